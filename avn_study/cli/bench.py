"""``avn-study bench``: throughput, calibration, cluster scheduling and the verdict's simulations."""

from __future__ import annotations

import argparse

from avn_study.cli.args import _path, _positive_float, _positive_int


def cmd_bench(args: argparse.Namespace) -> int:
    """``avn-study bench WHAT``: hand over to :func:`avn_study.bench.run`."""
    from avn_study import bench

    return bench.run(args.what, args)


def _bench_parser(sub) -> None:
    """``avn-study bench``'s arguments (next to :func:`cmd_bench`)."""
    p = sub.add_parser("bench", help="throughput figures")
    p.add_argument("what", choices=["data", "train", "sweep", "gpu", "calibrate", "cluster", "controller", "verdicts"],
                   help="what to measure (gpu: needs CUDA; calibrate: every ablation row on the phantom; "
                        "cluster: slot utilisation of ablation.yaml on logical GPUs; controller: Ray Tune's "
                        "controller memory and state per trial, --trials of --epochs reports; "
                        "verdicts: the simulated A/A, power and coverage tables of docs/analysis.md, --cases "
                        "studies per cell)")  # fmt: skip
    p.add_argument("--gpus", type=_positive_int, default=8, help="cluster bench: logical GPUs (default 8)")
    p.add_argument("--epoch-seconds", type=_positive_float, dest="epoch_seconds",
                   help="cluster bench: seconds of one unet epoch of the stand-in trials (default 0.1; "
                        "60 simulated seconds with --driver-only)")  # fmt: skip
    p.add_argument("--scheduling", choices=["both", "sequential", "concurrent"], default="both",
                   help="cluster bench: which scheduling(s) to run (default both, side by side)")  # fmt: skip
    p.add_argument("--outer-folds", type=_positive_int, dest="outer_folds",
                   help="cluster bench: only the first N of ablation.yaml's outer folds (default: all)")  # fmt: skip
    p.add_argument("--patients", type=_positive_int, default=40,
                   help="cluster bench: patients of the bench's phantom cohort (default 40)")  # fmt: skip
    p.add_argument("--trials", type=_positive_int,
                   help="cluster bench: trials of every stage-1 search (default: ablation.yaml's); "
                        "controller bench: trials (default 1000)")  # fmt: skip
    p.add_argument("--driver-only", action="store_true", dest="driver_only",
                   help="cluster bench: the study's own driver (searchers, ASHA, hand-out) against stand-in "
                        "trials in simulated time, without Ray's workers (see docs/benchmarks.md)")  # fmt: skip
    p.add_argument("--per-gpu", type=_positive_int, default=4, dest="per_gpu",
                   help="gpu and cluster benches: trials per GPU (default 4)")  # fmt: skip
    p.add_argument(
        "--cases",
        type=_positive_int,
        help="cohort size (data: 200 for the RSS figure; calibrate: 24; train: 16 for the loop profile)",
    )
    p.add_argument("--seed", type=int, default=0, help="calibrate: phantom seed (default 0)")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=8,
        help="calibrate: epochs of every row; controller: reports per trial (default 8)",
    )
    p.add_argument("--tiny", action="store_true", help="calibrate: the coarse test phantom (smoke runs)")
    p.add_argument("--work-dir", type=_path, help="where to put the bench cohorts (default: a temp folder)")
    p.add_argument("--slice-size", type=int, default=128, dest="slice_size", help="train bench: slice size")
    p.add_argument("--threads", type=int, default=0, help="train bench: torch threads (default: torch's)")
    p.set_defaults(func=cmd_bench)


def add_parsers(sub) -> None:
    """The bench command."""
    _bench_parser(sub)
