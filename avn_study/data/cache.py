"""Content-hashed preprocessing cache, one per node.

An entry's key hashes the bytes of the case's image and label files, the preprocessing parameters and
:data:`CACHE_VERSION`, so changing a file or a parameter makes a new entry and stale ones are never
read. Arrays are ``.npy`` files stored slice-major ``(A, R, S)`` so a coronal slice is one contiguous
read, and they are opened memory-mapped: a 200-case cohort does not have to fit in RAM.

Several processes (Ray trials on one node) may build the cache at once: each entry is built under an
``fcntl`` lock in a private temporary folder and moved into place with one atomic ``rename``; an entry
folder that exists is complete.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from avn_study.data.labels import CANONICAL, LABELS, LabelMap
from avn_study.data.layout import CaseFiles, Cohort, open_cohort
from avn_study.data.preprocess import (
    PreprocessConfig,
    head_distance_mm,
    inplane_shape,
    normalise,
    resample_inplane_to,
    resample_labels,
    resampled_affine,
)
from avn_study.data.problems import Problem, format_problems
from avn_study.data.verify import CaseVolumes, check_case, check_unlabelled
from avn_study.errors import DataError

CACHE_VERSION = 1  # bump when the preprocessing code changes what it writes
_ARRAYS = ("image", "label", "head_dist")


def default_cache_dir() -> Path:
    """``$AVN_STUDY_CACHE`` or ``~/.cache/avn-study``: local to the node, shared by its processes."""
    env = os.environ.get("AVN_STUDY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "avn-study"


_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC)  # ENOTDIR: a file on its path


def unwritable_cache(cache_dir: Path, err: OSError) -> DataError | None:
    """The message for a cache folder that cannot be written (read-only, immutable, not ours), or None when
    ``err`` is about something else (a file outside the cache, another kind of failure)."""
    if err.errno not in _UNWRITABLE or not err.filename:
        return None
    where, root = Path(str(err.filename)).absolute(), Path(cache_dir).absolute()
    if not (where == root or root in where.parents or where in root.parents):  # (a parent made by mkdir)
        return None
    return DataError(f"{cache_dir}: the preprocessing cache cannot be written ({err.strerror}: {err.filename}); set "
                     "AVN_STUDY_CACHE (or pass --cache-dir) to a writable folder on this node")  # fmt: skip


def _cache_case_or_explain(case: CaseFiles, config: PreprocessConfig, cache_dir: Path,
                           label_map: LabelMap = CANONICAL) -> tuple[CachedCase | None, list[Problem]]:  # fmt: skip
    try:
        return cache_case(case, config, cache_dir, label_map)
    except OSError as err:
        explained = unwritable_cache(cache_dir, err)
        if explained is None:
            raise
        raise explained from None


@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case; arrays are memory-mapped on first access, shape ``(A, R, S)``."""

    path: Path
    meta: dict

    @property
    def case_id(self) -> str:
        return self.meta["case_id"]

    @property
    def patient_id(self) -> str:
        return self.meta["patient_id"]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along R, A, S."""
        return tuple(self.meta["spacing"])

    @property
    def has_necrosis(self) -> bool:
        return any(self.meta["slice_has_necrosis"])

    @property
    def has_head_labels(self) -> bool:
        """Whether the cohort labels femoral heads (without them the localisation target is meaningless)."""
        return bool(self.meta.get("has_head_labels", True))

    @cached_property
    def image(self) -> np.ndarray:
        return np.load(self.path / "image.npy", mmap_mode="r")

    @cached_property
    def label(self) -> np.ndarray:
        return np.load(self.path / "label.npy", mmap_mode="r")

    @cached_property
    def head_dist(self) -> np.ndarray:
        return np.load(self.path / "head_dist.npy", mmap_mode="r")

    @property
    def n_channels(self) -> int:
        return int(self.meta.get("n_channels", 1))

    @cached_property
    def channels(self) -> tuple[np.ndarray, ...]:
        """Every input channel ``(A, R, S)``: ``image`` (the first), then ``image_1.npy``, ..."""
        extra = (np.load(self.path / f"image_{i}.npy", mmap_mode="r") for i in range(1, self.n_channels))
        return (self.image, *extra)

    @property
    def pad_values(self) -> list[float]:
        """Per channel, the normalised value of air (what pads a slice)."""
        return list(self.meta.get("pad_values", [self.meta["pad_value"]]))

    def volume_ras(self, name: str) -> np.ndarray:
        """An array back in ``(R, A, S)`` order (a view)."""
        return np.moveaxis(getattr(self, name), 0, 1)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_key(case: CaseFiles, config: PreprocessConfig, label_map: LabelMap = CANONICAL) -> str:
    if case.label is None:  # an unlabelled scan: images only
        parts = [f"v{CACHE_VERSION}", config.to_json(), "unlabelled", *(file_digest(p) for p in case.images)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    parts = [f"v{CACHE_VERSION}", config.to_json(), file_digest(case.image), file_digest(case.label)]
    parts += [file_digest(path) for path in case.extra]  # (single-channel cohorts keep their keys)
    if not label_map.is_canonical:  # (canonical cohorts keep the keys they had before label maps existed)
        parts.append(label_map.key())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of a node (``flock`` on ``path``, created if missing)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def preprocess_case(
    volumes: CaseVolumes, config: PreprocessConfig, has_head_labels: bool = True
) -> tuple[dict[str, np.ndarray], dict]:
    """Checked RAS volumes (canonical labels) -> cached arrays (slice-major) and their metadata.

    An unlabelled scan (``volumes.label is None``) gets its image channels only."""
    spacing = volumes.spacing
    shape = inplane_shape(volumes.image.shape, spacing, config.inplane_spacing_mm)
    image = resample_inplane_to(volumes.image, shape, order=1)
    affine = resampled_affine(volumes.geometry.ras_affine, volumes.image.shape, shape)
    new_spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    image, pad_value = normalise(image, config.clip_percentiles)
    extra = [normalise(resample_inplane_to(c, shape, order=1), config.clip_percentiles) for c in volumes.extra]
    arrays = {
        **{f"image_{i}": np.ascontiguousarray(np.moveaxis(c, 1, 0)) for i, (c, _) in enumerate(extra, start=1)},
        "image": np.ascontiguousarray(np.moveaxis(image, 1, 0)),
    }
    if volumes.label is not None:
        label = resample_labels(volumes.label, shape)
        arrays["label"] = np.ascontiguousarray(np.moveaxis(label, 1, 0))
        arrays["head_dist"] = np.ascontiguousarray(np.moveaxis(head_distance_mm(label, new_spacing), 1, 0))
    meta = {
        "case_id": volumes.case.case_id,
        "patient_id": volumes.case.patient_id,
        "spacing": new_spacing,
        "ras_affine": affine.tolist(),
        "pad_value": pad_value,
        "n_channels": 1 + len(extra),
        "pad_values": [pad_value, *(pad for _, pad in extra)],
        "source": {
            "image": str(volumes.case.image),
            "shape": list(volumes.geometry.shape),
            "affine": volumes.geometry.affine.tolist(),
            "axcodes": "".join(volumes.geometry.axcodes),
            "ras_shape": list(volumes.image.shape),
        },
        "preprocess": json.loads(config.to_json()),
        "cache_version": CACHE_VERSION,
    }
    if volumes.label is None:
        meta["unlabelled"] = True
        return arrays, meta
    meta.update(
        slice_has_head=arrays["label"].any(axis=(1, 2)).tolist(),
        slice_has_necrosis=(arrays["label"] == LABELS["necrosis"]).any(axis=(1, 2)).tolist(),
        has_head_labels=has_head_labels,
    )
    return arrays, meta


def _write_entry(root: Path, final: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    from avn_study.outputs import umask

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name[:12]}-", dir=root))
    os.chmod(tmp, 0o777 & ~umask())  # (mkdtemp makes 0700: other users of the node could not read the entry)
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, final)  # atomic: readers see a complete entry or none
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_entry(path: Path) -> CachedCase:
    return CachedCase(path, json.loads((path / "meta.json").read_text()))


def cache_case(
    case: CaseFiles, config: PreprocessConfig, cache_dir: Path, label_map: LabelMap = CANONICAL
) -> tuple[CachedCase | None, list[Problem]]:
    """Return the cached entry of ``case``, building it (after :func:`check_case`) when missing."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(case, config, label_map)
    final = root / key
    if (final / "meta.json").is_file():
        return _with_ids(_load_entry(final), case), []
    with file_lock(root / f"{key}.lock"):
        if (final / "meta.json").is_file():  # another process built it while we waited
            return _with_ids(_load_entry(final), case), []
        volumes, problems = check_case(case, label_map) if case.label is not None else check_unlabelled(case)
        if volumes is None:
            return None, problems
        arrays, meta = preprocess_case(volumes, config, label_map.has_head)
        _write_entry(root, final, arrays, meta)
    return _with_ids(_load_entry(final), case), problems


def _with_ids(entry: CachedCase, case: CaseFiles) -> CachedCase:
    """Identical files under another case id or patient share an entry; the ids come from the cohort."""
    if entry.meta["case_id"] == case.case_id and entry.meta["patient_id"] == case.patient_id:
        return entry
    return CachedCase(entry.path, {**entry.meta, "case_id": case.case_id, "patient_id": case.patient_id})


def build_cache(
    data: str | Path | Cohort,
    config: PreprocessConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[CachedCase]:
    """Verify and preprocess every labelled case of a cohort (cached ones are only hashed).

    Raises:
        DataError: the layout or any case is broken; the message lists every problem with its file,
            as ``avn-study verify`` does. Or the cache folder cannot be written (naming it and
            ``AVN_STUDY_CACHE``).
    """
    cohort = data if isinstance(data, Cohort) else open_cohort(data)
    config = config or PreprocessConfig()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cached, errors = [], []
    label_map, channels = cohort.label_map, cohort.channels
    for i, case in enumerate(cohort.cases):
        entry, problems = _cache_case_or_explain(case, config, cache_dir, label_map)
        errors += [p for p in problems if p.severity == "error"]
        if entry is not None:  # the names are the cohort's (an entry is keyed by file contents only)
            cached.append(CachedCase(entry.path, {**entry.meta, "channel_names": channels}))
        if progress:
            progress(i + 1, len(cohort.cases), case.case_id)
    if errors:
        raise DataError(format_problems(cohort.root, errors))
    return cached


def build_unlabelled_cache(
    cohort: Cohort, config: PreprocessConfig | None = None, cache_dir: str | Path | None = None
) -> list[CachedCase]:
    """Verify and preprocess the cohort's unlabelled scans (``imagesUnlabelled/``): image channels only.

    Raises:
        DataError: a scan is broken (every problem listed, with its file).
    """
    config = config or PreprocessConfig()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cached, errors = [], []
    for case in cohort.unlabelled:
        entry, problems = _cache_case_or_explain(case, config, cache_dir)
        errors += [p for p in problems if p.severity == "error"]
        if entry is not None:
            cached.append(CachedCase(entry.path, {**entry.meta, "channel_names": cohort.channels}))
    if errors:
        raise DataError(format_problems(cohort.root, errors))
    return cached


def cohort_fingerprint(cases: list[CachedCase]) -> str:
    """One hash of all cache keys (file contents + preprocessing) and case ids: the data's identity."""
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.case_id):
        digest.update(f"{case.case_id}:{case.patient_id}:{case.path.name}\n".encode())
    return digest.hexdigest()
