"""The ``avn-study`` command line (``commands``); ``--help`` stays torch-free.

The public names of ``avn_study.cli.commands`` are importable from here too, as they were before the package
existed.
"""

from __future__ import annotations

from avn_study.cli.commands import *  # noqa: F403
from avn_study.cli.commands import main  # noqa: F401
