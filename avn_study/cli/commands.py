"""The names ``avn_study.cli.commands`` held before the commands were split by group; they still import.

New code imports from the group modules (:mod:`~avn_study.cli.data`, ``train``, ``study``, ``bundle``,
``bench``, ``parser``) and from :mod:`avn_study.study.launch` and :mod:`avn_study.study.plan`.
"""

from __future__ import annotations

from typing import Any

from avn_study.cli.args import (  # noqa: F401
    _fraction,
    _path,
    _positive_float,
    _positive_int,
    _progress,
    _text,
)
from avn_study.cli.bench import (  # noqa: F401
    _bench_parser,
    cmd_bench,
)
from avn_study.cli.bundle import (  # noqa: F401
    _add_inference_flags,
    _evaluate_parser,
    _export_parser,
    _inference_args,
    _predict_parser,
    cmd_evaluate,
    cmd_export,
    cmd_predict,
)
from avn_study.cli.data import (  # noqa: F401
    _import_dicom_parser,
    _split_parser,
    _synth_parser,
    _verify_parser,
    cmd_import_dicom,
    cmd_split,
    cmd_synth,
    cmd_verify,
)
from avn_study.cli.parser import (
    build_parser,
    main,
)
from avn_study.cli.study import (  # noqa: F401
    _analyze_and_print,
    _analyze_parser,
    _demo_parser,
    _errored_summary,
    _plan_parser,
    _print_plan,
    _report,
    _summary_table,
    _sweep_parser,
    cmd_analyze,
    cmd_demo,
    cmd_plan,
    cmd_sweep,
)
from avn_study.cli.train import (  # noqa: F401
    _TRAIN_FLAGS,
    _epoch_line,
    _parse_set,
    _train_parser,
    cmd_train,
    train_config_from_args,
)
from avn_study.study.launch import _stop_on_sigterm, run_study  # noqa: F401

__all__ = [
    "build_parser",
    "cmd_analyze",
    "cmd_bench",
    "cmd_demo",
    "cmd_evaluate",
    "cmd_export",
    "cmd_import_dicom",
    "cmd_plan",
    "cmd_predict",
    "cmd_split",
    "cmd_sweep",
    "cmd_synth",
    "cmd_train",
    "cmd_verify",
    "main",
    "run_study",
    "train_config_from_args",
]

# the plan's text and cohort sizes live in avn_study.study.plan, whose imports (yaml, numpy) --help must not pay
_IN_PLAN = {"_plan_text": "plan_text", "_cohort_patients": "cohort_sizes"}


def __getattr__(name: str) -> Any:
    """The plan helpers under their old names, imported only when used (PEP 562)."""
    if name in _IN_PLAN:
        from avn_study.study import plan

        return getattr(plan, _IN_PLAN[name])
    raise AttributeError(f"module 'avn_study.cli.commands' has no attribute {name!r}")
