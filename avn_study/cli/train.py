"""``avn-study train``: one training run without Ray, configured from flags and ``--set``."""

from __future__ import annotations

import argparse
import sys

from avn_study.cli.args import _path
from avn_study.data.splits import SPLITS_FILE
from avn_study.errors import UsageError
from avn_study.vocabulary import AMP_MODES, ARMS, GATINGS


def _parse_set(items: list[str]) -> dict[str, object]:
    """``--set key=value`` pairs; values are parsed as YAML scalars/maps (``lr=3e-4``, ``schedule_params={a: 1}``)."""
    from avn_study.study.space import safe_yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = safe_yaml(value, f"--set {key.strip()}")
    return out


_TRAIN_FLAGS = (
    "fold",
    "arm",
    "schedule",
    "epochs",
    "slice_size",
    "base_channels",
    "depth",
    "lr",
    "batch_size",
    "seed",
    "device",
    "amp",
    "threads",
    "gating",
)


def train_config_from_args(args: argparse.Namespace):
    """The typed config of ``train``'s flags and ``--set`` pairs, validated as any config is."""
    from avn_study.config import TrainConfig

    flat = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    flat.update(_parse_set(args.set))
    return TrainConfig.from_flat(flat, source="command line")


def _epoch_line(record: dict, epochs: int) -> str:
    """One epoch's progress line: losses per branch, their weights, validation Dice and time."""
    losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss_") and k != "loss_total")
    weights = " ".join(f"{k[2:]} {v:.2f}" for k, v in record.items() if k.startswith("w_"))
    line = f"epoch {record['epoch'] + 1:>3}/{epochs}  loss {record['loss_total']:.3f} ({losses})  w ({weights})"
    if "val_dice" in record:
        line += f"  val_dice {record['val_dice']:.3f}"
    return line + f"  {record['train_seconds']:.1f}s"


def cmd_train(args: argparse.Namespace) -> int:
    """``avn-study train``: one run without Ray; ``--out`` is checked before any training."""
    from avn_study.outputs import check_target
    from avn_study.training.fold import prepare_data
    from avn_study.training.run import TrainingRun, is_run_folder, write_run_outputs

    config = train_config_from_args(args)
    # before any training: a run lost to a bad --out is the worst kind of error
    check_target(args.out, flag="--out", kind="a run folder", is_own=is_run_folder, overwrite=args.overwrite,
                 inputs=[args.data])  # fmt: skip
    data = prepare_data(args.data, config, cache_dir=args.cache_dir, splits_path=args.splits)
    from avn_study.data.slices import crop_warning
    from avn_study.models import n_parameters

    warning = crop_warning([*data.train, *data.val], config.data.slice_size, config.data.inplane_spacing_mm)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    run = TrainingRun(config, data)
    print(
        f"fold {config.data.fold}: {len(data.train)} training / {len(data.val)} validation cases, "
        f"arm {config.model.arm} ({n_parameters(run.model):,} parameters), schedule {config.optim.schedule}",
        file=sys.stderr,
    )
    while not run.done:
        record = run.run_epoch()
        if not args.quiet:
            print(_epoch_line(record, config.optim.epochs), file=sys.stderr, flush=True)
    out = write_run_outputs(run, args.out, overwrite=args.overwrite)
    final = run.history[-1]
    print(
        f"val_dice {final['val_dice']:.4f} (mean over {int(final['n_cases_necrosis'])} validation case(s) "
        f"with necrosis); wrote {out}/metrics.json, per_case.csv, checkpoint/"
    )
    return 0


def _train_parser(sub) -> None:
    """``avn-study train``'s arguments (next to :func:`cmd_train`)."""
    p = sub.add_parser("train", help="one training run without Ray")
    p.add_argument("--data", type=_path, required=True, help="dataset folder (nnU-Net raw layout)")
    p.add_argument("--out", type=_path, required=True, help="output folder")
    p.add_argument("--fold", type=int, help="validation fold (default 0)")
    p.add_argument("--arm", help=f"{' | '.join(ARMS)} (default seg+recon+loc)")
    p.add_argument(
        "--schedule",
        help="loss-adaptation schedule (default: recon_dependent for arms with a recon branch, else constant)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--slice-size", type=int, dest="slice_size")
    p.add_argument("--base-channels", type=int, dest="base_channels")
    p.add_argument("--depth", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--gating", help=" | ".join(GATINGS))
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", help=" | ".join(AMP_MODES))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config key, e.g. --set loc_margin_mm=15 --set 'schedule_params={pretrain_epochs: 3}'",
    )
    p.add_argument("--cache-dir", type=_path, help="preprocessing cache (default $AVN_STUDY_CACHE or ~/.cache)")
    p.add_argument(
        "--splits",
        type=_path,
        help=f"frozen splits file (default: DATA/{SPLITS_FILE} if you made one, else the cache's)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder (only a run folder)")
    p.set_defaults(func=cmd_train)


def add_parsers(sub) -> None:
    """The training command."""
    _train_parser(sub)
