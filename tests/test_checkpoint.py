"""Checkpoints round-trip without pickle, and refuse files that are not safetensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from avn_study.errors import DataError
from avn_study.training.checkpoint import MODEL_FILE, load_config, load_training_state, load_weights, save_checkpoint


def test_round_trip_of_nested_training_state(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    training = {"optimizer": optimizer.state_dict(), "history": [{"epoch": 0, "val_dice": 0.5}], "tuple": (1, 2.5)}
    save_checkpoint(tmp_path, model, {"arm": "seg"}, training)

    weights = load_weights(tmp_path)
    assert torch.equal(weights["weight"], model.weight)
    assert load_config(tmp_path) == {"arm": "seg"}
    state = load_training_state(tmp_path)
    assert state["history"] == training["history"]
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    restored.load_state_dict(state["optimizer"])  # int keys of optimizer state survive JSON
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_pickle_in_place_of_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / MODEL_FILE).write_bytes(pickle.dumps({"weight": [1, 2]}))
    with pytest.raises(DataError, match="not a readable safetensors weights file"):
        load_weights(tmp_path)


def test_incomplete_checkpoint_is_reported(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, torch.nn.Linear(2, 2), {}, {"epoch": 1})
    (tmp_path / "state.json").unlink()
    with pytest.raises(DataError, match="incomplete or unreadable checkpoint"):
        load_training_state(tmp_path)
