"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint folder holds ``model.safetensors`` (weights only, loadable by any safetensors reader),
``config.json`` (the run's flat config) and, for resuming, ``training.safetensors`` + ``state.json``
(optimizer and schedule state, epoch, history). Nested state dicts are split into a JSON tree whose
tensor leaves point into the safetensors file, so loading never executes code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from avn_study.errors import DataError

MODEL_FILE, CONFIG_FILE, TRAINING_FILE, STATE_FILE = (
    "model.safetensors",
    "config.json",
    "training.safetensors",
    "state.json",
)


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able tree of ``obj`` with tensors moved into ``tensors`` (dict key types preserved)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {k: _join(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def _umask_mode(path: Path) -> None:
    """Give a file the mode the umask gives a new file (safetensors writes 0600, unreadable by the group)."""
    from avn_study.outputs import umask

    os.chmod(path, 0o666 & ~umask())


def save_weights(model: torch.nn.Module, directory: str | Path, config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_FILE))
    _umask_mode(directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def save_checkpoint(
    directory: str | Path, model: torch.nn.Module, config: dict[str, Any], training: dict[str, Any]
) -> Path:
    """Write weights, config and the training state (optimizer, schedule, epoch, history)."""
    directory = save_weights(model, directory, config)
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(training, "t", tensors)
    save_file(tensors, str(directory / TRAINING_FILE))
    _umask_mode(directory / TRAINING_FILE)
    (directory / STATE_FILE).write_text(json.dumps(tree) + "\n")
    return directory


def load_weights(
    directory: str | Path, map_location: str = "cpu", *, file: str | None = MODEL_FILE
) -> dict[str, torch.Tensor]:
    """Read ``directory/model.safetensors`` (``file=None``: ``directory`` is the file itself); a file that is not
    safetensors (e.g. a pickle) is refused."""
    path = Path(directory) / file if file else Path(directory)
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors weights file ({err})") from None


def load_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable JSON config ({err})") from None


def load_training_state(directory: str | Path) -> dict[str, Any]:
    """The ``training`` dict given to :func:`save_checkpoint`, tensors on the CPU."""
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / TRAINING_FILE))
        tree = json.loads((directory / STATE_FILE).read_text())
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{directory}: incomplete or unreadable checkpoint ({err})") from None
    return _join(tree, tensors)
