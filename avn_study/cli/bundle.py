"""The bundle commands: ``export`` a study's best model, ``predict`` with it, ``evaluate`` it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from avn_study.cli.args import _path, _positive_int, _progress
from avn_study.data.layout import IMAGES_TR, IMAGES_TS, LABELS_TR, LABELS_TS
from avn_study.errors import UsageError
from avn_study.study.folder import MANIFEST


def cmd_export(args: argparse.Namespace) -> int:
    """``avn-study export``: select the best configuration, write its bundle and say what was chosen."""
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
    p.add_argument("--arm", help=f"export the best configuration of this row (a name from {MANIFEST} 'rows')")
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
    """The inference options export, predict and evaluate share; ``what`` says what their default is."""
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
    """The inference flags as keyword arguments (None: the bundle's own setting)."""
    return {"tta": args.tta, "restrict_to_head": args.restrict_to_head, "min_component_ml": args.min_component_ml}


def cmd_predict(args: argparse.Namespace) -> int:
    """``avn-study predict``: label maps (and, with ``--dicom-seg``, DICOM SEGs planned before any prediction)."""
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
    """``avn-study evaluate``: score a bundle on a labelled cohort and print the summary."""
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
        description=f"Predict every labelled case of DATA ({IMAGES_TS}/{LABELS_TS} when present, else "
        f"{IMAGES_TR}/{LABELS_TR}) "
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


def add_parsers(sub) -> None:
    """The bundle commands, in the order ``avn-study --help`` lists them."""
    _export_parser(sub)
    _predict_parser(sub)
    _evaluate_parser(sub)
