"""The public API resolves, and the command line starts fast without heavy imports."""

from __future__ import annotations

import subprocess
import sys

import avn_study


def test_every_public_name_resolves() -> None:
    for name in avn_study.__all__:
        assert getattr(avn_study, name) is not None


def test_cli_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys; from avn_study.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'ray', 'optuna', 'nibabel', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "avn_study", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "synth" in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "avn_study", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr
