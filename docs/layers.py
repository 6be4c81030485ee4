"""The layers of avn_study drawn from its import graph (every import, also those inside functions).

``python docs/layers.py`` rewrites the picture between the markers in docs/architecture.md;
``python docs/layers.py --check`` exits 1 when the picture there is not the one the code draws (a test runs it).
A node is a stage: a subpackage, or ``names`` for the small top-level modules; an arrow ``a --> b``
says that some module of ``a`` imports one of ``b``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "avn_study"
DOC = REPO / "docs" / "architecture.md"
BEGIN, END = "<!-- layers: begin (docs/layers.py) -->", "<!-- layers: end -->"


NAMES = {"vocabulary", "errors", "config", "outputs", "resources", "__main__"}  # the small cross-cutting modules


def stage(module: str) -> str:
    """``avn_study.study.driver`` -> ``study``; ``avn_study.errors`` -> ``names``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "avn_study"
    return "names" if parts[1] in NAMES else parts[1]


def edges() -> set[tuple[str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("avn_study", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("avn_study."):
                targets.append(node.module)
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("avn_study.")]
            for target in targets:
                a, b = stage(module), stage(target)
                if a != b and a != "avn_study":
                    found.add((a, b))
    return found


def picture() -> str:
    lines = ["```mermaid", "flowchart TD"]
    lines += [f"  {a} --> {b}" for a, b in sorted(edges())]
    lines.append("```")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    drawn = f"\n{picture()}\n"
    if "--check" in argv:
        if text[start:stop] != drawn:
            print(f"{DOC}: the layer picture is stale; run python docs/layers.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text[:start] + drawn + text[stop:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
