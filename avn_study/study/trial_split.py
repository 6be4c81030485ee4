"""A trial's split, read from its study folder by content hash instead of carried in its config.

A study freezes its patient split in the study folder (``splits.json``; nested cross-validation's inner
folds in ``nested_splits.json``). A trial's config names it: ``_avn.split_hash`` (and ``_avn.outer``, the
outer fold whose inner folds it tunes on), never the patient lists, so a trial's ``params.json`` and
Ray's experiment state, which holds several copies of every config, stay the same size whatever the
cohort (docs/benchmarks.md). The trial reads the files through the experiment storage's filesystem (a
local or shared folder, or an object store), once per worker process and study, and refuses a file
that is not the split it was planned on.

Trials of study folders written before this carry the split inline (``_avn.split``, ``_avn.inner``);
that is used as it is, so an old study resumes with the parameters Ray pickled for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from avn_study.errors import DataError
from avn_study.study.folder import NESTED_SPLITS, SPLITS_COPY

_READ: dict[tuple[str, str], Any] = {}  # (study folder, file name) -> parsed content, per worker process


def split_reference(split_hash: str, outer: int | None = None) -> dict[str, Any]:
    """What a trial's ``_avn`` carries of its split (see the module docstring)."""
    return {"split_hash": split_hash} if outer is None else {"split_hash": split_hash, "outer": outer}


def trial_split(
    meta: dict[str, Any], study: str, read: Callable[[str], bytes]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the frozen split, the inner folds of the trial's outer fold or None) in their ``to_dict`` forms.

    ``study`` names the study folder in messages and the cache; ``read(name)`` returns the bytes of a
    file in it. A trial without a reference (a direct call outside a study) gets (None, None): the data
    layer then finds the split as ``avn-study train`` does.

    Raises:
        DataError: a missing or unreadable file, or one whose split is not the trial's (hash mismatch).
    """
    if "split" in meta or "split_hash" not in meta:  # a study folder from before references, or no study
        return meta.get("split"), meta.get("inner")
    expected = str(meta["split_hash"])
    split = _cached(study, SPLITS_COPY, read, lambda s: isinstance(s, dict) and s.get("hash") == expected)
    if not isinstance(split, dict) or split.get("hash") != expected:
        found = split.get("hash") if isinstance(split, dict) else None
        raise DataError(f"{study}/{SPLITS_COPY}: holds split {str(found)[:12]}, but the trial was planned on "
                        f"split {expected[:12]}; the study's frozen split was replaced after it started")  # fmt: skip
    if meta.get("outer") is None:
        return split, None
    outer = str(int(meta["outer"]))

    def fits(n: Any) -> bool:
        return isinstance(n, dict) and n.get("outer_hash") == expected and outer in n.get("inner", {})

    nested = _cached(study, NESTED_SPLITS, read, fits)
    entry = nested.get("inner", {}).get(outer) if isinstance(nested, dict) else None
    if not isinstance(nested, dict) or nested.get("outer_hash") != expected or not isinstance(entry, dict):
        raise DataError(f"{study}/{NESTED_SPLITS}: no inner folds of outer fold {outer} made from split "
                        f"{expected[:12]}; expected the file the study froze when it started")  # fmt: skip
    return split, entry


def _cached(study: str, name: str, read: Callable[[str], bytes], fits: Callable[[Any], bool]) -> Any:
    """The parsed file, read again when what this process read before does not fit (a study folder made
    anew at the same place while the worker lived)."""
    key = (study, name)
    if key not in _READ or not fits(_READ[key]):
        try:
            _READ[key] = json.loads(read(name))
        except (OSError, ValueError) as err:
            raise DataError(f"{study}/{name}: cannot be read ({err}); a study's trials read its frozen split "
                            "from the study folder, which every node must reach (its --storage)") from None  # fmt: skip
    return _READ[key]


def forget() -> None:
    """Drop what this process has read (a test that rewrites a study folder in place)."""
    _READ.clear()
