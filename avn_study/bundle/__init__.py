"""Models in use: the bundle format (``format``), export, ONNX, prediction in native geometry, evaluation per
case and per hip.

The public names of ``avn_study.bundle.format`` are importable from here too, as they were before the package
existed.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE = "avn_study.bundle.format"
_NAMES = (
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "Bundle",
    "CHECKSUMS_SINCE",
    "CONFIG_KEYS",
    "ENSEMBLE_DIR",
    "InferenceOptions",
    "REQUIRED_FILES",
    "SLICE_AXIS",
    "TTA_MODES",
    "build_bundle_model",
    "bundle_checksums",
    "bundle_config",
    "check_bundle_out",
    "check_checksums",
    "file_sha256",
    "is_bundle",
    "load_bundle",
    "package_versions",
    "write_bundle",
)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
