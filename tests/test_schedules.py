"""Loss-adaptation schedules: the registry contract for every schedule, then each formula by hand."""

from __future__ import annotations

import math

import pytest
import torch

from avn_study.errors import UsageError
from avn_study.training.schedules import Schedule, create_schedule, list_schedules

BRANCH_SETS = [("seg",), ("seg", "loc"), ("seg", "recon"), ("seg", "recon", "loc")]
EPOCHS = 30


def synthetic_history(epochs: int = EPOCHS) -> list[dict[str, float]]:
    """Decreasing losses, each branch at its own pace."""
    return [
        {
            "epoch": i,
            "loss_seg": 0.9 * 0.95**i + 0.1,
            "loss_recon": 0.5 * 0.8**i + 0.05,
            "loss_loc": 0.7 * 0.9**i + 0.1,
            "loss_total": 0.0,
        }
        for i in range(epochs)
    ]


def needs_recon(name: str) -> bool:
    return "recon" in create_schedule(name, ("seg", "recon")).requires


def run(schedule: Schedule, history: list[dict[str, float]], epochs: range) -> list[dict[str, float]]:
    if not schedule.has_reference:  # what TrainingRun measures on the untrained network
        schedule.set_reference({b: history[0][f"loss_{b}"] for b in schedule.needs_reference})
    return [schedule.weights(e, history[:e]) for e in epochs]


# --- every registered schedule --------------------------------------------------------------------------

CASES = [(name, branches) for name in list_schedules() for branches in BRANCH_SETS]


def test_registry_lists_all_schedules():
    assert {"constant", "pretrain", "linear", "cosine", "recon_dependent", "uncertainty", "dwa"} <= set(
        list_schedules()
    )


@pytest.mark.parametrize(("name", "branches"), CASES)
def test_weights_have_exactly_the_active_branches(name, branches):
    if "recon" not in branches and needs_recon(name):
        with pytest.raises(ValueError) as info:
            create_schedule(name, branches)
        assert str(info.value) == f"schedule '{name}' needs the 'recon' branch, model branches are {branches}"
        return
    schedule = create_schedule(name, branches)
    assert schedule.name == name
    for weights in run(schedule, synthetic_history(), range(EPOCHS)):
        assert set(weights) == set(branches)
        for b, w in weights.items():
            assert type(w) is float and math.isfinite(w) and w >= 0, (b, w)
        assert any(w > 0 for w in weights.values())


@pytest.mark.parametrize(("name", "branches"), [c for c in CASES if "recon" in c[1]])
def test_state_dict_round_trip_continues_identically(name, branches, tmp_path):
    from avn_study.training.checkpoint import load_training_state, save_checkpoint

    history = synthetic_history()
    first = create_schedule(name, branches)
    run(first, history, range(15))
    if first.parameters():  # learned weights: move them away from their initial values
        opt = torch.optim.SGD(first.parameters(), lr=0.3)
        for _ in range(3):
            losses = {b: torch.tensor(history[0][f"loss_{b}"]) for b in branches}
            opt.zero_grad()
            first.combine(losses, first.weights(15, history)).backward()
            opt.step()
    # through the real checkpoint (JSON + safetensors), as a resumed run does
    save_checkpoint(tmp_path, torch.nn.Linear(1, 1), {}, {"schedule": first.state_dict()})
    resumed = create_schedule(name, branches)
    resumed.load_state_dict(load_training_state(tmp_path)["schedule"])
    assert run(resumed, history, range(15, EPOCHS)) == run(first, history, range(15, EPOCHS))
    losses = {b: torch.tensor(0.3) for b in branches}
    weights = first.weights(20, history)
    assert resumed.combine(losses, weights).item() == pytest.approx(first.combine(losses, weights).item())


@pytest.mark.parametrize("name", list_schedules())
def test_combine_is_a_differentiable_scalar(name):
    schedule = create_schedule(name, ("seg", "recon", "loc"))
    run(schedule, synthetic_history(), range(0))  # gives the reference that some schedules need
    preds = {b: torch.tensor(0.5, requires_grad=True) for b in schedule.branches}
    total = schedule.combine(preds, schedule.weights(8, synthetic_history()))
    assert total.shape == () and torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in preds.values())


@pytest.mark.parametrize("name", list_schedules())
def test_negative_epoch_and_foreign_state_are_refused(name):
    schedule = create_schedule(name, ("seg", "recon"))
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got epoch=-1"):
        schedule.weights(-1, [])
    other = "dwa" if name != "dwa" else "constant"
    with pytest.raises(ValueError, match=f"cannot load the state of schedule '{other}'"):
        schedule.load_state_dict(create_schedule(other, ("seg", "recon")).state_dict())


# --- formulas, by hand ----------------------------------------------------------------------------------


def test_constant_defaults_and_given_weights():
    assert create_schedule("constant", ("seg", "loc")).weights(3, []) == {"seg": 1.0, "loc": 1.0}
    schedule = create_schedule("constant", ("seg", "recon", "loc"), weights={"recon": 0.25, "loc": 2})
    assert schedule.weights(0, []) == {"seg": 1.0, "recon": 0.25, "loc": 2.0}


def test_pretrain_is_recon_only_for_e_epochs():
    schedule = create_schedule("pretrain", ("seg", "recon", "loc"), pretrain_epochs=3, weights={"recon": 0.5})
    weights = run(schedule, synthetic_history(), range(6))
    assert weights[:3] == [{"seg": 0.0, "recon": 1.0, "loc": 0.0}] * 3
    assert weights[3:] == [{"seg": 1.0, "recon": 0.5, "loc": 1.0}] * 3


@pytest.mark.parametrize(
    ("params", "epoch", "recon"),
    [
        ({}, 0, 1.0),
        ({}, 5, 0.75),
        ({}, 10, 0.5),
        ({}, 20, 0.0),
        ({}, 29, 0.0),
        ({"pretrain_epochs": 5}, 4, 1.0),
        ({"pretrain_epochs": 5}, 15, 0.5),
        ({"ramp_epochs": 4}, 1, 0.75),
        ({"min_recon_weight": 0.2}, 16, 0.2),
        ({"min_recon_weight": 0.2}, 4, 0.8),
    ],
)
def test_linear(params, epoch, recon):
    weights = create_schedule("linear", ("seg", "recon", "loc"), **params).weights(epoch, [])
    assert weights["recon"] == pytest.approx(recon)
    assert weights["seg"] == pytest.approx(1 - recon)
    assert weights["loc"] == weights["seg"]  # localisation follows segmentation


@pytest.mark.parametrize(
    ("epoch", "recon"),
    [
        (0, 1.0),
        (5, 0.5 * (1 + math.cos(math.pi / 4))),
        (10, 0.5),
        (15, 0.5 * (1 + math.cos(3 * math.pi / 4))),
        (20, 0.0),
    ],
)
def test_cosine(epoch, recon):
    weights = create_schedule("cosine", ("seg", "recon")).weights(epoch, [])
    assert weights == pytest.approx({"seg": 1 - recon, "recon": recon})


def _recon_history(losses: list[float]) -> list[dict[str, float]]:
    return [{"loss_seg": 0.5, "loss_recon": v, "loss_loc": 0.5} for v in losses]


def test_recon_dependent_hand_computed():
    history = _recon_history([0.9, 0.6, 0.4, 0.2, 0.01])
    schedule = create_schedule("recon_dependent", ("seg", "recon", "loc"), pretrain_epochs=2)
    schedule.set_reference({"recon": 1.0})  # the untrained network's loss, not epoch 0's mean
    weights = run(schedule, history, range(6))
    assert weights[0] == weights[1] == {"seg": 0.0, "recon": 1.0, "loc": 0.0}  # pre-training
    # w_recon = L_rec(t-1) / L_ref, w_seg = w_loc = 1 - w_recon; floors 0.1
    for epoch, recon in [(2, 0.6), (3, 0.4), (4, 0.2), (5, 0.1)]:
        assert weights[epoch] == pytest.approx({"seg": 1 - recon, "recon": recon, "loc": 1 - recon}), epoch
    assert schedule.state_dict()["reference_loss"] == 1.0


def _with_reference(schedule: Schedule, reference: float = 1.0) -> Schedule:
    schedule.set_reference({"recon": reference})
    return schedule


def test_recon_dependent_exponent_and_floors():
    sharp = _with_reference(create_schedule("recon_dependent", ("seg", "recon"), pretrain_epochs=2, exponent=2.0))
    assert sharp.weights(2, _recon_history([1.0, 0.6]))["recon"] == pytest.approx(0.36)
    worse = _with_reference(
        create_schedule("recon_dependent", ("seg", "recon"), pretrain_epochs=1, min_seg_weight=0.25)
    )
    assert worse.weights(1, _recon_history([1.0]))["seg"] == pytest.approx(0.25)  # r = 1: seg still trains
    no_floor = _with_reference(create_schedule(
        "recon_dependent", ("seg", "recon"), pretrain_epochs=1, min_recon_weight=0.0, min_seg_weight=0.0
    ))  # fmt: skip
    assert no_floor.weights(2, _recon_history([1.0, 1.5]))["seg"] == 0.0


def test_recon_dependent_is_monotone_in_convergence():
    last_losses = [1.2, 1.0, 0.8, 0.5, 0.3, 0.1, 0.05, 0.0]  # ever better reconstruction
    seg = []
    for last in last_losses:
        schedule = _with_reference(create_schedule("recon_dependent", ("seg", "recon"), pretrain_epochs=1))
        seg.append(schedule.weights(2, _recon_history([1.0, last]))["seg"])
    assert seg == sorted(seg) and seg[-1] > seg[0]
    # on a decreasing history, weight moves toward segmentation epoch by epoch
    schedule = create_schedule("recon_dependent", ("seg", "recon", "loc"))
    w_seg = [w["seg"] for w in run(schedule, synthetic_history(), range(5, EPOCHS))]
    assert w_seg == sorted(w_seg) and w_seg[0] > 0 and w_seg[-1] > w_seg[0] + 0.3


def test_recon_dependent_reference_comes_from_the_state():
    history = _recon_history([1.0, 0.5, 0.4])
    schedule = _with_reference(create_schedule("recon_dependent", ("seg", "recon"), pretrain_epochs=1))
    restored = create_schedule("recon_dependent", ("seg", "recon"), pretrain_epochs=1)
    assert not restored.has_reference
    restored.load_state_dict(schedule.state_dict())
    assert restored.has_reference
    changed = [{"loss_seg": 0.5, "loss_recon": 2.0}, *history[1:]]  # the first epoch's loss plays no part
    assert restored.weights(3, changed) == pytest.approx({"seg": 0.6, "recon": 0.4})


def test_recon_dependent_reports_a_missing_reference_or_history():
    schedule = create_schedule("recon_dependent", ("seg", "recon"), pretrain_epochs=2)
    assert schedule.weights(0, []) == {"seg": 0.0, "recon": 1.0}  # pre-training needs no reference
    with pytest.raises(ValueError, match=r"needs the untrained network's reconstruction loss: call set_reference"):
        schedule.weights(2, _recon_history([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"reference loss of 'recon' must be a finite number >= 0.0, got .*nan"):
        schedule.set_reference({"recon": float("nan")})
    schedule.set_reference({"recon": 1.0})
    with pytest.raises(ValueError, match=r"^weights\(epoch=3\) needs the losses of epoch 2, but history has"):
        schedule.weights(3, [])
    with pytest.raises(ValueError, match=r"history\[1\] has no 'loss_recon'"):
        schedule.weights(2, [{"loss_seg": 1.0}, {"loss_seg": 1.0}])


def test_uncertainty_combine_formula_and_gradients():
    schedule = create_schedule("uncertainty", ("seg", "recon", "loc"))
    assert len(schedule.parameters()) == 3
    assert schedule.weights(0, []) == {"seg": 1.0, "recon": 1.0, "loc": 1.0}
    s = {"seg": 0.5, "recon": -1.0, "loc": 0.0}
    state = {"name": "uncertainty", "log_variances": {b: torch.tensor(v) for b, v in s.items()}}
    schedule.load_state_dict(state)
    assert schedule.weights(4, []) == pytest.approx({b: math.exp(-v) for b, v in s.items()})
    losses = {"seg": torch.tensor(0.8), "recon": torch.tensor(0.2), "loc": torch.tensor(1.5)}
    total = schedule.combine(losses, {"seg": 123.0, "recon": 0.0, "loc": 9.0})  # given weights are ignored
    expected = sum(math.exp(-s[b]) * losses[b].item() + s[b] for b in s)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    for b, param in zip(schedule.branches, schedule.parameters(), strict=True):
        # d/ds (exp(-s) L + s) = 1 - exp(-s) L
        assert param.grad.item() == pytest.approx(1 - math.exp(-s[b]) * losses[b].item(), rel=1e-6), b


def test_uncertainty_learns_inverse_loss_weights():
    schedule = create_schedule("uncertainty", ("seg", "recon"))
    opt = torch.optim.SGD(schedule.parameters(), lr=0.1)
    losses = {"seg": torch.tensor(0.5), "recon": torch.tensor(2.0)}
    for _ in range(500):
        opt.zero_grad()
        schedule.combine(losses, {}).backward()
        opt.step()
    assert schedule.weights(1, []) == pytest.approx({"seg": 2.0, "recon": 0.5}, rel=1e-3)  # 1 / L_b


def test_dwa_hand_computed():
    schedule = create_schedule("dwa", ("seg", "recon"))
    history = [{"loss_seg": 1.0, "loss_recon": 1.0}, {"loss_seg": 0.5, "loss_recon": 1.0}]
    assert schedule.weights(0, []) == schedule.weights(1, history[:1]) == {"seg": 1.0, "recon": 1.0}
    # r = (0.5, 1.0), T = 2: w_seg = 2 e^0.25 / (e^0.25 + e^0.5) = 2 / (1 + e^0.25)
    w_seg = 2 / (1 + math.exp(0.25))
    assert schedule.weights(2, history) == pytest.approx({"seg": w_seg, "recon": 2 - w_seg})
    assert w_seg == pytest.approx(0.875647, abs=1e-6)


def test_dwa_three_branches_sum_to_k_and_temperature():
    history = synthetic_history(4)
    weights = create_schedule("dwa", ("seg", "recon", "loc")).weights(3, history)
    assert sum(weights.values()) == pytest.approx(3.0)
    assert weights["recon"] < weights["loc"] < weights["seg"]  # recon falls fastest, seg slowest
    hot = create_schedule("dwa", ("seg", "recon", "loc"), temperature=1e6).weights(3, history)
    assert hot == pytest.approx({"seg": 1.0, "recon": 1.0, "loc": 1.0})


# --- bad input ------------------------------------------------------------------------------------------


def test_unknown_schedule_name_suggests():
    with pytest.raises(UsageError) as info:
        create_schedule("linaer", ("seg", "recon"))
    assert "Unknown schedule 'linaer'; did you mean 'linear'?" in str(info.value)
    assert "Available: constant, cosine, dwa," in str(info.value)


def test_unknown_param_names_it_and_lists_the_allowed():
    with pytest.raises(UsageError) as info:
        create_schedule("linear", ("seg", "recon"), ramp_epoch=3)
    message = str(info.value)
    assert "'ramp_epoch'; did you mean 'ramp_epochs'?" in message
    assert "Available: min_recon_weight, pretrain_epochs, ramp_epochs" in message
    with pytest.raises(UsageError, match="Unknown 'dwa' schedule parameter 'weights'"):
        create_schedule("dwa", ("seg", "recon"), weights={"seg": 1.0})


BAD_VALUES = [
    ("linear", {"ramp_epochs": 0}, "ramp_epochs must be an integer > 0, got ramp_epochs=0"),
    ("cosine", {"ramp_epochs": 2.5}, "ramp_epochs must be an integer > 0, got ramp_epochs=2.5"),
    ("linear", {"ramp_epochs": True}, "ramp_epochs must be an integer > 0, got ramp_epochs=True"),
    ("linear", {"pretrain_epochs": -1}, "pretrain_epochs must be an integer >= 0, got pretrain_epochs=-1"),
    (
        "linear",
        {"min_recon_weight": 1.5},
        "min_recon_weight must be a finite number in [0.0, 1.0], got min_recon_weight=1.5",
    ),
    ("pretrain", {"pretrain_epochs": "5"}, "pretrain_epochs must be an integer >= 0, got pretrain_epochs='5'"),
    ("recon_dependent", {"pretrain_epochs": 0}, "pretrain_epochs must be an integer > 0, got pretrain_epochs=0"),
    ("recon_dependent", {"exponent": 0}, "exponent must be a finite number > 0.0, got exponent=0"),
    (
        "recon_dependent",
        {"min_recon_weight": 0.6, "min_seg_weight": 0.5},
        "min_recon_weight + min_seg_weight must be <= 1, got min_recon_weight=0.6, min_seg_weight=0.5",
    ),
    ("recon_dependent", {"min_seg_weight": -0.1}, "min_seg_weight must be a finite number in [0.0, 1.0]"),
    ("uncertainty", {"init_log_variance": float("nan")}, "init_log_variance must be a finite number"),
    ("dwa", {"temperature": 0.0}, "temperature must be a finite number > 0.0, got temperature=0.0"),
    ("dwa", {"temperature": float("inf")}, "temperature must be a finite number > 0.0, got temperature=inf"),
    (
        "constant",
        {"weights": {"loc": 1.0}},
        "schedule 'constant' weights name the 'loc' branch, model branches are ('seg', 'recon')",
    ),
    ("pretrain", {"weights": {"seg": -1}}, "weights['seg'] must be a finite number >= 0.0, got weights['seg']=-1"),
    ("constant", {"weights": {"seg": 0, "recon": 0}}, "weights must not all be 0"),
    ("constant", {"weights": [1.0, 2.0]}, "weights must be a mapping of branch -> weight"),
]


@pytest.mark.parametrize(("name", "params", "message"), BAD_VALUES)
def test_bad_values_name_the_param(name, params, message):
    with pytest.raises(ValueError) as info:
        create_schedule(name, ("seg", "recon"), **params)
    assert message in str(info.value)


def test_bad_branches():
    with pytest.raises(UsageError, match="did you mean 'seg'"):
        create_schedule("constant", ("seg", "recon"), weights={"sge": 1.0})
    with pytest.raises(UsageError, match="Unknown branch 'rcon'"):
        create_schedule("constant", ("seg", "rcon"))
    with pytest.raises(ValueError, match="branches must be a sequence of branch names"):
        create_schedule("constant", "seg")
    with pytest.raises(ValueError, match="branches must not repeat a name"):
        create_schedule("constant", ("seg", "seg"))
    with pytest.raises(ValueError, match=r"schedule 'dwa' needs the 'seg' branch, model branches are \("):
        create_schedule("dwa", ("recon",))
    with pytest.raises(
        ValueError, match="schedule 'linear' needs the 'recon' branch, model branches are \\('seg', 'loc'\\)"
    ):
        create_schedule("linear", ("seg", "loc"))
