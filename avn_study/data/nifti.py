"""NIfTI reading that reads whole files, reorientation to RAS and writing back in the input geometry.

nibabel reads only the bytes it needs and never checks the gzip CRC, so a damaged ``.nii.gz`` can load
silently. :func:`read_nifti` decompresses the whole stream with zlib (which checks CRC32 and length)
and builds the image from those bytes, so every reader in avn-study sees the same, checked data.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from avn_study.data.problems import Problem
from avn_study.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_RAS = nio.axcodes2ornt(("R", "A", "S"))


class NiftiReadError(DataError):
    """A NIfTI file could not be read whole; the message names the file."""


def gunzip_strict(data: bytes, path: Path) -> tuple[bytes, int]:
    """Decompress every gzip member of ``data``, checking CRC and length.

    Args:
        data: the compressed file contents.
        path: the file, for messages.

    Returns:
        The decompressed bytes and the number of trailing zero bytes that followed the last member
        (gzip(1) tolerates zero padding; callers may warn about it).

    Raises:
        NiftiReadError: a corrupt stream, a bad CRC or length, a truncated file or non-zero trailing data.
    """
    view = memoryview(data)
    pos, chunks = 0, []
    while True:
        if bytes(view[pos : pos + 2]) != _GZIP_MAGIC:
            raise NiftiReadError(f"{path}: not a gzip stream at byte {pos} (expected a .nii.gz file)")
        dec = zlib.decompressobj(wbits=31)
        try:
            chunks.append(dec.decompress(view[pos:]))
        except zlib.error as err:
            raise NiftiReadError(f"{path}: corrupt gzip data ({err}); the file is damaged") from None
        if not dec.eof:
            raise NiftiReadError(
                f"{path}: truncated: the gzip stream ends before its end marker "
                f"(file has {len(data)} bytes; was the copy interrupted?)"
            )
        rest = dec.unused_data
        if not rest:
            return b"".join(chunks), 0
        if rest[:2] == _GZIP_MAGIC:
            pos = len(data) - len(rest)
            continue
        if rest.count(0) == len(rest):
            return b"".join(chunks), len(rest)
        raise NiftiReadError(f"{path}: {len(rest)} bytes of trailing garbage after the gzip stream")


@dataclass(frozen=True)
class RawNifti:
    """A NIfTI image read from fully checked bytes."""

    path: Path
    image: nib.Nifti1Image  # a Nifti1Image or Nifti2Image built from the bytes
    stored_header: nib.Nifti1Header  # the header exactly as stored (nibabel fixes some fields on load)
    trailing_zero_bytes: int  # zero padding after the gzip stream (tolerated, reported by verify)
    extra_bytes: int  # bytes beyond the voxel data the header announces


def read_nifti(path: str | Path) -> RawNifti:
    """Read a ``.nii`` or ``.nii.gz`` file whole and check that it holds all the voxel data.

    Raises:
        NiftiReadError: unreadable, damaged, truncated or not a NIfTI file; the message names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise NiftiReadError(f"{path}: cannot be read ({err.strerror})") from None
    trailing = 0
    if path.name.endswith(".gz"):
        data, trailing = gunzip_strict(data, path)
    if len(data) < 348:
        raise NiftiReadError(f"{path}: {len(data)} bytes is too short for a NIfTI header (348 bytes)")
    klass = nib.Nifti2Image if _sizeof_hdr(data) == 540 else nib.Nifti1Image
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # verify reports header problems itself
            stored = klass.header_class(data[: klass.header_class.template_dtype.itemsize], check=False)
            image = klass.from_bytes(data)
    except Exception as err:  # nibabel raises many types for a bad header
        raise NiftiReadError(f"{path}: not a valid NIfTI file ({err})") from None
    header = image.header
    needed = int(image.dataobj.offset) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if len(data) < needed:
        raise NiftiReadError(f"{path}: truncated voxel data: header needs {needed} bytes, the file holds {len(data)}")
    return RawNifti(path, image, stored, trailing, len(data) - needed)


def _sizeof_hdr(data: bytes) -> int:
    little = int.from_bytes(data[:4], "little")
    return little if little in (348, 540) else int.from_bytes(data[:4], "big")


@dataclass(frozen=True)
class Geometry:
    """Where a volume came from, so arrays in RAS can be written back exactly as the input was stored.

    Attributes:
        shape: the stored array shape (3D).
        affine: the stored voxel-to-world affine.
        ornt: the nibabel orientation transform from stored axes to RAS axes.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray

    @classmethod
    def of(cls, shape: tuple[int, ...], affine: np.ndarray) -> Geometry:
        """The geometry of a stored array.

        Raises:
            DataError: an affine that maps no volume (non-finite values, a zero column, singular): the
                header is broken, and no orientation or spacing can be derived from it.
        """
        affine = np.asarray(affine, dtype=np.float64)
        columns = np.linalg.norm(affine[:3, :3], axis=0) if affine.shape == (4, 4) else np.zeros(3)
        if affine.shape != (4, 4) or not np.isfinite(affine).all() or (columns == 0).any():
            zero = [int(i) for i in np.flatnonzero(columns == 0)]
            raise DataError(f"the voxel-to-world affine is unusable (zero column(s) {zero} or non-finite values): "
                            f"{np.round(affine[:3], 4).tolist()}")  # fmt: skip
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12 * float(np.prod(columns)):
            raise DataError(f"the voxel-to-world affine is singular (its axes are not independent): "
                            f"{np.round(affine[:3], 4).tolist()}")  # fmt: skip
        ornt = nio.io_orientation(affine)
        return cls(tuple(int(s) for s in shape[:3]), affine, ornt)

    @property
    def obliquity_deg(self) -> float:
        """The largest angle between a voxel axis and the world axis it is read as (0 for a plain scan)."""
        directions = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        cosines = np.abs(directions).max(axis=0).clip(-1.0, 1.0)
        return float(np.degrees(np.arccos(cosines)).max())

    @property
    def acquisition_plane(self) -> str:
        """``coronal``, ``axial`` or ``sagittal``: the plane across the thickest voxel axis (slices of a 2D
        acquisition are thicker than their in-plane pixels); ``isotropic`` when no axis is 25 % thicker than
        the thinnest (a 3D acquisition that can be sliced in any plane)."""
        spacing = self.ras_spacing
        if max(spacing) < 1.25 * min(spacing):
            return "isotropic"
        return ("sagittal", "coronal", "axial")[int(np.argmax(spacing))]

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """The stored orientation, e.g. ``('L', 'P', 'S')``."""
        return nio.aff2axcodes(self.affine)

    @property
    def ras_affine(self) -> np.ndarray:
        """The affine of the array after :meth:`to_ras`."""
        return self.affine @ nio.inv_ornt_aff(self.ornt, self.shape)

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[int(ax)] for ax in np.argsort(self.ornt[:, 0]))

    @property
    def ras_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the R, A and S array axes after :meth:`to_ras`."""
        return tuple(float(v) for v in np.linalg.norm(self.ras_affine[:3, :3], axis=0))

    def to_ras(self, array: np.ndarray) -> np.ndarray:
        """Permute and flip a stored-orientation array into RAS axis order (no resampling)."""
        assert array.shape[:3] == self.shape, (array.shape, self.shape)
        return nio.apply_orientation(array, self.ornt)

    def from_ras(self, array: np.ndarray) -> np.ndarray:
        """Invert :meth:`to_ras`: an array in RAS order back to the stored shape and orientation."""
        assert array.shape[:3] == self.ras_shape, (array.shape, self.ras_shape)
        return nio.apply_orientation(array, nio.ornt_transform(_RAS, self.ornt))


def volume_array(image: nib.Nifti1Image) -> np.ndarray:
    """The float32 voxel array (scaling applied) of a 3D image, or a 4D image with a singleton last axis.

    Raises:
        DataError: any other dimensionality.
    """
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        return image.get_fdata(dtype=np.float32)[..., 0]
    if len(shape) != 3:
        raise DataError(f"expected a 3D volume (or 4D with a singleton last axis), got shape {shape}")
    return image.get_fdata(dtype=np.float32)


def load_ras(path: str | Path, refuse_repairs: bool = False) -> tuple[np.ndarray, Geometry]:
    """Read a NIfTI file whole and return its float32 array in RAS order and its original geometry.

    ``refuse_repairs``: refuse a header field that nibabel would silently replace on load (a voxel size
    of 0 read as 1, say; see :func:`header_repairs`), since the geometry would then not be the file's.

    Raises:
        NiftiReadError: an unreadable or damaged file, an unusable affine, or (``refuse_repairs``) a
            repaired header field; the message names the file.
    """
    raw = read_nifti(path)
    if refuse_repairs:
        repaired = [p.message for p in header_repairs(raw) if p.severity == "error"]
        if repaired:
            raise NiftiReadError(f"{raw.path}: {'; '.join(repaired)}")
    try:
        array = volume_array(raw.image)
        geometry = Geometry.of(array.shape, raw.image.affine)
    except DataError as err:
        raise NiftiReadError(f"{raw.path}: {err}") from None
    return geometry.to_ras(array), geometry


def save_in_geometry(array_ras: np.ndarray, geometry: Geometry, path: str | Path, dtype: type = np.uint8) -> Path:
    """Write an array given in RAS order back in the input's own shape, orientation and affine."""
    stored = geometry.from_ras(np.asarray(array_ras)).astype(dtype, copy=False)
    return write_nifti(stored, geometry.affine, path)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a NIfTI-1 file with both qform and sform set to ``affine`` (code 1, scanner)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return path


# ------------------------------------------------------------------ header fields nibabel repairs
_REPAIRABLE = ("sizeof_hdr", "dim", "datatype", "bitpix", "pixdim", "qform_code", "sform_code", "magic")


def header_repairs(raw: RawNifti) -> list[Problem]:
    """Fields whose stored value nibabel replaced when loading, each with the raw and the repaired value."""
    stored, loaded = raw.stored_header, raw.image.header
    if type(stored) is not type(loaded):
        return []
    problems = []
    for field in _REPAIRABLE:
        before, after = np.asarray(stored[field]), np.asarray(loaded[field])
        if before.shape == after.shape and np.array_equal(before, after, equal_nan=before.dtype.kind == "f"):
            continue
        if field == "pixdim" and np.array_equal(before[1:], after[1:]) and float(before[0]) == 0.0:
            problems.append(Problem(raw.path, "header qfac (pixdim[0]) is 0; read as 1 as the NIfTI standard says",
                                    "warning"))  # fmt: skip
            continue
        problems.append(Problem(
            raw.path, f"header field '{field}' holds an invalid value {_show(before)}, which nibabel would silently "
            f"replace by {_show(after)}; fix the header (geometry is not compared until then)",
        ))  # fmt: skip
    return problems


def _show(value: np.ndarray) -> str:
    return repr(value.item()) if value.size == 1 else str(np.round(value.astype(float), 6).tolist())
