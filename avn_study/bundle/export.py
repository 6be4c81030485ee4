"""``avn-study export``: the best model of a study as a self-contained bundle (see :mod:`avn_study.bundle.predict`).

Selection rule (also in ``avn-study export --help`` and in each bundle's ``metrics.json``):

    Candidates are the finished trials of stage 2 for an ablation (fair_ablation, nested_ablation),
    or, for a sweep (stage 1 only), the finished stage-1 trials that ran all their epochs (trials
    stopped early by ASHA are not candidates); --arm keeps the trials of one row. Trials of the same
    row whose resolved configurations are equal apart from fold, seed and run-time settings form one
    configuration (nested_ablation: all of a row's trials, since every outer fold chose its own). A
    configuration's score is the mean of the metric (the study's metric, default val_dice, each
    trial's final value) over its trials across folds and seeds, so a lucky fold does not win. The
    configuration with the best score is chosen (ties: the row listed first in study.json, then the
    lower trial id). Among its trials the one with the best value is exported, from the checkpoint
    of the epoch that gave that value; if Ray did not keep that checkpoint (checkpoint.num_to_keep),
    from the kept checkpoint with the best value, and metrics.json says so. That trial's own value
    is optimistic (the best of several); the configuration's mean is optimistic too once it was
    selected as the best of several configurations (a winner's curse): quote the ablation table's
    numbers, not this one. The bundle labels it "optimistic after selection"; the comparison of rows
    is the ablation table's (``avn-study analyze``).

An ablation whose stage 2 has no finished trial falls back to the sweep rule on stage 1 (noted in
``metrics.json``). The bundle records the configuration's mean, SD and number of trials, every trial's
value, the chosen trial's value and per-case metrics, and the rule in words.

Safety: export reads JSON (study.json, params.json, result.json, resolved_config.json, per-case files,
the checkpoint's config.json and state.json) and safetensors only. Ray's pickles (``tuner.pkl``,
``searcher-state-*.pkl``, ``params.pkl``, ``error.pkl``) are never opened, so exporting from somebody
else's experiment folder runs no code from it.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from avn_study.data.layout import IMAGES_TS, LABELS_TS
from avn_study.errors import AvnError, UsageError, look_up
from avn_study.study.folder import MANIFEST, TERMINATED, per_case_file
from avn_study.vocabulary import NNUNET_ARMS, TRIAL_METRICS

SELECTION_RULE = (
    "Candidates are the finished trials of stage 2 for an ablation (fair_ablation, nested_ablation), or, for a "
    "sweep (stage 1 only), the finished stage-1 trials that ran all their epochs (trials stopped early by ASHA "
    "are not candidates); --arm keeps the trials of one row. Trials of the same row whose resolved "
    "configurations are equal apart from fold, seed and run-time settings form one configuration "
    "(nested_ablation: all of a row's trials, since every outer fold chose its own). A configuration's score "
    "is the mean of the metric (the study's metric, default val_dice, each trial's final value) over its "
    "trials across folds and seeds, so a lucky fold does not win. The configuration with the best score is "
    f"chosen (ties: the row listed first in {MANIFEST}, then the lower trial id). Among its trials the one "
    "with the best value is exported, from the checkpoint of the epoch that gave that value; if Ray did not "
    "keep that checkpoint (checkpoint.num_to_keep), from the kept checkpoint with the best value, and "
    "metrics.json says so. That trial's own value is optimistic (the best of several); the configuration's "
    "mean is optimistic too once it was selected as the best of several configurations (a winner's curse): "
    "quote the ablation table's numbers, not this one."
)
# Config keys that vary between the trials of one configuration (identity and run-time settings).
RUN_KEYS = ("fold", "inner_fold", "seed", "threads", "device")
# Metrics a trial reports (final value) and whether higher is better; the study's own metric uses its mode.
METRIC_MODES = {name: m.mode for name, m in TRIAL_METRICS.items()}
_CASE_DROP = ("row", "arm", "schedule", "stage", "fold", "seed", "repeat", "split_hash", "data_fingerprint",
              "node_id", "hostname", "epoch")  # fmt: skip


@dataclass
class Configuration:
    """Trials that share a row and a resolved configuration (apart from :data:`RUN_KEYS`)."""

    row: str
    config: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)  # trial_id, fold, seed, repeat, value, path, ...

    @property
    def values(self) -> list[float]:
        return [t["value"] for t in self.trials]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def summary(self) -> dict[str, Any]:
        keys = ("trial_id", "fold", "seed", "repeat", "value")
        trials = [{k: t[k] for k in keys} for t in self.trials]
        return {"row": self.row, "mean": self.mean, "sd": self.sd, "n": len(self.trials), "trials": trials}


@dataclass
class Selection:
    metric: str
    mode: str
    stage: int
    configurations: list[Configuration]  # ranked, best first
    trial: dict[str, Any]  # the chosen trial of configurations[0]
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Configuration:
        return self.configurations[0]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def resolve_metric(experiment: Any, metric: str | None) -> tuple[str, str]:
    """(metric, mode): the study's own by default; others from :data:`METRIC_MODES`.

    Raises:
        UsageError: a metric the trials do not report (with a suggestion).
    """
    metric = metric or experiment.metric
    if metric == experiment.metric:
        return metric, experiment.mode
    options = [m for m in METRIC_MODES if m in experiment.trials.columns]
    look_up(metric, options, what="metric (--metric)")
    return metric, METRIC_MODES[metric]


def candidate_trials(experiment: Any, row: str | None) -> tuple[Any, int, list[str]]:
    """The finished trials that may be exported (see :data:`SELECTION_RULE`), their stage, and notes."""
    trials = experiment.trials
    notes = []
    nnunet = trials["arm" if "arm" in trials.columns else "row"].isin(list(NNUNET_ARMS))
    if row is not None:
        look_up(row, experiment.rows, what="row (--arm)")
        if nnunet[trials["row"] == row].any():
            raise UsageError(f"row '{row}' is an nnU-Net row: its models are nnU-Net's, not a bundle's; each trial "
                             "keeps its weights ('network_weights' of checkpoint_latest.pth in its Tune checkpoint, "
                             "torch.load(weights_only=True)) and nnU-Net's plans (nnunet/plans.json)")  # fmt: skip
        trials = trials[trials["row"] == row]
    elif nnunet.any():
        notes.append("nnU-Net rows are not exported (their models are nnU-Net's): chosen among the other rows")
        trials = trials[~nnunet]
    finished = trials[trials["status"] == TERMINATED]
    if (finished["stage"] == 2).any():
        return finished[(finished["stage"] == 2) & ~finished["stopped_early"]], 2, notes
    if experiment.protocol in ("fair_ablation", "nested_ablation"):
        notes.append("stage 2 has no finished trial: selected among the full-length stage-1 trials, on their own "
                     "validation patients (optimistic)")  # fmt: skip
    return finished[(finished["stage"] == 1) & ~finished["stopped_early"]], 1, notes


def select(experiment: Any, row: str | None = None, metric: str | None = None) -> Selection:
    """Rank configurations by their mean metric and pick the best trial of the best one.

    Raises:
        UsageError: an unknown row or metric.
        AvnError: no finished trial with a finite value of the metric.
    """
    from avn_study.analysis.tables import trial_config

    metric, mode = resolve_metric(experiment, metric)
    trials, stage, notes = candidate_trials(experiment, row)
    by_row = stage == 2 and experiment.protocol == "nested_ablation"
    if by_row:
        notes.append("nested_ablation: every outer fold chose its own configuration, so a row is scored by its mean "
                     "over all outer folds and seeds (its nested cross-validation estimate); the exported trial's "
                     "own configuration is in config.json")  # fmt: skip
    groups: dict[tuple[str, str], Configuration] = {}
    for t in trials.to_dict("records"):
        if not _finite(t.get(metric)):
            continue
        config = trial_config(Path(t["path"]))
        shared = {k: v for k, v in config.items() if k not in RUN_KEYS}
        key = (str(t["row"]), "" if by_row else json.dumps(shared, sort_keys=True, default=str))
        conf = groups.setdefault(key, Configuration(str(t["row"]), shared))
        conf.config = {k: v for k, v in conf.config.items() if shared.get(k) == v}  # what all its trials share
        conf.trials.append({**t, "value": float(t[metric])})
    if not groups:
        where = f"row '{row}'" if row else str(experiment.root)
        raise AvnError(f"{where}: no finished trial with a finite {metric} to export (see `avn-study analyze`)")
    sign = -1.0 if mode == "max" else 1.0
    order = {r: i for i, r in enumerate(experiment.rows)}
    for conf in groups.values():
        conf.trials.sort(key=lambda t: (sign * t["value"], str(t["trial_id"])))
    ranked = sorted(
        groups.values(), key=lambda c: (sign * c.mean, order.get(c.row, len(order)), str(c.trials[0]["trial_id"]))
    )
    best = ranked[0]
    if len(best.trials) > 1:
        notes.append(f"the exported trial's {metric} ({best.trials[0]['value']:.4f}) is the best of the "
                     f"configuration's {len(best.trials)} trials on their own validation patients, so it is "
                     f"optimistic; the configuration's mean ({best.mean:.4f}) is less so")  # fmt: skip
    if len(ranked) > 1:
        notes.append(
            f"optimistic after selection: the configuration's mean ({best.mean:.4f}) is the best of "
            f"{len(ranked)} configurations compared on the same patients, so it overstates what this "
            "model does on new ones; the ablation table (avn-study analyze) is the comparison to quote"
        )
    return Selection(metric, mode, stage, ranked, best.trials[0], notes)


# ------------------------------------------------------------------------------------------ checkpoint
def choose_checkpoint(trial: dict[str, Any], metric: str, mode: str) -> tuple[Path, dict[str, Any], str]:
    """The checkpoint folder of the epoch that gave the trial's value (else the best kept one).

    Returns:
        The folder, the last history record it holds (its epoch and metrics), and a note ("" when the
        checkpoint is the epoch of the trial's value).
    """
    from avn_study.training.checkpoint import load_training_state

    trial_dir = Path(trial["path"])
    kept = []
    for folder in sorted(p for p in trial_dir.glob("checkpoint_*") if p.is_dir()):
        history = load_training_state(folder).get("history") or []  # safetensors + JSON
        if history:
            kept.append((folder, history[-1]))
    if not kept:
        raise AvnError(
            f"{trial_dir}: the trial kept no checkpoint (checkpoint_*/ with a training state); cannot export it"
        )
    wanted = trial.get("eval_epoch")
    for folder, record in kept:
        if _finite(wanted) and record.get("epoch") == int(wanted):
            return folder, record, ""
    scored = [(f, r) for f, r in kept if _finite(r.get(metric))]
    sign = -1.0 if mode == "max" else 1.0
    folder, record = min(scored, key=lambda fr: sign * fr[1][metric]) if scored else kept[-1]
    note = (f"Ray did not keep the checkpoint of epoch {wanted} (the trial's final {metric}); exported "
            f"{folder.name} (epoch {record.get('epoch')}, {metric} {record.get(metric)}) instead")  # fmt: skip
    return folder, record, note


def _per_case(trial_dir: Path, epoch: int) -> list[dict[str, Any]]:
    path = trial_dir / per_case_file(epoch)
    if not path.is_file():
        return []
    return [{k: v for k, v in case.items() if k not in _CASE_DROP} for case in json.loads(path.read_text())]


# ------------------------------------------------------------------------------------------ provenance
def git_commit() -> dict[str, Any]:
    """The commit of the avn-study checkout this package runs from (None when not a git checkout)."""
    import avn_study

    root = Path(avn_study.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


# ------------------------------------------------------------------------------------------ live driver
LOCK_POLL_S = 10.0  # how often ``export --wait`` looks at the study's lock


def wait_for_driver(experiment_dir: Path, wait: bool = False, notify: Any = None, poll_s: float | None = None) -> None:
    """Refuse (or, with ``wait``, wait) while a live driver holds the study's lock (``study_folder.StudyLock``):
    its trials are still being written, so the selection could change under the export. A stale lock
    (its driver is gone) does not stop an export.

    Raises:
        UsageError: a live driver holds the lock and ``wait`` is off (naming its pid and host).
    """
    import sys
    import time

    from avn_study.study.folder import LOCK_FILE, LockFile, StudyLock

    lock = StudyLock(LockFile(Path(experiment_dir) / LOCK_FILE), str(experiment_dir))
    told = False
    while True:
        holder = lock.holder()
        if holder is None or lock.stale(holder):
            return
        if not wait:
            raise UsageError(f"{experiment_dir} is being run by a live driver ({lock.describe(holder)}): its trials "
                             "are still being written, so what export would choose can change; export when it has "
                             "finished, or pass --wait to wait for it")  # fmt: skip
        if not told:
            message = f"waiting for the driver of {experiment_dir} ({lock.describe(holder)}) to finish"
            (notify or (lambda text: print(text, file=sys.stderr)))(message)
            told = True
        time.sleep(LOCK_POLL_S if poll_s is None else poll_s)


# ------------------------------------------------------------------------------------------ bundle
@dataclass
class ExportResult:
    path: Path
    selection: Selection
    checkpoint: Path
    checkpoint_record: dict[str, Any]
    onnx: dict[str, Any] | None


def _metrics_json(sel: Selection, checkpoint: Path, record: dict[str, Any], note: str) -> dict[str, Any]:
    trial = sel.trial
    summary = {k: v for k, v in record.items()
               if not k.startswith(("loss_", "w_")) and k not in ("lr", "train_slices", "train_seconds")}  # fmt: skip
    return {
        "metric": sel.metric,
        "mode": sel.mode,
        "stage": sel.stage,
        "rule": SELECTION_RULE,
        "notes": [*sel.notes, *([note] if note else [])],
        "configuration": {**sel.best.summary(), "config": sel.best.config},
        "ranking": [c.summary() for c in sel.configurations],
        "chosen_trial": {
            "trial_id": str(trial["trial_id"]),
            "fold": trial["fold"],
            "seed": trial["seed"],
            "repeat": trial["repeat"],
            "value": trial["value"],
            "checkpoint": checkpoint.name,
            "checkpoint_epoch": record.get("epoch"),
            "checkpoint_value": record.get(sel.metric),
            "summary": summary,
            "per_case": _per_case(Path(trial["path"]), int(record.get("epoch", -1))),
        },
    }


def _provenance_json(experiment: Any, sel: Selection, checkpoint: Path, versions: dict[str, Any]) -> dict[str, Any]:
    trial = sel.trial
    root = Path(experiment.root).resolve()
    try:
        relative = str(checkpoint.resolve().relative_to(root))
    except ValueError:
        relative = str(checkpoint.resolve())
    git = git_commit()
    return {
        "trial_id": str(trial["trial_id"]),
        "study": experiment.manifest.get("name", root.name),
        "study_path": str(root),
        "experiment": trial["experiment"],
        "row": trial["row"],
        "arm": trial["arm"],
        "schedule": trial["schedule"],
        "stage": int(trial["stage"]),
        "fold": trial["fold"],
        "seed": trial["seed"],
        "checkpoint": relative,
        "split_hash": trial.get("split_hash") or experiment.manifest.get("split_hash"),
        "study_split_hash": experiment.manifest.get("split_hash"),
        "data_fingerprint": trial.get("data_fingerprint"),
        "data": experiment.manifest.get("data"),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "versions": versions,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def export_bundle(
    experiment_dir: str | Path,
    out: str | Path,
    *,
    row: str | None = None,
    metric: str | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    ensemble: bool = False,
    inference: Any = None,
    wait: bool = False,
) -> ExportResult:
    """Select (see :data:`SELECTION_RULE`) and write the bundle folder ``out`` (see :func:`write_bundle`).

    With ``ensemble``, every trial of the winning configuration (a nested row: all its outer folds and
    seeds) goes into the bundle, each from the checkpoint :func:`choose_checkpoint` picks; ``predict``
    averages their probabilities. ``inference`` sets the bundle's default inference options. While a live
    driver runs the study, export refuses, or with ``wait`` waits for it to finish (:func:`wait_for_driver`).

    Raises:
        UsageError: ``out`` exists (without ``overwrite``), an unknown row or metric, a bad folder, a live
            driver (without ``wait``).
        AvnError: nothing to export, or the checkpoint does not load.
    """
    from avn_study.analysis.tables import load_experiment
    from avn_study.bundle.format import check_bundle_out, package_versions, write_bundle
    from avn_study.training.checkpoint import load_config, load_training_state

    check_bundle_out(Path(out), overwrite, inputs=(Path(experiment_dir),))
    _refuse_a_mirror(Path(experiment_dir))
    wait_for_driver(Path(experiment_dir), wait)
    experiment = load_experiment(experiment_dir)
    sel = select(experiment, row, metric)
    if ensemble and onnx:
        raise UsageError("--onnx writes one model, and --ensemble asks for several; export the ensemble without --onnx")
    checkpoint, record, note = choose_checkpoint(sel.trial, sel.metric, sel.mode)
    flat = load_config(checkpoint)
    model = _load_model(checkpoint, flat)
    members = _ensemble_members(sel, flat) if ensemble else []
    metrics = _metrics_json(sel, checkpoint, record, note)
    if members:
        metrics["ensemble"] = {
            "members": 1 + len(members),
            "note": "the validation metrics here are the first member's on its own fold; each member was validated "
                    "on its own fold, and no patient of the study is unseen by the ensemble as a whole: score it on "
                    f"a held-out test set (`avn-study evaluate BUNDLE DATA` with {IMAGES_TS}/{LABELS_TS})",
        }  # fmt: skip
    provenance = _provenance_json(experiment, sel, checkpoint, package_versions())
    channels = (load_training_state(checkpoint).get("provenance") or {}).get("channels")
    path, onnx_info = write_bundle(out, model, flat, metrics, provenance, onnx=onnx, overwrite=overwrite,
                                   inference=inference, members=members, channels=channels)  # fmt: skip
    return ExportResult(path, sel, checkpoint, record, onnx_info)


def _refuse_a_mirror(experiment_dir: Path) -> None:
    """Refuse the local JSON mirror of a study kept in a store: it holds no checkpoints to export.

    Raises:
        UsageError: names the store the mirror copies and how to export from it.
    """
    from avn_study.study.folder import MIRROR_MARKER

    mirror_of = experiment_dir / MIRROR_MARKER
    if mirror_of.is_file():
        raise UsageError(
            f"{experiment_dir} is the local JSON mirror of {mirror_of.read_text().strip()}: it holds no checkpoints. "
            "Export from the study folder itself: mount the store, or download it (aws s3 sync, gcloud storage "
            "rsync, ...) and run avn-study export on that folder"
        )


def _load_model(folder: Path, config: dict[str, Any]) -> Any:
    """The checkpoint's model in eval mode, built from its flat ``config`` and loaded with its weights.

    Raises:
        AvnError: the weights do not fit the config.
    """
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model
    from avn_study.training.checkpoint import load_weights

    model = build_model(TrainConfig.from_flat(config, source=str(folder / "config.json")))
    try:
        model.load_state_dict(load_weights(folder))
    except RuntimeError as err:
        raise AvnError(f"{folder}: the weights do not fit the checkpoint's config.json ({err})") from None
    return model.eval()


def _ensemble_members(sel: Selection, flat: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """The other trials of the winning configuration, each as (model, record), in (fold, seed, repeat, id) order.

    Raises:
        AvnError: a member is another model than the chosen one (``flat``), or there is no other trial.
    """
    from avn_study.training.checkpoint import load_config

    members = []
    others = sorted((t for t in sel.best.trials if t["trial_id"] != sel.trial["trial_id"]),
                    key=lambda t: (t["fold"], t["seed"], t.get("repeat", 0), str(t["trial_id"])))  # fmt: skip
    for trial in others:
        folder, member_record, _ = choose_checkpoint(trial, sel.metric, sel.mode)
        config = load_config(folder)
        _check_same_model(flat, config, sel.trial, trial)
        record = {"trial_id": str(trial["trial_id"]), "fold": trial["fold"], "seed": trial["seed"],
                  "epoch": member_record.get("epoch")}  # fmt: skip
        members.append((_load_model(folder, config), record))
    if not members:
        raise AvnError(f"--ensemble: the best configuration (row {sel.best.row}) has one trial only; "
                       "there is nothing to ensemble")  # fmt: skip
    return members


def _check_same_model(first: dict[str, Any], other: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> None:
    """Ensemble members must share architecture and preprocessing (they share config.json)."""
    from avn_study.config import ModelConfig

    keys = (*ModelConfig.__dataclass_fields__, "slice_size", "inplane_spacing_mm", "loc_margin_mm", "threshold", "amp")
    differ = [k for k in keys if first.get(k) != other.get(k)]
    if differ:
        k = differ[0]
        raise AvnError(
            f"--ensemble: trials {a['trial_id']} and {b['trial_id']} differ in '{k}' ({first.get(k)!r} vs "
            f"{other.get(k)!r}); members of one bundle must share the model and its preprocessing"
        )
