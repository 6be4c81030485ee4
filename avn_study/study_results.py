"""Reading a study's trials back from its folders: outcomes, statuses, and what a search validated on.

JSON and text files only (no pickle is opened). :class:`~avn_study.sweep.Study` runs the protocol and
uses these to select, report and resume; ``avn_study.analysis`` builds its tables from the same files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avn_study.study_folder import ERROR, TERMINATED, merge_grid, per_case_file, trial_status, trial_statuses


@dataclass(frozen=True)
class Selected:
    """A row's stage-1 choice and what it rests on."""

    config: dict[str, Any]  # the winning trial's flat config (without private keys)
    trial_id: str | None  # None: a row that chose nothing (nnU-Net)
    experiment: str | None
    patients: list[str]  # every patient the search validated on: none may be reported for this choice


def best_trial(candidates: list[tuple[str, float | None, int]], mode: str) -> str | None:
    """The stage-1 choice among finished trials ``(trial_id, final metric, epochs)``: the best final metric
    among those that ran the most epochs (ASHA-stopped trials compete only if none ran to the end), ties
    to the smaller trial id; None when no trial has a finite metric. The one rule, for a study read back
    from its folders (:meth:`avn_study.sweep.Study.select`) and for a live one
    (:class:`avn_study.search.RowSearch`)."""
    scored = sorted((t, m, e) for t, m, e in candidates if isinstance(m, int | float) and math.isfinite(m))
    if not scored:
        return None
    longest = max(e for _, _, e in scored)
    pool = [c for c in scored if c[2] == longest]
    return (max if mode == "max" else min)(pool, key=lambda c: c[1])[0]


def validated_patients(trial_dir: Path) -> set[str]:
    """Patients in a trial's per-case validation files (any epoch: a trial validates on one fixed set)."""
    files = sorted((trial_dir / per_case_file(0)).parent.glob("epoch_*.json"))
    return {str(case["patient"]) for case in json.loads(files[-1].read_text())} if files else set()


@dataclass
class TrialOutcome:
    trial_id: str | None  # None: a row that chose nothing (nnU-Net)
    row: str
    stage: int
    status: str  # TERMINATED | ERROR
    path: str
    metric: float | None
    epochs: int
    config: dict[str, Any]
    error: str = ""


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
    run); ``error`` holds ``error.txt``, which also survives a failure that a retry later recovered.
    """
    statuses = trial_statuses(experiment)
    outcomes = []
    for params in sorted(experiment.glob("*/params.json")):
        trial_dir = params.parent
        config = json.loads(params.read_text())
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()] \
            if (trial_dir / "result.json").is_file() else []  # fmt: skip
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
