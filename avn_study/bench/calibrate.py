"""``avn-study bench calibrate``: is the phantom decided by construction? Every row at one small budget.

Trains the paper's rows and the control rows of ``search_spaces/ablation.yaml`` on a fixed phantom
cohort, with the same CPU budget and settings for all (no tuning: one learning rate), on every fold of
a patient-level split, and adds a shortcut baseline that needs no learning: necrosis = voxels darker
than a threshold *inside the true femoral head* (the threshold chosen on each fold's training
patients). If that baseline reached the networks, or the gate beat its no-gate control only because
distractors sit outside the head, the phantom would decide the ablation by construction.

Per row: parameters, the per-patient Dice over the patients with necrosis (mean and SD over
patients, and the mean per fold: a run that failed shows as one fold near 0) and false-positive
lesions per case (the dark spots outside a lesion a row calls necrosis).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from avn_study.data.layout import DATASET_JSON
from avn_study.data.splits import SPLITS_FILE

# row -> overrides of the calibration config (the rows of ablation.yaml, at the calibration's width)
ROWS: dict[str, dict[str, Any]] = {
    "unet": {"arm": "unet", "schedule": "constant"},
    "unet/wide": {"arm": "unet", "schedule": "constant"},  # base_channels matched to seg+recon+loc at run time
    "unet+head": {"arm": "unet+head", "schedule": "constant"},
    "seg+loc": {"arm": "seg+loc", "schedule": "constant"},
    "seg+loc/no-gate": {"arm": "seg+loc", "gating": "none", "schedule": "constant"},
    "cascade": {"arm": "cascade", "schedule": "constant"},
    "seg+recon+loc": {"arm": "seg+recon+loc", "schedule": "recon_dependent", "schedule_params": {"pretrain_epochs": 1}},
    "seg+recon+loc/constant": {"arm": "seg+recon+loc", "schedule": "constant"},
}
BASE = {  # the demo's resolution and width: a budget two CPU cores can afford for every row and fold
    "slice_size": 64, "inplane_spacing_mm": 4.0, "base_channels": 8, "depth": 3, "batch_size": 8,
    "lr": 1e-3, "schedule_params": {}, "threads": 0,
}  # fmt: skip


def shortcut_dice(train: list[Any], val: list[Any]) -> list[dict[str, Any]]:
    """Necrosis = normalised intensity below a threshold inside the *true* head, the threshold that
    maximises the mean Dice of the training cases with necrosis (grid of 41 values)."""
    from avn_study.data.labels import LABELS
    from avn_study.metrics.case import case_metrics

    def predict(case: Any, t: float) -> np.ndarray:
        return (np.asarray(case.label) >= LABELS["femoral_head"]) & (np.asarray(case.image) < t)

    def dice(case: Any, t: float) -> float:
        ref = np.asarray(case.label) == LABELS["necrosis"]
        pred = predict(case, t)
        return 2 * float((ref & pred).sum()) / max(1.0, float(ref.sum() + pred.sum()))

    grid = np.linspace(-3.0, 1.0, 41)
    necrotic = [c for c in train if c.has_necrosis]
    best = max(grid, key=lambda t: np.mean([dice(c, t) for c in necrotic]) if necrotic else 0.0)
    out = []
    for case in val:
        spacing = (case.spacing[1], case.spacing[0], case.spacing[2])  # cached arrays are (A, R, S)
        ref = np.asarray(case.label) == LABELS["necrosis"]
        metrics = case_metrics(predict(case, best), ref, spacing)
        out.append({"case": case.case_id, "patient": case.patient_id, **metrics, "threshold": float(best)})
    return out


def calibrate(work: Path, cases: int = 24, seed: int = 0, epochs: int = 8, folds: int = 3,
              rows: dict[str, dict[str, Any]] | None = None, tiny: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Per row (and the shortcut): parameters, per-patient Dice (mean, SD, n) and false positives.

    Every row trains ``epochs`` epochs on each of ``folds`` folds of one ``cases``-patient phantom
    cohort (``seed``) with :data:`BASE`'s settings and training seed = fold; per-case metrics of the
    last epoch are pooled.
    """
    from avn_study.config import TrainConfig
    from avn_study.data.phantom import PhantomConfig, write_cohort
    from avn_study.models import matched_width, model_for_arm, n_parameters
    from avn_study.training.fold import prepare_data
    from avn_study.training.run import TrainingRun

    cohort = work / "cohort"
    if not (cohort / DATASET_JSON).is_file():
        write_cohort(cohort, cases=cases, seed=seed, config=PhantomConfig.tiny() if tiny else PhantomConfig())
    rows = dict(ROWS if rows is None else rows)
    base = {**BASE, "epochs": epochs, "n_folds": folds}
    full = n_parameters(model_for_arm("seg+recon+loc", base_channels=base["base_channels"], depth=base["depth"]))
    wide = matched_width("unet", full, depth=base["depth"])
    per_case: dict[str, list[dict[str, Any]]] = {"threshold in the true head": []}
    sizes: dict[str, int] = {"threshold in the true head": 0}
    for fold in range(folds):
        data = prepare_data(cohort, TrainConfig.from_flat({**base, "fold": fold}), work / "cache", work / SPLITS_FILE)
        per_case["threshold in the true head"] += [{**c, "fold": fold} for c in shortcut_dice(data.train, data.val)]
        for row, overrides in rows.items():
            # seed = fold: one initialisation per fold, not one for all; at this budget an unlucky
            # initialisation keeps a U-Net on the all-background solution, and with one seed for every
            # fold that luck would decide the whole row
            flat = {**base, **overrides, "fold": fold, "seed": fold,
                    **({"base_channels": wide} if row == "unet/wide" else {})}  # fmt: skip
            run = TrainingRun(TrainConfig.from_flat(flat), data)
            while not run.done:
                run.run_epoch()
            sizes[row] = n_parameters(run.model)
            per_case.setdefault(row, []).extend({**c, "fold": fold} for c in run.last_per_case)
    return [_summary(row, sizes[row], cases_of_row) for row, cases_of_row in per_case.items()]


def _summary(row: str, n_params: int, per_case: list[dict[str, Any]]) -> dict[str, Any]:
    necrotic: dict[str, list[float]] = {}
    by_fold: dict[int, list[float]] = {}
    for case in per_case:
        if case.get("has_necrosis"):
            necrotic.setdefault(str(case["patient"]), []).append(float(case["dice"]))
            by_fold.setdefault(int(case["fold"]), []).append(float(case["dice"]))
    dice = np.array([np.mean(v) for v in necrotic.values()])
    fp = np.mean([float(c["lesion_fp"]) for c in per_case]) if per_case else math.nan
    return {"row": row, "parameters": n_params, "dice_mean": float(dice.mean()) if dice.size else math.nan,
            "dice_sd": float(dice.std(ddof=1)) if dice.size > 1 else math.nan, "n_patients": int(dice.size),
            "lesion_fp": float(fp), "fold_dice": [float(np.mean(by_fold[f])) for f in sorted(by_fold)]}  # fmt: skip


def table_rows(summary: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(row, Dice, detail) for :func:`avn_study.bench.benches.print_table`."""
    out = []
    for s in summary:
        size = f"{s['parameters'] / 1e3:.0f} k params, " if s["parameters"] else "no parameters, "
        folds = "/".join(f"{d:.2f}" for d in s["fold_dice"])
        detail = f"{size}{s['n_patients']} patients with necrosis, {s['lesion_fp']:.1f} FP lesions/case, folds {folds}"
        out.append((s["row"], f"{s['dice_mean']:.3f} +- {s['dice_sd']:.3f}", detail))
    return out
