"""The ``avn-study`` command line. Heavy modules are imported inside the commands so ``--help`` is fast.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (a message, no traceback unless
``--debug``).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from avn_study.errors import AvnError, UsageError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _progress(done: int, total: int, name: str) -> None:
    end = "\n" if done == total else "\r"
    print(f"  [{done}/{total}] {name}", end=end, file=sys.stderr, flush=True)


def cmd_synth(args: argparse.Namespace) -> int:
    from avn_study.data.phantom import PhantomConfig, write_cohort

    config = PhantomConfig.tiny() if args.tiny else PhantomConfig()
    out = write_cohort(args.out, cases=args.cases, seed=args.seed, config=config)
    print(f"wrote a phantom cohort of {args.cases} patient(s) (seed {args.seed}) to {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from avn_study.data.verify import verify_dataset

    report = verify_dataset(args.data)
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 2


def cmd_split(args: argparse.Namespace) -> int:
    from avn_study.data.cache import build_cache
    from avn_study.data.splits import SPLITS_FILE, make_splits, write_splits

    cases = build_cache(args.data, cache_dir=args.cache_dir, progress=_progress)
    patients = {c.case_id: c.patient_id for c in cases}
    necrosis = None if args.no_stratify else {c.case_id: c.has_necrosis for c in cases}
    try:
        splits = make_splits(patients, k=args.folds, seed=args.seed, has_necrosis=necrosis)
    except ValueError as err:
        raise UsageError(f"--folds: {err}") from None
    out = write_splits(splits, args.out or Path(args.data) / SPLITS_FILE)
    for i, fold in enumerate(splits.folds):
        print(f"fold {i}: {len(fold.train)} train / {len(fold.val)} val cases")
    print(f"wrote {out} (hash {splits.hash[:12]})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from avn_study import bench

    return bench.run(args.what, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avn-study",
        description="Ablation and hyperparameter studies of a multitask AVN segmentation network.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic hip-MRI phantom cohort (nnU-Net raw layout)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--cases", type=_positive_int, default=20, help="number of patients (default 20)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--tiny", action="store_true", help="small, coarse volumes for smoke tests")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("verify", help="check a cohort's integrity; exit 2 listing every problem")
    p.add_argument("data", type=Path, help="dataset folder (nnU-Net raw layout)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("split", help="freeze patient-level K-fold splits in DATA/splits.json")
    p.add_argument("data", type=Path, help="dataset folder")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--no-stratify", action="store_true", help="do not stratify by necrosis presence")
    p.add_argument("--out", type=Path, help="where to write (default DATA/splits.json)")
    p.add_argument("--cache-dir", type=Path, help="preprocessing cache (default $AVN_STUDY_CACHE or ~/.cache)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("bench", help="throughput figures")
    p.add_argument("what", choices=["data"], help="what to measure")
    p.add_argument("--cases", type=_positive_int, default=200, help="cohort size for the RSS figure")
    p.add_argument("--work-dir", type=Path, help="where to put the bench cohorts (default: a temp folder)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (AvnError, ValueError) as err:
        if args.debug:
            traceback.print_exc()
        code = err.exit_code if isinstance(err, AvnError) else 2
        print(f"avn-study {args.command}: error: {err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
