"""Predicting necrosis on NIfTI volumes in their own geometry.

The bundle format, its writer and its safe reader live in :mod:`avn_study.bundle.format`.

Prediction follows the path of validation during training, step for step: the NIfTI is read whole and
reoriented to RAS (no resampling), the R and S axes are resampled linearly to the bundle's in-plane
spacing, intensities are clipped to the case's percentiles and z-scored, every coronal slice (constant
A/P, RAS axis 1) is centre-cropped or padded to the slice size, and the model's probabilities are
pasted back into that grid (the *training space*, where the trial's metrics were computed). They are
then resampled linearly back to the input's RAS grid, thresholded and written in the input's own
orientation, shape and affine as a uint8 label map: necrosis = 2 and, for models with a localisation
branch, the localisation region (femoral head plus margin) = 1; necrosis wins where both are set.
On a GPU the model runs under the trial's ``amp`` setting (bf16 autocast by default, as validation did
there); on the CPU in float32.

File names in folder mode follow nnU-Net: ``{case}_0000.nii.gz`` -> ``{case}.nii.gz`` (other names are
kept), and ``volumes.json`` lists each case's volumes; a single file ``OUT.nii.gz`` gets ``OUT.json``
(:mod:`avn_study.bundle.predict_paths` pairs and checks the names; its public names are importable here too).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avn_study.bundle.format import SLICE_AXIS, Bundle, InferenceOptions, load_bundle
from avn_study.bundle.predict_paths import (
    WRITTEN_BY,
    json_path,
    output_name,
    plan,
    predicted_outputs,
    written_by_predict,
)
from avn_study.data.labels import LABELS
from avn_study.data.nifti import Geometry, load_ras, save_in_geometry
from avn_study.data.preprocess import (
    PreprocessConfig,
    inplane_shape,
    normalise,
    resample_inplane_to,
    resampled_affine,
)
from avn_study.data.slices import crop_box
from avn_study.errors import AvnError, DataError, UsageError
from avn_study.vocabulary import LOC_THRESHOLD

MAX_GRID_VOXELS = 2**28  # 268 M voxels (~1 GiB per float32 copy): no hip MRI comes near it
OBLIQUE_WARNING_DEG = 5.0  # beyond this, coronal slices of the RAS grid cut the anatomy at an angle
PLAUSIBLE_SPACING_MM = (0.2, 10.0)  # outside this a voxel size is a header error, not hip MRI
UNVERIFIED_BUNDLE = ("the bundle was written before bundles recorded checksums (format version < 3): its files "
                     "could not be checked for damage; export it again to get a checked bundle")  # fmt: skip


# ------------------------------------------------------------------------------------------ prediction
@dataclass
class CasePrediction:
    """One volume's prediction in training space and in the input's own RAS grid.

    Attributes:
        geometry: the input's stored geometry (shape, affine, orientation).
        slices: the model's input, ``(A, 1, S, S)`` normalised, cropped/padded coronal slices.
        grid: probabilities per branch (``seg``, ``loc``) pasted into the resampled grid ``(A, R', S')``:
            the space the trial's validation metrics were computed in.
        recon: the reconstruction ``(A, S, S)`` in slice space (models with ``recon``), else None.
        spacing: voxel size in mm of ``grid`` along (A, R', S').
        labels: the uint8 label map in the input's RAS grid ``(R, A, S)``.
    """

    geometry: Geometry
    slices: torch.Tensor
    grid: dict[str, np.ndarray]
    recon: np.ndarray | None
    spacing: tuple[float, float, float]
    labels: np.ndarray = field(repr=False)


def preprocess_image(
    image_ras: np.ndarray, geometry: Geometry, config: PreprocessConfig
) -> tuple[np.ndarray, float, tuple[float, float, float]]:
    """What the cache does to a training image (``data.cache.preprocess_case``): in-plane resampling,
    then clipping and z-scoring, with the same functions.

    Returns:
        The normalised image ``(R', A, S')``, its pad value (the normalised lower clip bound), and its
        voxel size in mm along R, A, S.
    """
    shape = inplane_shape(image_ras.shape, geometry.ras_spacing, config.inplane_spacing_mm)
    resampled = resample_inplane_to(image_ras, shape, order=1)
    image, pad_value = normalise(resampled, config.clip_percentiles)
    affine = resampled_affine(geometry.ras_affine, image_ras.shape, shape)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return image, pad_value, spacing


def resolve_options(bundle: Bundle, **changes: Any) -> InferenceOptions:
    """The bundle's inference options with the command line's changes (``None``: keep the bundle's).

    Raises:
        UsageError: a bad value, or ``restrict_to_head`` for a model without a localisation branch.
    """
    try:
        options = bundle.inference.override(**changes)
    except ValueError as err:
        raise UsageError(f"inference option: {err}") from None
    if options.restrict_to_head and "loc" not in bundle.branches:
        arm = bundle.config["model"]["arm"]
        raise UsageError(f"restrict_to_head needs a localisation branch, and this bundle's arm '{arm}' has none "
                         "(use --no-restrict-to-head)")  # fmt: skip
    return options


def slice_probabilities(
    bundle: Bundle, slices: torch.Tensor, device: torch.device, batch_size: int = 32, tta: str = "none"
) -> dict[str, np.ndarray]:
    """The mean over the bundle's models (a fold ensemble has several) and, with ``tta="flip"``, over each
    slice and its left-right mirror, of the probabilities (``seg``, ``loc``) and reconstructions."""
    from avn_study.models.runtime import autocast_dtype
    from avn_study.training.validation import predict_slices

    amp = autocast_dtype(bundle.config.get("amp", "auto"), device)
    outs = []
    for model in bundle.models:
        model = model.to(device)
        for flip in (False, True) if tta == "flip" else (False,):
            x = torch.flip(slices, dims=[2]) if flip else slices  # (N, 1, R', S'): dim 2 runs left-right
            out = predict_slices(model, x, device, amp, batch_size)
            outs.append({k: np.ascontiguousarray(v[:, ::-1]) for k, v in out.items()} if flip else out)
    if len(outs) == 1:
        return outs[0]
    return {k: np.mean([o[k] for o in outs], axis=0, dtype=np.float64).astype(np.float32) for k in outs[0]}


def postprocess(necrosis: np.ndarray, loc: np.ndarray | None, spacing: tuple[float, ...],
                options: InferenceOptions) -> np.ndarray:  # fmt: skip
    """Necrosis mask after the options' post-processing (restricted to the localisation region; small
    components dropped), in the grid of ``spacing``."""
    from scipy import ndimage

    if options.restrict_to_head and loc is not None:
        necrosis = necrosis & (loc >= LOC_THRESHOLD)
    if options.min_component_ml > 0 and necrosis.any():
        components, n = ndimage.label(necrosis, structure=np.ones((3, 3, 3), bool))
        voxel_ml = float(np.prod(spacing)) / 1000.0
        keep = np.bincount(components.ravel(), minlength=n + 1) * voxel_ml >= options.min_component_ml
        keep[0] = False
        necrosis = keep[components]
    return necrosis


def predict_volume(
    bundle: Bundle,
    image_ras: np.ndarray,
    geometry: Geometry,
    device: torch.device | None = None,
    batch_size: int = 32,
    options: InferenceOptions | None = None,
    extra: tuple[np.ndarray, ...] = (),
) -> CasePrediction:
    """Predict every coronal slice of a RAS volume and map the result back to its RAS grid.

    ``image_ras`` is the first input channel; ``extra`` the others, in the bundle's channel order, on
    the same grid. ``options`` (default: the bundle's) set test-time augmentation, applied to the
    probabilities, and post-processing, applied to the label map in the scan's grid (``grid`` keeps
    the model's probabilities as they are).
    """
    device = device or torch.device("cpu")
    options = options or bundle.inference
    channels = (image_ras, *extra)
    if len(channels) != len(bundle.channels):
        raise DataError(f"the bundle reads {len(bundle.channels)} channel(s) ({', '.join(bundle.channels)}), "
                        f"got {len(channels)}")  # fmt: skip
    size, stacks = bundle.slice_size, []
    for channel in channels:
        image, pad_value, spacing = preprocess_image(channel, geometry, bundle.preprocess)
        stacks.append((np.ascontiguousarray(np.moveaxis(image, SLICE_AXIS, 0)), pad_value))  # (A, R', S'), as cached
    stack = stacks[0][0]
    src, dst = crop_box(stack.shape[1:], size)
    slices = np.empty((stack.shape[0], len(stacks), size, size), dtype=np.float32)
    for k, (channel_stack, pad_value) in enumerate(stacks):
        slices[:, k] = pad_value
        slices[(slice(None), k, *dst)] = channel_stack[(slice(None), *src)]
    out = slice_probabilities(bundle, torch.from_numpy(slices), device, batch_size, options.tta)
    for name in ("seg", "loc"):
        bad = int((~np.isfinite(out[name])).sum()) if name in out else 0
        if bad:  # a threshold would read NaN as "no necrosis" without a word
            raise DataError(f"the model produced NaN/Inf for {bad:,} of {out[name].size:,} '{name}' probabilities "
                            "(its weights hold non-finite values, or the input overflowed); nothing was written "
                            "for this case")  # fmt: skip
    grid = {}
    for name in ("seg", "loc"):
        if name in out:
            full = np.zeros(stack.shape, np.float32)  # outside the crop: nothing predicted
            full[(slice(None), *src)] = out[name][(slice(None), *dst)]
            grid[name] = full
    labels = np.zeros(geometry.ras_shape, np.uint8)
    native = {k: resample_inplane_to(np.moveaxis(v, 0, SLICE_AXIS), geometry.ras_shape) for k, v in grid.items()}
    if "loc" in native:
        labels[native["loc"] >= LOC_THRESHOLD] = LABELS["femoral_head"]
    necrosis = postprocess(native["seg"] >= bundle.threshold, native.get("loc"), geometry.ras_spacing, options)
    labels[necrosis] = LABELS["necrosis"]
    a_r_s = (spacing[1], spacing[0], spacing[2])
    return CasePrediction(geometry, torch.from_numpy(slices), grid, out.get("recon"), a_r_s, labels)


def label_volumes(labels: np.ndarray, geometry: Geometry, branches: tuple[str, ...], margin_mm: float) -> dict:
    """Voxel counts and volumes in ml per label of a predicted label map."""
    voxel_ml = abs(float(np.linalg.det(geometry.affine[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=3)
    out: dict[str, Any] = {"voxel_volume_ml": voxel_ml}
    for name in ("necrosis", "femoral_head"):
        value = LABELS[name]
        entry = {"value": value, "voxels": int(counts[value]), "volume_ml": float(counts[value]) * voxel_ml}
        if name == "femoral_head":
            entry["predicted"] = "loc" in branches
            entry["meaning"] = (
                f"localisation region: femoral head plus a {margin_mm:g} mm margin, necrosis excluded"
                if "loc" in branches
                else "not predicted: the model has no localisation branch"
            )
        out[name] = entry
    return out


def check_geometry(source: Path, geometry: Geometry, bundle: Bundle) -> list[str]:
    """Refuse a grid too large to resample; warn about oblique scans and implausible voxel sizes.

    Returns:
        Warnings (also written to the output's JSON record).

    Raises:
        DataError: the in-plane resampling to the bundle's spacing would need more than
            :data:`MAX_GRID_VOXELS` voxels (a wrong spacing in the header, as a rule).
    """
    spacing = geometry.ras_spacing
    shape = inplane_shape(geometry.ras_shape, spacing, bundle.preprocess.inplane_spacing_mm)
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_GRID_VOXELS:
        raise DataError(
            f"{source}: resampling to {bundle.preprocess.inplane_spacing_mm:g} mm in-plane would give a "
            f"{' x '.join(map(str, shape))} grid ({voxels:,} voxels, {voxels * 4 / 2**30:.0f} GiB per copy) from "
            f"a {' x '.join(map(str, geometry.ras_shape))} scan with voxel size "
            f"{' x '.join(f'{v:g}' for v in spacing)} mm (R, A, S); check the header's spacing"
        )
    warnings = []
    if geometry.obliquity_deg > OBLIQUE_WARNING_DEG:
        warnings.append(
            f"oblique acquisition: a voxel axis is {geometry.obliquity_deg:.1f} degrees off the world axis it is "
            "read as; the model sees slices of the nearest RAS grid, so results may be worse than on plain "
            "coronal scans"
        )
    plane = geometry.acquisition_plane
    if plane not in ("coronal", "isotropic"):
        warnings.append(
            f"{plane} acquisition (voxel {' x '.join(f'{v:g}' for v in spacing)} mm R, A, S: thickest across the "
            f"{plane} plane); the model reads coronal slices, so each one mixes the thick {plane} slices and "
            "results may be worse than on coronal scans"
        )
    size, step = bundle.slice_size, bundle.preprocess.inplane_spacing_mm
    covered = min(shape[0], size) * min(shape[2], size) / (shape[0] * shape[2])
    if covered < 1.0:
        width = f"{size} px x {step:g} mm = {size * step:g} mm" if step else f"{size} px"
        field = f"{shape[0] * (step or spacing[0]):.0f} x {shape[2] * (step or spacing[2]):.0f} mm"
        warnings.append(
            f"the slice crop ({width} square, centred) covers {100 * covered:.0f} % of the scan's coronal plane "
            f"({field}, R x S); nothing is predicted outside it: check that the hips are inside"
        )
    low, high = PLAUSIBLE_SPACING_MM
    if min(spacing) < low or max(spacing) > high:
        warnings.append(
            f"voxel size {' x '.join(f'{v:g}' for v in spacing)} mm (R, A, S) is outside {low:g}-{high:g} mm, far "
            "from hip MRI the model was trained on; check the header"
        )
    return warnings


def predict_file(bundle: Bundle, source: Path | tuple[Path, ...], target: Path, device: torch.device,
                 batch_size: int = 32, options: InferenceOptions | None = None,
                 replace: Callable[[Path], bool] | None = None) -> dict:  # fmt: skip
    """Predict one case (a NIfTI file, or one file per channel) and write its label map; returns its
    volumes record (with ``warnings``).

    The label map is written under a temporary name and renamed into place (``replace``: whether an
    existing ``target`` may be replaced at that moment), so a killed predict leaves no truncated mask
    under its final name.

    Raises:
        DataError: an input is unreadable, not 3D, has an unusable affine, a grid too large to
            resample, or holds non-finite voxels; channels on different grids; the model produced
            non-finite probabilities (names the file).
        UsageError: ``target`` appeared meanwhile and may not be replaced.
    """
    sources = source if isinstance(source, tuple) else (source,)
    source = sources[0]
    image, geometry = load_ras(source, refuse_repairs=True)
    warnings = check_geometry(source, geometry, bundle)
    extra = []
    for path, arr in ((source, image), *((p, None) for p in sources[1:])):
        if arr is None:
            arr, other = load_ras(path, refuse_repairs=True)
            if other.shape != geometry.shape or not np.allclose(other.affine, geometry.affine, atol=1e-3):
                raise DataError(f"{path}: its grid (shape {other.shape}) differs from the first channel's "
                                f"{source.name} (shape {geometry.shape}); channels must be co-registered")  # fmt: skip
            extra.append(arr)
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: {int((~np.isfinite(arr)).sum())} NaN/Inf voxels; all voxels must be finite")
    from avn_study.outputs import staged_file

    try:
        prediction = predict_volume(bundle, image, geometry, device, batch_size, options, tuple(extra))
    except DataError as err:
        raise DataError(f"{source}: {err}") from None
    with staged_file(target, replace) as tmp:  # a killed predict leaves no truncated mask under its name
        save_in_geometry(prediction.labels, geometry, tmp)
    margin = float(bundle.config["preprocessing"]["loc_margin_mm"])
    return {
        "input": str(source),
        **({"channels": [str(p) for p in sources]} if len(sources) > 1 else {}),
        "output": str(target),
        "shape": list(geometry.shape),
        "axcodes": "".join(geometry.axcodes),
        **label_volumes(prediction.labels, geometry, bundle.branches, margin),
        "warnings": warnings,
    }


def _device(name: str) -> torch.device:
    """``resolve_device`` with the option's name in its message."""
    from avn_study.models.runtime import resolve_device

    try:
        return resolve_device(name)
    except AvnError as err:
        raise type(err)(f"--{err}") from None


def predict(
    bundle: str | Path | Bundle,
    source: str | Path,
    target: str | Path,
    device: str = "auto",
    batch_size: int = 32,
    progress: Any = None,
    overwrite: bool = False,
    **options: Any,
) -> list[dict[str, Any]]:
    """``avn-study predict``: a file to a file, or every NIfTI of a folder to a folder.

    ``options`` (``tta``, ``restrict_to_head``, ``min_component_ml``; None keeps the bundle's) override
    the bundle's inference options; those used are recorded in the JSON record.

    Writes each label map and ``OUT.json`` (file mode) or ``TARGET/volumes.json`` (folder mode).
    In folder mode a broken input does not stop the others; the problems are raised together at the end.

    Raises:
        UsageError: bad paths or names (see :func:`plan`), a bad bundle.
        DataError: a bad bundle or unreadable inputs (each named).
    """
    from avn_study.outputs import check_writable, write_text_atomic

    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    pairs, folder = plan(Path(source), Path(target), overwrite, loaded.channels)
    check_writable(pairs[0][1], "OUTPUT", "choose another OUTPUT")  # before any work
    chosen = resolve_options(loaded, **options)
    torch_device = _device(device)
    record = Path(target) / "volumes.json" if folder else json_path(pairs[0][1])
    existed = record.exists()
    ours = predicted_outputs(record)  # what an earlier predict here wrote (read before this run lists its own)
    header = {"written_by": WRITTEN_BY, "bundle": str(loaded.path), "trial_id": loaded.provenance.get("trial_id"),
              "labels": dict(LABELS), "inference": chosen.to_json(), "models": len(loaded.models)}  # fmt: skip

    def replace(path: Path) -> bool:
        return overwrite and path.name in ours

    # first the record of what this run writes: a killed predict leaves it, and --overwrite may then replace
    # the label maps it lists (each is renamed into place whole, so none is ever truncated)
    planned = sorted(ours | {out.name for _, out in pairs})
    write_text_atomic(record, json.dumps({**header, "complete": False, "planned": planned, "cases": []}, indent=1)
                      + "\n", written_by_predict)  # fmt: skip
    records, problems = [], []
    for i, (src, dst) in enumerate(pairs):
        try:
            case = predict_file(loaded, src, dst, torch_device, batch_size, chosen, replace)
            if not loaded.verified:
                case["warnings"] = [UNVERIFIED_BUNDLE, *case["warnings"]]
            records.append(case)
        except DataError as err:
            if not folder:
                if not existed:
                    record.unlink(missing_ok=True)  # nothing was written: no record of it either
                raise
            problems.append(str(err))
        if progress:
            progress(i + 1, len(pairs), (src[0] if isinstance(src, tuple) else src).name)
    _complete_record(record, header, planned, records, problems, len(pairs) if folder else None)
    return records


def _complete_record(
    record: Path,
    header: dict[str, Any],
    planned: list[str],
    records: list[dict[str, Any]],
    problems: list[str],
    n_inputs: int | None,
) -> None:
    """Replace the record of a run in progress with the finished one: every case of a folder
    (``n_inputs`` of them), or the one case of a file (``n_inputs`` None).

    Raises:
        DataError: some inputs of a folder could not be predicted (each named; the others were written).
    """
    from avn_study.outputs import write_text_atomic

    if n_inputs is None:
        finished = {**header, "complete": True, **records[0]}
        write_text_atomic(record, json.dumps(finished, indent=1) + "\n", written_by_predict)
        return
    summary = {**header, "complete": True, "planned": planned, "cases": records, "failed": problems}
    write_text_atomic(record, json.dumps(summary, indent=1) + "\n", written_by_predict)
    if problems:
        raise DataError(
            f"{len(problems)} of {n_inputs} input(s) could not be predicted (the others were written):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


__all__ = [
    "WRITTEN_BY",
    "CasePrediction",
    "json_path",
    "output_name",
    "plan",
    "predict",
    "predict_file",
    "predict_volume",
    "preprocess_image",
    "resolve_options",
    "written_by_predict",
]
