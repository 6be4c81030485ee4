"""matplotlib figures of an experiment, written as PNG (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from avn_study.analysis.stats import metric_spec, patient_matrix


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # keeps an interactive backend a notebook already chose
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def per_case_plot(cases: pd.DataFrame, rows: list[str], reference: str | None, path: Path,
                  metric: str = "dice") -> Path:  # fmt: skip
    """Per-patient values by row: box, points, and lines pairing each patient with the reference row."""
    plt = _pyplot()
    matrix = patient_matrix(cases, metric, rows)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * max(1, matrix.shape[1]), 4.2))
    positions = np.arange(matrix.shape[1])
    data = [matrix[c].dropna().to_numpy() for c in matrix.columns]
    ax.boxplot(data, positions=positions, widths=0.5, showfliers=False, medianprops={"color": "black"})
    jitter = pd.Series(np.random.default_rng(0).uniform(-0.12, 0.12, size=len(matrix)), index=matrix.index)
    if reference in matrix.columns:
        ref_x = list(matrix.columns).index(reference)
        for x, column in enumerate(matrix.columns):
            if column == reference:
                continue
            pair = matrix[[reference, column]].dropna()
            for patient, p in pair.iterrows():
                j = jitter[patient]  # the same offset as the patient's points
                ax.plot([ref_x + j, x + j], [p[reference], p[column]], color="tab:gray", alpha=0.25, lw=0.8)
    for x, column in enumerate(matrix.columns):
        values = matrix[column].to_numpy()
        ax.scatter(x + jitter.to_numpy(), values, s=14, alpha=0.8, zorder=3)
    ax.set_xticks(positions, list(matrix.columns), rotation=20, ha="right")
    ax.set_ylabel(f"{metric_spec(metric).label}, per patient")
    ax.set_title(f"per-patient {metric} (lines pair patients with {reference})" if reference else metric)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _band_plot(history: pd.DataFrame, rows: list[str], column: str, ylabel: str, title: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row in rows:
        mine = history[(history["row"] == row) & history[column].notna()] if column in history else history.iloc[0:0]
        if mine.empty:
            continue
        by_epoch = mine.groupby("epoch")[column]
        mean, sd = by_epoch.mean(), by_epoch.std(ddof=1).fillna(0.0)
        ax.plot(mean.index, mean.to_numpy(), marker="o", ms=3, label=f"{row} (n={mine['trial_id'].nunique()})")
        ax.fill_between(mean.index, (mean - sd).to_numpy(), (mean + sd).to_numpy(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def learning_curves(history: pd.DataFrame, rows: list[str], path: Path) -> Path:
    """Validation Dice per epoch per row: mean over the row's trials, band = +-1 SD."""
    return _band_plot(history, rows, "val_dice", "validation Dice (cases with necrosis)",
                      "learning curves (mean +- SD over trials)", path)  # fmt: skip


def loss_weights(history: pd.DataFrame, rows: list[str], path: Path) -> Path:
    """Loss-weight trajectories ``w_<branch>`` of each row's schedule (mean over its trials)."""
    plt = _pyplot()
    branches = sorted(c for c in history.columns if c.startswith("w_"))
    fig, axes = plt.subplots(1, max(1, len(branches)), figsize=(3.6 * max(1, len(branches)), 3.4), squeeze=False)
    for ax, column in zip(axes[0], branches, strict=False):
        for row in rows:
            mine = history[(history["row"] == row) & history[column].notna()]
            if mine.empty:
                continue
            curve = mine.groupby("epoch")[column].mean()
            ax.plot(curve.index, curve.to_numpy(), marker="o", ms=3, label=row)
        ax.set_title(f"weight of {column.removeprefix('w_')}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if branches and axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def importance_plot(importance: pd.DataFrame, path: Path) -> Path:
    """Optuna parameter importance per row (horizontal bars)."""
    plt = _pyplot()
    studies = list(importance["row"].drop_duplicates())
    fig, axes = plt.subplots(1, len(studies), figsize=(3.6 * len(studies), 2.8), squeeze=False)
    for ax, row in zip(axes[0], studies, strict=True):
        mine = importance[importance["row"] == row].sort_values("importance")
        ax.barh(mine["param"], mine["importance"], color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_title(f"{row} ({int(mine['n_trials'].iloc[0])} trials)", fontsize=9)
    return _save(fig, path)


def reliability(calibration: pd.DataFrame, rows: list[str], path: Path) -> Path:
    """Reliability diagram per row: observed necrosis frequency against mean predicted probability per bin
    (voxels pooled over the row's evaluation cases); the diagonal is perfect calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="calibrated")
    table = reliability_table(calibration)
    for row in rows:
        mine = table[(table["row"] == row) & (table["count"] > 0)]
        if len(mine):
            ax.plot(mine["mean_prob"], mine["observed"], marker="o", ms=3, label=row)
    ax.set_xlabel("mean predicted necrosis probability (bin)")
    ax.set_ylabel("observed necrosis frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability (voxels in the femoral head region)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability_table(calibration: pd.DataFrame) -> pd.DataFrame:
    """Per row and bin: voxel count, mean predicted probability, observed frequency."""
    pooled = calibration.groupby(["row", "bin"], sort=False)[["count", "positive", "prob_sum"]].sum().reset_index()
    safe = pooled["count"].where(pooled["count"] > 0)
    pooled["mean_prob"] = pooled["prob_sum"] / safe
    pooled["observed"] = pooled["positive"] / safe
    return pooled


def expected_calibration_error(calibration: pd.DataFrame) -> pd.DataFrame:
    """Per row: ECE = sum over bins |prob_sum - positive| / voxels, and the voxel count it is over."""
    pooled = calibration.groupby(["row", "bin"], sort=False)[["count", "positive", "prob_sum"]].sum().reset_index()
    pooled["gap"] = (pooled["prob_sum"] - pooled["positive"]).abs()
    per_row = pooled.groupby("row", sort=False)[["gap", "count"]].sum()
    return pd.DataFrame({"row": per_row.index, "ece": per_row["gap"] / per_row["count"],
                         "voxels": per_row["count"].astype(int)}).reset_index(drop=True)  # fmt: skip


def overlays(images: dict[str, dict[str, dict[str, np.ndarray]]], rows: list[str], path: Path) -> Path | None:
    """The same validation slices for every row: the input with the reference (green) and the row's
    prediction (red, probability >= 0.5) outlined; one line per case, one column per row."""
    rows = [r for r in rows if r in images]
    cases = sorted(set.intersection(*(set(images[r]) for r in rows))) if rows else []
    if not cases:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(cases), len(rows), figsize=(2.4 * len(rows), 2.4 * len(cases)), squeeze=False)
    for i, case in enumerate(cases):
        for j, row in enumerate(rows):
            item, ax = images[row][case], axes[i][j]
            ax.imshow(item["image"].astype(np.float32).T, cmap="gray", origin="lower")  # S up, R across
            ax.contour(item["ref"].T.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            pred = item["prob"].T.astype(float) / 255.0
            if pred.max() >= 0.5:
                ax.contour(pred, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(row, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{case} (slice {int(item['slice'])})", fontsize=7)
    fig.suptitle("reference (green) and prediction (red) on the same validation slices", fontsize=9)
    return _save(fig, path)
