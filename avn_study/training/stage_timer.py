"""Wall time of the training loop's stages, for ``avn-study bench train`` (off in real runs).

The loops in :mod:`avn_study.training.loop` and :mod:`avn_study.training.validation` wrap each stage (batch
fetch, transfer, augmentation, the model's forward/backward/optimizer step, loss bookkeeping, validation
prediction, paste and metrics) in ``timer("name")``. The default :data:`NO_TIMER` costs one attribute lookup
and a no-op context; a :class:`StageTimer` adds a ``torch.profiler.record_function`` range (so the same names
show in a profiler trace) and, on CUDA, synchronises around the stage so the time is the stage's own.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

# the model's own work (training steps and validation forward passes); every other stage is overhead
MODEL_STAGES = ("forward", "backward", "optimizer", "val_predict")


class NullTimer:
    enabled = False

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


NO_TIMER = NullTimer()


class StageTimer:
    """Accumulates seconds and calls per stage name.

    Args:
        device: synchronised before and after each stage when it is a CUDA device.
    """

    enabled = True

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        with torch.profiler.record_function(f"avn:{name}"):
            yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start
        self.calls[name] += 1

    def overhead(self) -> float:
        """Seconds in every stage outside the model's work (:data:`MODEL_STAGES`)."""
        return sum(s for name, s in self.seconds.items() if name not in MODEL_STAGES)


Timer = StageTimer | NullTimer  # what the loops accept
