"""The names every layer shares: branches, the ablation arms and the question each answers, model options,
the metrics with their direction, and trial statuses.

One owner per fact (docs/architecture.md): config, models, losses, schedules, space and the bundle import these
instead of spelling them again. Standard library only, so ``avn-study --help`` and space validation stay
fast.
"""

from __future__ import annotations

from dataclasses import dataclass

BRANCHES = ("seg", "recon", "loc")  # canonical order of the decoders / loss terms
NORMS = ("batch", "instance", "group", "none")
UPSAMPLES = ("transpose", "bilinear")
SKIPS = ("all", "deepest", "none")
GATINGS = ("multiply", "residual", "none")
RECON_KINDS = ("l1", "mse")  # reconstruction losses: mean absolute error | mean squared error
AMP_MODES = ("auto", "bf16", "off")  # autocast: bf16 on CUDA and off on the CPU | bf16 | off
LOC_THRESHOLD = 0.5  # localisation probability threshold: validation, prediction and the bundle alike


@dataclass(frozen=True)
class Arm:
    """An ablation arm: the registered model that builds it, its branches, and what its row asks."""

    model: str  # the model registry name (avn_study.models.create_model)
    branches: tuple[str, ...]  # the outputs the model has and the loss terms it trains
    question: str  # what a row of this arm answers in an ablation (README "Models")


ARMS: dict[str, Arm] = {
    "unet": Arm("unet", ("seg",), "the baseline: a standard U-Net on necrosis alone"),
    "seg": Arm("multitask", ("seg",), "the multitask network with its segmentation decoder only (= the U-Net)"),
    "seg+recon": Arm("multitask", ("seg", "recon"), "does reconstruction (pre-training) of the encoder help?"),
    "seg+loc": Arm("multitask", ("seg", "loc"), "does a femoral-head localisation decoder (and its gate) help?"),
    "seg+recon+loc": Arm("multitask", ("seg", "recon", "loc"), "the paper's full model: both auxiliary tasks"),
    "unet+head": Arm(
        "unet",
        ("seg", "loc"),
        "a U-Net with a second output channel supervised by the femoral-head region, no gating: does the "
        "head label alone explain the gain?",
    ),
    "cascade": Arm(
        "cascade",
        ("seg", "loc"),
        "a separately trained head localiser whose mask restricts a U-Net's output (the usual clinical "
        "pipeline): does a hard two-stage pipeline do as well as the multitask gate?",
    ),
}

# Rows run by another tool: nnU-Net v2 (the optional extra ``avn-study[nnunet]``), arm -> nnU-Net configuration.
# It configures itself, so such a row has no stage-1 search: it is trained in stage 2 on the same folds and
# seeds and scored by our metrics (avn_study.baselines.nnunet.run).
NNUNET_ARMS: dict[str, str] = {"nnunet_2d": "2d", "nnunet_3d_fullres": "3d_fullres"}
NNUNET_QUESTION = "nnU-Net v2, self-configuring, on the same folds and scored by the same code: the reviewer's baseline"

# Model options of the architecture (ModelConfig fields besides ``arm``) and the models that accept each;
# a config carries all of them, and a model is built with only the ones it takes.
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "in_channels": ("unet", "multitask", "cascade"),
    "depth": ("unet", "multitask", "cascade"),
    "base_channels": ("unet", "multitask", "cascade"),
    "norm": ("unet", "multitask", "cascade"),
    "upsample": ("unet", "multitask", "cascade"),
    "aux_channels_factor": ("multitask",),
    "recon_skips": ("multitask",),
    "loc_skips": ("multitask",),
    "gating": ("multitask",),
    "gating_alpha": ("multitask",),
}


# Metrics, each with its direction ("max": higher is better). Per-case metrics (avn_study.metrics.case.case_metrics,
# the statistics of the report) and trial-level ones (what a trial reports to Tune; a space may tune on the
# ``tunable`` ones, ``full_only`` ones exist only on full validations, see RuntimeConfig.full_metrics_every).
CASE_METRICS: dict[str, str] = {
    "dice": "max",
    "dice_all": "max",
    "hd95_mm": "min",
    "abs_volume_error_ml": "min",
    "lesion_sensitivity": "max",
    "lesion_fp": "min",
    "loc_dice": "max",
    "recon_psnr": "max",
}


@dataclass(frozen=True)
class TrialMetric:
    mode: str  # max | min
    tunable: bool = False  # a space's ``metric`` may be this one
    full_only: bool = False  # absent from quick validations


TRIAL_METRICS: dict[str, TrialMetric] = {
    "val_dice": TrialMetric("max", tunable=True),
    "val_dice_all": TrialMetric("max", tunable=True),
    "loc_dice": TrialMetric("max", tunable=True),
    "hd95_mm": TrialMetric("min", tunable=True, full_only=True),
    "abs_volume_error_ml": TrialMetric("min", tunable=True),
    "lesion_fp": TrialMetric("min", tunable=True, full_only=True),
    "lesion_sensitivity": TrialMetric("max", full_only=True),
    "recon_psnr": TrialMetric("max"),
}

# Trial statuses in a study's tables (Ray Tune's TERMINATED and ERROR, and ours for a trial cut short).
TERMINATED, ERROR, INCOMPLETE = "TERMINATED", "ERROR", "INCOMPLETE"
DAMAGED = "DAMAGED"  # a trial whose files are not what the sweep wrote (avn_study.study.check)
TRIAL_STATUSES = (TERMINATED, ERROR, INCOMPLETE, DAMAGED)
