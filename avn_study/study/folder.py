"""The study folder's format: names, paths, the manifest, the lock, trial statuses, the stage-2 grid.

One owner for what ``avn-study sweep`` writes (as :mod:`avn_study.bundle.format` owns the bundle format),
imported by the sweep, the trainable, the object-store mirror, the analysis and the export; it
depends on the standard library only::

    STORAGE/NAME/                   NAME: a safe name (check_name), never a path
        study.json                  the manifest: protocol, data, split hash, rows, searches, primary metric,
                                    alpha, reference, questions, contrasts, resources, the space as run
        space.yaml                  the search-space file as run
        splits.json                 the patient-level split the study froze (its trials read it by hash)
        optuna.journal              Optuna's journal: one study per stage-1 search
        nested_splits.json          nested_ablation: the frozen inner folds of every outer fold, with hashes
        stage2_plan.json            the stage-2 grid
        .lock                       the live driver (StudyLock): host, pid, heartbeat
        driver.log                  Ray Tune's log records (errored trials' tracebacks, retries)
        stage1-<slug>[-outer<k>][-fold<f>][-seed<s>]/   a Ray Tune experiment per search; <slug> = slug(row)
        stage2/                     a Ray Tune experiment
        stage2-repair-<n>/          --resume: re-runs of stage-2 trials whose folder or result was missing
                                    or damaged (the damaged folder kept as trial_<id>.damaged-<k>)
        stages/                     concurrent_rows: every trial of both stages in one Ray experiment,
                                    told apart by ``_stage`` and ``_run`` in their parameters
        <each experiment above>/
            experiment_state-*.json     Ray's: the trials' statuses (only its JSON skeleton is read)
            searcher-state-*.pkl        Ray's: the searcher's state (checked opcode by opcode, never loaded)
            trial_<id>/params.json, result.json, resolved_config.json, error.txt, checkpoint_*/,
                       epochs/epoch_NNN.json (the epoch's full record; result.json holds what Tune saw),
                       per_case/epoch_NNN.json, per_case/test_epoch_NNN.json,
                       per_case/calibration_epoch_NNN.json, per_case/overlay_epoch_NNN.npz

An object-store study adds ``mirror_of.txt`` to its local mirror (:mod:`avn_study.study.storage`). This tree
is documented here and in ``docs/architecture.md`` ("The study folder"); other places point here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avn_study.data.splits import NESTED_FILE, SPLITS_FILE  # (their owner; it imports numpy only when splitting)
from avn_study.errors import UsageError
from avn_study.outputs import pid_alive
from avn_study.vocabulary import ERROR, INCOMPLETE, TERMINATED  # (the statuses' one owner)

MANIFEST = "study.json"
SPACE_COPY = "space.yaml"
JOURNAL = "optuna.journal"
NESTED_SPLITS = NESTED_FILE  # nested_ablation: the frozen inner folds
SPLITS_COPY = SPLITS_FILE  # the study's frozen outer split (trials read it by hash; DATA is never written)
STAGE2_PLAN = "stage2_plan.json"
LOCK_FILE = ".lock"
DRIVER_LOG = "driver.log"  # Ray Tune's own log records of the driver (tracebacks of errored trials)
STUDY_FILES = (MANIFEST, SPACE_COPY, JOURNAL, STAGE2_PLAN, NESTED_SPLITS, SPLITS_COPY)  # the study's own (not Ray's)
STAGE1_PREFIX = "stage1-"
STAGE1_ALL = "stage1"  # concurrent_rows, studies before 2026-11: every stage-1 search in one Ray experiment
STAGES = "stages"  # concurrent_rows: every trial of the study (both stages) in one Ray experiment
STAGE2 = "stage2"
NNUNET_CHECKPOINT = "checkpoint_latest.pth"  # an nnU-Net trial's checkpoint file (nnunet_trainer.save_state)
STAGE2_REPAIR = "stage2-repair"  # --resume: stage-2 trials re-run because theirs was missing or damaged (-1, -2, ...)
DAMAGED = ".damaged-"  # a damaged trial folder set aside by --resume: trial_<id>.damaged-N (never deleted)

# a trial folder (Ray Tune's, named by the driver): what the trainable writes and the readers read back
TRIAL_PREFIX = "trial_"  # trial_<Ray's trial id>
PARAMS = "params.json"  # Ray's: the trial's config (stage 2's ``grid`` entry nested; see merge_grid)
RESULTS = "result.json"  # Ray's: one JSON object per report (epoch): what the driver saw (see epoch_file)
EPOCHS_DIR = "epochs"  # the trial's full record of each epoch (see epoch_file)
RESOLVED_CONFIG = "resolved_config.json"  # the typed training config the trial ran (TrainConfig.to_flat)
ERROR_FILE = "error.txt"  # Ray's: the tracebacks of the trial's failures (kept when a retry recovered)
PER_CASE_DIR = "per_case"  # per-case records of the trial's epochs (see per_case_file)
TEST_PREFIX = "test_"  # a per-case record of the held-out test set: per_case/test_epoch_NNN.json

# Ray Tune's files of an experiment folder that the readers look at (its pickles are never opened)
EXPERIMENT_STATE = "experiment_state-*.json"  # one per driver session: the trials' statuses (trial_statuses)
SEARCHER_STATE = "searcher-state-*.pkl"  # the searcher's saved state (checked, never loaded: check.py)
SEARCH_GEN_STATE = "search_gen_state-*.json"  # Ray's search generator's state (a pickle despite its name)

MIRROR_MARKER = "mirror_of.txt"  # in an object-store study's mirror: the URI it mirrors (export refuses a mirror)

MAX_NAME = 100  # characters of a study name or a row's folder name (file systems allow 255 bytes)
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


# ----------------------------------------------------------------------------------------------- names
def check_name(name: Any, what: str) -> str:
    """A name that becomes one folder: letters, digits, ``. _ + -``, not starting with a dot or a dash.

    Raises:
        UsageError: anything else (a separator, ``..``, a leading dot, spaces, control characters, an
            empty or over-long name), naming ``what`` and the name.
    """
    text = name if isinstance(name, str) else repr(name)
    if not isinstance(name, str) or not _SAFE.fullmatch(name) or len(name) > MAX_NAME:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise UsageError(
            f"{what} {shown!r} is not a safe folder name: use 1-{MAX_NAME} letters, digits, '.', '_', '+' or "
            "'-', starting with a letter or digit (no '/', '..', spaces or a leading dot)"
        )
    return name


def slug(row: str) -> str:
    """The folder form of a row name (``seg+recon/linear`` -> ``seg-recon_linear``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", row.replace("/", "_"))


def check_rows(rows: list[str], source: str) -> None:
    """Every row name must give a safe folder, and no two rows the same one.

    Raises:
        UsageError: an unsafe row name, or two names that map to one folder (naming both).
    """
    seen: dict[str, str] = {}
    for row in rows:
        if not row or len(row) > MAX_NAME or not row.isprintable():
            raise UsageError(f"{source}: arms: row name {row[:60]!r} must be 1-{MAX_NAME} printable characters")
        folder = slug(row)
        check_name(folder, f"{source}: arms: row {row!r} (folder")
        if folder.lower() in seen:  # case-insensitive file systems (macOS, Windows shares) fold case
            raise UsageError(
                f"{source}: arms: rows {seen[folder.lower()]!r} and {row!r} map to the same folder "
                f"'{STAGE1_PREFIX}{folder}'; rename one of them"
            )
        seen[folder.lower()] = row


@dataclass(frozen=True)
class Stage1:
    """One Optuna search of stage 1: a row, on the tuning fold or inside an outer fold (nested); with
    ``search_per_seed``, one per stage-2 seed (and, in a fair ablation, per reported fold), so that every
    seed is a replicate of the whole pipeline."""

    row: str
    outer: int | None = None  # nested_ablation: the outer fold searched inside
    seed: int | None = None  # search_per_seed: the stage-2 seed (replicate) whose configuration it chooses
    fold: int | None = None  # fair_ablation with search_per_seed: the reported fold its choice is trained on

    @property
    def experiment(self) -> str:
        name = f"{STAGE1_PREFIX}{slug(self.row)}" + ("" if self.outer is None else f"-outer{self.outer}")
        name += "" if self.fold is None else f"-fold{self.fold}"
        return name + ("" if self.seed is None else f"-seed{self.seed}")

    def optuna_study(self, study: str) -> str:
        return f"{study}-{self.experiment.removeprefix(STAGE1_PREFIX)}"

    @property
    def label(self) -> str:
        where = [f"outer fold {self.outer}"] if self.outer is not None else []
        where += [f"for fold {self.fold}"] if self.fold is not None else []
        where += [f"seed {self.seed}"] if self.seed is not None else []
        return f"stage 1 {self.row}" + (f" ({', '.join(where)})" if where else "")

    def replicate_seed(self, base: int, salt: str) -> int:
        """A seed of this search's own (``salt``: what it seeds), the same on every run of the study and
        independent across searches: rows, folds and replicates never share one sampler or one init."""
        import hashlib

        if self.seed is None:
            return base  # one search shared by the seeds (studies before search_per_seed)
        key = json.dumps([base, salt, self.row, self.outer, self.fold, self.seed]).encode()
        return int(hashlib.sha256(key).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------------------------- paths
def per_case_file(epoch: int, test: bool = False) -> str:
    """A trial's per-case metrics of one epoch, relative to its folder (``test``: the held-out set)."""
    return f"{PER_CASE_DIR}/{TEST_PREFIX if test else ''}epoch_{int(epoch):03d}.json"


def per_case_files(trial_dir: Path, test: bool = False) -> list[Path]:
    """A trial's per-case metric files (:func:`per_case_file`) of every epoch, oldest first (``test``: the
    held-out set's); the calibration and overlay files beside them are not among them."""
    pattern = f"{TEST_PREFIX if test else ''}epoch_*.json"
    return sorted((Path(trial_dir) / PER_CASE_DIR).glob(pattern))  # epochs are zero-padded: name order


def epoch_file(epoch: int) -> str:
    """A trial's full record of one epoch (identity, losses, loss weights, validation metrics), relative to
    its folder. Ray Tune is told only what it schedules on (the metric and the epoch: see
    ``study.trainable.driver_view``), so the driver's state per trial stays small; the analysis lays this
    record over the epoch's line of ``result.json`` (``study.check.read_epochs``)."""
    return f"{EPOCHS_DIR}/epoch_{int(epoch):03d}.json"


def epoch_files(trial_dir: Path) -> dict[int, Path]:
    """A trial's full epoch records (:func:`epoch_file`) by epoch; {} for a study from before them."""
    found = (Path(trial_dir) / EPOCHS_DIR).glob("epoch_*.json")
    return {int(p.stem.removeprefix("epoch_")): p for p in found if p.stem.removeprefix("epoch_").isdigit()}


def calibration_file(epoch: int) -> str:
    """A trial's per-case calibration counts of its last epoch (see ``metrics.calibration_counts``)."""
    return f"{PER_CASE_DIR}/calibration_epoch_{int(epoch):03d}.json"


def overlay_file(epoch: int) -> str:
    """A few validation slices of a trial's last epoch, with reference and predicted masks, for figures."""
    return f"{PER_CASE_DIR}/overlay_epoch_{int(epoch):03d}.npz"


def folder_trial_id(trial_dir: Path) -> str:
    """Ray's trial id from a trial folder's name (``trial_<id>``), for a trial that reported nothing."""
    return Path(trial_dir).name.removeprefix(TRIAL_PREFIX)


def is_study(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def stage_folders(root: Path) -> list[Path]:
    """The Ray experiments of a study, in name order (set-aside ``*.abandoned-N`` folders excluded)."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.startswith("stage") and "." not in p.name)


def trial_folders(experiment: Path) -> list[Path]:
    """The trial folders of one Ray experiment (those with ``params.json``), in name order; folders that
    ``--resume`` set aside as damaged (``*.damaged-N``) are not trials any more."""
    return sorted(p.parent for p in Path(experiment).glob(f"*/{PARAMS}") if DAMAGED not in p.parent.name)


def repair_folders(root: Path) -> list[Path]:
    """The study's ``stage2-repair-N`` experiments, in order of N."""
    found = [p for p in Path(root).glob(f"{STAGE2_REPAIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def merge_grid(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's Ray config with stage 2's ``grid`` entry (one row x fold x seed) merged into the top level."""
    return {**config.get("grid", {}), **{k: v for k, v in config.items() if k != "grid"}}


def reports_to_tune_in_brief(params: dict[str, Any]) -> bool:
    """Whether a trial (its ``params.json``) told Tune only its metric and epoch and kept its full records in
    its folder (:func:`epoch_file`): trials given the metric's name (``_avn.metric``) do; older ones reported
    everything to Tune."""
    meta = merge_grid(params).get("_avn")
    return isinstance(meta, dict) and isinstance(meta.get("metric"), str)


def epoch_history(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's reports by epoch (``training_iteration``), the last report of each epoch kept.

    A trial restored from a checkpoint (a lost node, a driver's ``--resume``) reports again the epochs
    after that checkpoint, so ``result.json`` can hold an epoch twice; read as lines, such a trial would
    seem to have run more epochs than it did. Reports without an iteration keep their place.
    """
    by_epoch: dict[Any, dict[str, Any]] = {}
    for i, record in enumerate(results):
        key = record.get("training_iteration", ("line", i))
        by_epoch.pop(key, None)  # a repeat replaces the earlier report, and takes its place at the end
        by_epoch[key] = record
    return sorted(by_epoch.values(), key=lambda r: r.get("training_iteration", 0))


# -------------------------------------------------------------------------------------------- statuses
def trial_statuses(experiment: Path) -> dict[str, str]:
    """Trial folder name -> Ray's status, from the newest ``experiment_state-*.json``.

    Only the JSON structure is read; Ray's pickled fields inside it are never decoded.
    """
    # one file per driver session, named by its start time: the last name is the latest session
    states = sorted(Path(experiment).glob(EXPERIMENT_STATE), key=lambda p: (p.name, p.stat().st_mtime))
    if not states:
        return {}
    statuses = {}
    for trial_json, _ in json.loads(states[-1].read_text())["trial_data"]:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        statuses[str(trial.get("relative_logdir"))] = str(trial.get("status"))
    return statuses


def trial_status(ray_status: str | None, epochs: int, planned: int, errored: bool) -> str:
    """The one rule for a trial's status: Ray's when it saved one; otherwise (no experiment state yet,
    e.g. a driver killed early) TERMINATED when every planned epoch reported, ERROR when the trial left
    an ``error.txt``, else INCOMPLETE."""
    if ray_status:
        return ray_status
    if epochs >= planned:
        return TERMINATED
    return ERROR if errored else INCOMPLETE


# ------------------------------------------------------------------------------------------------ lock
class LockFile:
    """Where a lock lives: a local file here; :class:`avn_study.study.storage.RemoteStudy` has an object-store one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def create(self, payload: bytes) -> bool:
        """Write the file only if it does not exist (atomically); False if it does."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        return True

    def replace(self, payload: bytes) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, self.path)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class StudyLock:
    """The live driver's claim on a study folder: host, pid, start time and a heartbeat.

    A second driver is refused with a message naming the holder. A lock is *stale* when its pid is dead
    on this host, or its heartbeat is older than ``stale_after_s`` (a driver on another host that
    crashed): ``--resume`` takes a stale lock over; ``--force-unlock`` takes any lock (for a shared
    file system where the holder's host is gone and its heartbeat is recent).
    """

    def __init__(self, where: LockFile, location: str, stale_after_s: float = 600.0, heartbeat_s: float = 30.0):
        self.where, self.location = where, location
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # another driver forced the lock away from us

    def _payload(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def holder(self) -> dict[str, Any] | None:
        raw = self.where.read()
        if raw is None:
            return None
        try:
            holder = json.loads(raw)
            return holder if isinstance(holder, dict) else {"unreadable": True}
        except ValueError:
            return {"unreadable": True}

    def _mine(self, holder: dict[str, Any] | None) -> bool:
        return bool(holder) and holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]

    def stale(self, holder: dict[str, Any]) -> str:
        """Why ``holder`` is stale ("" if it looks alive)."""
        if holder.get("unreadable"):
            return "the lock file is unreadable"
        if holder.get("host") == self.me["host"] and not pid_alive(holder.get("pid")):
            return f"process {holder.get('pid')} no longer runs on {holder.get('host')}"
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if age > self.stale_after_s:
            return f"its last heartbeat was {age / 60:.0f} min ago"
        return ""

    def describe(self, holder: dict[str, Any]) -> str:
        if holder.get("unreadable"):
            return "an unreadable lock"
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0) or 0)))
        return f"pid {holder.get('pid')} on {holder.get('host')} (since {started}, heartbeat {age:.0f} s ago)"

    def acquire(self, takeover_stale: bool = False, force: bool = False) -> None:
        """Take the lock and start the heartbeat.

        Raises:
            UsageError: another live driver holds it (or a stale one, without ``takeover_stale``).
        """
        if not self.where.create(self._payload()):
            self.check_free(takeover_stale, force)
            self.where.replace(self._payload())
        self._thread = threading.Thread(target=self._beat, name="avn-study-lock", daemon=True)
        self._thread.start()

    def check_free(self, takeover_stale: bool = False, force: bool = False) -> None:
        """Refuse, writing nothing, if another driver holds the lock (as :meth:`acquire` would).

        Raises:
            UsageError: naming the holder, and how to take a stale or orphaned lock over.
        """
        holder = self.holder()
        if holder is None or self._mine(holder):
            return
        why = self.stale(holder)
        if not (force or (why and takeover_stale)):
            hint = (f"it looks stale ({why}): --resume takes it over" if why else
                    "if that driver is gone (its host lost), pass --force-unlock")  # fmt: skip
            raise UsageError(f"{self.location} is being run by another driver: {self.describe(holder)}; {hint}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._mine(self.holder()):
                self.lost = True
                return
            try:
                self.where.replace(self._payload())
            except OSError:  # storage hiccup: the next beat retries; the sweep reports storage errors itself
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._mine(self.holder()):
            self.where.delete()


def storage_error(location: str, err: OSError) -> Exception:
    """What a failed write in the study folder becomes: exit 1, naming the storage and the reason."""
    from avn_study.errors import AvnError

    where = str(getattr(err, "filename", None) or location)
    detail = "" if where.rstrip("/") == str(location).rstrip("/") else f" ({where})"
    return AvnError(f"cannot write to {location}: {err.strerror or err}{detail}")
