"""The content-hashed cache: reuse, invalidation, memory mapping and concurrent builders."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from conftest import write_toy_case

from avn_study.data.cache import build_cache, cohort_fingerprint
from avn_study.data.preprocess import PreprocessConfig

CONFIG = PreprocessConfig(inplane_spacing_mm=3.0)


def test_cache_entries_are_memory_mapped_and_slice_major(toy_cohort: Path, cache_dir: Path) -> None:
    cases = build_cache(toy_cohort, CONFIG, cache_dir)
    assert [c.case_id for c in cases] == ["toy_000", "toy_001", "toy_002"]
    case = cases[0]
    assert isinstance(case.image, np.memmap)
    assert case.image.shape == (6, 16, 13)  # (A, R, S): 24 x 2 mm -> 16 x 3 mm; 20 x 2 mm -> 13 x 3 mm
    assert case.spacing[1] == 4.0
    assert case.image.flags.c_contiguous and case.label.dtype == np.uint8
    assert [c.has_necrosis for c in cases] == [True, True, False]


def test_reorientation_makes_equal_cases_equal(toy_cohort: Path, cache_dir: Path) -> None:
    """toy_001 is stored LPS; after RAS reorientation its label equals a RAS-stored twin."""
    write_toy_case(toy_cohort, "toy_003", 1, axcodes="RAS")
    spec = json.loads((toy_cohort / "dataset.json").read_text())
    spec["numTraining"] = 4
    spec["patients"]["toy_003"] = "P3"
    (toy_cohort / "dataset.json").write_text(json.dumps(spec))
    cases = {c.case_id: c for c in build_cache(toy_cohort, CONFIG, cache_dir)}
    assert np.array_equal(cases["toy_001"].label, cases["toy_003"].label)
    assert np.allclose(cases["toy_001"].image, cases["toy_003"].image)


def test_cache_is_reused_and_invalidated(toy_cohort: Path, cache_dir: Path) -> None:
    first = build_cache(toy_cohort, CONFIG, cache_dir)
    again = build_cache(toy_cohort, CONFIG, cache_dir)
    assert [c.path for c in first] == [c.path for c in again]
    other_params = build_cache(toy_cohort, PreprocessConfig(inplane_spacing_mm=2.0), cache_dir)
    assert all(a.path != b.path for a, b in zip(first, other_params, strict=True))
    write_toy_case(toy_cohort, "toy_002", 7, necrosis=False)  # same name, new contents
    changed = build_cache(toy_cohort, CONFIG, cache_dir)
    assert [c.path for c in changed[:2]] == [c.path for c in first[:2]]
    assert changed[2].path != first[2].path
    assert cohort_fingerprint(changed) != cohort_fingerprint(first)


def _build(args: tuple[str, str]) -> list[str]:
    cases = build_cache(args[0], CONFIG, args[1])
    return [str(c.path) for c in cases] + [str(float(np.asarray(c.image).sum())) for c in cases]


def test_concurrent_builders_agree(toy_cohort: Path, cache_dir: Path) -> None:
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_build, [(str(toy_cohort), str(cache_dir))] * 8)
    assert all(r == results[0] for r in results)
    entries = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert len(entries) == 3, entries  # no duplicate and no leftover temporary folders


def test_cache_entry_of_identical_files_keeps_the_cohort_ids(tmp_path: Path, cache_dir: Path) -> None:
    from conftest import write_toy_cohort

    a = write_toy_cohort(tmp_path / "a")
    b = write_toy_cohort(tmp_path / "b", patients={f"toy_{i:03d}": "same" for i in range(3)})
    build_cache(a, CONFIG, cache_dir)
    assert {c.patient_id for c in build_cache(b, CONFIG, cache_dir)} == {"same"}


def test_cache_dir_from_environment(toy_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVN_STUDY_CACHE", str(tmp_path / "envcache"))
    cases = build_cache(toy_cohort, CONFIG)
    assert cases[0].path.parent == tmp_path / "envcache"
