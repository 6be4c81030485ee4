"""The cohort commands: ``synth``, ``verify``, ``import-dicom`` and ``split``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avn_study.cli.args import _fraction, _path, _positive_int, _progress
from avn_study.data.layout import DATASET_JSON, IMAGES_TR, IMAGES_TS, LABELS_TR, UNLABELLED_DIR
from avn_study.data.splits import SPLITS_FILE
from avn_study.errors import UsageError


def cmd_synth(args: argparse.Namespace) -> int:
    """``avn-study synth``: write a phantom cohort, replacing only an earlier phantom cohort whole."""
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
    """``avn-study verify``: check a cohort (or a DICOM export); exit 2 listing every problem."""
    from avn_study.data.verify import verify_dataset
    from avn_study.dicom import looks_like_dicom

    data = Path(args.data)
    if data.is_dir() and not (data / DATASET_JSON).exists() and looks_like_dicom(data):
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
    """``avn-study import-dicom``: convert a DICOM export and list the series chosen for each visit."""
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
    labelled = sum(c.subset == IMAGES_TR for c in result.cases)
    patients = len({c.patient for c in result.cases})
    print(f"imported {len(result.cases)} visit(s) of {patients} patient(s) to {result.out} ({labelled} labelled in "
          f"{IMAGES_TR}/{LABELS_TR}, {len(result.cases) - labelled} in {args.unlabelled}/)")  # fmt: skip
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
        f"with {DATASET_JSON}'s patients map from PatientID. Cases are case_000, ...; patients P000, ...; the link to "
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
                   f"series go to {IMAGES_TR}/{LABELS_TR}")  # fmt: skip
    p.add_argument("--unlabelled", choices=(IMAGES_TS, UNLABELLED_DIR), default=IMAGES_TS,
                   help=f"where visits without labels go (default {IMAGES_TS})")  # fmt: skip
    p.add_argument("--mapping", type=_path, help="the private mapping file (default OUT.mapping.json beside OUT)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier import (only one) and its mapping")
    p.set_defaults(func=cmd_import_dicom)


def cmd_split(args: argparse.Namespace) -> int:
    """``avn-study split``: freeze patient-level folds; a frozen split is replaced only with ``--overwrite``."""
    from avn_study.data.cache import build_cache
    from avn_study.data.splits import SPLITS_FILE, is_splits_file, make_splits, write_splits
    from avn_study.outputs import check_target

    target = args.out or Path(args.data) / SPLITS_FILE
    if target.is_file() and not args.overwrite:
        _refuse_a_frozen_split(target)
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
    _print_splits(splits, patients, necrosis)
    print(f"wrote {out} (hash {splits.hash[:12]})")
    return 0


def _refuse_a_frozen_split(target: Path) -> None:
    """Refuse to replace a frozen split without ``--overwrite``: runs and studies recorded its hash."""
    from avn_study.outputs import json_marker

    held = json.loads(target.read_text()).get("hash", "?")[:12] if json_marker(target, "hash") else "?"
    raise UsageError(f"{target}: a frozen split (hash {held}) already exists; runs and studies recorded its "
                     "hash. Pass --overwrite to replace it (their results will then name a split that is gone), "
                     "or --out to write another file")  # fmt: skip


def _print_splits(splits, patients: dict[str, str], necrosis: dict[str, bool] | None) -> None:
    """The held-out test set (patients, with necrosis) and each fold's train and validation cases."""
    if splits.test:
        test_patients = {patients[c] for c in splits.test}
        positive = sum(any(necrosis.get(c, False) for c in splits.test if patients[c] == p) for p in test_patients) \
            if necrosis else "?"  # fmt: skip
        print(f"test set: {len(splits.test)} cases of {len(test_patients)} patients ({positive} with necrosis), "
              "held out of every fold")  # fmt: skip
    for i, fold in enumerate(splits.folds):
        print(f"fold {i}: {len(fold.train)} train / {len(fold.val)} val cases")


def _split_parser(sub) -> None:
    """``avn-study split``'s arguments (next to :func:`cmd_split`)."""
    p = sub.add_parser("split", help=f"freeze patient-level K-fold splits in DATA/{SPLITS_FILE}")
    p.add_argument("data", type=_path, help="dataset folder")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--no-stratify", action="store_true", help="do not stratify by necrosis presence")
    p.add_argument("--test-fraction", type=_fraction, default=0.0, dest="test_fraction",
                   help="share of patients held out as a test set, in no fold (stratified, default 0)")  # fmt: skip
    p.add_argument("--out", type=_path, help=f"where to write (default DATA/{SPLITS_FILE})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing splits file")
    p.add_argument("--cache-dir", type=_path, help="preprocessing cache (default $AVN_STUDY_CACHE or ~/.cache)")
    p.set_defaults(func=cmd_split)


def add_parsers(sub) -> None:
    """The cohort commands, in the order ``avn-study --help`` lists them."""
    _synth_parser(sub)
    _verify_parser(sub)
    _import_dicom_parser(sub)
    _split_parser(sub)
