"""A compact live view of a sweep: running / finished / errored trials, best metric per row, ETA."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from ray.tune import Callback

from avn_study.study.folder import merge_grid


class ProgressView(Callback):
    """Prints one status line when something changes, at most every ``every_s`` seconds."""

    def __init__(self, label: str, total: int, metric: str, mode: str, concurrency: int,
                 stream: TextIO | None = None, every_s: float = 15.0) -> None:  # fmt: skip
        self.label, self.total, self.metric, self.mode = label, total, metric, mode
        self.concurrency = max(1, concurrency)
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.running: set[str] = set()
        self.finished: set[str] = set()
        self.errored: set[str] = set()
        self.best: dict[str, float] = {}
        self.durations: list[float] = []
        self.started: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.last_print = 0.0

    def _better(self, new: float, old: float | None) -> bool:
        if old is None or math.isnan(old):
            return True
        return new > old if self.mode == "max" else new < old

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self.started.setdefault(trial.trial_id, time.monotonic())
        self.show(force=len(self.running) == 1 and not self.finished)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value, row = result.get(self.metric), str(result.get("row") or merge_grid(trial.config).get("_row", "?"))
        if isinstance(value, int | float) and not math.isnan(value) and self._better(value, self.best.get(row)):
            self.best[row] = float(value)
            self.show()  # a new best is news; other results only refresh the line every every_s

    def _ended(self, trial: Any, bucket: set[str]) -> None:
        self.running.discard(trial.trial_id)
        bucket.add(trial.trial_id)
        if trial.trial_id in self.started:
            self.durations.append(time.monotonic() - self.started[trial.trial_id])
        self.show(force=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, self.finished)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, self.errored)

    def eta(self) -> str:
        left = self.total - len(self.finished) - len(self.errored)
        if not self.durations or left <= 0:
            return "?" if left > 0 else "0s"
        seconds = sum(self.durations) / len(self.durations) * math.ceil(left / self.concurrency)
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def line(self) -> str:
        best = ", ".join(f"{row} {value:.3f}" for row, value in sorted(self.best.items())) or "-"
        return (f"[{self.label}] {len(self.running)} running, {len(self.finished)}/{self.total} finished, "
                f"{len(self.errored)} errored | best {self.metric}: {best} | ETA {self.eta()}")  # fmt: skip

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_print >= self.every_s:
            self.last_print = now
            print(self.line(), file=self.stream, flush=True)
