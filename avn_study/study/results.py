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
    TERMINATED,
    epoch_history,
    merge_grid,
    per_case_file,
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
    experiment: str | None
    patients: list[str]  # every patient the search validated on: none may be reported for this choice


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


def validated_patients(trial_dir: Path) -> set[str]:
    """Patients in a trial's per-case validation files (any epoch: a trial validates on one fixed set)."""
    from avn_study.study.check import read_per_case

    files = sorted((trial_dir / per_case_file(0)).parent.glob("epoch_*.json"))
    return {str(case["patient"]) for case in read_per_case(files[-1])} if files else set()


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


def read_trials(experiment: Path, metric: str = "val_dice") -> list[TrialOutcome]:
    """Trials of one Ray experiment folder from JSON and text files only (no pickle is opened).

    A trial's status is Ray's (``TERMINATED``, ``ERROR``, ``RUNNING``/``PENDING`` for an interrupted
    run); ``error`` holds ``error.txt``, which also survives a failure that a retry later recovered. A
    trial whose files are damaged (:func:`~avn_study.study.check.trial_damage`) is ``DAMAGED``, with
    what is wrong in ``error``: it is never chosen, and ``--resume`` re-runs it in stage 2.
    """
    from avn_study.study.check import read_results, trial_damage

    statuses = trial_statuses(experiment)
    outcomes = []
    for trial_dir in trial_folders(experiment):
        damage = trial_damage(trial_dir, finished=statuses.get(trial_dir.name) == TERMINATED)
        if damage:
            try:
                merged = merge_grid(json.loads((trial_dir / "params.json").read_text()))
            except (ValueError, TypeError, AttributeError):
                merged = {}
            outcomes.append(TrialOutcome(trial_id=trial_dir.name.removeprefix("trial_"),
                                         row=str(merged.get("_row", "?")), stage=int(merged.get("_stage", 1)),
                                         status=DAMAGED, path=str(trial_dir), metric=None, epochs=0, config=merged,
                                         error=damage))  # fmt: skip
            continue
        config = json.loads((trial_dir / "params.json").read_text())
        result_file = trial_dir / "result.json"
        results = epoch_history(read_results(result_file) if result_file.is_file() else [])
        last = results[-1] if results else {}
        error = (trial_dir / "error.txt").read_text().strip() if (trial_dir / "error.txt").is_file() else ""
        merged = merge_grid(config)
        planned = int(merged.get("epochs", len(results)))
        outcomes.append(TrialOutcome(
            trial_id=str(last.get("trial_id", trial_dir.name)), row=str(merged.get("_row", "?")),
            stage=int(merged.get("_stage", 1)), path=str(trial_dir),
            status=trial_status(statuses.get(trial_dir.name), len(results), planned, bool(error)),
            metric=last.get(metric), epochs=len(results), config=merged, error=error,
        ))  # fmt: skip
    return outcomes
