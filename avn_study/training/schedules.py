"""Loss-adaptation schedules: the weight of each branch loss, epoch by epoch.

A schedule is built for the model's branches (``create_schedule("linear", ("seg", "recon"),
ramp_epochs=10)``); at the start of each epoch the training loop asks ``weights(epoch, history)``,
where ``history[i]`` holds epoch ``i``'s mean *unweighted* train losses (``loss_seg``,
``loss_recon``, ``loss_loc``), and every step adds the branch losses with ``combine(losses, weights)``.
Epochs are 0-based. Weights are plain floats, one per active branch (0.0 allowed), so they go into the
reported history as ``w_<branch>``.

To add a schedule, subclass :class:`Schedule`, give its parameters as keyword-only arguments of
``__init__`` (validated there), and decorate it with ``@register_schedule("name")``; the tests
parametrize over :func:`list_schedules`.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from avn_study.errors import look_up
from avn_study.vocabulary import BRANCHES

History = Sequence[Mapping[str, Any]]
S = TypeVar("S", bound="type[Schedule]")

_SCHEDULES: dict[str, type[Schedule]] = {}


def register_schedule(name: str) -> Callable[[S], S]:
    """Class decorator: make the schedule constructible as ``create_schedule(name, branches, **params)``."""

    def register(cls: S) -> S:
        if name in _SCHEDULES:
            raise ValueError(f"schedule {name!r} is already registered (by {_SCHEDULES[name]!r})")
        cls.name = name
        _SCHEDULES[name] = cls
        return cls

    return register


def list_schedules() -> list[str]:
    """The registered schedule names, sorted."""
    return sorted(_SCHEDULES)


def create_schedule(name: str, branches: Sequence[str], **params: Any) -> Schedule:
    """Build the schedule registered as ``name`` for a model with ``branches``.

    Raises:
        UsageError: unknown schedule or parameter name (with a suggestion and the allowed names).
        ValueError: a bad parameter value, or a branch the schedule needs (or names) that the model lacks.
    """
    cls = _SCHEDULES[look_up(name, _SCHEDULES, what="schedule")]
    signature = inspect.signature(cls.__init__)
    allowed = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    for key in params:
        look_up(key, allowed, what=f"'{name}' schedule parameter")
    return cls(branches, **params)


# --- validation helpers -------------------------------------------------------------------------------


def _int_param(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        bound = "> 0" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bound}, got {name}={value!r}")
    return int(value)


def _float_param(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if open_low else low <= value) or value > high:
        bound = f"> {low}" if open_low else f">= {low}"
        bound = bound if high == math.inf else f"in {'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a finite number {bound}, got {name}={value!r}")
    return float(value)


def _check_epoch(epoch: Any) -> int:
    return _int_param("epoch", epoch, 0)


def _history_loss(history: History, index: int, branch: str, epoch: int) -> float:
    """``history[index]["loss_<branch>"]`` as a finite float, or a message saying what is missing."""
    if index >= len(history):
        raise ValueError(
            f"weights(epoch={epoch}) needs the losses of epoch {index}, but history has {len(history)} epochs"
        )
    key = f"loss_{branch}"
    if key not in history[index]:
        raise ValueError(f"history[{index}] has no '{key}' (keys: {sorted(history[index])})")
    value = float(history[index][key])
    if not math.isfinite(value):
        raise ValueError(f"history[{index}]['{key}'] is {value}; a schedule needs finite losses")
    return value


def _fixed_weights(schedule: Schedule, weights: Mapping[str, Any] | None) -> dict[str, float]:
    """Per-branch fixed weights: given ones validated, the others 1.0."""
    weights = {} if weights is None else weights
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping of branch -> weight, got weights={weights!r}")
    for branch in weights:
        look_up(branch, BRANCHES, what="branch in weights")
        if branch not in schedule.branches:
            raise ValueError(
                f"schedule '{schedule.name}' weights name the '{branch}' branch, model branches are {schedule.branches}"
            )
    fixed = {b: _float_param(f"weights['{b}']", weights.get(b, 1.0), 0.0) for b in schedule.branches}
    if not any(fixed.values()):
        raise ValueError(f"schedule '{schedule.name}' weights must not all be 0, got weights={fixed}")
    return fixed


# --- the interface --------------------------------------------------------------------------------------


class Schedule(ABC):
    """Weights of the active branch losses, epoch by epoch.

    Attributes:
        name: the registry name (set by :func:`register_schedule`).
        requires: branches the schedule cannot work without.
        branches: the model's active branches, in canonical order (``seg``, ``recon``, ``loc``).

    Raises (at construction):
        ValueError: a branch in ``requires`` is missing (``schedule 'pretrain' needs the 'recon'
            branch, model branches are ('seg',)``), or ``branches`` is malformed.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ("seg",)
    #: branches whose loss on the untrained network the schedule needs (see :meth:`set_reference`)
    needs_reference: ClassVar[tuple[str, ...]] = ()

    def __init__(self, branches: Sequence[str]) -> None:
        if isinstance(branches, str) or not isinstance(branches, Sequence):
            raise ValueError(f"branches must be a sequence of branch names such as ('seg', 'recon'), got {branches=}")
        for branch in branches:
            look_up(branch, BRANCHES, what="branch")
        if len(set(branches)) != len(branches):
            raise ValueError(f"branches must not repeat a name, got {branches=}")
        self.branches: tuple[str, ...] = tuple(b for b in BRANCHES if b in branches)
        for branch in self.requires:
            if branch not in self.branches:
                raise ValueError(
                    f"schedule '{self.name}' needs the '{branch}' branch, model branches are {self.branches}"
                )

    @abstractmethod
    def weights(self, epoch: int, history: History) -> dict[str, float]:
        """The weight of each active branch in ``epoch`` (0-based).

        Args:
            epoch: the epoch about to run.
            history: ``history[i]`` holds epoch ``i``'s mean unweighted train losses as ``loss_<branch>``;
                only entries ``i < epoch`` are read.

        Returns:
            ``{branch: weight}`` for exactly the active branches, finite floats >= 0.
        """

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learned weights that the optimizer must update (none for most schedules)."""
        return []

    @property
    def has_reference(self) -> bool:
        """Whether :meth:`set_reference` has what the schedule needs (always, if it needs nothing)."""
        return True

    def set_reference(self, losses: Mapping[str, float]) -> None:
        """Give the mean unweighted losses of the *untrained* network (before the first optimizer step).

        Only schedules with :attr:`needs_reference` use it; the training run measures it once, on a
        fixed set of training slices, and the value is part of :meth:`state_dict`.

        Raises:
            ValueError: a branch in :attr:`needs_reference` is missing from ``losses``.
        """
        missing = [b for b in self.needs_reference if b not in losses]
        if missing:
            raise ValueError(f"schedule '{self.name}' needs the reference losses of {missing}, got {sorted(losses)}")

    def combine(self, losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
        """The training objective ``sum_b w_b * L_b`` over the active branches (scalar tensor)."""
        self._check_losses(losses)
        missing = [b for b in self.branches if b not in weights]
        if missing:
            raise ValueError(f"weights lack the active branches {missing} (got {sorted(weights)})")
        return torch.stack([weights[b] * losses[b] for b in self.branches]).sum()

    def state_dict(self) -> dict[str, Any]:
        """State that a resumed run needs to continue identically (JSON values and tensors only)."""
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: the state belongs to another schedule.
        """
        if state.get("name", self.name) != self.name:
            raise ValueError(f"cannot load the state of schedule '{state['name']}' into schedule '{self.name}'")

    def _check_losses(self, losses: Mapping[str, Tensor]) -> None:
        missing = [b for b in self.branches if b not in losses]
        if missing:
            raise ValueError(f"losses lack the active branches {missing} (got {sorted(losses)})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(branches={self.branches})"


# --- the schedules --------------------------------------------------------------------------------------


@register_schedule("constant")
class ConstantSchedule(Schedule):
    """Fixed weights: ``w_b(t) = c_b`` (default 1 for every branch).

    The plain weighted multitask sum (Caruana, "Multitask Learning", Machine Learning 1997), the
    baseline against which the adaptive schedules are compared.

    Args:
        branches: the model's branches.
        weights: optional ``{branch: c_b}``; branches not given get 1.0.
    """

    def __init__(self, branches: Sequence[str], *, weights: Mapping[str, float] | None = None) -> None:
        super().__init__(branches)
        self.fixed = _fixed_weights(self, weights)

    def weights(self, epoch: int, history: History) -> dict[str, float]:
        _check_epoch(epoch)
        return dict(self.fixed)


@register_schedule("pretrain")
class PretrainSchedule(Schedule):
    """Reconstruction-only pre-training, then fixed weights.

    ``w_recon(t) = 1`` and ``w_b(t) = 0`` for the other branches while ``t < E``; ``w_b(t) = c_b``
    (default 1) from ``t = E`` on. The encoder pre-training of Pham et al., "Multitask-Learning for the
    Extraction of Avascular Necrosis of the Femoral Head in MRI" (BVM 2020), without their adaptation.

    Args:
        branches: the model's branches (must include ``recon``).
        pretrain_epochs: ``E``, epochs of reconstruction only (>= 0).
        weights: optional ``{branch: c_b}`` after pre-training; branches not given get 1.0.
    """

    requires = ("seg", "recon")

    def __init__(
        self, branches: Sequence[str], *, pretrain_epochs: int = 5, weights: Mapping[str, float] | None = None
    ) -> None:
        super().__init__(branches)
        self.pretrain_epochs = _int_param("pretrain_epochs", pretrain_epochs, 0)
        self.fixed = _fixed_weights(self, weights)

    def weights(self, epoch: int, history: History) -> dict[str, float]:
        if _check_epoch(epoch) < self.pretrain_epochs:
            return {b: 1.0 if b == "recon" else 0.0 for b in self.branches}
        return dict(self.fixed)


class _RampSchedule(Schedule):
    """Shared by ``linear`` and ``cosine``: ``w_recon = max(m, f(t))``, ``w_seg = w_loc = 1 - w_recon``."""

    requires = ("seg", "recon")

    def __init__(
        self, branches: Sequence[str], *, ramp_epochs: int = 20, pretrain_epochs: int = 0, min_recon_weight: float = 0.0
    ) -> None:
        super().__init__(branches)
        self.ramp_epochs = _int_param("ramp_epochs", ramp_epochs, 1)
        self.pretrain_epochs = _int_param("pretrain_epochs", pretrain_epochs, 0)
        self.min_recon_weight = _float_param("min_recon_weight", min_recon_weight, 0.0, 1.0)

    @staticmethod
    @abstractmethod
    def _recon_weight(t: float) -> float:
        """``f(t)``: the reconstruction weight at ramp progress ``t`` in [0, 1], from 1 down to 0."""

    def weights(self, epoch: int, history: History) -> dict[str, float]:
        t = min(max((_check_epoch(epoch) - self.pretrain_epochs) / self.ramp_epochs, 0.0), 1.0)
        w_recon = max(self.min_recon_weight, self._recon_weight(t))
        # the localisation branch serves segmentation (it gates it), so it follows w_seg
        return {b: w_recon if b == "recon" else 1.0 - w_recon for b in self.branches}


@register_schedule("linear")
class LinearSchedule(_RampSchedule):
    """Linear shift from reconstruction to segmentation.

    ``t = clip((epoch - P) / R, 0, 1)``, ``w_recon = max(m, 1 - t)``, ``w_seg = w_loc = 1 - w_recon``
    (``P = pretrain_epochs``, ``R = ramp_epochs``, ``m = min_recon_weight``): a fixed-time version of
    the reconstruction-to-segmentation shift of Pham et al. (BVM 2020).

    Args:
        branches: the model's branches (must include ``recon``).
        ramp_epochs: ``R`` (> 0), epochs from all-reconstruction to all-segmentation.
        pretrain_epochs: ``P`` (>= 0), reconstruction-only epochs before the ramp.
        min_recon_weight: ``m`` in [0, 1], floor of ``w_recon`` (reconstruction as a regulariser).
    """

    @staticmethod
    def _recon_weight(t: float) -> float:
        return 1.0 - t


@register_schedule("cosine")
class CosineSchedule(_RampSchedule):
    """Cosine shift from reconstruction to segmentation.

    As ``linear`` but ``w_recon = max(m, (1 + cos(pi t)) / 2)``: slow at both ends of the ramp, the shape
    of cosine annealing (Loshchilov and Hutter, "SGDR", ICLR 2017) applied to the task weights of
    Pham et al. (BVM 2020).

    Args:
        branches: the model's branches (must include ``recon``).
        ramp_epochs: ``R`` (> 0), epochs from all-reconstruction to all-segmentation.
        pretrain_epochs: ``P`` (>= 0), reconstruction-only epochs before the ramp.
        min_recon_weight: ``m`` in [0, 1], floor of ``w_recon``.
    """

    @staticmethod
    def _recon_weight(t: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * t))


@register_schedule("recon_dependent")
class ReconDependentSchedule(Schedule):
    """Reconstruction-dependent loss adaptation (Pham et al., BVM 2020), made precise.

    Pre-training, ``t < E``: ``w_recon = 1``, ``w_seg = w_loc = 0``. Afterwards::

        r        = L_rec(t - 1) / L_ref              # remaining reconstruction error, ~1 untrained
        w_recon  = clip(r ** gamma, m_rec, 1 - m_seg)
        w_seg    = w_loc = 1 - w_recon

    ``L_ref`` is the mean reconstruction loss of the *untrained* network, measured before the first
    optimizer step on a fixed set of training slices (:meth:`set_reference`; ``TrainingRun`` does it)
    and kept in :meth:`state_dict`. ``L_rec(t - 1)`` is the previous epoch's mean unweighted
    reconstruction loss (``r = 0`` if ``L_ref <= 0``).

    Why the untrained network: taking ``L_ref`` at the end of pre-training would give ``r = 1`` there,
    hence ``w_seg = 0``, and segmentation would start only if reconstruction kept improving without
    being trained more than before. Relative to the untrained loss, ``r`` measures how far
    reconstruction has converged, so a well pre-trained encoder hands most of the weight to
    segmentation at once, and ``w_seg`` keeps rising while ``L_rec`` falls (``w_seg`` is non-increasing
    in ``r``). If the reconstruction degrades once segmentation trains the shared encoder, ``r`` rises
    and the weight moves back to reconstruction. The mean training loss of epoch 0 would be a moving
    target: the network learns during that epoch, so the reference, and every weight after it, would
    depend on the learning rate, the epoch length and the cohort size. The paper's abstract does not
    say which reference it used. ``gamma > 1`` shifts faster (``r ** gamma`` is smaller); the floors
    ``m_rec`` / ``m_seg`` keep either task from dropping to exactly 0 after pre-training (so also
    ``w_seg >= m_seg`` when reconstruction never improves). ``w_loc = w_seg`` because the localisation
    branch serves segmentation.

    Args:
        branches: the model's branches (must include ``recon``).
        pretrain_epochs: ``E`` (>= 1: the reference needs one reconstruction epoch).
        exponent: ``gamma`` (> 0).
        min_recon_weight: ``m_rec`` in [0, 1].
        min_seg_weight: ``m_seg`` in [0, 1]; ``m_rec + m_seg <= 1``.
    """

    requires = ("seg", "recon")
    needs_reference = ("recon",)

    def __init__(
        self,
        branches: Sequence[str],
        *,
        pretrain_epochs: int = 5,
        exponent: float = 1.0,
        min_recon_weight: float = 0.1,
        min_seg_weight: float = 0.1,
    ) -> None:
        super().__init__(branches)
        self.pretrain_epochs = _int_param("pretrain_epochs", pretrain_epochs, 1)
        self.exponent = _float_param("exponent", exponent, 0.0, open_low=True)
        self.min_recon_weight = _float_param("min_recon_weight", min_recon_weight, 0.0, 1.0)
        self.min_seg_weight = _float_param("min_seg_weight", min_seg_weight, 0.0, 1.0)
        if self.min_recon_weight + self.min_seg_weight > 1.0:
            raise ValueError(
                f"min_recon_weight + min_seg_weight must be <= 1, got {min_recon_weight=}, {min_seg_weight=}"
            )
        self.reference_loss: float | None = None

    @property
    def has_reference(self) -> bool:
        return self.reference_loss is not None

    def set_reference(self, losses: Mapping[str, float]) -> None:
        super().set_reference(losses)
        self.reference_loss = _float_param("reference loss of 'recon'", losses["recon"], 0.0)

    def weights(self, epoch: int, history: History) -> dict[str, float]:
        if _check_epoch(epoch) < self.pretrain_epochs:
            return {b: 1.0 if b == "recon" else 0.0 for b in self.branches}
        if self.reference_loss is None:
            raise ValueError(
                "schedule 'recon_dependent' needs the untrained network's reconstruction loss: call "
                "set_reference({'recon': L}) before the first epoch (TrainingRun does)"
            )
        last = _history_loss(history, epoch - 1, "recon", epoch)
        r = last / self.reference_loss if self.reference_loss > 0 else 0.0
        w_recon = min(max(r**self.exponent, self.min_recon_weight), 1.0 - self.min_seg_weight)
        return {b: w_recon if b == "recon" else 1.0 - w_recon for b in self.branches}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reference_loss": self.reference_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        ref = state.get("reference_loss")
        self.reference_loss = None if ref is None else float(ref)


@register_schedule("uncertainty")
class UncertaintySchedule(Schedule):
    """Learned homoscedastic-uncertainty weights (Kendall, Gal and Cipolla, CVPR 2018).

    One learned log-variance ``s_b = log sigma_b^2`` per branch (init ``init_log_variance``)::

        combine = sum_b exp(-s_b) * L_b + s_b

    Convention: the paper's regression term is ``L / (2 sigma^2) + log sigma = (exp(-s) L + s) / 2`` and
    its classification term ``L / sigma^2 + log sigma``. We drop the 1/2 factors and use one form for
    every task (as common re-implementations do): the optimum is ``s_b = log L_b``, i.e. weight
    ``1 / L_b``, for every branch alike, and the overall factor 1/2 only rescales the gradient.
    :meth:`combine` uses the current ``s_b`` at every step and ignores the ``weights`` argument;
    :meth:`weights` reports ``exp(-s_b)`` at the start of the epoch for the history. The total can be
    negative (``s_b < 0``).

    Args:
        branches: the model's branches.
        init_log_variance: initial ``s_b`` (0: every weight starts at 1).
    """

    def __init__(self, branches: Sequence[str], *, init_log_variance: float = 0.0) -> None:
        super().__init__(branches)
        init = _float_param("init_log_variance", init_log_variance, -math.inf)
        self.log_variances = {b: torch.nn.Parameter(torch.tensor(init)) for b in self.branches}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.log_variances.values())

    def weights(self, epoch: int, history: History) -> dict[str, float]:
        _check_epoch(epoch)
        return {b: math.exp(-s.item()) for b, s in self.log_variances.items()}

    def combine(self, losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
        self._check_losses(losses)
        terms = []
        for b, s in self.log_variances.items():
            s = s.to(losses[b].device)  # differentiable copy: the Parameter itself stays where it is
            terms.append(torch.exp(-s) * losses[b] + s)
        return torch.stack(terms).sum()

    def state_dict(self) -> dict[str, Any]:
        logs = {b: s.detach().clone() for b, s in self.log_variances.items()}
        return {**super().state_dict(), "log_variances": logs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state["log_variances"]
        if set(saved) != set(self.log_variances):
            raise ValueError(
                f"saved log-variances are for branches {sorted(saved)}, this schedule has {list(self.branches)}"
            )
        with torch.no_grad():  # in place, so the optimizer keeps pointing at the same Parameters
            for b, s in self.log_variances.items():
                s.copy_(torch.as_tensor(saved[b], dtype=s.dtype))


@register_schedule("dwa")
class DWASchedule(Schedule):
    """Dynamic Weight Average (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019).

    ``w_b(t) = K exp(r_b(t-1) / T) / sum_i exp(r_i(t-1) / T)`` with ``r_b(t-1) = L_b(t-1) / L_b(t-2)``
    (the epoch-mean unweighted losses), ``K`` the number of active branches and ``T`` the temperature;
    ``w_b = 1`` in epochs 0 and 1. A branch whose loss falls slowly gets more weight.
    (``r_b = 1`` if ``L_b(t-2) <= 0``.)

    Args:
        branches: the model's branches.
        temperature: ``T`` (> 0); larger is closer to equal weights.
    """

    def __init__(self, branches: Sequence[str], *, temperature: float = 2.0) -> None:
        super().__init__(branches)
        self.temperature = _float_param("temperature", temperature, 0.0, open_low=True)

    def weights(self, epoch: int, history: History) -> dict[str, float]:
        if _check_epoch(epoch) < 2:
            return {b: 1.0 for b in self.branches}
        z = {}
        for b in self.branches:
            before = _history_loss(history, epoch - 2, b, epoch)
            last = _history_loss(history, epoch - 1, b, epoch)
            z[b] = (last / before if before > 0 else 1.0) / self.temperature
        top = max(z.values())  # softmax shifted by the max: no overflow for any ratio
        e = {b: math.exp(v - top) for b, v in z.items()}
        total = sum(e.values())
        return {b: len(self.branches) * v / total for b, v in e.items()}


__all__ = [
    "ConstantSchedule",
    "CosineSchedule",
    "DWASchedule",
    "LinearSchedule",
    "PretrainSchedule",
    "ReconDependentSchedule",
    "Schedule",
    "UncertaintySchedule",
    "create_schedule",
    "list_schedules",
    "register_schedule",
]
