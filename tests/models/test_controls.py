"""The control rows of search_spaces/ablation.yaml: what each isolates, checked on the models themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from avn_study.config import TrainConfig
from avn_study.models import matched_width, model_for_arm, n_parameters
from avn_study.models.runtime import build_model
from avn_study.study.space import group_rows, load_space
from avn_study.vocabulary import ARMS

ABLATION = Path(__file__).parents[2] / "search_spaces" / "ablation.yaml"


def _model(space, row: str):
    return build_model(TrainConfig.from_flat(space.trial_config(row)))


def test_the_wide_unet_matches_the_full_model_within_5_percent() -> None:
    space = load_space(ABLATION)
    full, wide = n_parameters(_model(space, "seg+recon+loc")), n_parameters(_model(space, "unet/wide"))
    assert abs(wide / full - 1) < 0.05, (wide, full)
    assert n_parameters(_model(space, "unet")) < 0.85 * full  # the plain U-Net is clearly smaller
    depth = space.fixed["depth"]
    assert space.arms["unet/wide"]["base_channels"] == matched_width("unet", full, depth=depth)


@pytest.mark.parametrize(
    ("row", "control", "differs_in"),
    [
        ("seg+loc", "seg+loc/no-gate", {"gating"}),  # the same network and losses, only the gate removed
        ("seg+recon+loc", "seg+recon+loc/constant", {"schedule", "schedule_params"}),  # only the schedule
        ("unet", "unet/wide", {"base_channels"}),  # only the width
    ],
)
def test_each_control_changes_one_thing(row: str, control: str, differs_in: set[str]) -> None:
    space = load_space(ABLATION)
    a, b = space.trial_config(row), space.trial_config(control)
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"arm"}
    assert changed == differs_in and (a["arm"] == b["arm"])


def test_the_no_gate_control_keeps_the_localisation_loss_and_drops_the_gate() -> None:
    space = load_space(ABLATION)
    gated, plain = _model(space, "seg+loc"), _model(space, "seg+loc/no-gate")
    assert gated.branches == plain.branches == ("seg", "loc")  # loc still trained by its loss
    assert (gated.gating, plain.gating) == ("multiply", "none")
    assert n_parameters(gated) == n_parameters(plain)


def test_every_arm_says_what_it_asks_and_every_control_is_grouped() -> None:
    space = load_space(ABLATION)
    assert all(arm.question for arm in ARMS.values())
    grouped = [row for rows in group_rows(space.raw["groups"]).values() for row in rows]
    assert sorted(grouped) == sorted(space.arms) and len(grouped) == len(set(grouped))
    # every control row is in a contrast that answers its question
    asked = {row for c in space.contrasts for row in (c.row, c.against)}
    assert asked == set(space.arms)


def test_head_supervised_unet_and_cascade_have_the_unet_budget_or_the_cascade_its_two() -> None:
    cfg = {"base_channels": 32, "depth": 4}
    unet, head = n_parameters(model_for_arm("unet", **cfg)), n_parameters(model_for_arm("unet+head", **cfg))
    assert head - unet == 33  # one 1x1 conv from the 32 top-level channels
    cascade = model_for_arm("cascade", **cfg)
    assert n_parameters(cascade.seg_net) == n_parameters(cascade.loc_net) == unet  # two full U-Nets
