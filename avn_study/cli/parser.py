"""The ``avn-study`` parser and its exit codes.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (a message, no traceback unless
``--debug``), 3 a bug of ours (the traceback), 130 interrupted. Each command group (:mod:`~avn_study.cli.data`,
:mod:`~avn_study.cli.train`, :mod:`~avn_study.cli.study`, :mod:`~avn_study.cli.bundle`,
:mod:`~avn_study.cli.bench`) adds its subcommands; heavy modules are imported inside the commands, so
``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from avn_study.cli import bench, bundle, data, study, train
from avn_study.errors import AvnError


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``--debug`` and one subcommand per command."""
    parser = argparse.ArgumentParser(
        prog="avn-study",
        description="Ablation and hyperparameter studies of a multitask AVN segmentation network.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, train, study, bundle, bench):  # the order --help lists the commands in
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and turn its errors into the exit codes above."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AvnError as err:  # bad usage or bad input: a message, no traceback
        if args.debug:
            traceback.print_exc()
        print(f"avn-study {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # anything else is a bug of ours: show where, and ask for the report
        traceback.print_exc()
        print(f"avn-study {args.command}: internal error (a bug in avn-study, not in your input); please report it "
              "with the traceback above and the command line", file=sys.stderr)  # fmt: skip
        return 3
