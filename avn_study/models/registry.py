"""The model registry (timm's pattern): ``@register_model("name")`` on a class, ``create_model("name", ...)``.

Its own module so that the model modules can register themselves without importing the package that
imports them (no import cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from avn_study.errors import look_up

M = TypeVar("M", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make the model constructible as ``create_model(name, **cfg)``."""

    def register(cls: M) -> M:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name]!r})")
        _MODELS[name] = cls
        return cls

    return register


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **cfg: Any) -> nn.Module:
    """Build the model registered as ``name`` with keyword arguments ``cfg``.

    Raises:
        UsageError: unknown ``name`` (``did you mean ...?``).
    """
    return _MODELS[look_up(name, _MODELS, what="model")](**cfg)
