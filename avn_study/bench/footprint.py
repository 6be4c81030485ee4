"""What a study costs its driver and its storage, measured on a study folder (``bench cluster``, the
growth table of docs/benchmarks.md, and the test that a trial's share does not grow with the cohort).

- **Experiment state**: Ray Tune rewrites an experiment's ``experiment_state-*.json`` whole at every
  snapshot; it holds one entry per trial (its config several times, its last result, per-metric
  statistics, its checkpoints' results). Measured per trial, and in total over the newest file of
  every experiment of the study.
- **Parameters**: every trial folder's ``params.json`` (Ray writes the trial's config there).
- **Study folder**: bytes and files, everything included.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from avn_study.study.folder import EXPERIMENT_STATE, PARAMS


@dataclass(frozen=True)
class StateSize:
    """One experiment's newest snapshot: its bytes, its trials and their entries' mean size."""

    experiment: str
    bytes: int
    trials: int
    per_trial: float  # mean bytes of one trial's entry (what Ray keeps per trial)


def experiment_states(root: Path) -> list[StateSize]:
    """The newest ``experiment_state-*.json`` of every Ray experiment under the study folder ``root``."""
    sizes = []
    for experiment in sorted(p for p in root.iterdir() if p.is_dir()):
        snapshots = sorted(experiment.glob(EXPERIMENT_STATE))
        if not snapshots:
            continue
        newest = snapshots[-1]
        entries = json.loads(newest.read_text()).get("trial_data", [])
        per_trial = statistics.fmean(sum(len(part) for part in e) for e in entries) if entries else 0.0
        sizes.append(StateSize(experiment.name, newest.stat().st_size, len(entries), per_trial))
    return sizes


def params_bytes(root: Path) -> float:
    """Mean size of the study's trials' ``params.json`` (0 without trials)."""
    sizes = [p.stat().st_size for p in root.glob(f"*/*/{PARAMS}")]
    return statistics.fmean(sizes) if sizes else 0.0


def folder_size(root: Path) -> tuple[int, int]:
    """(bytes, files) of everything under ``root``."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def peak_rss_mb() -> float:
    """This process's peak resident set so far (the driver's, when called in the driver)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
