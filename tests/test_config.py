"""Flat <-> typed config at the trainable boundary, with errors that name the key."""

from __future__ import annotations

import pytest

from avn_study.config import TrainConfig
from avn_study.errors import UsageError
from avn_study.vocabulary import ARMS


def test_round_trip() -> None:
    flat = {"arm": "seg+recon+loc", "lr": 3e-4, "epochs": 7, "schedule_params": {"pretrain_epochs": 3}}
    config = TrainConfig.from_flat(flat)
    assert config.model.arm == "seg+recon+loc" and config.optim.epochs == 7
    assert TrainConfig.from_flat(config.to_flat()) == config
    assert config.replace(seed=5).runtime.seed == 5


def test_every_arm_is_accepted() -> None:
    for arm in ARMS:
        assert TrainConfig.from_flat({"arm": arm}).model.arm == arm


def test_int_is_accepted_for_float() -> None:
    assert TrainConfig.from_flat({"lr": 1}).optim.lr == 1.0


@pytest.mark.parametrize(
    ("flat", "fragment"),
    [
        ({"lrr": 1e-3}, "Unknown key in space.yaml 'lrr'; did you mean 'lr'?"),
        ({"arm": "seg+rcon"}, "Unknown arm 'seg+rcon'; did you mean 'seg+recon'?"),
        ({"epochs": "ten"}, "space.yaml: epochs must be int, got 'ten'"),
        ({"epochs": True}, "space.yaml: epochs must be int, got True"),
        ({"epochs": 0}, "space.yaml: epochs must be >= 1, got 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"fold": 5}, "fold must be in [0, n_folds - 1] = [0, 4], got fold=5"),
        ({"n_inner_folds": 1}, "n_inner_folds must be >= 2, got n_inner_folds=1"),
        ({"inner_fold": 3}, "inner_fold must be -1 (off) or in [0, n_inner_folds - 1] = [0, 2], got inner_fold=3"),
        ({"norm": "btach"}, "space.yaml: Unknown norm 'btach'; did you mean 'batch'?"),
        ({"threshold": 1.5}, "space.yaml: threshold must be in (0, 1)"),
        ({"eval_every": 0}, "space.yaml: eval_every must be >= 1, got 0"),
        ({"slice_size": 0}, "space.yaml: slice_size must be in [8,"),
        ({"schedule": "linaer"}, "space.yaml: Unknown schedule 'linaer'; did you mean 'linear'?"),
        ({"arm": "unet", "schedule": "pretrain"}, "space.yaml: schedule 'pretrain' needs the 'recon' branch"),
        ({"schedule": "constant", "schedule_params": {"ramp": 1}}, "Unknown 'constant' schedule parameter 'ramp'"),
        ({"seg_dice_weight": 1.5}, "space.yaml: seg_dice_weight must be in [0, 1]"),
        ({"recon_kind": "l3"}, "space.yaml: Unknown recon_kind 'l3'"),
        ({"weight_decay": -0.1}, "space.yaml: weight_decay must be >= 0"),
    ],
)
def test_bad_flat_config(flat: dict, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        TrainConfig.from_flat(flat, source="space.yaml")
    assert fragment in str(info.value)


def test_the_default_schedule_follows_the_arm() -> None:
    assert TrainConfig.from_flat({"arm": "unet"}).optim.schedule == "constant"
    assert TrainConfig.from_flat({"arm": "seg+loc"}).optim.schedule == "constant"
    assert TrainConfig.from_flat({"arm": "seg+recon"}).optim.schedule == "recon_dependent"
    assert TrainConfig().to_flat()["schedule"] == "recon_dependent"  # recorded resolved, never "auto"
    assert TrainConfig.from_flat({"arm": "seg+loc", "schedule": "dwa"}).optim.schedule == "dwa"
