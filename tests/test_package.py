"""The public API resolves, and the command line starts fast without heavy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import avn_study


def test_every_public_name_resolves() -> None:
    for name in avn_study.__all__:
        assert getattr(avn_study, name) is not None


def test_cli_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys; from avn_study.cli.commands import build_parser; build_parser().format_help(); "
        "heavy = ('torch', 'ray', 'optuna', 'nibabel', 'scipy', 'pydicom', 'highdicom'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "avn_study", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "synth" in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "avn_study", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_the_package_list_covers_the_source_tree() -> None:
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(p.relative_to(root).parts) for p in (root / "avn_study").rglob("__init__.py")}
    found = {name.removesuffix(".__init__.py").replace("/", ".") for name in found}
    assert set(listed) == found | {"avn_study.search_spaces", "avn_study.notebooks"}


def test_shipped_files_are_found_by_name() -> None:
    from avn_study.resources import shipped_file, shipped_names, shipped_space, space_argument

    assert {"ablation.yaml", "demo.yaml", "smoke.yaml", "tune.yaml"} <= set(shipped_names("search_spaces"))
    assert shipped_space("demo").read_text() == shipped_space("demo.yaml").read_text()
    assert shipped_file("notebooks", "ablation_report.ipynb").is_file()
    assert space_argument(__import__("pathlib").Path("ablation")) == shipped_space("ablation")
    import pytest

    from avn_study.errors import UsageError

    with pytest.raises(UsageError, match=r"no shipped search spaces file 'nope\.yaml' \(shipped: ablation\.yaml"):
        shipped_space("nope")


def test_a_wheel_runs_the_demo_outside_the_repository(tmp_path) -> None:
    """`pip install` of the built wheel (its dependencies borrowed from this environment) runs `avn-study
    --help` and `avn-study demo --tiny` from a folder outside the checkout: the shipped files travel."""
    import sysconfig
    import venv
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(root)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    wheel = next(wheels.glob("avn_study-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(purelib, "_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    where = subprocess.run([python, "-c", "import avn_study; print(avn_study.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert where.startswith(str(env_dir)), where  # the wheel, not the checkout
    cli = env_dir / "bin" / "avn-study"
    assert "demo" in subprocess.run([cli, "--help"], cwd=tmp_path, capture_output=True, text=True).stdout
    done = subprocess.run([cli, "demo", "--tiny", "--out", str(tmp_path / "demo"), "--num-cpus", "2", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "demo" / "report"
    assert (report / "summary.md").is_file() and (report / "ablation_report.ipynb").is_file()
    assert (
        str((tmp_path / "demo" / "experiments" / "smoke").resolve()) in (report / "ablation_report.ipynb").read_text()
    )


def test_imports_at_any_depth_form_no_cycle() -> None:
    """The package's layers import downwards only, counting the imports inside functions too (kept lazy for
    speed, never to hide a cycle)."""
    import ast
    from pathlib import Path

    root = Path(avn_study.__file__).parent
    names = {".".join(("avn_study", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
             for p in root.rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        name = ".".join(("avn_study", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # module level and inside functions
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("avn_study"):
                for alias in node.names:  # `from pkg import submodule` depends on the submodule, not the package
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in names else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("avn_study")}
        graph[name] = deps
    modules = set(graph)
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(d for d in graph.get(module, ()) if d in modules and d != module):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, module, dep]))
            if dep not in state:
                visit(dep, [*trail, module])
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [])


def test_the_repository_carries_its_own_contracts() -> None:
    """Nothing in the repository points at a design file outside it; docs/architecture.md owns the contracts."""
    from pathlib import Path

    repo = Path(avn_study.__file__).parents[1]
    files = [
        p
        for folder in ("avn_study", "docs", "tests", "search_spaces", "analysis", "docker")
        for p in (repo / folder).rglob("*")
        if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".ipynb"}
    ]
    files += [repo / "README.md", repo / "pyproject.toml"]
    outside = ("DESIGN" + ".md", "../" + "shared")  # (spelled apart, so this file does not match itself)
    offenders = [str(p.relative_to(repo)) for p in files if any(o in p.read_text(errors="replace") for o in outside)]
    assert offenders == [], offenders
    architecture = (repo / "docs" / "architecture.md").read_text()
    for section in (
        "## The data flow",
        "## Protocol rules",
        "## The study folder",
        "## The bundle",
        "## CLI conventions",
    ):
        assert section in architecture


def test_the_layer_picture_is_the_import_graphs() -> None:
    repo = Path(avn_study.__file__).parents[1]
    done = subprocess.run([sys.executable, str(repo / "docs" / "layers.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_package_is_stage_shaped() -> None:
    root = Path(avn_study.__file__).parent
    top = sorted(p.name for p in root.glob("*.py"))
    assert len(top) <= 10, top  # the rest lives in stage subpackages
    stages = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert {
        "data",
        "models",
        "metrics",
        "training",
        "study",
        "analysis",
        "bundle",
        "baselines",
        "bench",
        "cli",
    } <= stages


def test_every_public_name_is_the_object_it_documents_not_a_module() -> None:
    import importlib
    import types

    for name, module in avn_study._EXPORTS.items():
        importlib.import_module(module)  # (also imports submodules of the same name, which must not shadow)
        obj = getattr(avn_study, name)
        assert not isinstance(obj, types.ModuleType), name
        assert obj is getattr(importlib.import_module(module), name)


def test_old_module_paths_still_import_with_a_warning() -> None:
    import importlib
    import warnings

    for old, new in avn_study._MOVED.items():
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert importlib.import_module(old) is importlib.import_module(new), old
