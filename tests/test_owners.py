"""One owner per file name: the study folder's, the trial folder's, the raw layout's and the splits' names
are spelled as string literals only in the module that owns them; everyone else imports the constant."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import avn_study

PACKAGE = Path(avn_study.__file__).parent

# owner module -> the names it owns (as they appear in a literal: a file, a folder, a glob's fixed part)
OWNERS = {
    "avn_study.study.folder": (
        "study.json", "space.yaml", "optuna.journal", "stage2_plan.json", "driver.log", "params.json",
        "result.json", "resolved_config.json", "error.txt", "per_case/", "experiment_state-", "searcher-state-",
        "search_gen_state-", "mirror_of.txt", ".damaged-", "stage2-repair",
    ),
    "avn_study.data.layout": ("dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabelled"),
    "avn_study.data.splits": ("splits.json", "nested_splits.json"),
}  # fmt: skip


def _pattern(name: str) -> re.Pattern[str]:
    """``name`` as a whole word of a path: not part of a longer name (``splits.json`` is no ``nested_splits.json``;
    ``per_case/`` is no ``per_case.csv``)."""
    return re.compile(rf"(?<![\w.-]){re.escape(name)}" + ("" if name[-1] in "/-" else r"(?![\w-])"))


PATTERNS = {name: (owner, _pattern(name)) for owner, names in OWNERS.items() for name in names}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes: documentation may name the files it describes."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def literals(source: str) -> list[str]:
    """Every string literal of a module but its docstrings, f-strings' constant parts included."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip]  # fmt: skip


def spellings(package: Path = PACKAGE) -> set[tuple[str, str]]:
    """(module, name) for each name a module spells that another module owns."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        module = ".".join(("avn_study", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        for text in literals(path.read_text()):
            for name, (owner, pattern) in PATTERNS.items():
                if module != owner and pattern.search(text):
                    found.add((module, name))
    return found


def test_every_file_name_is_spelled_by_its_owner_only() -> None:
    unlisted = spellings()
    assert not unlisted, f"import the owner's constant instead (see OWNERS): {sorted(unlisted)}"


def test_the_scan_finds_a_spelling_and_not_its_longer_cousins(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text('"""Reads params.json."""\nx = f"{root}/params.json"\ny = "nested_splits.json"\n')
    (tmp_path / "b.py").write_text('z = "per_case.csv"\nw = "my_result.json"\n')
    assert spellings(tmp_path) == {("avn_study.a", "params.json"), ("avn_study.a", "nested_splits.json")}


def test_the_study_folder_format_imports_no_numpy() -> None:
    """``study.folder`` takes the splits' names from ``data.splits``, which imports numpy only to split."""
    code = "import sys, avn_study.study.folder; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
