"""The ``avn-study`` command line. Heavy modules are imported inside the commands so ``--help`` is fast.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (a message, no traceback unless
``--debug``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avn_study.errors import AvnError, UsageError
from avn_study.vocabulary import AMP_MODES, ARMS


def _path(text: str) -> Path:
    """A path argument; a NUL byte (which no file system accepts) is refused here, not deep in pathlib."""
    if "\x00" in text:
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte, which no path can hold")
    return Path(text)


def _text(text: str) -> str:
    """A URI or path argument kept as text (``--storage``): no NUL byte either."""
    if "\x00" in text:
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte")
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0.0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _progress(done: int, total: int, name: str) -> None:
    end = "\n" if done == total else "\r"
    print(f"  [{done}/{total}] {name}", end=end, file=sys.stderr, flush=True)


def cmd_synth(args: argparse.Namespace) -> int:
    from avn_study.data.phantom import PhantomConfig, is_phantom_cohort, write_cohort
    from avn_study.outputs import check_target, staged_folder

    check_target(args.out, flag="OUT", kind="a phantom cohort", is_own=is_phantom_cohort, overwrite=args.overwrite)
    if args.seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {args.seed}")
    config = PhantomConfig.tiny() if args.tiny else PhantomConfig()
    replace = is_phantom_cohort if args.overwrite else None  # checked again right before the swap
    with staged_folder(args.out, replace) as staged:  # a new cohort replaces the old one whole, never file by file
        write_cohort(staged, cases=args.cases, seed=args.seed, config=config, channels=tuple(args.channels.split(",")))
    print(f"wrote a phantom cohort of {args.cases} patient(s) (seed {args.seed}) to {args.out}")
    return 0


def _synth_parser(sub) -> None:
    """``avn-study synth``'s arguments (next to :func:`cmd_synth`)."""
    p = sub.add_parser("synth", help="write a synthetic hip-MRI phantom cohort (nnU-Net raw layout)")
    p.add_argument("out", type=_path, help="output folder")
    p.add_argument("--cases", type=_positive_int, default=20, help="number of patients (default 20)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--tiny", action="store_true", help="small, coarse volumes for smoke tests")
    p.add_argument("--channels", choices=("T1", "T1,STIR"), default="T1",
                   help="input sequences: T1 (default), or T1,STIR (a second, STIR-like channel _0001)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing phantom cohort (only one)")
    p.set_defaults(func=cmd_synth)


def cmd_verify(args: argparse.Namespace) -> int:
    from avn_study.data.verify import verify_dataset
    from avn_study.dicom import looks_like_dicom

    data = Path(args.data)
    if data.is_dir() and not (data / "dataset.json").exists() and looks_like_dicom(data):
        from avn_study.dicom import require_dicom, verify_dicom_tree

        require_dicom("verify of a DICOM export")
        ok, text = verify_dicom_tree(data)
        print(text, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 2
    report = verify_dataset(args.data)
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 2


def _verify_parser(sub) -> None:
    """``avn-study verify``'s arguments (next to :func:`cmd_verify`)."""
    p = sub.add_parser("verify", help="check a cohort's integrity; exit 2 listing every problem")
    p.add_argument("data", type=_path, help="dataset folder (nnU-Net raw layout), or a DICOM export to check")
    p.set_defaults(func=cmd_verify)


def cmd_import_dicom(args: argparse.Namespace) -> int:
    from avn_study.dicom import require_dicom

    require_dicom("import-dicom")
    from avn_study.dicom.convert import import_dicom

    channels = [c.strip() for c in args.channels.split(",")]
    if not all(channels) or len(set(channels)) != len(channels):
        raise UsageError(f"--channels {args.channels!r}: expected distinct names separated by commas, e.g. T1,STIR")
    result = import_dicom(args.dicom_dir, args.out, channels=channels, series=args.series, plane=args.plane,
                          labels_from=args.labels_from, unlabelled=args.unlabelled, mapping=args.mapping,
                          overwrite=args.overwrite, progress=_progress)  # fmt: skip
    for warning in result.warnings:
        print(f"warning: {warning.path}: {warning.message}", file=sys.stderr)
    labelled = sum(c.subset == "imagesTr" for c in result.cases)
    patients = len({c.patient for c in result.cases})
    print(f"imported {len(result.cases)} visit(s) of {patients} patient(s) to {result.out} ({labelled} labelled in "
          f"imagesTr/labelsTr, {len(result.cases) - labelled} in {args.unlabelled}/)")  # fmt: skip
    for case in result.cases:
        chosen = ", ".join(f"{ch}: series {s.first.series_number} ({s.plane}, {len(s.instances)} slices)"
                           for ch, s in zip(channels, case.series, strict=True))  # fmt: skip
        print(f"  {case.case_id}: patient {case.patient}, {chosen}{', labels from SEG' if case.seg else ''}")
    print(f"private mapping to the hospital's identifiers: {result.mapping} (keep it apart from the cohort)")
    return 0


def _import_dicom_parser(sub) -> None:
    """``avn-study import-dicom``'s arguments (next to :func:`cmd_import_dicom`)."""
    p = sub.add_parser(
        "import-dicom",
        help="a DICOM export (patients, visits, series) to a pseudonymous cohort in the nnU-Net raw layout",
        description="Walk DICOM_DIR, group the files into series, choose per visit one series per channel (by "
        "SeriesDescription regex and/or plane), convert each with dcm2niix and write OUT in the nnU-Net raw layout "
        "with dataset.json's patients map from PatientID. Cases are case_000, ...; patients P000, ...; the link to "
        "the hospital's identifiers goes to one private mapping file (default OUT.mapping.json beside OUT). Needs "
        "avn-study[dicom].",
    )
    p.add_argument("dicom_dir", type=_path, help="the DICOM export (any folder tree)")
    p.add_argument("out", type=_path, help="the cohort folder to write")
    p.add_argument("--channels", default="T1", help="input channels in order, e.g. T1 or T1,STIR (default T1)")
    p.add_argument("--series", action="append", default=[], metavar="[CHANNEL=]REGEX",
                   help="SeriesDescription regex choosing a channel's series, case-insensitive (default: the "
                   "channel's name); repeat as CHANNEL=REGEX for several channels")  # fmt: skip
    p.add_argument("--plane", choices=("coronal", "axial", "sagittal"),
                   help="keep only series acquired in this plane (from the orientation vectors)")  # fmt: skip
    p.add_argument("--labels-from", type=_path, dest="labels_from", metavar="SEG",
                   help="a DICOM SEG file or a folder of them (may be DICOM_DIR): visits with a SEG of a chosen "
                   "series go to imagesTr/labelsTr")  # fmt: skip
    p.add_argument("--unlabelled", choices=("imagesTs", "imagesUnlabelled"), default="imagesTs",
                   help="where visits without labels go (default imagesTs)")  # fmt: skip
    p.add_argument("--mapping", type=_path, help="the private mapping file (default OUT.mapping.json beside OUT)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier import (only one) and its mapping")
    p.set_defaults(func=cmd_import_dicom)


def cmd_split(args: argparse.Namespace) -> int:
    from avn_study.data.cache import build_cache
    from avn_study.data.splits import SPLITS_FILE, is_splits_file, make_splits, write_splits
    from avn_study.outputs import check_target

    target = args.out or Path(args.data) / SPLITS_FILE
    if target.is_file() and not args.overwrite:
        from avn_study.outputs import json_marker

        held = json.loads(target.read_text()).get("hash", "?")[:12] if json_marker(target, "hash") else "?"
        raise UsageError(f"{target}: a frozen split (hash {held}) already exists; runs and studies recorded its "
                         "hash. Pass --overwrite to replace it (their results will then name a split that is gone), "
                         "or --out to write another file")  # fmt: skip
    unwritable = ("the cohort folder may be read-only: pass --out FILE to freeze the split elsewhere (and --splits "
                  "FILE to train with it)")  # fmt: skip
    check_target(target, flag="--out", kind="a splits file", is_own=is_splits_file, overwrite=args.overwrite,
                 folder=False, hint=unwritable)  # fmt: skip
    cases = build_cache(args.data, cache_dir=args.cache_dir, progress=_progress)
    patients = {c.case_id: c.patient_id for c in cases}
    necrosis = None if args.no_stratify else {c.case_id: c.has_necrosis for c in cases}
    try:
        splits = make_splits(patients, args.folds, args.seed, necrosis, test_fraction=args.test_fraction)
    except ValueError as err:
        flag = "--test-fraction" if "test_fraction" in str(err) else "--folds"
        raise UsageError(f"{flag}: {err}") from None
    try:
        out = write_splits(splits, target, is_splits_file if args.overwrite else None)
    except OSError as err:
        raise UsageError(f"{target.parent}: cannot write {target.name} there ({err.strerror}); {unwritable}") from None
    if splits.test:
        test_patients = {patients[c] for c in splits.test}
        positive = sum(any(necrosis.get(c, False) for c in splits.test if patients[c] == p) for p in test_patients) \
            if necrosis else "?"  # fmt: skip
        print(f"test set: {len(splits.test)} cases of {len(test_patients)} patients ({positive} with necrosis), "
              "held out of every fold")  # fmt: skip
    for i, fold in enumerate(splits.folds):
        print(f"fold {i}: {len(fold.train)} train / {len(fold.val)} val cases")
    print(f"wrote {out} (hash {splits.hash[:12]})")
    return 0


def _split_parser(sub) -> None:
    """``avn-study split``'s arguments (next to :func:`cmd_split`)."""
    p = sub.add_parser("split", help="freeze patient-level K-fold splits in DATA/splits.json")
    p.add_argument("data", type=_path, help="dataset folder")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--no-stratify", action="store_true", help="do not stratify by necrosis presence")
    p.add_argument("--test-fraction", type=_fraction, default=0.0, dest="test_fraction",
                   help="share of patients held out as a test set, in no fold (stratified, default 0)")  # fmt: skip
    p.add_argument("--out", type=_path, help="where to write (default DATA/splits.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing splits file")
    p.add_argument("--cache-dir", type=_path, help="preprocessing cache (default $AVN_STUDY_CACHE or ~/.cache)")
    p.set_defaults(func=cmd_split)


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
    from avn_study.config import TrainConfig

    flat = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    flat.update(_parse_set(args.set))
    return TrainConfig.from_flat(flat, source="command line")


def _epoch_line(record: dict, epochs: int) -> str:
    losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss_") and k != "loss_total")
    weights = " ".join(f"{k[2:]} {v:.2f}" for k, v in record.items() if k.startswith("w_"))
    line = f"epoch {record['epoch'] + 1:>3}/{epochs}  loss {record['loss_total']:.3f} ({losses})  w ({weights})"
    if "val_dice" in record:
        line += f"  val_dice {record['val_dice']:.3f}"
    return line + f"  {record['train_seconds']:.1f}s"


def cmd_train(args: argparse.Namespace) -> int:
    from avn_study.outputs import check_target
    from avn_study.training.engine import prepare_data
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
    p.add_argument("--gating", help="multiply | residual | none")
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
        "--splits", type=_path, help="frozen splits file (default: DATA/splits.json if you made one, else the cache's)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder (only a run folder)")
    p.set_defaults(func=cmd_train)


def _summary_table(result, metric: str) -> str:
    """What finished: per stage and row, the trials' own final metric (mean, SD), in the order the rows ran.
    Not a ranking and not a verdict: per-patient statistics are ``avn-study analyze``'s."""
    import math
    import statistics

    from avn_study.study.folder import TERMINATED

    lines = [f"{'stage':<6} {'row':<28} {'trials':>6} {metric + ' mean':>14} {'SD':>7}"]
    groups: dict[tuple[int, str], list[float]] = {}
    for o in result.outcomes:
        if o.status == TERMINATED and o.metric is not None and not math.isnan(o.metric):
            groups.setdefault((o.stage, o.row), []).append(o.metric)
    for (stage, row), values in sorted(groups.items(), key=lambda kv: kv[0][0]):  # stable: rows as they ran
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(f"{stage:<6} {row:<28} {len(values):>6} {statistics.fmean(values):>14.4f} {sd:>7.4f}")
    return "\n".join(lines)


def _errored_summary(result) -> str:
    lines = [f"{len(result.errored)} trial(s) errored after their retries:"]
    for o in result.errored:
        reason = next((line for line in reversed(o.error.splitlines()) if line.strip()), "unknown")
        lines.append(f"  - {o.trial_id} (stage {o.stage}, row {o.row}): {reason[:200]}\n    log: {o.path}/error.txt")
    return "\n".join(lines)


def _report(result, metric: str, where: str) -> int:
    """What finished, where things are, and the errored trials (exit 1 when there are any)."""
    print(_summary_table(result, metric))
    print(where)
    if result.errored:
        print(_errored_summary(result), file=sys.stderr)
        return 1
    return 0


def _stop_on_sigterm(study) -> None:
    """Let SIGTERM (a scheduler preempting the driver) stop a sweep the way Ctrl-C does.

    It takes Ray Tune's graceful Ctrl-C path and also marks the study, so a stop that Tune does not see
    (its trials had just finished, or it was still setting up) still ends the study with exit 130.
    """

    def handler(*_: object) -> None:
        study.stop_requested.set()
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


def cmd_sweep(args: argparse.Namespace) -> int:

    from avn_study.resources import space_argument
    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    space = load_space(space_argument(args.space))
    if args.plan:
        return _print_plan(space, args.data, args.allow_no_verdict, gpus_per_trial=args.gpus_per_trial)
    study = Study(
        space,
        args.data,
        str(args.storage),
        args.name,
        args.max_concurrent,
        args.gpus_per_trial,
        progress=not args.quiet,
        force_unlock=args.force_unlock,
        track=args.track,
        allow_no_verdict=args.allow_no_verdict,
    )
    from avn_study.outputs import shell

    extra = ["--allow-no-verdict"] if args.allow_no_verdict else []
    resume_hint = shell("avn-study", "sweep", args.space, "--data", args.data, "--storage", args.storage, "--name",
                        study.name, "--resume", *extra)  # fmt: skip
    result = run_study(study, args.resume, args.address, args.num_cpus, resume_hint, args.connect_timeout)
    if result is None:
        return 130
    mirror = f" (JSON mirror: {study.root})" if study.remote else ""
    return _report(
        result,
        space.metric,
        f"results in {study.location}{mirror}\nstatistics and report: {shell('avn-study', 'analyze', study.root)}",
    )


def _sweep_parser(sub) -> None:
    """``avn-study sweep``'s arguments (next to :func:`cmd_sweep`)."""
    p = sub.add_parser("sweep", help="run a search-space file (a sweep, a nested or a fair ablation) on Ray Tune")
    p.add_argument("space", type=_path, help="search-space YAML file, or a shipped one by name (ablation, demo, ...)")
    p.add_argument("--data", type=_path, required=True, help="dataset folder, readable on every node")
    p.add_argument(
        "--storage", type=_text, required=True, help="experiment storage: a local/shared path or a pyarrow URI"
    )
    p.add_argument("--name", help="study name (default: the file's name key)")  # check_name refuses unsafe ones
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (trusts its storage)")
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: start Ray here)")
    p.add_argument("--connect-timeout", type=_positive_float, dest="connect_timeout", metavar="SECONDS",
                   help="how long to wait for --address before giving up with exit 1 (default "
                   "$AVN_STUDY_CONNECT_TIMEOUT, else 30)")  # fmt: skip
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs of a local Ray (default: all)")
    p.add_argument("--max-concurrent", type=int, dest="max_concurrent", help="trials at once (default: the file's)")
    p.add_argument("--gpus-per-trial", type=float, dest="gpus_per_trial", help="GPU share per trial, e.g. 0.25")
    p.add_argument("--quiet", action="store_true", help="no live progress lines")
    p.add_argument("--track", action="append", default=[], metavar="TOOL",
                   help="also log every trial to tensorboard, mlflow or wandb (repeatable; see README)")  # fmt: skip
    p.add_argument("--plan", action="store_true",
                   help="print the trials, epochs, attainable p and power of the space, and exit")  # fmt: skip
    p.add_argument("--allow-no-verdict", action="store_true", dest="allow_no_verdict",
                   help="run a design whose declared contrasts can never reach a verdict (see --plan)")  # fmt: skip
    p.add_argument("--force-unlock", action="store_true", dest="force_unlock",
                   help="take over the study's lock even if its driver looks alive (its host is gone)")  # fmt: skip
    p.set_defaults(func=cmd_sweep)


def run_study(study, resume: bool, address: str | None, num_cpus: int | None, resume_hint: str,
              connect_timeout: float | None = None):  # fmt: skip
    """What ``sweep`` and ``demo`` share: check everything before Ray starts, start (or join) Ray, then
    take the study's lock and write its files, stop cleanly on SIGTERM, run the stages, release the study.
    Returns the result, or None when interrupted (having said how to continue)."""
    from avn_study.study.driver import init_ray

    cases = study.check(resume=resume)  # bad --resume/--name, a live driver, broken cohorts: nothing written
    try:
        init_ray(address, num_cpus, connect_timeout_s=connect_timeout)  # unreachable, refused: no study files
    except KeyboardInterrupt:
        print(f"interrupted while waiting for Ray{f' at {address}' if address else ''}; nothing was written",
              file=sys.stderr)  # fmt: skip
        return None
    study.claim(resume=resume, cases=cases)  # only now the lock and study.json (a racing driver: refused)
    space = study.space
    try:
        _stop_on_sigterm(study)  # after ray.init, which installs its own SIGTERM handler
        print(f"{'resuming' if resume else 'running'} study {study.location} ({space.protocol}, rows: "
              f"{', '.join(space.arms)}; split {study.split_hash[:12]})", file=sys.stderr)  # fmt: skip
        return study.run(resume=resume)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: {resume_hint}", file=sys.stderr)
        return None
    finally:
        study.close()


def _plan_text(space, gpus_per_trial: float | None = None) -> str:
    """``sweep --plan``: the trials and epochs a space will run, before anything starts."""
    plan = space.plan()
    searched = len(space.searched_rows)
    if space.protocol == "nested_ablation":
        shape = f"{searched} rows x {len(space.folds)} outer folds" + (
            f" x {len(space.seeds)} seeds (a search per seed)" if space.search_per_seed else "")  # fmt: skip
    elif space.search_per_seed:
        shape = f"{searched} rows x {len(space.folds)} reported folds x {len(space.seeds)} seeds (a search per seed)"
    else:
        shape = "one per row"
    lines = [
        f"{space.path}: {space.protocol}, {plan['rows']} rows",
        f"stage 1: {plan['searches']} searches ({shape}) x "
        f"{space.trials} trials = {plan['stage1_trials']} trials, ~{plan['stage1_epochs']:,.0f} epochs with "
        f"{space.scheduler.type} (at most {plan['stage1_epochs_max']:,})",
    ]
    if plan["stage2_trials"]:
        lines.append(f"stage 2: {searched} rows x {len(space.folds)} folds x {len(space.seeds) * space.repeats} "
                     f"seeds = {plan['stage2_trials']} trials, {plan['stage2_epochs']:,} epochs")  # fmt: skip
    if plan["nnunet_trials"]:
        lines.append(f"stage 2, nnU-Net rows (no search: nnU-Net configures itself): {plan['nnunet_trials']} trials")
    if space.concurrent_rows:
        lines.append(
            "scheduling: one Ray experiment, every search at once"
            + (", each row's stage 2 as soon as its search has chosen" if plan["stage2_trials"] else "")
        )
    else:
        lines.append("scheduling: one search after another" + (", then stage 2" if plan["stage2_trials"] else "")
                     + " (concurrent_rows: true keeps a cluster fuller)")  # fmt: skip
    gpu = space.gpu if gpus_per_trial is None else gpus_per_trial
    lines.append(f"each trial: {space.cpu:g} CPU, {gpu:g} GPU" + (" (--gpus-per-trial)" if gpus_per_trial is not None
                                                                   else ""))  # fmt: skip
    return "\n".join(lines)


def _cohort_patients(space, data: Path | None) -> tuple[int | None, int | None]:
    """(reported patients the primary metric is defined on, every patient) of a cohort, or (None, None)."""
    if data is None or not (Path(data) / "dataset.json").is_file():
        return None, None
    from avn_study.config import TrainConfig
    from avn_study.study.plan import reported_patients
    from avn_study.training.engine import cohort_split

    searched = space.searched_rows
    config = TrainConfig.from_flat(space.trial_config(searched[0]) if searched else space.fixed)
    cases, splits = cohort_split(data, config)
    return reported_patients(space, cases, splits), len({c.patient_id for c in cases})


def _print_plan(space, data: Path | None, allow_no_verdict: bool, pilot: Path | None = None,
                patients: int | None = None, gpus_per_trial: float | None = None) -> int:  # fmt: skip
    """``sweep --plan`` and ``avn-study plan``: what the space runs and what its design can decide; exit 2
    (with the refusal the sweep would give) when no verdict can be reached, unless allowed."""
    from avn_study.study.plan import check_verdicts, plan_lines

    reported, cohort = _cohort_patients(space, data)
    if patients is not None:
        reported, cohort = reported or patients, cohort or patients
    components = None
    if pilot is not None:
        from avn_study.analysis.pilot import pilot_components

        components = pilot_components(pilot, space.primary_metric)
        print(f"pilot study {pilot}: variance components of {space.primary_metric} estimated from its stage 2")
    print(_plan_text(space, gpus_per_trial))
    print("\n".join(plan_lines(space, reported, cohort, components)))
    check_verdicts(space, reported, allow_no_verdict or space.allow_no_verdict)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from avn_study.resources import space_argument
    from avn_study.study.space import load_space

    space = load_space(space_argument(args.space))
    return _print_plan(space, args.data, args.allow_no_verdict, args.pilot, args.patients)


def _plan_parser(sub) -> None:
    """``avn-study plan``'s arguments (next to :func:`cmd_plan`)."""
    p = sub.add_parser("plan", help="what a space's design can decide: attainable p, power, detectable effects")
    p.add_argument("space", type=_path, help="search-space YAML file, or a shipped one by name")
    p.add_argument("--data", type=_path, help="the cohort (for the reported patients with necrosis and the cost)")
    p.add_argument("--patients", type=_positive_int, help="reported patients, when the cohort is not at hand")
    p.add_argument("--pilot", type=_path, help="a finished study folder: estimate the variance components from it")
    p.add_argument("--allow-no-verdict", action="store_true", dest="allow_no_verdict",
                   help="exit 0 even when a contrast can never reach a verdict")  # fmt: skip
    p.set_defaults(func=cmd_plan)


def cmd_demo(args: argparse.Namespace) -> int:
    from avn_study.data.phantom import PhantomConfig, write_cohort
    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    out = args.out.resolve()
    cohort = out / "cohort"
    cases = args.cases or (6 if args.tiny else 16)
    if args.seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {args.seed}")
    from avn_study.resources import shipped_space, space_argument

    if args.space:
        space_file = space_argument(args.space)
    elif args.tiny:  # the smoke space with one trial per search: a check of the install, not a study
        import yaml

        text = yaml.safe_dump({**yaml.safe_load(shipped_space("smoke").read_text()), "trials": 1}, sort_keys=False)
        out.mkdir(parents=True, exist_ok=True)
        space_file = out / "tiny.yaml"
        if space_file.exists() and space_file.read_text() != text:  # never replace a file the demo did not write
            raise UsageError(f"{space_file}: exists and is not the tiny demo's space; choose another --out")
        space_file.write_text(text)
    else:
        space_file = shipped_space("demo")
    space = load_space(space_file)
    if (cohort / "dataset.json").is_file():
        print(f"reusing the phantom cohort in {cohort}", file=sys.stderr)
    else:
        print(f"writing a phantom cohort of {cases} patients to {cohort}", file=sys.stderr)
        write_cohort(cohort, cases=cases, seed=args.seed, config=PhantomConfig.tiny() if args.tiny else PhantomConfig())
    study = Study(space, cohort, str(out / "experiments"), progress=not args.quiet)
    resume = (study.root / "study.json").is_file()
    from avn_study.outputs import shell

    result = run_study(study, resume, None, args.num_cpus, shell("avn-study", "demo", "--out", args.out))
    if result is None:
        return 130
    print(f"cohort: {cohort}\nexperiment: {study.root}")
    if result.errored:
        print(_errored_summary(result), file=sys.stderr)
    code = _analyze_and_print(study.root, out / "report")
    return 1 if result.errored else code


def _demo_parser(sub) -> None:
    """``avn-study demo``'s arguments (next to :func:`cmd_demo`)."""
    p = sub.add_parser("demo", help="phantom cohort + the demo nested ablation + its report (the README's command)")
    p.add_argument("--out", type=_path, default=Path("avn-demo"), help="output folder (default ./avn-demo)")
    p.add_argument("--cases", type=_positive_int, help="phantom patients (default 16; 6 with --tiny)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--space", type=_path, help="search-space file or shipped name (default demo; smoke with --tiny)")
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs for Ray (default: all)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a minute-long smoke run: tiny phantom and the smoke space (checks an install)",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress lines")
    p.set_defaults(func=cmd_demo)


def _analyze_and_print(experiment: Path, out: Path, reference: str | None = None, metric: str = "dice") -> int:
    from avn_study.analysis import analyze, write_analysis
    from avn_study.analysis.report import ablation_markdown

    analysis = write_analysis(analyze(experiment, reference, metric), out)
    print(ablation_markdown(analysis))
    for warning in analysis.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report: {analysis.summary}\ntables and figures: {out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    out = args.out or args.experiment / "analysis"
    return _analyze_and_print(args.experiment, out, args.reference, args.metric)


def _analyze_parser(sub) -> None:
    """``avn-study analyze``'s arguments (next to :func:`cmd_analyze`)."""
    p = sub.add_parser("analyze", help="tables, paired statistics, plots and summary.md of an experiment")
    p.add_argument("experiment", type=_path, help="study folder (STORAGE/NAME) or one Ray Tune experiment folder")
    p.add_argument("--out", type=_path, help="output folder (default EXPERIMENT/analysis)")
    p.add_argument("--reference", help="row the others are compared with (default unet, else the first row)")
    p.add_argument("--metric", default="dice", help="metric of the paired comparison (default dice)")
    p.set_defaults(func=cmd_analyze)


def cmd_export(args: argparse.Namespace) -> int:
    from avn_study.bundle.export import export_bundle
    from avn_study.bundle.format import InferenceOptions

    try:
        inference = InferenceOptions().override(**_inference_args(args))
    except ValueError as err:
        raise UsageError(f"inference option: {err}") from None
    result = export_bundle(args.experiment, args.out, row=args.arm, metric=args.metric, onnx=args.onnx,
                           overwrite=args.overwrite, ensemble=args.ensemble, inference=inference,
                           wait=args.wait)  # fmt: skip
    sel, conf = result.selection, result.selection.best
    sd = f" (SD {conf.sd:.4f})" if conf.sd is not None else ""
    print(
        f"best configuration: row {conf.row}, mean {sel.metric} {conf.mean:.4f}{sd} over {len(conf.trials)} "
        f"trial(s) of stage {sel.stage}; exported trial {sel.trial['trial_id']} (fold {sel.trial['fold']}, "
        f"seed {sel.trial['seed']}, {sel.metric} {sel.trial['value']:.4f}) from {result.checkpoint}"
    )
    for note in sel.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.onnx:
        print(f"model.onnx matches PyTorch to {result.onnx['max_abs_diff_vs_torch']:.2g} (onnxruntime)")
    if args.ensemble:
        print(f"fold ensemble: all {len(conf.trials)} trial(s) of the configuration")
    print(f"bundle: {result.path}")
    return 0


def _export_parser(sub) -> None:
    """``avn-study export``'s arguments (next to :func:`cmd_export`)."""
    from avn_study.bundle.export import SELECTION_RULE  # light module: no heavy imports at its top

    p = sub.add_parser(
        "export",
        help="the best model of a study as a bundle (safetensors weights + JSON; optional ONNX)",
        description=f"Write BUNDLE: model.safetensors, config.json, metrics.json, provenance.json. {SELECTION_RULE} "
        "Only JSON and safetensors are read; Ray's pickles are never opened.",
    )
    p.add_argument("experiment", type=_path, help="study folder (STORAGE/NAME) or one Ray Tune experiment folder")
    p.add_argument("--out", type=_path, required=True, help="bundle folder to write")
    p.add_argument("--arm", help="export the best configuration of this row (a name from study.json 'rows')")
    p.add_argument("--metric", help="selection metric (default: the study's metric, val_dice)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked against PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--wait", action="store_true",
                   help="if a live driver still runs the study, wait for it to finish (default: refuse)")  # fmt: skip
    p.add_argument("--ensemble", action="store_true",
                   help="put every trial of the best configuration (all folds and seeds) into the bundle; predict "
                   "averages them")  # fmt: skip
    _add_inference_flags(p, "the bundle's default; default off")
    p.set_defaults(func=cmd_export)


def _add_inference_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tta", choices=("none", "flip"), default=None,
                   help=f"test-time augmentation: flip = mean with the left-right mirror ({what})")  # fmt: skip
    p.add_argument(
        "--restrict-to-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        dest="restrict_to_head",
        help=f"keep necrosis only inside the predicted localisation region (+loc models; {what})",
    )
    p.add_argument("--min-component-ml", type=float, default=None, dest="min_component_ml",
                   help=f"drop predicted necrosis components smaller than this volume ({what})")  # fmt: skip


def _inference_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"tta": args.tta, "restrict_to_head": args.restrict_to_head, "min_component_ml": args.min_component_ml}


def cmd_predict(args: argparse.Namespace) -> int:
    from avn_study.bundle.predict import predict

    progress = _progress if args.input.is_dir() else None
    bundle, segs = args.bundle, None
    if args.dicom_seg is not None:  # before any prediction: every input's source series, every SEG's path
        from avn_study.dicom import require_dicom

        require_dicom("predict --dicom-seg")
        from avn_study.bundle.format import load_bundle
        from avn_study.dicom.predict_seg import plan_segs

        bundle = load_bundle(args.bundle)
        segs = plan_segs(bundle, args.input, args.output, args.dicom_seg, args.overwrite)
    records = predict(bundle, args.input, args.output, args.device, args.batch_size, progress, args.overwrite,
                      **_inference_args(args))  # fmt: skip
    if segs is not None:
        from avn_study.dicom.predict_seg import write_segs

        for path in write_segs(bundle, segs, records, args.input, args.output):
            print(f"{path}: DICOM SEG")
    for r in records:
        print(f"{r['output']}: necrosis {r['necrosis']['volume_ml']:.2f} ml ({r['necrosis']['voxels']} voxels)")
        for warning in r.get("warnings", []):
            print(f"warning: {r['input']}: {warning}", file=sys.stderr)
    return 0


def _predict_parser(sub) -> None:
    """``avn-study predict``'s arguments (next to :func:`cmd_predict`)."""
    p = sub.add_parser(
        "predict",
        help="necrosis label maps for NIfTI volumes, written in each input's own geometry",
        description="Predict every coronal slice with the bundle's preprocessing and write a uint8 label map with "
        "the input's shape, affine and orientation: necrosis 2 and, for models with a localisation branch, the "
        "localisation region 1. File to file (OUT.nii.gz plus OUT.json with volumes per label) or folder to "
        "folder (every *.nii.gz / *.nii; nnU-Net names {case}_0000.nii.gz become {case}.nii.gz, others are "
        "kept; OUTPUT/volumes.json lists the volumes). The bundle is read as JSON and safetensors only.",
    )
    p.add_argument("bundle", type=_path, help="bundle folder written by `avn-study export`")
    p.add_argument("input", type=_path, help="a .nii/.nii.gz file or a folder of them")
    p.add_argument("output", type=_path, help="output .nii/.nii.gz file (or folder) for a file; a folder for a folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--batch-size", type=_positive_int, default=32, dest="batch_size", help="slices per batch")
    p.add_argument("--overwrite", action="store_true", help="replace label maps that an earlier predict wrote here")
    p.add_argument("--dicom-seg", type=_path, dest="dicom_seg", metavar="SOURCE_DICOM_DIR",
                   help="also write each mask as a DICOM SEG ({case}_seg.dcm) of the series in SOURCE_DICOM_DIR "
                   "the input was converted from (import-dicom), for PACS, 3D Slicer or OHIF; needs "
                   "avn-study[dicom]")  # fmt: skip
    _add_inference_flags(p, "default: the bundle's setting")
    p.set_defaults(func=cmd_predict)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from avn_study.bundle.evaluate import evaluate_bundle, summary_lines

    summary = evaluate_bundle(args.bundle, args.data, args.out, subset=args.subset, device=args.device,
                              min_volume_ml=args.min_volume_ml, min_iou=args.min_iou, tau_mm=args.tau_mm,
                              overwrite=args.overwrite, progress=_progress, **_inference_args(args))  # fmt: skip
    print("\n".join(summary_lines(summary)))
    print(f"wrote per_case.csv, per_hip.csv and summary.json to {args.out}")
    return 0


def _evaluate_parser(sub) -> None:
    """``avn-study evaluate``'s arguments (next to :func:`cmd_evaluate`)."""
    p = sub.add_parser(
        "evaluate",
        help="score a bundle on a labelled cohort in each scan's own geometry, per case and per hip",
        description="Predict every labelled case of DATA (imagesTs/labelsTs when present, else imagesTr/labelsTr) "
        "as `predict` does and compare with the reference in the scan's own grid: Dice, HD95, volumes, lesions, "
        "surface Dice, lesion detection with a minimum IoU; next to them the training-grid Dice/HD95 a trial "
        "reports; per hip (split at the midline of the two heads): necrotic fraction of the head with the "
        "15/30 %% staging bins and hip-level detection. Writes OUT/per_case.csv, per_hip.csv, summary.json.",
    )
    p.add_argument("bundle", type=_path, help="bundle folder written by `avn-study export`")
    p.add_argument("data", type=_path, help="a labelled cohort in the nnU-Net raw layout")
    p.add_argument("--out", type=_path, required=True, help="new (or empty) folder for the tables")
    p.add_argument("--subset", default="auto", choices=("auto", "Tr", "Ts"),
                   help="which images/labels pair to score (default auto: Ts when present)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--min-volume-ml", type=float, default=0.1, dest="min_volume_ml",
                   help="a hip is predicted positive with at least this much necrosis (default 0.1 ml)")  # fmt: skip
    p.add_argument(
        "--min-iou",
        type=float,
        default=0.1,
        dest="min_iou",
        help="a reference lesion counts as detected at this IoU with a predicted one (default 0.1)",
    )
    p.add_argument("--tau-mm", type=float, default=2.0, dest="tau_mm",
                   help="surface Dice tolerance in mm (default 2)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    _add_inference_flags(p, "default: the bundle's setting")
    p.set_defaults(func=cmd_evaluate)


def cmd_bench(args: argparse.Namespace) -> int:
    from avn_study import bench

    return bench.run(args.what, args)


def _bench_parser(sub) -> None:
    """``avn-study bench``'s arguments (next to :func:`cmd_bench`)."""
    p = sub.add_parser("bench", help="throughput figures")
    p.add_argument("what", choices=["data", "train", "sweep", "gpu", "calibrate", "cluster", "verdicts"],
                   help="what to measure (gpu: needs CUDA; calibrate: every ablation row on the phantom; "
                        "cluster: slot utilisation of ablation.yaml on logical GPUs; "
                        "verdicts: the simulated A/A, power and coverage tables of docs/analysis.md, --cases "
                        "studies per cell)")  # fmt: skip
    p.add_argument("--gpus", type=_positive_int, default=8, help="cluster bench: logical GPUs (default 8)")
    p.add_argument("--epoch-seconds", type=_positive_float, default=0.1, dest="epoch_seconds",
                   help="cluster bench: seconds of one unet epoch of the stand-in trials (default 0.1)")  # fmt: skip
    p.add_argument("--scheduling", choices=["both", "sequential", "concurrent"], default="both",
                   help="cluster bench: which scheduling(s) to run (default both, side by side)")  # fmt: skip
    p.add_argument("--outer-folds", type=_positive_int, dest="outer_folds",
                   help="cluster bench: only the first N of ablation.yaml's outer folds (default: all)")  # fmt: skip
    p.add_argument("--per-gpu", type=_positive_int, default=4, dest="per_gpu",
                   help="gpu and cluster benches: trials per GPU (default 4)")  # fmt: skip
    p.add_argument(
        "--cases",
        type=_positive_int,
        help="cohort size (data: 200 for the RSS figure; calibrate: 24; train: 16 for the loop profile)",
    )
    p.add_argument("--seed", type=int, default=0, help="calibrate: phantom seed (default 0)")
    p.add_argument("--epochs", type=_positive_int, default=8, help="calibrate: epochs of every row (default 8)")
    p.add_argument("--tiny", action="store_true", help="calibrate: the coarse test phantom (smoke runs)")
    p.add_argument("--work-dir", type=_path, help="where to put the bench cohorts (default: a temp folder)")
    p.add_argument("--slice-size", type=int, default=128, dest="slice_size", help="train bench: slice size")
    p.add_argument("--threads", type=int, default=0, help="train bench: torch threads (default: torch's)")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avn-study",
        description="Ablation and hyperparameter studies of a multitask AVN segmentation network.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _synth_parser(sub)
    _verify_parser(sub)
    _import_dicom_parser(sub)
    _split_parser(sub)
    _train_parser(sub)
    _sweep_parser(sub)
    _plan_parser(sub)
    _demo_parser(sub)
    _analyze_parser(sub)
    _export_parser(sub)
    _predict_parser(sub)
    _evaluate_parser(sub)
    _bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    raise SystemExit(main())
