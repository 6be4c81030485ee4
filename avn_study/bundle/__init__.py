"""Models in use: the bundle format (``format``), export, ONNX, prediction in native geometry, evaluation per
case and per hip.

The public names of ``avn_study.bundle.format`` are importable from here too, as they were before the package
existed.
"""

from __future__ import annotations

from avn_study import lazy_exports

__getattr__ = lazy_exports(
    "avn_study.bundle.format",
    (
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
    ),
)
