"""nnU-Net v2 as a baseline row: our patient-level folds, nnU-Net's own training, our metrics.

A space row ``{arm: nnunet_2d}`` (or ``nnunet_3d_fullres``) runs in stage 2 only, on the same folds and
seeds as every other row. A trial of it:

1. lays out nnU-Net's raw dataset for the cohort once per node (:func:`prepare_dataset`, under a file
   lock like the cache): images are links to the cohort's files, labels are the cohort's label map
   written as nnU-Net classes (``with_head``: 0 background / 1 femoral head / 2 necrosis, the supervision
   our full model gets; ``necrosis``: 0 / 1, the supervision of ``unet``), one ``DatasetNNN_AVN`` per
   cohort fingerprint and label choice; nnU-Net's fingerprinting, planning and preprocessing run once
   per configuration and are reused by every later trial;
2. gives nnU-Net *our* frozen split as ``splits_final.json`` (in a per-trial view of the preprocessed
   folder, so two studies with different splits of one cohort never share the file);
3. trains the trial's fold with a trainer whose epochs and iterations come from the row
   (``nnunet_epochs``, ``nnunet_iterations``, ``nnunet_val_iterations``; nnU-Net's 1000 x 250 / 50
   otherwise), reporting nnU-Net's own losses and pseudo Dice to Tune every epoch and checkpointing
   through Tune (``--resume`` continues like nnU-Net's ``--c``);
4. predicts the validation patients (and the split's held-out test patients) in their own geometry,
   brings each prediction onto the grid our trials are scored on exactly as a label file is cached,
   and scores it with :func:`avn_study.metrics.case.case_metrics`, so the per-case table, the paired
   statistics and the plots treat the row like ours.

nnU-Net is imported only here (and in :mod:`avn_study.baselines.nnunet.trainer`), never by the rest of the
package: ``pip install 'avn-study[nnunet]'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avn_study.config import TrainConfig
from avn_study.data.layout import DATASET_JSON, IMAGES_TR, IMAGES_TS, LABELS_TR
from avn_study.errors import DataError, UsageError, look_up
from avn_study.study.folder import NNUNET_CHECKPOINT
from avn_study.vocabulary import NNUNET_ARMS

EXTRA = "pip install 'avn-study[nnunet]'"
LABEL_CHOICES = ("with_head", "necrosis")
# the keys an nnU-Net row adds to the shared ones (folds, seed, grid, device)
NNUNET_KEYS = {
    "nnunet_epochs": (int, 1000),  # nnU-Net's defaults
    "nnunet_iterations": (int, 250),
    "nnunet_val_iterations": (int, 50),
    "nnunet_labels": (str, "with_head"),
    "nnunet_tta": (bool, True),  # nnU-Net's mirroring at prediction time
}
PREPARE_LOG = "prepare.log"  # one line per planning / preprocessing actually run on this node


def nnunet_installed() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def require_nnunet(where: str) -> None:
    """Raises UsageError naming the extra when nnU-Net v2 is not installed."""
    if not nnunet_installed():
        raise UsageError(f"{where}: nnU-Net rows need nnU-Net v2, which is not installed: {EXTRA}")


def is_nnunet(flat: dict[str, Any]) -> bool:
    return str(flat.get("arm", "")) in NNUNET_ARMS


@dataclass(frozen=True)
class NnUNetConfig:
    """One nnU-Net trial: the arm, its own settings, and the row's shared settings (``base``: fold,
    split, seed, the grid it is scored on, device and threads; its model and optimiser keys are unused)."""

    arm: str
    base: TrainConfig
    epochs: int = 1000
    iterations: int = 250
    val_iterations: int = 50
    labels: str = "with_head"
    tta: bool = True

    @property
    def configuration(self) -> str:
        return NNUNET_ARMS[self.arm]

    @classmethod
    def from_flat(cls, flat: dict[str, Any], *, source: str = "config") -> NnUNetConfig:
        """Split a flat row config into nnU-Net's keys and the shared ones (validated like any row).

        Raises:
            UsageError: a bad value, naming ``source`` and the key.
        """
        for key in flat:
            if key.startswith("nnunet_") and key not in NNUNET_KEYS:
                look_up(key, NNUNET_KEYS, what=f"key in {source}")
        own: dict[str, Any] = {}
        for key, (kind, default) in NNUNET_KEYS.items():
            value = flat.get(key, default)
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{source}: {key} must be an integer >= 1, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise UsageError(f"{source}: {key} must be true or false, got {value!r}")
            own[key] = value
        if own["nnunet_labels"] not in LABEL_CHOICES:
            raise UsageError(f"{source}: nnunet_labels must be one of {', '.join(LABEL_CHOICES)}, "
                             f"got {own['nnunet_labels']!r}")  # fmt: skip
        for key in flat:  # our model's and optimiser's keys may be there (the space's fixed): unused
            if key not in NNUNET_KEYS and key != "arm":
                look_up(key, [*TrainConfig.flat_keys(), *NNUNET_KEYS], what=f"key in {source}")
        base = TrainConfig.from_flat({k: v for k, v in flat.items() if k in SHARED_KEYS}, source=source)
        return cls(str(flat["arm"]), base, own["nnunet_epochs"], own["nnunet_iterations"],
                   own["nnunet_val_iterations"], own["nnunet_labels"], own["nnunet_tta"])  # fmt: skip

    def to_flat(self) -> dict[str, Any]:
        shared = {k: v for k, v in self.base.to_flat().items() if k in SHARED_KEYS}
        own = {"nnunet_epochs": self.epochs, "nnunet_iterations": self.iterations, "nnunet_tta": self.tta,
               "nnunet_val_iterations": self.val_iterations, "nnunet_labels": self.labels}  # fmt: skip
        return {"arm": self.arm, **shared, **own}


# what of a row's shared config an nnU-Net trial uses (recorded in its resolved config)
SHARED_KEYS = ("fold", "n_folds", "split_seed", "inner_fold", "inplane_spacing_mm", "seed", "device", "threads")


# ------------------------------------------------------------------ the dataset, once per node
def dataset_id(fingerprint: str) -> int:
    """A stable nnU-Net dataset id (500..999) for a cohort fingerprint."""
    return 500 + int(fingerprint[:8], 16) % 500


@dataclass(frozen=True)
class NnUNetDataset:
    root: Path  # holds raw/ and preprocessed/ of this cohort and label choice
    name: str  # DatasetNNN_AVN

    @property
    def raw(self) -> Path:
        return self.root / "raw" / self.name

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed" / self.name


@contextlib.contextmanager
def nnunet_paths(raw: Path, preprocessed: Path, results: Path, data_workers: int) -> Iterator[None]:
    """nnU-Net reads its folders (and its data-augmentation worker count) from the environment."""
    values = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed), "nnUNet_results": str(results),
              "nnUNet_n_proc_DA": str(data_workers)}  # fmt: skip
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # a filesystem without links: a copy
        shutil.copyfile(source, target)


def _write_raw(
    cohort: Any, cases: list[Any], labels: str, target: Path, held_out: frozenset[str] = frozenset()
) -> None:
    """nnU-Net's raw layout of ``cases`` (labelled cohort cases) in ``target`` (a fresh folder); the
    ``held_out`` cases (the split's test set) go to ``imagesTs`` without labels, so that nnU-Net's
    fingerprint, plans and normalisation never see them."""
    import nibabel as nib

    (target / IMAGES_TR).mkdir(parents=True)
    (target / LABELS_TR).mkdir()
    (target / IMAGES_TS).mkdir()
    ending = cohort.file_ending
    label_map = cohort.label_map
    for case in [c for c in cases if c.case_id in held_out]:
        for k, image in enumerate(case.images):
            _link(image, target / IMAGES_TS / f"{case.case_id}_{k:04d}{ending}")
    cases = [c for c in cases if c.case_id not in held_out]
    for case in cases:
        for k, image in enumerate(case.images):
            _link(image, target / IMAGES_TR / f"{case.case_id}_{k:04d}{ending}")
        source = nib.load(case.label)
        canonical = label_map.canonical(np.asarray(source.dataobj))
        if labels == "necrosis":
            canonical = (canonical == 2).astype(np.uint8)
        header = source.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        nib.save(nib.Nifti1Image(canonical, source.affine, header), target / LABELS_TR / f"{case.case_id}{ending}")
    classes = {"background": 0, "femoral_head": 1, "necrosis": 2} if labels == "with_head" else \
        {"background": 0, "necrosis": 1}  # fmt: skip
    spec = {"channel_names": {str(i): name for i, name in enumerate(cohort.channels)}, "labels": classes,
            "numTraining": len(cases), "file_ending": ending}  # fmt: skip
    (target / DATASET_JSON).write_text(json.dumps(spec, indent=1))


def cohort_files_fingerprint(cohort: Any) -> str:
    """The identity of a cohort's labelled files (contents, case and patient ids) and its label map."""
    from avn_study.data.cache import file_digest

    digest = hashlib.sha256(cohort.label_map.key().encode())
    for case in sorted(cohort.cases, key=lambda c: c.case_id):
        files = ",".join(file_digest(p) for p in (*case.images, case.label))
        digest.update(f"{case.case_id}:{case.patient_id}:{files}\n".encode())
    return digest.hexdigest()


def prepare_dataset(data_root: str | Path, configuration: str, labels: str, cache_dir: str | Path | None = None,
                    processes: int = 1, held_out: tuple[str, ...] = ()) -> NnUNetDataset:  # fmt: skip
    """nnU-Net's raw dataset, plans and ``configuration``'s preprocessed data for a cohort on this node.

    Made once per node, cohort fingerprint, label choice and held-out set, under a file lock: a second
    trial that starts meanwhile waits and reuses them (each step run is one line of ``ROOT/prepare.log``).
    The ``held_out`` cases (the split's test set) are left out of what nnU-Net plans and preprocesses
    from. Planning per outer fold is not done: nnU-Net plans once per dataset, so the reported folds'
    patients do take part in its (label-free) intensity and spacing statistics, as in nnU-Net's own
    cross-validation (docs/nnunet.md).

    Raises:
        DataError: ``with_head`` on a cohort without femoral head labels.
    """
    from avn_study.data.cache import default_cache_dir, file_lock
    from avn_study.data.layout import open_cohort

    cohort = open_cohort(data_root)  # (the caller has verified its cases: cohort_split)
    if labels == "with_head" and not cohort.label_map.has_head:
        raise DataError(f"{data_root}: nnunet_labels: with_head needs femoral head labels, but the cohort labels "
                        f"none ({DATASET_JSON}); use nnunet_labels: necrosis")  # fmt: skip
    held = sorted(held_out)
    fingerprint = hashlib.sha256(f"{cohort_files_fingerprint(cohort)}:{labels}:{json.dumps(held)}".encode()).hexdigest()
    root = Path(cache_dir or default_cache_dir()) / "nnunet" / f"{fingerprint[:16]}"
    dataset = NnUNetDataset(root, f"Dataset{dataset_id(fingerprint):03d}_AVN")
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".prepare.lock"):
        log = root / PREPARE_LOG
        if not (dataset.raw / DATASET_JSON).is_file():
            partial = Path(tempfile.mkdtemp(prefix=".raw-", dir=root))
            try:  # written aside, then renamed: a layout is complete or absent
                _write_raw(cohort, cohort.cases, labels, partial / "d", frozenset(held))
                (root / "raw").mkdir(exist_ok=True)
                os.rename(partial / "d", dataset.raw)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            _log(
                log,
                f"raw {dataset.name} ({len(cohort.cases) - len(held)} cases, {len(held)} held out, labels {labels})",
            )
        marker = dataset.preprocessed / f".avn-preprocessed-{configuration}"
        if not marker.is_file():
            _plan_and_preprocess(dataset, configuration, processes, log)
            marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return dataset


def _log(path: Path, line: str) -> None:
    with path.open("a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {line}\n")


@contextlib.contextmanager
def _pools_spawn_their_workers():
    """Python's default worker start method is ``spawn`` inside: nnU-Net starts its own pools with
    ``spawn`` but lists the raw files with a default ``Pool``, whose forked workers can hang for ever in a
    process that runs threads (a Ray worker, a driver with Ray up) when they inherit a held lock."""
    import multiprocessing

    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(before, force=True)


def _plan_and_preprocess(dataset: NnUNetDataset, configuration: str, processes: int, log: Path) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    number = int(dataset.name[7:10])
    paths = nnunet_paths(dataset.root / "raw", dataset.root / "preprocessed", dataset.root / "results", processes)
    with paths, _pools_spawn_their_workers():
        if not (dataset.preprocessed / "nnUNetPlans.json").is_file():
            start = time.perf_counter()
            extract_fingerprints([number], num_processes=processes, check_dataset_integrity=True, clean=True,
                                 verbose=False)  # fmt: skip
            plan_experiments([number])
            _log(log, f"planned {dataset.name} in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        preprocess([number], configurations=(configuration,), num_processes=(processes,), verbose=False)
        _log(log, f"preprocessed {dataset.name} {configuration} in {time.perf_counter() - start:.1f} s")


def splits_final(splits: Any) -> list[dict[str, list[str]]]:
    """Our frozen patient-level split as nnU-Net's ``splits_final.json`` (test patients in no fold)."""
    return [{"train": sorted(splits.fold(k).train), "val": sorted(splits.fold(k).val)} for k in range(splits.k)]


def trial_view(dataset: NnUNetDataset, splits: Any, work: Path) -> Path:
    """A preprocessed-data folder for one trial: links to the node's shared data and our ``splits_final.json``."""
    view = work / "preprocessed" / dataset.name
    view.mkdir(parents=True)
    for entry in dataset.preprocessed.iterdir():
        if entry.name != "splits_final.json":
            os.symlink(entry, view / entry.name)
    (view / "splits_final.json").write_text(json.dumps(splits_final(splits), indent=1))
    return view


# ------------------------------------------------------------------ scoring on our grid
def prediction_on_grid(path: Path, case: Any, labels: str) -> np.ndarray:
    """An nnU-Net segmentation file (voxel for voxel on the case's scan) as a necrosis mask on the case's
    cached grid, resampled exactly as a label file is when cached (``(A, R, S)``, like ``case.label``).

    The voxels are oriented with the geometry the cache read from the scan itself, not with the header
    nnU-Net's writer made, so a scan whose header two readers would interpret differently is still
    scored voxel for voxel.

    Raises:
        DataError: the prediction is not on the scan's voxel grid.
    """
    import nibabel as nib

    from avn_study.data.labels import LABELS
    from avn_study.data.nifti import Geometry
    from avn_study.data.preprocess import resample_labels

    source = case.meta["source"]
    seg = np.rint(np.asarray(nib.load(path).dataobj)).astype(np.int64)
    if tuple(seg.shape) != tuple(source["shape"]):
        raise DataError(f"{path}: the nnU-Net prediction has shape {tuple(seg.shape)}, but the scan of case "
                        f"{case.case_id} ({source['image']}) has {tuple(source['shape'])}")  # fmt: skip
    seg = Geometry.of(tuple(source["shape"]), np.array(source["affine"])).to_ras(seg)
    canonical = seg if labels == "with_head" else np.where(seg == 1, LABELS["necrosis"], 0)
    shape = (case.image.shape[1], case.image.shape[0], case.image.shape[2])
    on_grid = resample_labels(canonical.astype(np.uint8), shape)
    return np.moveaxis(on_grid, 1, 0) == LABELS["necrosis"]


def score(predictions: dict[str, Path], cases: list[Any], labels: str) -> list[dict[str, Any]]:
    """Per-case metrics of nnU-Net's predictions with our metrics module, as our trials compute them."""
    from avn_study.data.labels import LABELS
    from avn_study.metrics.case import case_metrics

    rows = []
    for case in cases:
        pred = prediction_on_grid(predictions[case.case_id], case, labels)
        ref = np.asarray(case.label) == LABELS["necrosis"]
        spacing = (case.spacing[1], case.spacing[0], case.spacing[2])  # cached arrays are (A, R, S)
        rows.append({"case": case.case_id, "patient": case.patient_id, **case_metrics(pred, ref, spacing)})
    return rows


# ------------------------------------------------------------------ one trial
@dataclass
class EpochHooks:
    """What the trainer calls at each epoch's end (``report``) and when it wants a checkpoint saved."""

    report: Callable[[dict[str, Any], Path | None], None]
    checkpoint_every: int = 1


def run_trial(cfg: NnUNetConfig, data_root: str | Path, cache_dir: str | Path | None, frozen_split: dict | None,
              work: Path, hooks: EpochHooks, resume_from: Path | None = None, processes: int = 1,
              test: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train and score one nnU-Net trial in ``work`` (a fresh folder of the caller's).

    Returns:
        ``val`` and ``test``: per-case rows (our metrics); ``record``: nnU-Net's last epoch; ``n_parameters``;
        ``plans``: the configuration nnU-Net planned; ``split_hash``, ``data_fingerprint``; and what is
        worth keeping in the trial folder: ``splits_final`` (the file nnU-Net read), ``output_folder``
        (its logs), ``predictions`` (a folder of ``{case}.nii.gz``), ``checkpoint`` (the trained state).
    """
    import random

    import torch

    from avn_study.data.cache import cohort_fingerprint
    from avn_study.models.runtime import resolve_device
    from avn_study.training.fold import cohort_split

    require_nnunet("arm " + cfg.arm)
    if cfg.base.data.inner_fold >= 0:
        raise UsageError(f"arm {cfg.arm}: nnU-Net rows run in stage 2 only (on outer folds), not on inner folds")
    cases, splits = cohort_split(data_root, cfg.base, cache_dir, None, frozen_split)
    dataset = prepare_dataset(data_root, cfg.configuration, cfg.labels, cache_dir, processes, tuple(splits.test))
    view = trial_view(dataset, splits, work)
    fold = splits.fold(cfg.base.data.fold)
    by_id = {c.case_id: c for c in cases}
    seed = cfg.base.runtime.seed
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    device = resolve_device(cfg.base.runtime.device)
    from avn_study.baselines.nnunet.trainer import build_trainer, predict_cases, save_state

    with nnunet_paths(dataset.root / "raw", view.parent, work / "results", max(0, processes - 1)):
        trainer = build_trainer(view, cfg, device, hooks, resume_from)
        trainer.run_training()
        save_state(trainer, work / NNUNET_CHECKPOINT)  # the trial's last checkpoint
        raw = dataset.raw
        held = set(splits.test)
        images = {c: [raw / (IMAGES_TS if c in held else IMAGES_TR) / f"{c}_{k:04d}{_ending(raw)}"
                      for k in range(by_id[c].n_channels)] for c in [*fold.val, *splits.test]}  # fmt: skip
        out = work / "predictions"
        val = predict_cases(trainer, {c: images[c] for c in fold.val}, out, cfg.tta)
        tests = predict_cases(trainer, {c: images[c] for c in splits.test}, out, cfg.tta) if test else {}
    return {
        "val": score(val, [by_id[c] for c in fold.val], cfg.labels),
        "test": score(tests, [by_id[c] for c in splits.test], cfg.labels) if tests else [],
        "record": trainer.avn_last_record,
        "n_parameters": sum(p.numel() for p in trainer.network.parameters()),
        "plans": trainer.configuration_manager.configuration,
        "splits_final": view / "splits_final.json",
        "split_hash": splits.hash,
        "data_fingerprint": cohort_fingerprint(cases),
        "output_folder": Path(trainer.output_folder),
        "predictions": out,
        "checkpoint": work / NNUNET_CHECKPOINT,
        "dataset": dataset,
    }


def _ending(raw: Path) -> str:
    return json.loads((raw / DATASET_JSON).read_text())["file_ending"]
