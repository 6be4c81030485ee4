"""``sweep --track``: trials logged to TensorBoard and MLflow as well as the study folder (the smoke study runs
with both), and clear refusals before anything starts."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from avn_study.cli.commands import main


def _event_tags(path: Path) -> set[str]:
    """Scalar tags of a TensorBoard event file (TFRecord framing, tensorboardX's Event protobuf)."""
    from tensorboardX.proto.event_pb2 import Event

    data, tags, offset = path.read_bytes(), set(), 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        tags.update(v.tag for v in event.summary.value)
        offset += 12 + length + 4
    return tags


def test_every_trial_is_in_tensorboard(smoke_experiment: Path) -> None:
    trials = [p for p in smoke_experiment.glob("*/trial_*") if p.is_dir()]
    assert trials
    for trial in trials:
        events = list(trial.glob("events.out.tfevents.*"))
        assert events, trial
        tags = _event_tags(events[0])  # the full epoch records, not only what Tune was told
        assert any("val_dice" in tag for tag in tags) and any("loss_seg" in tag for tag in tags), trial


def test_every_trial_is_an_mlflow_run(smoke_experiment: Path) -> None:
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from avn_study.analysis import load_experiment

    mlflow.set_tracking_uri(f"sqlite:///{smoke_experiment / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["smoke"])
    trials = load_experiment(smoke_experiment).trials
    assert len(runs) == len(trials)
    assert set(runs["tags.experiment"]) == set(trials["experiment"])
    finished = runs[runs["status"] == "FINISHED"]
    assert len(finished) == len(trials) and finished["metrics.val_dice"].notna().all()
    assert finished["metrics.loss_seg"].notna().all() and finished["metrics.w_seg"].notna().all()
    assert "params.lr" in runs and runs["tags.avn_study"].eq("smoke").all()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--track", "comet"], "--track comet: unknown tracker; choose from tensorboard, mlflow, wandb"),
        (["--track", "wandb"], "--track wandb needs the 'wandb' package: pip install 'avn-study[wandb]'"),
        (["--track", "mlflow", "--storage", "s3://bucket/x"], "--track mlflow with an object-store --storage needs"),
    ],
)
def test_bad_trackers_are_refused_before_anything_starts(
    args: list[str], fragment: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    import importlib.util

    from conftest import small_space

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = [] if "--storage" in args else ["--storage", str(tmp_path / "storage")]
    argv = ["sweep", str(small_space(tmp_path)), "--data", str(tmp_path / "nothing"), *storage, *args]
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "storage").exists()
