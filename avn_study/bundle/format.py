"""The model bundle: its format, and loading one safely.

A bundle (written by ``avn-study export``, see :mod:`avn_study.bundle.export`) is a folder::

    model.safetensors   the weights, nothing else
    config.json         format version, model (registry name, arm, architecture), preprocessing, labels,
                        slice axis, threshold, package versions
    metrics.json        how the model was selected and how it scored
    provenance.json     trial, study, split hash, data fingerprint, git commit, versions, export time
    model.onnx          optional (``--onnx``)
    ensemble/member_NN.safetensors   further members of a fold ensemble (``export --ensemble``)

``config.json`` also holds the default ``inference`` options (flip test-time augmentation,
post-processing; ``predict``/``evaluate`` flags override them) and, for an ensemble, the members'
files and trials. Format version 2 added both; version 1 bundles still load (one model, no options).
Format version 3 added ``checksums``: the SHA-256 of every other file of the bundle, checked by
:func:`load_bundle` before anything is read from it (a flipped byte in the weights is refused, naming
the file). Bundles of versions 1 and 2 have none and still load, with ``Bundle.verified`` False, which
``predict`` and ``evaluate`` report as a warning.

:func:`write_bundle` writes one (``avn-study export`` selects what goes in, :mod:`avn_study.bundle.export`).
A bundle is data, not code. :func:`load_bundle` reads JSON and safetensors only (no pickle, no
``torch.load``), checks ``config.json`` against the model registry and the weights' names and shapes
against the model it describes, and refuses anything else with a message naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avn_study.data.labels import LABELS
from avn_study.data.preprocess import PreprocessConfig
from avn_study.errors import DataError, UsageError, look_up
from avn_study.training.checkpoint import load_weights
from avn_study.vocabulary import LOC_THRESHOLD

BUNDLE_FORMAT = "avn-study-bundle"
BUNDLE_VERSION = 3  # bump when a reader of this version could misread a newer bundle (2: inference, ensemble;
# 3: checksums)
CHECKSUMS_SINCE = 3  # bundles of this version and later must list the SHA-256 of their files
MODEL_FILE, CONFIG_FILE, METRICS_FILE, PROVENANCE_FILE, ONNX_FILE = (
    "model.safetensors",
    "config.json",
    "metrics.json",
    "provenance.json",
    "model.onnx",
)
REQUIRED_FILES = (CONFIG_FILE, MODEL_FILE, METRICS_FILE, PROVENANCE_FILE)
CONFIG_KEYS = ("format", "format_version", "model", "preprocessing", "labels", "label_map", "threshold",
               "loc_threshold", "amp", "train_config", "versions", "onnx", "inference", "ensemble",
               "checksums")  # fmt: skip
ENSEMBLE_DIR = "ensemble"
TTA_MODES = ("none", "flip")
SLICE_AXIS = 1  # coronal slices: planes of constant A/P, RAS array axis 1


@dataclass(frozen=True)
class InferenceOptions:
    """How a bundle predicts: test-time augmentation and post-processing (recorded with every output).

    Attributes:
        tta: ``none``, or ``flip``: the mean of the probabilities of each slice and of its left-right
            mirror (mirrored back); the hips are near-symmetric, so the mirror is a plausible scan.
        restrict_to_head: keep necrosis only inside the predicted localisation region (models with a
            ``loc`` branch; necrosis outside the femoral head region is a known false-positive mode).
        min_component_ml: drop predicted necrosis components (26-connected, in the scan's own grid)
            smaller than this volume; 0 keeps all.
    """

    tta: str = "none"
    restrict_to_head: bool = False
    min_component_ml: float = 0.0

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        if not isinstance(self.restrict_to_head, bool):
            raise ValueError(f"restrict_to_head must be true or false, got {self.restrict_to_head!r}")
        value = self.min_component_ml
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < float("inf"):
            raise ValueError(f"min_component_ml must be a finite number >= 0, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return {"tta": self.tta, "restrict_to_head": self.restrict_to_head, "min_component_ml": self.min_component_ml}

    def override(self, **changes: Any) -> InferenceOptions:
        """These options with every change that is not None (a command-line flag left unset)."""
        return InferenceOptions(**{**self.to_json(), **{k: v for k, v in changes.items() if v is not None}})


# ------------------------------------------------------------------------------------------ bundle
def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a folder holding an avn-study bundle's ``config.json`` (what ``--overwrite`` may replace)."""
    from avn_study.outputs import json_marker

    return Path(path).is_dir() and json_marker(Path(path) / CONFIG_FILE, "format", BUNDLE_FORMAT)


def bundle_config(
    flat: dict[str, Any],
    model: torch.nn.Module,
    versions: dict[str, Any],
    inference: InferenceOptions | None = None,
    ensemble: list[dict[str, Any]] | None = None,
    channels: list[str] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a bundle whose model was trained with the flat TrainConfig ``flat``
    (``ensemble``: one record per member, the first being ``model.safetensors``)."""
    from avn_study.config import ModelConfig, TrainConfig
    from avn_study.data.cache import CACHE_VERSION
    from avn_study.vocabulary import ARMS

    config = TrainConfig.from_flat(flat, source="checkpoint config")
    pre = PreprocessConfig(inplane_spacing_mm=config.data.inplane_spacing_mm)
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "model": {
            "name": ARMS[config.model.arm].model,  # the model registry name (create_model)
            "arm": config.model.arm,
            "branches": list(model.branches),
            "config": {f: getattr(config.model, f) for f in ModelConfig.__dataclass_fields__},
            "outputs": "logits (seg: final necrosis, loc: localisation); recon: the reconstructed image",
        },
        "preprocessing": {
            "channels": channels or ["T1"] * max(1, config.model.in_channels),
            "orientation": "RAS",
            "slice_axis": SLICE_AXIS,
            "slice_plane": "coronal",
            "inplane_spacing_mm": pre.inplane_spacing_mm,
            "resampling": "linear, R and S axes only (field of view kept, voxel edges aligned)",
            "clip_percentiles": list(pre.clip_percentiles),
            "normalisation": "clip to the case's percentiles, then z-score with the clipped mean and SD",
            "slice_size": config.data.slice_size,
            "crop": "centre crop/pad of each coronal slice, padded with the normalised lower clip value",
            "loc_margin_mm": config.data.loc_margin_mm,
            "cache_version": CACHE_VERSION,
        },
        "labels": dict(LABELS),
        "label_map": {
            "2": "necrosis (seg >= threshold)",
            "1": f"localisation region (loc >= {LOC_THRESHOLD:g}), if predicted",
        },
        "threshold": config.runtime.threshold,
        "loc_threshold": LOC_THRESHOLD,
        "amp": config.runtime.amp,
        "train_config": flat,
        "versions": versions,
        "inference": (inference or InferenceOptions()).to_json(),
        **({"ensemble": ensemble} if ensemble else {}),
    }


@dataclass
class Bundle:
    """A loaded bundle: its JSON files and the model (on the CPU, in eval mode)."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    model: torch.nn.Module
    members: list[torch.nn.Module] | None = None  # every model of a fold ensemble (``model`` is the first)
    verified: bool = True  # its files matched the checksums in config.json (False: a bundle from before them)

    @property
    def models(self) -> list[torch.nn.Module]:
        return self.members or [self.model]

    @property
    def branches(self) -> tuple[str, ...]:
        return tuple(self.model.branches)

    @property
    def inference(self) -> InferenceOptions:
        """The bundle's default inference options (version 1 bundles: none)."""
        return InferenceOptions(**self.config.get("inference", {}))

    @property
    def preprocess(self) -> PreprocessConfig:
        pre = self.config["preprocessing"]
        return PreprocessConfig(pre["inplane_spacing_mm"], tuple(pre["clip_percentiles"]))

    @property
    def channels(self) -> list[str]:
        """The input channels the model reads, in order (version 1 bundles: one, T1)."""
        return list(self.config["preprocessing"].get("channels", ["T1"]))

    @property
    def slice_size(self) -> int:
        return int(self.config["preprocessing"]["slice_size"])

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a readable JSON file ({err}); the bundle is damaged") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _key(config: dict[str, Any], dotted: str, path: Path) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{path}: missing key '{dotted}'; not a config.json written by avn-study export")
        value = value[part]
    return value


def _check_format(config: dict[str, Any], path: Path) -> None:
    extra = sorted(set(config) - set(CONFIG_KEYS))
    if config.get("format") == BUNDLE_FORMAT and extra:
        raise DataError(f"{path}: unknown top-level key(s) {extra}; a config.json written by avn-study export has "
                        f"only {', '.join(CONFIG_KEYS)}")  # fmt: skip
    if config.get("format") != BUNDLE_FORMAT:
        raise DataError(
            f"{path}: 'format' is {config.get('format')!r}, expected {BUNDLE_FORMAT!r}; not an avn-study bundle"
        )
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DataError(f"{path}: 'format_version' must be a positive integer, got {version!r}")
    if version > BUNDLE_VERSION:
        from avn_study import __version__

        raise DataError(
            f"{path}: bundle format version {version} is newer than avn-study {__version__} reads (up to "
            f"{BUNDLE_VERSION}); upgrade avn-study to use this bundle"
        )
    labels = _key(config, "labels", path)
    if labels != LABELS:
        raise DataError(f"{path}: 'labels' must be {json.dumps(LABELS)}, got {json.dumps(labels)}")
    axis = _key(config, "preprocessing.slice_axis", path)
    if axis != SLICE_AXIS:
        raise DataError(f"{path}: 'preprocessing.slice_axis' must be {SLICE_AXIS} (coronal), got {axis!r}")


def build_bundle_model(config: dict[str, Any], path: Path) -> torch.nn.Module:
    """The model ``config.json`` describes, checked against the registry (random weights).

    Raises:
        UsageError: an unknown model or arm name (names the file, the key and the available names) or
            an unknown architecture key.
    """
    from avn_study.config import TrainConfig
    from avn_study.models import list_models
    from avn_study.models.runtime import build_model
    from avn_study.vocabulary import ARMS

    name, arm = _key(config, "model.name", path), _key(config, "model.arm", path)
    for key, value, options, what in (("model.name", name, list_models(), "model"), ("model.arm", arm, ARMS, "arm")):
        try:
            look_up(str(value), options, what=what)
        except UsageError as err:
            raise UsageError(f"{path}: key '{key}': {err}") from None
    if ARMS[arm].model != name:
        raise UsageError(f"{path}: 'model.arm' {arm!r} is built by model {ARMS[arm].model!r}, not {name!r}")
    architecture = _key(config, "model.config", path)
    if not isinstance(architecture, dict):
        raise DataError(f"{path}: 'model.config' must be an object, got {architecture!r}")
    slice_size = _key(config, "preprocessing.slice_size", path)
    train_config = TrainConfig.from_flat({**architecture, "slice_size": slice_size}, source=f"{path} (model.config)")
    return build_model(train_config)


def _check_settings(bundle: Bundle, path: Path) -> None:
    """The preprocessing and thresholds must be usable values (a hand-edited config fails here)."""
    for key in ("threshold", "preprocessing.inplane_spacing_mm", "preprocessing.clip_percentiles",
                "preprocessing.slice_size", "preprocessing.loc_margin_mm"):  # fmt: skip
        _key(bundle.config, key, path)
    try:
        bundle.preprocess  # noqa: B018  (validates)
        if bundle.slice_size < 8 or not 0.0 < bundle.threshold < 1.0:
            raise ValueError(f"slice_size={bundle.slice_size}, threshold={bundle.threshold}")
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: bad preprocessing or threshold value ({err})") from None
    channels = bundle.config["preprocessing"].get("channels", ["T1"])
    expected = max(1, int(bundle.config["model"]["config"].get("in_channels", 0) or 0))
    if (not isinstance(channels, list) or len(channels) != expected or len(set(channels)) != len(channels)
            or not all(isinstance(c, str) and c for c in channels)):  # fmt: skip
        raise DataError(f"{path}: 'preprocessing.channels' must name the model's {expected} input channel(s), "
                        f"distinct, got {channels!r}")  # fmt: skip
    try:
        options = bundle.config.get("inference", {})
        if not isinstance(options, dict):
            raise ValueError(f"expected an object, got {options!r}")
        unknown = sorted(set(options) - set(InferenceOptions().to_json()))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}")
        bundle.inference  # noqa: B018  (validates)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: key 'inference': {err}") from None


def _member_files(config: dict[str, Any], path: Path) -> list[str]:
    """The weight files of the bundle's models: ``model.safetensors``, then any ensemble members."""
    members = config.get("ensemble")
    if members is None:
        return [MODEL_FILE]
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise DataError(f"{path}: key 'ensemble' must list at least 2 member records, got {members!r}")
    files = [m.get("file") for m in members]
    pattern = [MODEL_FILE, *(f"{ENSEMBLE_DIR}/member_{i:02d}.safetensors" for i in range(1, len(files)))]
    if files != pattern:
        raise DataError(f"{path}: key 'ensemble': member files must be {pattern}, got {files}")
    return files


def _check_weights(state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        parts.append(
            f"{len(wrong)} tensor(s) of the wrong shape (e.g. '{wrong[0]}': {list(found[wrong[0]])} in the file, "
            f"{list(expected[wrong[0]])} in the model)"
        )
    if missing:
        parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')")
    raise DataError(
        f"{path}: the weights do not fit the model that {CONFIG_FILE} describes: {'; '.join(parts)}. "
        "The bundle was altered or its files come from different exports."
    )


def _check_self_contained(path: Path) -> None:
    """Every file of a bundle lives in its folder: a link out of it could read any file on the machine."""
    folder = path.resolve()
    ensemble = path / ENSEMBLE_DIR
    members = sorted(p.relative_to(path) for p in ensemble.glob("*")) if ensemble.is_dir() else []
    for name in (*REQUIRED_FILES, ONNX_FILE, *members):
        file = path / name
        if file.is_symlink() and folder not in file.resolve().parents:
            raise DataError(f"{file}: a link to {file.resolve()}, outside the bundle; a bundle's files must be in "
                            "its folder (copy the file in if it is yours)")  # fmt: skip


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def bundle_checksums(path: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file of a bundle folder but ``config.json`` (which lists them)."""
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(Path(path).rglob("*"))
            if p.is_file() and p.relative_to(path) != Path(CONFIG_FILE)}  # fmt: skip


def check_checksums(config: dict[str, Any], path: Path) -> bool:
    """Every file ``config.json`` lists must have the SHA-256 it records, and the files a bundle is read from
    must be listed; a bundle from before checksums (format version < 3) has none (returns False).

    Raises:
        DataError: a listed file missing or altered (naming it, with both digests), a file that is read but
            not listed, or a version-3 bundle without its checksums.
    """
    listed = config.get("checksums")
    version = config.get("format_version")
    if listed is None:
        if isinstance(version, int) and version >= CHECKSUMS_SINCE:
            raise DataError(f"{path / CONFIG_FILE}: a format version {version} bundle lists the SHA-256 of its "
                            "files under 'checksums', and this one has none: it was altered after export")  # fmt: skip
        return False
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise DataError(f"{path / CONFIG_FILE}: 'checksums' must map file names to SHA-256 digests")
    folder = path.resolve()
    for name, expected in sorted(listed.items()):
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or folder not in file.resolve().parents:
            raise DataError(f"{path / CONFIG_FILE}: 'checksums' names {name!r}, which is not a file of the bundle")
        if not file.is_file():
            raise DataError(f"{file}: missing; {CONFIG_FILE} records its SHA-256, so the bundle is incomplete")
        found = file_sha256(file)
        if found != expected:
            raise DataError(f"{file}: SHA-256 {found[:16]}... differs from the {expected[:16]}... that {CONFIG_FILE} "
                            "records: the file was altered or damaged after export; copy or export the bundle "
                            "again")  # fmt: skip
    needed = [*REQUIRED_FILES[1:], *_member_files(config, path / CONFIG_FILE)]
    unlisted = sorted(set(needed) - set(listed))
    if unlisted:
        raise DataError(f"{path / unlisted[0]}: not listed in {CONFIG_FILE} 'checksums'; the bundle was altered "
                        "after export")  # fmt: skip
    return True


def load_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle folder; never unpickles anything.

    Raises:
        UsageError: not a folder, or a config naming an unknown model / arm / key.
        DataError: a missing or unreadable file, a bundle format from a newer avn-study, a file whose
            SHA-256 differs from the one ``config.json`` records, weights that are not safetensors or do not
            fit the described model.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: not a folder; expected a model bundle written by `avn-study export`")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise DataError(
            f"{path}: incomplete bundle, missing {', '.join(missing)} (a bundle holds {', '.join(REQUIRED_FILES)})"
        )
    _check_self_contained(path)
    config = _read_json(path / CONFIG_FILE)
    _check_format(config, path / CONFIG_FILE)
    verified = check_checksums(config, path)  # before anything else is read from the bundle's files
    model = build_bundle_model(config, path / CONFIG_FILE)
    bundle = Bundle(path, config, _read_json(path / METRICS_FILE), _read_json(path / PROVENANCE_FILE), model,
                    verified=verified)  # fmt: skip
    _check_settings(bundle, path / CONFIG_FILE)
    members = []
    for name in _member_files(config, path / CONFIG_FILE):
        member = model if not members else build_bundle_model(config, path / CONFIG_FILE)
        state = load_weights(path / name, file=None)  # safetensors only: a pickle or anything else raises DataError
        _check_weights(state, member, path / name)
        member.load_state_dict(state)
        members.append(member.eval())
    bundle.members = members if len(members) > 1 else None
    return bundle


# ------------------------------------------------------------------------------------------ writing
def package_versions() -> dict[str, str | None]:
    """Versions of the packages that define a bundle's numerics (None: not installed)."""
    import platform
    from importlib import metadata

    import avn_study

    versions: dict[str, str | None] = {"python": platform.python_version(), "avn-study": avn_study.__version__}
    for name in ("torch", "numpy", "nibabel", "safetensors", "ray"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_bundle_out(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """``--out`` of a bundle: new, or (with ``overwrite``) an existing bundle that is not an input."""
    from avn_study.outputs import check_target

    check_target(Path(out), flag="--out", kind="a bundle", is_own=is_bundle, overwrite=overwrite, inputs=inputs)


def write_bundle(
    out: str | Path,
    model: Any,
    flat: dict[str, Any],
    metrics: dict[str, Any],
    provenance: dict[str, Any],
    *,
    onnx: bool = False,
    overwrite: bool = False,
    inference: InferenceOptions | None = None,
    members: list[tuple[Any, dict[str, Any]]] | None = None,
    channels: list[str] | None = None,
) -> tuple[Path, dict[str, Any] | None]:
    """Write a bundle folder for ``model`` (trained with the flat TrainConfig ``flat``): the writer beside
    its reader, :func:`load_bundle`.

    ``inference`` (:class:`InferenceOptions`) is stored as the bundle's default;
    ``members`` (further models of a fold ensemble, each with its record for ``config.json``) are
    written to ``ensemble/member_NN.safetensors``; ``model`` is the first member.

    The bundle is assembled in a temporary folder next to ``out`` and moved into place at the end, so
    an interrupted export leaves no half-written bundle (see :mod:`avn_study.outputs`); ``config.json``
    records the SHA-256 of every other file. Files get the mode the umask gives.

    Returns:
        The bundle folder and the ONNX record (None without ``onnx``).
    """
    from safetensors.torch import save_file

    from avn_study.bundle.onnx import export_onnx
    from avn_study.outputs import staged_folder, umask

    out = Path(out)
    check_bundle_out(out, overwrite)
    mode = 0o666 & ~umask()
    if onnx and members:
        raise UsageError("--onnx writes one model, and --ensemble asks for several; export the ensemble without --onnx")
    with staged_folder(out, is_bundle if overwrite else None) as tmp:  # the old bundle (or none), never half
        ensemble = []
        for i, (member, record) in enumerate([(model, {}), *(members or [])]):
            name = MODEL_FILE if i == 0 else f"{ENSEMBLE_DIR}/member_{i:02d}.safetensors"
            (tmp / name).parent.mkdir(exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in member.state_dict().items()}
            save_file(state, str(tmp / name), metadata={"format": "pt", "avn_study_bundle": "1"})
            os.chmod(tmp / name, mode)  # safetensors writes 0600
            ensemble.append({"file": name, **record})
        config = bundle_config(flat, model, provenance.get("versions") or package_versions(), inference,
                               ensemble if members else None, channels)  # fmt: skip
        n_channels = max(1, int(flat.get("in_channels", 0) or 0))
        onnx_info = export_onnx(model, tmp / ONNX_FILE, int(flat["slice_size"]), channels=n_channels) if onnx else None
        if onnx_info:
            config["onnx"] = onnx_info
        for name, payload in ((METRICS_FILE, metrics), (PROVENANCE_FILE, provenance)):
            (tmp / name).write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
        config["checksums"] = bundle_checksums(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=_json_default) + "\n")
    return out, onnx_info


def _json_default(value: Any) -> Any:
    """numpy scalars from pandas rows -> Python numbers."""
    return value.item() if hasattr(value, "item") else str(value)
