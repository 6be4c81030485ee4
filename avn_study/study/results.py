"""Reading a study's trials back from its folders: outcomes, statuses, and what a search validated on.

JSON and text files only (no pickle is opened). :class:`~avn_study.study.driver.Study` runs the protocol and
uses these to select, report and resume; ``avn_study.analysis`` builds its tables from the same files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avn_study.study.folder import (
    ERROR,
    ERROR_FILE,
    PARAMS,
    TERMINATED,
    folder_trial_id,
    merge_grid,
    trial_folders,
    trial_status,
    trial_statuses,
)
from avn_study.vocabulary import DAMAGED


@dataclass(frozen=True)
class Selected:
    """A row's stage-1 choice and what it rests on."""

    config: dict[str, Any]  # the winning trial's flat config (without private keys)
    trial_id: str | None  # None: a row that chose nothing (nnU-Net)
    experiment: str | None  # the search's key: none of the patients its trials validated on may be reported


def best_trial(candidates: list[tuple], mode: str) -> str | None:
    """The stage-1 choice among finished trials ``(trial_id, final metric, epochs[, order])``: the best final
    metric among those that completed the most epochs (ASHA-stopped trials compete only if none ran to
    the end); ties to the configuration sampled first (``order``: its place in the search's sampling,
    ``_sample`` in its config; else the trial id, which Ray numbers in order of creation); None when no
    trial has a finite metric. Epochs are completed epochs (:func:`~avn_study.study.folder.epoch_history`),
    never lines of ``result.json``. The one rule, for a study read back from its folders
    (:meth:`avn_study.study.driver.Study.select`) and for a live one (:class:`avn_study.study.search.RowSearch`)."""
    scored = [(c[0], c[1], c[2], c[3] if len(c) > 3 and c[3] is not None else math.inf)
              for c in candidates if isinstance(c[1], int | float) and math.isfinite(c[1])]  # fmt: skip
    if not scored:
        return None
    longest = max(e for _, _, e, _ in scored)
    pool = [c for c in scored if c[2] == longest]
    sign = -1.0 if mode == "max" else 1.0
    return min(pool, key=lambda c: (sign * c[1], c[3], str(c[0])))[0]


@dataclass
class TrialOutcome:
    trial_id: str | None  # None: a row that chose nothing (nnU-Net)
    row: str
    stage: int
    status: str  # TERMINATED | ERROR | DAMAGED (a file that is not what the sweep wrote; ``error`` says which)
    path: str
    metric: float | None
    epochs: int
    config: dict[str, Any]
    error: str = ""

    @property
    def order(self) -> int | None:
        """The trial's place in its search's sampling (``_sample``), for a stable tie-break."""
        sample = self.config.get("_sample")
        return int(sample) if isinstance(sample, int) else None


@dataclass
class StudyResult:
    root: Path
    outcomes: list[TrialOutcome] = field(default_factory=list)

    @property
    def errored(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if o.status == ERROR]

    @property
    def unfinished(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if o.status not in (ERROR, TERMINATED)]


@dataclass(frozen=True)
class TrialRecord:
    """One trial folder read back: what the sweep's bookkeeping (:func:`read_trials`) and the analysis
    tables (``avn_study.analysis.tables``) both start from, so that they agree on a trial's id, epochs
    and status."""

    path: Path
    trial_id: str  # Ray's, from the trial's last report; else from its folder's name (folder_trial_id)
    params: dict[str, Any]  # params.json, stage 2's grid entry merged in (merge_grid)
    results: list[dict[str, Any]]  # the full records by completed epoch (check.read_epochs), oldest first
    error: str  # error.txt without surrounding blank space ("" when the trial left none)
    planned: int  # the epochs the trial was to run
    status: str  # the one rule's (folder.trial_status)

    @property
    def last(self) -> dict[str, Any]:
        """The trial's last report ({} before its first)."""
        return self.results[-1] if self.results else {}


def read_trial(trial_dir: Path, ray_status: str | None, config: dict[str, Any] | None = None) -> TrialRecord:
    """One trial folder whose files passed :func:`~avn_study.study.check.trial_damage`, from JSON and text
    files only.

    Args:
        trial_dir: the trial's folder (``trial_<id>``).
        ray_status: Ray's status of the trial (:func:`~avn_study.study.folder.trial_statuses`), None when
            Ray saved none.
        config: the config whose ``epochs`` the trial was to run (the analysis passes the resolved
            training config); None: the trial's merged parameters.

    Raises:
        DamagedFile: unreadable parameters or results (a folder that was not checked first).
    """
    from avn_study.study.check import read_epochs, read_json

    trial_dir = Path(trial_dir)
    params = merge_grid(read_json(trial_dir / PARAMS, "the trial's parameters (a JSON object)"))
    results = read_epochs(trial_dir, params)
    error = (trial_dir / ERROR_FILE).read_text().strip() if (trial_dir / ERROR_FILE).is_file() else ""
    planned = int((params if config is None else config).get("epochs", len(results)))
    last = results[-1] if results else {}
    return TrialRecord(
        path=trial_dir,
        trial_id=str(last.get("trial_id", folder_trial_id(trial_dir))),
        params=params,
        results=results,
        error=error,
        planned=planned,
        status=trial_status(ray_status, len(results), planned, bool(error)),
    )


def _damaged_outcome(trial_dir: Path, damage: str) -> TrialOutcome:
    """A damaged trial's outcome: never chosen; its row and stage when its parameters still read."""
    try:
        merged = merge_grid(json.loads((trial_dir / PARAMS).read_text()))
    except (ValueError, TypeError, AttributeError):
        merged = {}
    return TrialOutcome(trial_id=folder_trial_id(trial_dir), row=str(merged.get("_row", "?")),
                        stage=int(merged.get("_stage", 1)), status=DAMAGED, path=str(trial_dir), metric=None,
                        epochs=0, config=merged, error=damage)  # fmt: skip


def read_trials(experiment: Path, metric: str = "val_dice") -> list[TrialOutcome]:
    """Trials of one Ray experiment folder from JSON and text files only (no pickle is opened).

    A trial's status is Ray's (``TERMINATED``, ``ERROR``, ``RUNNING``/``PENDING`` for an interrupted
    run); ``error`` holds ``error.txt``, which also survives a failure that a retry later recovered. A
    trial whose files are damaged (:func:`~avn_study.study.check.trial_damage`) is ``DAMAGED``, with
    what is wrong in ``error``: it is never chosen, and ``--resume`` re-runs it in stage 2.
    """
    from avn_study.study.check import trial_damage

    statuses = trial_statuses(experiment)
    outcomes = []
    for trial_dir in trial_folders(experiment):
        damage = trial_damage(trial_dir, finished=statuses.get(trial_dir.name) == TERMINATED)
        if damage:
            outcomes.append(_damaged_outcome(trial_dir, damage))
            continue
        trial = read_trial(trial_dir, statuses.get(trial_dir.name))
        outcomes.append(TrialOutcome(
            trial_id=trial.trial_id, row=str(trial.params.get("_row", "?")), stage=int(trial.params.get("_stage", 1)),
            path=str(trial_dir), status=trial.status, metric=trial.last.get(metric), epochs=len(trial.results),
            config=trial.params, error=trial.error,
        ))  # fmt: skip
    return outcomes
