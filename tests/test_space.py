"""Search-space files: the shipped ones parse; bad ones fail naming the file, the key and what is allowed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from avn_study.errors import UsageError
from avn_study.study.space import load_space, resolve_sampled

SPACES = sorted(Path(__file__).parents[1].joinpath("search_spaces").glob("*.yaml"))
BASE = {
    "name": "t",
    "fixed": {"epochs": 4, "slice_size": 64, "depth": 2, "schedule": "constant"},
    "arms": ["unet", "seg+loc"],
}


def test_shipped_spaces_are_valid() -> None:
    names = {p.stem for p in SPACES}
    assert {"smoke", "demo", "ablation", "tune"} <= names
    for path in SPACES:
        if path.stem == "vs_nnunet" and importlib.util.find_spec("nnunetv2") is None:
            continue  # needs the nnunet extra (tests/test_nnunet.py says so when it is absent)
        space = load_space(path)
        assert space.name == path.stem and space.arms


def test_ablation_covers_the_paper_rows() -> None:
    space = load_space(next(p for p in SPACES if p.stem == "ablation"))
    assert {v["arm"] for v in space.arms.values()} == {
        "unet",
        "seg",
        "seg+recon",
        "seg+loc",
        "seg+recon+loc",
        "unet+head",
        "cascade",
    }  # the paper's rows and controls
    assert space.protocol == "nested_ablation" and len(space.seeds) == 3 and space.folds == (0, 1, 2, 3, 4)
    assert space.inner_folds == 4 and space.tuning_fold == 0


def test_no_shipped_ablation_reports_a_tuning_patient() -> None:
    for path in SPACES:
        space = load_space(path)
        if space.protocol == "fair_ablation":
            assert space.tuning_fold not in space.folds, path


def test_fold_defaults_per_protocol(tmp_path: Path) -> None:
    fair = load_space(_write(tmp_path, protocol="fair_ablation", tuning_fold=2))
    assert fair.folds == (0, 1, 3, 4)  # every fold but the tuning fold
    nested = load_space(_write(tmp_path, protocol="nested_ablation"))
    assert nested.folds == (0, 1, 2, 3, 4) and nested.inner_folds == 3 and nested.tuning_fold == 0


def _write(tmp_path: Path, **changes: object) -> Path:
    data = {**BASE, **changes}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"protocl": "sweep"}, "protocl: Unknown key 'protocl'; did you mean 'protocol'?"),
        ({"protocol": "fair"}, "protocol: Unknown value 'fair'; did you mean 'fair_ablation'?"),
        ({"metric": "dice"}, "metric: Unknown value 'dice'; did you mean"),
        ({"arms": ["unet", "seg+rcon"]}, "arms.seg+rcon: Unknown arm 'seg+rcon'; did you mean 'seg+recon'?"),
        ({"arms": {"base": {"schedule": "linaer"}}}, "Unknown arm 'base'"),
        (
            {"arms": {"x": {"arm": "seg+recon", "schedule": "linaer"}}},
            "Unknown schedule 'linaer'; did you mean 'linear'?",
        ),
        ({"arms": {"x": {"arm": "seg", "schedule": "pretrain"}}}, "schedule 'pretrain' needs the 'recon' branch"),
        ({"fixed": {"epochs": 4, "lr_rate": 1}}, "Unknown key in"),
        ({"search": {"lr": {"loguniform": [0, 1]}}}, "search.lr: loguniform needs low > 0, got [0, 1]"),
        ({"search": {"lr": {"uniform": [1, 0.1]}}}, "search.lr: uniform needs [low, high] with low < high"),
        ({"search": {"lr": {"normal": [1, 2]}}}, "search.lr: Unknown value 'normal'"),
        ({"search": {"lrate": {"uniform": [1, 2]}}}, "search.lrate: Unknown key 'lrate'; did you mean 'lr'?"),
        ({"search": {"gating": {"categorical": ["multiply"]}}}, "categorical needs a list of at least 2 choices"),
        ({"search": {"schedule_params.ramp": {"int": [1, 3]}}}, "Unknown 'constant' schedule parameter 'ramp'"),
        ({"folds": [0, 7]}, "folds: fold indices must be < n_folds=5, got [0, 7]"),
        ({"seeds": []}, "seeds: expected a non-empty list of integers >= 0"),
        ({"trials": 0}, "trials: expected an integer >= 1, got 0"),
        ({"resources": {"cpu": 1, "gpus": 1}}, "resources.gpus: Unknown key 'gpus'; did you mean 'gpu'?"),
        ({"resources": {"gpu": 1.5}}, "resources.gpu: fractions are for sharing one GPU"),
        ({"scheduler": {"type": "asha", "grace_period": 9}}, "scheduler.grace_period: must be <= epochs (4)"),
        ({"name": "a b"}, "name: the study 'a b' is not a safe folder name"),
        (
            {"protocol": "fair_ablation", "folds": [0, 1, 2]},
            "folds: fair_ablation reports folds [0, 1, 2], but tuning_fold 0 chose every row's configuration",
        ),
        ({"protocol": "fair_ablation", "tuning_fold": 5}, "tuning_fold: fold indices must be < n_folds=5, got [5]"),
        ({"protocol": "fair_ablation", "inner_folds": 3}, "inner_folds: only nested_ablation has inner folds"),
        ({"protocol": "nested_ablation", "inner_folds": 1}, "inner_folds: expected an integer >= 2, got 1"),
        (
            {"metric": "hd95_mm", "mode": "min", "fixed": {**BASE["fixed"], "full_metrics_every": 2}},
            "arms.unet: metric hd95_mm is computed only on full validations, but full_metrics_every=2",
        ),
        ({"fixed": {**BASE["fixed"], "eval_every": 0}}, "fixed: eval_every must be >= 1, got 0"),
        (
            {"fixed": {**BASE["fixed"], "epochs": 8, "eval_every": 2}, "scheduler": {"grace_period": 1}},
            "arms.unet: ASHA compares trials at epochs [1], but eval_every=2",
        ),
        (  # Ray's milestones 3, 4.5 and 6.75 are decided at epochs 3, 5 and 7
            {
                "fixed": {**BASE["fixed"], "epochs": 8, "eval_every": 3},
                "scheduler": {"grace_period": 3, "reduction_factor": 1.5},
            },
            "ASHA compares trials at epochs [5, 7], but eval_every=3",
        ),
        (
            {"protocol": "nested_ablation", "inner_folds": 3, "tuning_fold": 3},
            "tuning_fold: nested_ablation: the inner fold searched on must be < inner_folds=3, got 3",
        ),
    ],
)
def test_bad_space_files(tmp_path: Path, changes: dict, fragment: str) -> None:
    path = _write(tmp_path, **changes)
    with pytest.raises(UsageError) as info:
        load_space(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot be read"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_space(tmp_path / "bad.yaml")


def test_rows_merge_fixed_and_overrides(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, arms={"full": {"arm": "seg+recon+loc", "schedule": "linear"}}))
    config = space.trial_config("full", fold=2)
    assert config["arm"] == "seg+recon+loc" and config["epochs"] == 4 and config["fold"] == 2
    merged = resolve_sampled({"schedule_params": {"ramp_epochs": 3}}, {"schedule_params.pretrain_epochs": 2, "lr": 1.0})
    assert merged == {"schedule_params": {"ramp_epochs": 3, "pretrain_epochs": 2}, "lr": 1.0}


def test_asha_rungs_on_evaluated_epochs_are_accepted(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, fixed={**BASE["fixed"], "epochs": 20, "eval_every": 2},
                              scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 3}))  # fmt: skip
    assert space.scheduler.rungs(20) == [2, 6, 18]
