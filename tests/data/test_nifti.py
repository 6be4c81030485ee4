"""Strict gzip reading, RAS reorientation and writing back in the input's own geometry."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from avn_study.data.nifti import (
    Geometry,
    NiftiReadError,
    gunzip_strict,
    load_ras,
    read_nifti,
    save_in_geometry,
    write_nifti,
)

PAYLOAD = bytes(range(256)) * 64
GZ = gzip.compress(PAYLOAD)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (GZ[:-4], "truncated"),
        (GZ[: len(GZ) // 2], "truncated"),
        (GZ[:-8] + b"\xff\xff\xff\xff" + GZ[-4:], "corrupt gzip data"),
        (GZ[:-4] + b"\x00\x00\x00\x00", "corrupt gzip data"),  # wrong length field
        (GZ + b"junk", "trailing garbage"),
        (b"BM" + GZ, "not a gzip stream"),
    ],
    ids=["cut_trailer", "cut_middle", "bad_crc", "bad_length", "garbage", "not_gzip"],
)
def test_gunzip_strict_rejects(data: bytes, fragment: str) -> None:
    with pytest.raises(NiftiReadError, match=fragment) as info:
        gunzip_strict(data, Path("x.nii.gz"))
    assert str(info.value).startswith("x.nii.gz: ")


def test_gunzip_strict_accepts_members_and_zero_padding() -> None:
    assert gunzip_strict(GZ + GZ, Path("x")) == (PAYLOAD + PAYLOAD, 0)
    assert gunzip_strict(GZ + b"\0" * 7, Path("x")) == (PAYLOAD, 7)


def test_nibabel_alone_misses_a_bad_crc(tmp_path: Path) -> None:
    """Why verify decompresses whole files: nib.load reads a damaged file without complaint."""
    path = write_nifti(np.arange(1000, dtype=np.int16).reshape(10, 10, 10), np.eye(4), tmp_path / "a.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[:-8] + b"\0\0\0\0" + data[-4:])
    np.asanyarray(nib.load(str(path)).dataobj)  # no error from nibabel
    with pytest.raises(NiftiReadError, match="corrupt gzip data"):
        read_nifti(path)


def test_read_nifti_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NiftiReadError, match="cannot be read"):
        read_nifti(tmp_path / "missing.nii.gz")


AXCODES = ["RAS", "LPS", "LAS", "RPI", "LSP", "PSL", "IRA"]


@pytest.mark.parametrize("axcodes", AXCODES)
def test_round_trip_in_original_geometry(tmp_path: Path, axcodes: str) -> None:
    rng = np.random.default_rng(0)
    ras = rng.integers(0, 3, size=(7, 5, 6)).astype(np.uint8)
    ras_affine = np.diag([0.9, 3.5, 1.1, 1.0])
    ras_affine[:3, 3] = [-40.0, 12.0, 7.5]
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(axcodes)))
    stored, stored_affine = nio.apply_orientation(ras, ornt), ras_affine @ nio.inv_ornt_aff(ornt, ras.shape)
    src = write_nifti(stored, stored_affine, tmp_path / "in.nii.gz")

    array, geometry = load_ras(src)
    assert np.array_equal(array, ras)
    assert np.allclose(geometry.ras_affine, ras_affine)
    assert geometry.ras_spacing == pytest.approx((0.9, 3.5, 1.1))
    assert "".join(geometry.axcodes) == axcodes

    out = save_in_geometry(array, geometry, tmp_path / "out.nii.gz")
    written = nib.load(str(out))
    assert np.array_equal(np.asanyarray(written.dataobj), stored)
    assert np.allclose(written.affine, stored_affine)
    assert written.shape == stored.shape


def test_world_coordinates_are_preserved_by_reorientation() -> None:
    affine = np.array([[-1.0, 0, 0, 50], [0, 0, -3.0, 20], [0, 1.2, 0, -8], [0, 0, 0, 1]])
    geometry = Geometry.of((6, 8, 4), affine)
    stored = np.zeros((6, 8, 4))
    stored[2, 5, 1] = 1
    ras = geometry.to_ras(stored)
    ras_index = np.argwhere(ras == 1)[0]
    world_stored = affine @ np.array([2, 5, 1, 1.0])
    world_ras = geometry.ras_affine @ np.array([*ras_index, 1.0])
    assert np.allclose(world_stored, world_ras)
