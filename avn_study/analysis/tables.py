"""An experiment folder as tidy DataFrames, read from JSON files only.

A *study* folder (``avn-study sweep``'s ``STORAGE/NAME``, holding ``study.json``) is read stage by
stage; a single Ray Tune experiment folder (one holding ``experiment_state-*.json``) is read as is.
Per trial the reader uses ``params.json``, ``result.json``, ``resolved_config.json``,
``per_case/epoch_NNN.json`` and ``error.txt``, plus the JSON skeleton of Ray's
``experiment_state-*.json`` for statuses. Ray's pickles (``tuner.pkl``, ``searcher-state-*.pkl``,
``params.pkl``, ``error.pkl``) are never opened, so analysing somebody else's folder runs no code
from it. The folders' tree is :mod:`avn_study.study.folder`'s; a trial folder is read by
:func:`avn_study.study.results.read_trial`, as the sweep reads it.

Tables (see :class:`Experiment`):

- ``trials``: one row per trial: identity (``trial_id, experiment, stage, row, arm, schedule, fold,
  seed, repeat``), ``status`` and ``error``, ``epochs``/``epochs_planned``/``stopped_early``, the
  final validation metrics, ``best_val_dice``/``best_epoch``, ``train_seconds``, ``node``, split hash
  and data fingerprint, what it was selected in (stage 2: ``selected_in``, ``selected_trial``) or the
  search it belongs to (stage 1: ``search``), and the resolved training config (``schedule_params.*``
  flattened).
- ``cases``: one row per trial x validation case, the per-case metrics of the trial's last evaluated
  epoch (the epoch its final ``val_dice`` came from).
- ``test_cases``: one row per stage-2 trial x held-out test case (when the split has a test set),
  scored once, after the last epoch.
- ``selection``: per stage-2 trial, the patients its configuration was selected on: those the trials of
  the search it records (``_selected_in``) validated on, read from their per-case records (older sweeps
  recorded the list, ``_selected_on``; studies from before both: the validation patients of the row's
  stage-1 trials). :meth:`Experiment.evaluation_cases` never reports a trial on those patients.
- ``history``: one row per trial x epoch: learning rate, loss weights ``w_*``, losses ``loss_*`` and
  the validation metrics of evaluated epochs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from avn_study.errors import DataError, UsageError
from avn_study.study.check import (
    DamagedFile,
    describe_entry,
    read_per_case,
    read_plan,
    stage2_key,
    trial_key,
)
from avn_study.study.folder import (
    DAMAGED,
    ERROR,
    EXPERIMENT_STATE,
    MANIFEST,
    PARAMS,
    RESOLVED_CONFIG,
    STAGE1_PREFIX,
    STAGE2_PLAN,
    TERMINATED,
    calibration_file,
    is_study,
    merge_grid,
    overlay_file,
    per_case_file,
    per_case_files,
    stage_folders,
    trial_folders,
    trial_statuses,
)
from avn_study.study.results import read_trial

IDENTITY = ("trial_id", "experiment", "stage", "row", "arm", "schedule", "fold", "seed", "repeat", "unit")
FINISHED = TERMINATED
# metric columns of a validation record that describe the whole trial (the per-case means and counts)
VAL_KEYS = ("val_dice", "val_dice_all", "n_cases", "n_cases_necrosis", "n_hd95_undefined")
_RAY_KEYS = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
    "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore", "iterations_since_restore",
    "should_checkpoint", "node_id", "data_fingerprint", "split_hash", "row", "arm", "schedule", "stage", "fold",
    "seed", "repeat", "n_parameters",
}  # fmt: skip


@dataclass
class Experiment:
    """The tables of one study (or one Ray experiment) plus what the reader noticed on the way."""

    root: Path
    manifest: dict[str, Any]
    trials: pd.DataFrame
    cases: pd.DataFrame
    history: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    test_cases: pd.DataFrame = field(default_factory=pd.DataFrame)
    selection: dict[str, frozenset[str]] = field(default_factory=dict)  # stage-2 trial id -> patients
    # damaged or missing trials, one line each (the trial, the file, what was expected): not in the tables
    damaged: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return str(self.manifest.get("metric", "val_dice"))

    @property
    def mode(self) -> str:
        return str(self.manifest.get("mode", "max"))

    @property
    def protocol(self) -> str:
        return str(self.manifest.get("protocol", "sweep"))

    @property
    def primary_metric(self) -> str:
        """The per-case metric the study declared its verdicts on (``dice`` for studies before the key)."""
        return str(self.manifest.get("primary_metric") or "dice")

    @property
    def alpha(self) -> float:
        return float(self.manifest.get("alpha") or 0.05)

    @property
    def reference(self) -> str | None:
        return self.manifest.get("reference") or None

    def contrasts(self, rows: list[str], reference: str | None = None) -> list[tuple[str, str, str]]:
        """The primary family ``(question, row, against)`` among ``rows``: the study's declared contrasts
        (``reference`` given: every row against it instead; studies before the record: against the
        reference, ``unet`` or the first row)."""
        declared = self.manifest.get("contrasts")
        if reference is None and declared:
            return [(str(q), str(r), str(a)) for q, r, a in declared if r in rows and a in rows]
        against = reference or (self.reference if self.reference in rows else None)
        against = against or ("unet" if "unet" in rows else rows[0])
        return [("", row, against) for row in rows if row != against]

    def questions(self) -> dict[str, list[str]]:
        """Report headings -> their rows: the manifest's record, else the space's ``groups`` (either form)."""
        if "questions" in self.manifest:
            return {str(t): [str(r) for r in rows] for t, rows in self.manifest["questions"].items()}
        groups = (self.manifest.get("space") or {}).get("groups") or {}
        return {str(t): [str(r) for r in (g.get("rows", []) if isinstance(g, dict) else g)] for t, g in groups.items()}

    @property
    def rows(self) -> list[str]:
        """Row names in the order of the search-space file (else in order of appearance)."""
        declared = [str(r) for r in self.manifest.get("rows", [])]
        seen = [str(r) for r in self.trials["row"].drop_duplicates()] if len(self.trials) else []
        return declared + [r for r in seen if r not in declared]

    @property
    def reported_stage(self) -> int:
        """2 when stage 2 has finished trials (the ablation's evaluation), else 1 (tuning results)."""
        finished = self.trials[self.trials["status"] == FINISHED]
        return 2 if (finished["stage"] == 2).any() else 1

    def evaluation_trials(self) -> pd.DataFrame:
        """The finished trials the statistics use.

        An ablation (``fair_ablation``, ``nested_ablation``): stage 2 (every row's chosen configuration
        on every reported fold x seed). Otherwise (a ``sweep``, or stage 2 not run yet): per row, the
        finished, full-length trial with the best final metric, on the very patients it was chosen on:
        tuning results, which the report marks and gives no verdicts for.
        """
        finished = self.trials[self.trials["status"] == FINISHED]
        if self.reported_stage == 2:
            return finished[finished["stage"] == 2]
        full = finished[~finished["stopped_early"]]
        full = full[full[self.metric].notna()] if self.metric in full else full.iloc[0:0]
        if full.empty:
            return full
        ascending = self.mode == "min"
        ranked = full.sort_values(self.metric, ascending=ascending)
        return ranked.groupby("row", sort=False).head(1)

    def evaluation_cases(self) -> pd.DataFrame:
        """Per-case rows of :meth:`evaluation_trials`, without any patient its trial's configuration
        was selected on (see :attr:`selection`; :meth:`excluded` lists what was left out)."""
        return self._reported(self.cases)[0]

    def evaluation_test_cases(self) -> pd.DataFrame:
        """Held-out test-set rows of :meth:`evaluation_trials` (empty without a test set)."""
        return self._reported(self.test_cases)[0]

    def excluded(self) -> pd.DataFrame:
        """Per row: patients left out of the statistics because they chose the row's configuration."""
        dropped = self._reported(self.cases)[1]
        if dropped.empty:
            return pd.DataFrame(columns=["row", "n_patients", "patients"])
        grouped = dropped.groupby("row", sort=False)["patient"]
        names = grouped.agg(lambda p: ", ".join(sorted(set(map(str, p)))))
        return pd.DataFrame({"n_patients": grouped.nunique(), "patients": names}).reset_index()

    def calibration(self) -> pd.DataFrame:
        """Per evaluation case and probability bin (``row, trial_id, case, patient, bin, count, positive,
        prob_sum``) from the trials' last-epoch calibration files; only the cases the statistics use.
        Empty for studies from before the files existed."""
        cases = self.evaluation_cases()
        if cases.empty:
            return pd.DataFrame()
        keep = set(zip(cases["trial_id"].astype(str), cases["case"].astype(str), strict=True))
        records = []
        for trial in self.evaluation_trials().itertuples():
            path = Path(trial.path) / calibration_file(int(trial.eval_epoch)) if _finite(trial.eval_epoch) else None
            if path is None or not path.is_file():
                continue
            for case, counts in _json(path, "calibration counts").items():
                if (str(trial.trial_id), str(case)) not in keep:
                    continue
                for b, (n, pos, total) in enumerate(zip(counts["count"], counts["positive"], counts["prob_sum"],
                                                        strict=True)):  # fmt: skip
                    records.append({"row": trial.row, "trial_id": str(trial.trial_id), "case": case, "bin": b,
                                    "count": n, "positive": pos, "prob_sum": total})  # fmt: skip
        return pd.DataFrame.from_records(records)

    def overlays(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Row -> case -> ``{image, ref, prob, slice}`` for figures: per row its evaluation trial on the
        lowest fold and seed (every row's trial on that fold kept the same cases)."""
        import numpy as np

        trials = self.evaluation_trials()
        if trials.empty:
            return {}
        fold, seed = trials["fold"].min(), trials[trials["fold"] == trials["fold"].min()]["seed"].min()
        chosen = trials[(trials["fold"] == fold) & (trials["seed"] == seed)].sort_values("trial_id")
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for trial in chosen.drop_duplicates("row").itertuples():
            path = Path(trial.path) / overlay_file(int(trial.eval_epoch)) if _finite(trial.eval_epoch) else None
            if path is None or not path.is_file():
                continue
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    case, part = key.rsplit("/", 1)
                    out.setdefault(str(trial.row), {}).setdefault(case, {})[part] = npz[key]
        return out

    def _reported(self, cases: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        if cases.empty:
            return cases, cases
        ids = set(self.evaluation_trials()["trial_id"])
        mine = cases[cases["trial_id"].isin(ids)]
        chosen_on = [
            str(p) in self.selection.get(str(t), ()) for t, p in zip(mine["trial_id"], mine["patient"], strict=True)
        ]
        chosen_on = pd.Series(chosen_on, index=mine.index, dtype=bool)
        return mine[~chosen_on].reset_index(drop=True), mine[chosen_on].reset_index(drop=True)


# ------------------------------------------------------------------------------------------ reading
def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error}); expected Ray Tune's {what}") from None


def _statuses(experiment: Path) -> dict[str, str]:
    try:
        return trial_statuses(experiment)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UsageError(f"{experiment}: Ray's {EXPERIMENT_STATE} is unreadable; statuses unknown") from None


def experiment_folders(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """(manifest, Ray experiment folders) of a study folder or of one Ray experiment folder."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such folder; expected a study folder (STORAGE/NAME) or a Ray experiment")
    if is_study(path):
        return _json(path / MANIFEST, "study manifest"), stage_folders(path)
    if any(path.glob(EXPERIMENT_STATE)) or any(path.glob(f"*/{PARAMS}")):
        return {"name": path.name, "protocol": "sweep", "metric": "val_dice", "mode": "max"}, [path]
    raise UsageError(
        f"{path}: neither a study folder (no {MANIFEST}) nor a Ray Tune experiment (no {EXPERIMENT_STATE} "
        f"or */{PARAMS})"
    )


def _flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def trial_config(trial_dir: Path, merged: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trial's resolved training config (``resolved_config.json``), else its Ray parameters without
    avn-study's private keys (a trial that failed before writing the resolved config)."""
    resolved = trial_dir / RESOLVED_CONFIG
    if resolved.is_file():
        return _json(resolved, "resolved config")
    merged = merged if merged is not None else merge_grid(_json(trial_dir / PARAMS, "trial parameters"))
    return {k: v for k, v in merged.items() if not k.startswith("_")}


def _read_trial(
    trial_dir: Path, experiment: str, status: str | None
) -> tuple[dict, list[dict], list[dict], list[dict]]:
    """(trial row, case rows, history rows, test-case rows) of one trial folder."""
    config = trial_config(trial_dir)
    trial = read_trial(trial_dir, status, config)  # the sweep's reader: the same id, epochs and status
    merged, results, error, last, status = trial.params, trial.results, trial.error, trial.last, trial.status
    evaluated = [r for r in results if "val_dice" in r]
    final = evaluated[-1] if evaluated else {}
    planned = trial.planned
    stage = int(merged.get("_stage", last.get("stage", 1)))
    row = {
        "trial_id": trial.trial_id,
        "experiment": experiment,
        "stage": stage,
        "row": str(merged.get("_row", last.get("row", config.get("arm", "?")))),
        "arm": config.get("arm", last.get("arm")),
        "schedule": config.get("schedule", last.get("schedule")),
        "fold": config.get("fold", last.get("fold")),
        # the listed seed (a replicate); with a search per seed the run's own torch seed is derived from it
        "seed": merged.get("_replicate", config.get("seed", last.get("seed"))),
        "run_seed": config.get("seed", last.get("seed")),
        "repeat": int(merged.get("_repeat", last.get("repeat", 0))),
        # the pipeline replicate the trial belongs to: the stage-1 search whose choice it trains (a row that
        # searches nothing, such as nnU-Net's, or a stage-1 trial: the trial itself)
        "unit": str(merged.get("_selected_in") or f"trial:{trial_dir.name}"),
        # a stage-1 trial's search: its own experiment, or its ``_run`` in one shared by several searches
        "search": str(merged.get("_run") or experiment) if stage == 1 else "",
        "status": status,
        "error": _last_line(error) if status == ERROR else "",
        "recovered_failures": error.count("Traceback") if status != ERROR else 0,
        "epochs": len(results),
        "epochs_planned": planned,
        "stopped_early": status == FINISHED and len(results) < planned,
        "eval_epoch": final.get("epoch"),
        **{k: v for k, v in final.items() if k not in _RAY_KEYS and not k.startswith(("w_", "loss_", "lr"))},
        "best_val_dice": max((r["val_dice"] for r in evaluated if _finite(r["val_dice"])), default=math.nan),
        "best_epoch": _best_epoch(evaluated),
        "train_seconds": float(last.get("time_total_s", math.nan)),
        "node": last.get("hostname", ""),
        "node_id": last.get("node_id", ""),
        "split_hash": last.get("split_hash", ""),
        "data_fingerprint": last.get("data_fingerprint", ""),
        "n_parameters": last.get("n_parameters"),  # absent in studies from before it was recorded
        "selected_in": merged.get("_selected_in", ""),
        "selected_trial": merged.get("_selected_trial", ""),
        "selected_on": json.dumps(merged["_selected_on"]) if "_selected_on" in merged else "",
        **{k: v for k, v in (results[0] if results else {}).items() if k.startswith("ref_loss_")},
        "path": str(trial_dir),
    }
    row.pop("epoch", None)
    row.pop("train_slices", None)
    row.update({k: v for k, v in _flatten_config(config).items() if k not in row and k != "threads"})
    identity = {k: row[k] for k in IDENTITY}
    cases: list[dict] = []
    if final:
        cases = _case_rows(trial_dir / per_case_file(int(final["epoch"])), identity)
    tests = per_case_files(trial_dir, test=True)
    test_cases = _case_rows(tests[-1], identity) if tests else []
    history = [
        {**identity, **{k: v for k, v in r.items() if k not in _RAY_KEYS}, "epoch_seconds": r.get("time_this_iter_s")}
        for r in results
    ]
    return row, cases, history, test_cases


def _case_rows(path: Path, identity: dict[str, Any]) -> list[dict]:
    if not path.is_file():
        return []
    drop = {*IDENTITY, "split_hash", "data_fingerprint", "node_id", "hostname", "n_parameters"}
    return [{**identity, **{k: v for k, v in case.items() if k not in drop}} for case in read_per_case(path)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _best_epoch(evaluated: list[dict[str, Any]]) -> float:
    scored = [r for r in evaluated if _finite(r["val_dice"])]
    return float(max(scored, key=lambda r: r["val_dice"])["epoch"]) if scored else math.nan


def load_experiment(path: str | Path) -> Experiment:
    """Read a study folder (or one Ray experiment folder) into tidy tables; see the module docstring.

    Errored and unfinished trials stay in ``trials`` with their status and reason; :attr:`Experiment.notes`
    says how many there are and that statistics leave them out. A trial whose files are damaged
    (:func:`~avn_study.study.check.trial_damage`), and a stage-2 trial that ``stage2_plan.json`` lists
    but no folder holds, is in no table: :attr:`Experiment.damaged` names each with what was expected,
    and a note says the statistics exclude them.
    """
    from avn_study.study.check import trial_damage

    root = Path(path)
    manifest, experiments = experiment_folders(root)
    trial_rows, case_rows, history_rows, test_rows = [], [], [], []
    damaged: list[str] = []
    gone_stage2: list[str] = []  # trial folders Ray's state lists in experiments that hold stage 2
    damaged_keys: set[Any] = set()
    unkeyed: list[int] = []  # damaged trials (in experiments holding stage 2) whose entry cannot be told
    for experiment in experiments:
        statuses = _statuses(experiment)
        gone = [
            f"{experiment.name}/{name}"
            for name in sorted(statuses)
            if not (experiment / name / PARAMS).is_file() and not any(experiment.glob(f"{name}{DAMAGED}*"))
        ]
        if experiment.name.startswith(STAGE1_PREFIX):  # (a stage-2 trial's absence is found against the plan)
            damaged += [f"{name}: listed by Ray's experiment state, but its folder is gone" for name in gone]
        else:
            gone_stage2 += gone
        for trial_dir in trial_folders(experiment):
            damage = trial_damage(trial_dir, finished=statuses.get(trial_dir.name) == TERMINATED)
            try:
                if damage:
                    raise DamagedFile(trial_dir, damage)
                row, cases, history, tests = _read_trial(trial_dir, experiment.name, statuses.get(trial_dir.name))
            except DamagedFile as error:
                damaged.append(f"{experiment.name}/{trial_dir.name}: {error.problem}")
                key = trial_key(trial_dir)  # named here, not again as missing from the plan
                damaged_keys.add(key)
                if key is None and not experiment.name.startswith(STAGE1_PREFIX):
                    unkeyed.append(len(damaged) - 1)  # unreadable parameters: which entry is it?
                continue
            trial_rows.append(row)
            case_rows += cases
            history_rows += history
            test_rows += tests
    trials = pd.DataFrame(trial_rows)
    if trials.empty:
        if damaged:
            raise DataError(f"{root}: every trial folder is damaged: {'; '.join(damaged)}")
        raise UsageError(f"{root}: no trial folders (*/{PARAMS}) found; has the sweep started?")
    cases = pd.DataFrame(case_rows)
    experiment = Experiment(
        root, manifest, trials, cases, pd.DataFrame(history_rows), test_cases=pd.DataFrame(test_rows)
    )
    experiment.selection = _selection(trials, cases)
    missing = _missing_from_plan(root, trials, gone_stage2, damaged_keys) if is_study(root) else []
    for index in unkeyed:  # one trial, named once: its folder, and the plan entry it may have held
        if missing and not missing[0].startswith(STAGE2_PLAN):
            damaged[index] += f" (perhaps the trial of {missing.pop(0).split(': ')[0]})"
    experiment.damaged = damaged + missing
    experiment.notes += _notes(experiment)
    return experiment


def _missing_from_plan(root: Path, trials: pd.DataFrame, gone: list[str], damaged: set[Any]) -> list[str]:
    """Entries of ``stage2_plan.json`` that no stage-2 trial folder holds (or the plan's own damage);
    ``gone``: trial folders that Ray's state lists in the experiments holding stage 2, named with them;
    ``damaged``: keys of damaged trial folders, already named."""
    try:
        plan = read_plan(root)
    except DamagedFile as error:
        return [f"{error.path.name}: {error.problem}; stage 2 cannot be checked for completeness"]
    if plan is None:
        return []
    stage2 = trials[trials["stage"] == 2]
    have = {(str(t.row), int(t.fold), int(t.run_seed), int(t.repeat)) for t in stage2.itertuples()} | damaged
    where = f" (Ray's experiment state lists trial folders that are gone: {', '.join(gone)})" if gone else ""
    return [f"stage 2 {describe_entry(e)} (entry {i} of {STAGE2_PLAN}): no trial folder holds it{where}; "
            "expected a stage-2 trial (`avn-study sweep ... --resume` runs it)"
            for i, e in enumerate(plan) if stage2_key(e) not in have]  # fmt: skip


def _selection(trials: pd.DataFrame, cases: pd.DataFrame) -> dict[str, frozenset[str]]:
    """Stage-2 trial id -> the patients its configuration was selected on.

    Those the stage-1 trials of the search it records (``_selected_in``) validated on, from their per-case
    records (what the search's choice rested on); a list recorded by older sweeps (``_selected_on``) as it
    is; for a trial with neither (studies from before both), every patient the row's stage-1 trials
    validated on.
    """
    stage1 = cases[cases["stage"] == 1] if len(cases) else cases
    by_row, by_search = {}, {}
    if len(stage1):
        by_row = {row: frozenset(map(str, group["patient"])) for row, group in stage1.groupby("row")}
        search_of = dict(zip(trials["trial_id"].astype(str), trials["search"], strict=True))
        searches = stage1["trial_id"].astype(str).map(search_of)
        by_search = {key: frozenset(map(str, group["patient"])) for key, group in stage1.groupby(searches)}
    out = {}
    for t in trials[trials["stage"] == 2].itertuples():
        if t.selected_on:
            out[str(t.trial_id)] = frozenset(map(str, json.loads(t.selected_on)))
        elif t.selected_in:
            out[str(t.trial_id)] = by_search.get(str(t.selected_in), frozenset())
        else:
            out[str(t.trial_id)] = by_row.get(t.row, frozenset())
    return out


def _notes(experiment: Experiment) -> list[str]:
    notes = []
    if experiment.damaged:
        notes.append(f"{len(experiment.damaged)} damaged or missing trial(s) are excluded from the statistics "
                     "(`avn-study sweep ... --resume` re-runs stage-2 ones): "
                     f"{'; '.join(experiment.damaged)}")  # fmt: skip
    trials = experiment.trials
    errored = trials[trials["status"] == ERROR]
    if len(errored):
        listed = "; ".join(f"{t.trial_id} ({t.row}, stage {t.stage}): {t.error[:120]}" for t in errored.itertuples())
        notes.append(f"{len(errored)} errored trial(s) are excluded from the statistics: {listed}")
    unfinished = trials[~trials["status"].isin([FINISHED, ERROR])]
    if len(unfinished):
        notes.append(
            f"{len(unfinished)} trial(s) did not finish (status {', '.join(sorted(set(unfinished['status'])))}); "
            "they are excluded from the statistics. `avn-study sweep ... --resume` finishes them."
        )
    if experiment.protocol in ("fair_ablation", "nested_ablation") and not (trials["stage"] == 2).any():
        notes.append("stage 2 has not run: the table shows each row's best stage-1 trial on the patients it was "
                     "chosen on (tuning results, no verdicts)")  # fmt: skip
    excluded = experiment.excluded()
    if len(excluded):
        listed = "; ".join(f"{t.row}: {t.n_patients}" for t in excluded.itertuples())
        notes.append(f"patients excluded from the statistics because their validation results chose the row's "
                     f"configuration (stage 1): {listed}")  # fmt: skip
    hashes = set(trials["split_hash"]) - {""}
    if len(hashes) > 1:
        notes.append(f"trials used {len(hashes)} different splits ({', '.join(h[:12] for h in hashes)})")
    return notes


def write_tables(experiment: Experiment, out: Path) -> list[Path]:
    """``trials``, ``cases`` and ``history`` as Parquet and CSV in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("trials", "cases", "history", "test_cases"):
        if name == "test_cases" and experiment.test_cases.empty:
            continue
        table: pd.DataFrame = _arrow_safe(getattr(experiment, name))
        table.to_parquet(out / f"{name}.parquet", index=False)
        table.to_csv(out / f"{name}.csv", index=False)
        written += [out / f"{name}.parquet", out / f"{name}.csv"]
    return written


def _arrow_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (e.g. a schedule parameter that is a number in one row and a
    string in another) become strings, which Parquet can store; numeric and uniform columns stay."""
    table = table.copy()
    for column in [c for c in table.columns if pd.api.types.is_object_dtype(table[c])]:
        kinds = {type(v) for v in table[column] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1 or kinds & {list, dict, tuple}:
            table[column] = table[column].map(
                lambda v: v if v is None else json.dumps(v) if not isinstance(v, str) else v
            )
    return table
