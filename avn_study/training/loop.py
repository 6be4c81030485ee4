"""The epoch loop: one pass of training over a fold's batches, and what it runs on.

:func:`train_one_epoch` trains; :func:`reference_losses` measures the untrained network's losses for the
schedules that need them, without changing it; :func:`cosine_lr` is the learning rate of each epoch.
Plain torch: no Ray here.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch

from avn_study.data.layout import UNLABELLED_DIR
from avn_study.data.slices import AugmentConfig, augment_batch
from avn_study.errors import AvnError
from avn_study.models.runtime import autocast_context, move_batch
from avn_study.training.losses import LossConfig, branch_losses
from avn_study.training.schedules import Schedule
from avn_study.training.stage_timer import NO_TIMER, Timer


class NonFiniteLossError(AvnError):
    """A loss became NaN or Inf: the run stops, naming the epoch, step and loss term."""


def train_one_epoch(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    weights: dict[str, float],
    *,
    epoch: int,
    loss_config: LossConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    augment: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
    timer: Timer = NO_TIMER,
) -> dict[str, float]:
    """One pass over ``batches``; returns mean unweighted branch losses, the weighted total, counts.

    A batch without a ``seg`` target is a slice batch of unlabelled scans: it trains the
    reconstruction term alone (weighted by ``weights["recon"]``) and is reported apart, as
    ``loss_recon_unlabelled`` over ``unlabelled_slices``, so the labelled losses keep their meaning.

    Losses are summed on the device and read once at the end of the epoch (no host sync per step).
    A non-finite loss is still found exactly: the first step with one, and its values, are kept on
    the device as the epoch runs, and the error names that step and term. (The steps after it train
    on NaN, which costs the rest of one epoch of a run that fails anyway.)

    Raises:
        NonFiniteLossError: a loss term is NaN or Inf (names the epoch, step and term).
    """
    model.train()
    branches = tuple(model.branches)
    tally, start = _EpochTally(device), time.perf_counter()
    channels_last = device.type == "cuda"
    batches = iter(batches)
    for step in itertools.count():
        with timer("fetch"):
            batch = next(batches, None)
        if batch is None:
            break
        batch = _on_device(batch, device, channels_last, augment, generator, timer)
        if "seg" not in batch:  # unlabelled scans: the reconstruction term alone
            with timer("forward"):
                loss = _recon_loss(model, batch, loss_config, device, amp_dtype)
            with timer("bookkeeping"):
                tally.add_unlabelled(step, loss, batch["image"].shape[0])
            with timer("backward"):
                optimizer.zero_grad(set_to_none=True)
                (loss * weights["recon"]).backward()
        else:
            with timer("forward"):
                losses = _branch_losses(model, batch, branches, loss_config, device, amp_dtype)
                total = schedule.combine(losses, weights)
            with timer("bookkeeping"):
                tally.add(step, total, losses, batch["image"].shape[0])
            with timer("backward"):
                optimizer.zero_grad(set_to_none=True)
                total.backward()
        with timer("optimizer"):
            optimizer.step()
    record = tally.record(epoch, timer)
    record.update(train_slices=float(tally.n_slices), train_seconds=time.perf_counter() - start)
    return record


def _on_device(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    channels_last: bool,
    augment: AugmentConfig | None,
    generator: torch.Generator | None,
    timer: Timer,
) -> dict[str, torch.Tensor]:
    """The batch moved to the device and, when ``augment`` is set, augmented there."""
    with timer("transfer"):
        batch = move_batch(batch, device, channels_last)
    if augment is not None:
        with timer("augment"):
            batch = augment_batch(batch, augment, generator)
    return batch


def _branch_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    branches: tuple[str, ...],
    loss_config: LossConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """The unweighted loss of each branch on a labelled batch (the forward pass under autocast, losses in fp32)."""
    with autocast_context(device, amp_dtype):
        outputs = model(batch["image"])
    return branch_losses({k: v.float() for k, v in outputs.items()}, batch, branches, loss_config)


def _recon_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_config: LossConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """The unweighted reconstruction loss of a batch of unlabelled slices (a scalar on the device)."""
    with autocast_context(device, amp_dtype):
        recon = model(batch["image"])["recon"]
    return branch_losses({"recon": recon.float()}, batch, ("recon",), loss_config)["recon"]


class _EpochTally:
    """The epoch's loss sums and its first non-finite step, kept on the device and read once, by :meth:`record`.

    Labelled batches sum ``total`` and each branch loss; unlabelled batches sum their reconstruction loss
    apart. Sums are float64 (float32 on MPS, which has no float64), added in step order: the same numbers
    as summing each step's ``.item()``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []  # "total", then the branch losses in the order the loss returns them
        self.sums = self.bad_values = torch.zeros(0)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.recon_sum = torch.zeros((), dtype=exact, device=device)
        self.recon_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.n_slices = self.n_unlabelled = 0

    def add(self, step: int, total: torch.Tensor, losses: dict[str, torch.Tensor], n: int) -> None:
        """Count a labelled batch of ``n`` slices; keep its values if it is the first non-finite one."""
        if not self.names:
            self.names = ["total", *losses]
            exact = torch.float32 if self.device.type == "mps" else torch.float64
            self.sums = torch.zeros(len(self.names), dtype=exact, device=self.device)
            self.bad_values = torch.zeros(len(self.names), device=self.device)
        values = torch.stack([total.detach(), *(losses[k].detach() for k in self.names[1:])]).float()
        newly_bad = (self.bad_step < 0) & ~torch.isfinite(values).all()
        self.bad_step = torch.where(newly_bad, step, self.bad_step)
        self.bad_values = torch.where(newly_bad, values, self.bad_values)
        self.n_slices += n
        self.sums += values.to(self.sums.dtype) * n

    def add_unlabelled(self, step: int, loss: torch.Tensor, n: int) -> None:
        """Count an unlabelled batch of ``n`` slices; remember the step if it is the first non-finite one."""
        self.recon_bad = torch.where((self.recon_bad < 0) & ~torch.isfinite(loss), step, self.recon_bad)
        self.n_unlabelled += n
        self.recon_sum += loss.detach().to(self.recon_sum.dtype) * n

    def record(self, epoch: int, timer: Timer) -> dict[str, float]:
        """The epoch's mean losses (the epoch's host syncs, all here at its end).

        Raises:
            AvnError: the epoch had no labelled slice.
            NonFiniteLossError: a loss was not finite (the earlier of the two kinds of batch, named).
        """
        if self.n_slices == 0:
            raise AvnError(f"epoch {epoch}: the training set yielded no slices")
        with timer("bookkeeping"):
            first_bad = int(self.bad_step)
            totals = self.sums.tolist()
            recon_first_bad, recon_total = int(self.recon_bad), float(self.recon_sum)
        if recon_first_bad >= 0 and not 0 <= first_bad < recon_first_bad:
            raise NonFiniteLossError(
                f"epoch {epoch}, step {recon_first_bad} (a batch of unlabelled scans): loss term 'recon' is not "
                f"finite (lower the learning rate, or check {UNLABELLED_DIR}/ with `avn-study verify`)"
            )
        if first_bad >= 0:
            found = dict(zip(self.names, self.bad_values.tolist(), strict=True))
            bad = next((k for k in self.names[1:] if not math.isfinite(found[k])), "total")
            raise NonFiniteLossError(
                f"epoch {epoch}, step {first_bad}: loss term '{bad}' is {found[bad]} "
                "(lower the learning rate, or check the data with `avn-study verify`)"
            )
        record = {f"loss_{k}": v / self.n_slices for k, v in zip(self.names, totals, strict=True)}
        if self.n_unlabelled:
            record.update(
                loss_recon_unlabelled=recon_total / self.n_unlabelled, unlabelled_slices=float(self.n_unlabelled)
            )
        return record


REFERENCE_SLICES = 64  # slices of the fixed set on which schedules measure the untrained network's losses


def reference_indices(has_head: np.ndarray, n: int = REFERENCE_SLICES) -> np.ndarray:
    """A fixed, seed-independent set of training slices: ``n`` evenly spaced among those with a femoral head."""
    pool = np.flatnonzero(has_head) if has_head.any() else np.arange(has_head.size)
    picks = np.unique(np.linspace(0, pool.size - 1, min(n, pool.size)).round().astype(int))
    return pool[picks]


@torch.no_grad()
def reference_losses(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_config: LossConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean unweighted branch losses of ``model`` as it is (untrained), without changing it.

    The model runs in training mode, as in the first epoch (batch norm on batch statistics, so the
    losses are on the scale that training reports); its buffers (running statistics) are restored
    afterwards and no optimizer step is taken, so the run continues exactly as if this never happened.
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    branches = tuple(model.branches)
    sums: dict[str, float] = defaultdict(float)
    n = 0
    for batch in batches:
        batch = move_batch(batch, device, device.type == "cuda")
        with autocast_context(device, amp_dtype):
            outputs = model(batch["image"])
        losses = branch_losses({k: v.float() for k, v in outputs.items()}, batch, branches, loss_config)
        b = batch["image"].shape[0]
        n += b
        for name, value in losses.items():
            sums[name] += value.item() * b
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    if n == 0:
        raise AvnError("the reference set of training slices is empty")
    return {name: total / n for name, total in sums.items()}


def cosine_lr(base: float, epoch: int, epochs: int, final_fraction: float = 0.01) -> float:
    """Cosine annealing from ``base`` at epoch 0 to ``base * final_fraction`` at the last epoch."""
    t = epoch / max(1, epochs - 1)
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))
