"""The ``avn-study`` command line; ``--help`` stays torch-free.

One module per command group, each a parser builder beside its ``cmd_*``: :mod:`~avn_study.cli.data`
(synth, verify, import-dicom, split), :mod:`~avn_study.cli.train`, :mod:`~avn_study.cli.study` (sweep, plan,
demo, analyze), :mod:`~avn_study.cli.bundle` (export, predict, evaluate), :mod:`~avn_study.cli.bench`;
:mod:`~avn_study.cli.parser` puts them together (``build_parser``, ``main``) and :mod:`~avn_study.cli.args`
holds the shared argument types. The public names of ``avn_study.cli.commands`` (the module that held them
all before) are importable from here too.
"""

from __future__ import annotations

from avn_study.cli.commands import *  # noqa: F403
from avn_study.cli.parser import main  # noqa: F401
