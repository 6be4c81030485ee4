"""Shared fixtures: toy cohorts written by hand (fast, exact) and a tiny phantom cohort."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from avn_study.data.layout import write_dataset_json
from avn_study.data.nifti import write_nifti

TOY_SHAPE = (24, 6, 20)  # RAS voxels
TOY_SPACING = (2.0, 4.0, 2.0)  # mm


def toy_volumes(index: int, necrosis: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A box 'pelvis' with two spherical femoral heads and, optionally, a lesion in the right one."""
    rng = np.random.default_rng(index)
    x, y, z = np.meshgrid(*[np.arange(n) * s for n, s in zip(TOY_SHAPE, TOY_SPACING, strict=True)], indexing="ij")
    label = np.zeros(TOY_SHAPE, np.uint8)
    for cx in (14.0, 32.0):
        label[(x - cx) ** 2 + (y - 10) ** 2 + (z - 20) ** 2 <= 7.5**2] = 1
    if necrosis:
        label[((x - 16) ** 2 + (y - 10) ** 2 + (z - 23) ** 2 <= 3.5**2) & (label == 1)] = 2
    image = np.where(label == 1, 300.0, np.where(label == 2, 90.0, 120.0)) + rng.normal(0, 5, TOY_SHAPE)
    image[:2] = 0  # a little air
    return image.astype(np.int16), label


def write_toy_case(root: Path, case: str, index: int, axcodes: str = "RAS", necrosis: bool = True) -> None:
    image, label = toy_volumes(index, necrosis)
    affine = np.diag([*TOY_SPACING, 1.0])
    affine[:3, 3] = [-20.0, 5.0, -10.0]
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(axcodes)))
    affine = affine @ nio.inv_ornt_aff(ornt, TOY_SHAPE)
    write_nifti(nio.apply_orientation(image, ornt), affine, root / "imagesTr" / f"{case}_0000.nii.gz")
    write_nifti(nio.apply_orientation(label, ornt), affine, root / "labelsTr" / f"{case}.nii.gz")


def write_toy_cohort(root: Path, n: int = 3, patients: dict[str, str] | None = None) -> Path:
    """``n`` toy cases ``toy_000...``; case 1 is stored LPS; the last case is healthy."""
    cases = [f"toy_{i:03d}" for i in range(n)]
    for i, case in enumerate(cases):
        write_toy_case(root, case, i, axcodes="LPS" if i == 1 else "RAS", necrosis=i < n - 1)
    write_dataset_json(root, patients or {c: f"P{i}" for i, c in enumerate(cases)})
    return root


@pytest.fixture
def toy_cohort(tmp_path: Path) -> Path:
    return write_toy_cohort(tmp_path / "toy")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-patient phantom cohort at the tiny size (shared, read-only for tests)."""
    from avn_study.data.phantom import PhantomConfig, write_cohort

    return write_cohort(tmp_path_factory.mktemp("phantom"), cases=6, seed=3, config=PhantomConfig.tiny())


def read_spec(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def load_stored(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


@pytest.fixture(scope="module")
def ray_2cpus():
    """A local Ray with 2 CPUs for one test module (shut down after it, so other modules can start a cluster)."""
    import ray

    from avn_study.study.driver import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private tiny phantom cohort for sweeps."""
    from avn_study.data.phantom import PhantomConfig, write_cohort

    return write_cohort(tmp_path_factory.mktemp("sweep") / "cohort", cases=6, seed=3, config=PhantomConfig.tiny())


def small_space(tmp_path: Path, **changes: object) -> Path:
    """search_spaces/smoke.yaml with changes, written to tmp_path/space.yaml."""
    import yaml

    base = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "smoke.yaml").read_text())
    base.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def smoke_experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke fair ablation with two seeds (study folder), shared read-only by the analysis,
    report, notebook, export and predict tests. It runs in a subprocess with its own Ray, so it does
    not collide with the modules that start a local Ray or a two-node cluster."""
    import subprocess
    import sys

    from avn_study.data.phantom import PhantomConfig, write_cohort

    work = tmp_path_factory.mktemp("experiment")
    cohort = write_cohort(work / "cohort", cases=6, seed=3, config=PhantomConfig.tiny())
    space = small_space(work, seeds=[0, 1])
    command = [sys.executable, "-m", "avn_study", "sweep", str(space), "--data", str(cohort),
               "--storage", str(work / "storage"), "--num-cpus", "2", "--quiet",
               "--track", "tensorboard", "--track", "mlflow"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default: STUDY/mlflow.db
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "storage" / "smoke"


@pytest.fixture(scope="session")
def nested_experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke *nested* ablation (concurrent rows) with a held-out test set and two seeds, each with
    its own search, run in a subprocess like ``smoke_experiment``: 10 patients, 2 of them held out, 3 outer
    folds x 2 inner folds."""
    import subprocess
    import sys

    from avn_study.cli.commands import main
    from avn_study.data.phantom import PhantomConfig, write_cohort

    work = tmp_path_factory.mktemp("nested")
    cohort = write_cohort(work / "cohort", cases=10, seed=3, config=PhantomConfig.tiny())
    assert main(["split", str(cohort), "--folds", "3", "--test-fraction", "0.2"]) == 0
    space = small_space(
        work,
        name="nested",
        protocol="nested_ablation",
        folds=[0, 1, 2],
        inner_folds=2,
        seeds=[0, 1],
        search_per_seed=True,
        concurrent_rows=True,
    )  # fmt: skip (12 searches in one experiment: a search per row, outer fold and seed)
    command = [sys.executable, "-m", "avn_study", "sweep", str(space), "--data", str(cohort),
               "--storage", str(work / "storage"), "--num-cpus", "2", "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "storage" / "nested"


class Payload:
    """Unpickling this creates ``marker``: proof that somebody unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(Payload(marker)))
    return path
