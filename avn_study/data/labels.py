"""A cohort's own label map, read from ``dataset.json`` and mapped onto the two roles training needs.

Inside avn-study every label volume is *canonical*: 0 background, 1 femoral head, 2 necrosis (necrosis
lies inside the head region). A cohort may be annotated otherwise; ``dataset.json`` says how:

- ``labels`` as nnU-Net v2 writes it: name -> value, or name -> list of values (nnU-Net's
  region-based labels, e.g. ``"femoral_head": [1, 2], "necrosis": 2`` when necrosis is drawn inside
  the head). ``background`` must be 0.
- ``avn_roles`` (optional): which label name(s) are ``necrosis`` and which are ``femoral_head``, e.g.
  ``{"necrosis": "avn", "femoral_head": ["head_left", "head_right"]}`` (left and right heads merged).
  Without it, the labels named ``necrosis`` and ``femoral_head`` play those roles. ``femoral_head``
  may be ``null`` or absent: a cohort with necrosis masks only. It then trains the arms without a
  localisation branch; ``+loc`` arms are refused, naming the missing label.

Labels with no role (e.g. an acetabulum) are read as background; voxel values that ``labels`` does not
declare are an error. The canonical volume is ``head_region = head | necrosis``, ``necrosis`` on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from avn_study.data.problems import Problem

if TYPE_CHECKING:
    import numpy as np

LABELS: dict[str, int] = {"background": 0, "femoral_head": 1, "necrosis": 2}  # the canonical label map

ROLES = ("necrosis", "femoral_head")


@dataclass(frozen=True)
class LabelMap:
    """``labels`` (name -> raw values) and the names playing each role."""

    labels: tuple[tuple[str, tuple[int, ...]], ...]
    necrosis: tuple[str, ...]
    femoral_head: tuple[str, ...]  # empty: the cohort has no femoral head labels

    @property
    def values(self) -> dict[str, tuple[int, ...]]:
        return dict(self.labels)

    def role_values(self, role: str) -> tuple[int, ...]:
        values = self.values
        return tuple(sorted({v for name in getattr(self, role) for v in values[name]}))

    @property
    def has_head(self) -> bool:
        return bool(self.femoral_head)

    @property
    def declared_values(self) -> set[int]:
        return {v for _, values in self.labels for v in values}

    @property
    def is_canonical(self) -> bool:
        return self == CANONICAL

    def canonical(self, raw: np.ndarray) -> np.ndarray:
        """The cohort's label volume as 0 background / 1 femoral head / 2 necrosis (uint8)."""
        import numpy as np  # (the raw layout's names and the label map stay light enough for --help)

        necrosis = np.isin(raw, self.role_values("necrosis"))
        head = np.isin(raw, self.role_values("femoral_head")) | necrosis
        out = head.astype(np.uint8)
        out[necrosis] = LABELS["necrosis"]
        return out

    def key(self) -> str:
        """Part of the cache key: a different mapping makes different cached labels."""
        return json.dumps({"labels": self.labels, "necrosis": self.necrosis, "femoral_head": self.femoral_head})

    def describe(self) -> str:
        """One line for ``avn-study verify``: what each role reads from the files."""

        def show(role: str) -> str:
            names = getattr(self, role)
            if not names:
                return "none (no femoral head labels: arms with a localisation branch cannot run)"
            values = self.values
            return " + ".join(f"'{n}' ({', '.join(map(str, values[n]))})" for n in names)

        unused = [n for n, _ in self.labels if n != "background" and n not in self.necrosis + self.femoral_head]
        line = f"labels understood: necrosis = {show('necrosis')}; femoral head = {show('femoral_head')}"
        if unused:
            line += f"; read as background: {', '.join(repr(n) for n in unused)}"
        return line


CANONICAL = LabelMap(tuple((k, (v,)) for k, v in LABELS.items()), ("necrosis",), ("femoral_head",))


def _values(name: str, raw: object) -> tuple[int, ...] | None:
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in items):
        return None
    return tuple(sorted(set(items)))


def _names(raw: object) -> tuple[str, ...] | None:
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    return tuple(items) if all(isinstance(v, str) and v for v in items) else None


def parse_label_map(spec: dict, path: Path) -> tuple[LabelMap | None, list[Problem]]:
    """The label map of a ``dataset.json`` (``spec``), or ``None`` and every problem found in it."""
    raw_labels = spec.get("labels", dict(LABELS))
    if not isinstance(raw_labels, dict) or not raw_labels:
        return None, [Problem(path, f"labels must map label names to values, got {json.dumps(raw_labels)}")]
    labels, problems = [], []
    for name, raw in raw_labels.items():
        values = _values(name, raw)
        if values is None:
            problems.append(Problem(path, f"labels.{name}: expected an integer 0-255 or a list of them, got {raw!r}"))
        else:
            labels.append((name, values))
    if dict(labels).get("background", (0,)) != (0,) or "background" not in raw_labels:
        problems.append(Problem(path, "labels must declare background as 0 (nnU-Net's convention)"))
    roles = spec.get("avn_roles", {})
    if not isinstance(roles, dict):
        return None, [*problems, Problem(path, f"avn_roles must be a mapping of role -> label name(s), got {roles!r}")]
    for key in roles:
        if key not in ROLES:
            problems.append(Problem(path, f"avn_roles.{key}: unknown role (roles are {', '.join(ROLES)})"))
    known = dict(labels)
    picked: dict[str, tuple[str, ...]] = {}
    for role in ROLES:
        default = role if role in raw_labels else None
        names = _names(roles.get(role, default))
        if names is None:
            problems.append(Problem(path, f"avn_roles.{role}: expected a label name or a list of names"))
            continue
        for name in names:
            if name not in raw_labels:
                problems.append(
                    Problem(path, f"avn_roles.{role}: '{name}' is not a name in labels ({', '.join(raw_labels)})")
                )
            elif name == "background":
                problems.append(Problem(path, f"avn_roles.{role}: background cannot play a role"))
        picked[role] = tuple(n for n in names if n in known and n != "background")
    if not problems and not picked["necrosis"]:
        problems.append(Problem(path, "no label plays necrosis: name it in labels, or set avn_roles.necrosis"))
    if problems:
        return None, problems
    return LabelMap(tuple(labels), picked["necrosis"], picked["femoral_head"]), []
