"""Files shipped with avn-study: the search spaces and the report notebook.

In a checkout they live in the repository's ``search_spaces/`` and ``analysis/`` folders; a wheel carries
the same files as package data (``avn_study/search_spaces/``, ``avn_study/notebooks/``, mapped in
``pyproject.toml``), so ``pip install avn-study`` can run ``demo`` and ``bench`` without a clone.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from avn_study.errors import UsageError

_CHECKOUT = {"search_spaces": "search_spaces", "notebooks": "analysis"}  # package-data folder -> repo folder


def shipped_file(kind: str, name: str) -> Path:
    """The shipped file ``name`` of ``kind`` (``search_spaces`` or ``notebooks``).

    Raises:
        UsageError: no such shipped file (names the ones there are).
    """
    packaged = files("avn_study") / kind / name
    if packaged.is_file():  # an installed wheel (unpacked on disk, so it is a path)
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[1] / _CHECKOUT[kind] / name
    if checkout.is_file():
        return checkout
    known = ", ".join(shipped_names(kind)) or "none found"
    raise UsageError(f"no shipped {kind.replace('_', ' ')} file '{name}' (shipped: {known})")


def shipped_names(kind: str) -> list[str]:
    """Names of the shipped files of ``kind``."""
    packaged = files("avn_study") / kind
    if packaged.is_dir():
        return sorted(p.name for p in packaged.iterdir() if p.is_file() and not p.name.startswith(("_", ".")))
    checkout = Path(__file__).resolve().parents[1] / _CHECKOUT[kind]
    return sorted(p.name for p in checkout.iterdir() if p.is_file()) if checkout.is_dir() else []


def shipped_space(name: str) -> Path:
    """``search_spaces/NAME.yaml`` as shipped (``name`` with or without ``.yaml``)."""
    return shipped_file("search_spaces", name if name.endswith(".yaml") else f"{name}.yaml")


def space_argument(given: Path) -> Path:
    """A search-space argument: a file, or the name of a shipped space (``ablation``, ``demo``, ...)."""
    if given.exists() or given.parent != Path(".") or given.suffix not in ("", ".yaml"):
        return given
    try:
        return shipped_space(given.name)
    except UsageError:
        return given  # load_space names the missing file
