"""Statistics of an ablation with the patient as the unit, computed from stored per-case metrics.

Rules (the report repeats them):

- **Unit.** A patient's value is the mean over that patient's validation cases of one run, then the
  mean over the runs (seeds, repeats) of the row. Patients are independent; cases and seeds of one
  patient are not, so they are averaged, never counted as extra samples.
- **Which cases.** ``dice``, ``lesion_sensitivity``: cases with necrosis in the reference. ``dice_all``
  (Dice with the empty-mask rule), ``lesion_fp``, ``abs_volume_error_ml``: every case. ``hd95_mm``:
  cases where it is defined. ``loc_dice``, ``recon_psnr``: rows whose model has that branch.
- **Per row.** Mean and SD over patients and a 95% percentile-bootstrap CI of the mean (patients
  resampled, 10,000 resamples, fixed seed).
- **Paired comparison** with a reference row on the patients both have: mean difference with a 95%
  paired-bootstrap CI, the Wilcoxon signed-rank test (two-sided, zero differences dropped), Holm's
  correction across the compared rows, and two effect sizes: the matched-pairs rank-biserial
  correlation and Cohen's d_z (mean difference / SD of differences). A row is called better or worse
  only when its Holm-adjusted p is below alpha; otherwise it is *not distinguishable* from the
  reference, and the table does not rank it.
- **Seed spread.** Per row, the SD across seeds of the row's mean over patients. A difference between
  rows smaller than that spread is flagged: a new seed could reverse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class MetricSpec:
    column: str  # per-case column the value comes from
    subset: str  # necrotic | all | defined
    higher_is_better: bool
    label: str


METRICS: dict[str, MetricSpec] = {
    "dice": MetricSpec("dice", "necrotic", True, "Dice (cases with necrosis)"),
    "dice_all": MetricSpec("dice", "all", True, "Dice, all cases (empty rule)"),
    "hd95_mm": MetricSpec("hd95_mm", "defined", False, "HD95 (mm)"),
    "abs_volume_error_ml": MetricSpec("abs_volume_error_ml", "all", False, "abs. volume error (ml)"),
    "lesion_sensitivity": MetricSpec("lesion_sensitivity", "necrotic", True, "lesion sensitivity"),
    "lesion_fp": MetricSpec("lesion_fp", "all", False, "false-positive lesions / case"),
    "loc_dice": MetricSpec("loc_dice", "defined", True, "localisation Dice"),
    "recon_psnr": MetricSpec("recon_psnr", "defined", True, "reconstruction PSNR (dB)"),
}
RUN_KEYS = ("seed", "repeat")
N_BOOT = 10_000


def metric_spec(name: str) -> MetricSpec:
    from avn_study.errors import look_up

    return METRICS[look_up(name, METRICS, what="metric")]


def case_values(cases: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The cases a metric is defined on, with its value in column ``value``."""
    spec = metric_spec(metric)
    if spec.column not in cases:
        return cases.iloc[0:0].assign(value=pd.Series(dtype=float))
    chosen = cases
    if spec.subset == "necrotic":
        chosen = cases[cases["has_necrosis"] > 0]
    values = chosen.assign(value=pd.to_numeric(chosen[spec.column], errors="coerce"))
    return values[np.isfinite(values["value"])]


def patient_values(cases: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One value per row x patient: cases of a run averaged, then runs (seeds, repeats) averaged.

    Returns:
        Columns ``row, patient, value, n_runs``.
    """
    values = case_values(cases, metric)
    if values.empty:
        return pd.DataFrame(columns=["row", "patient", "value", "n_runs"])
    per_run = values.groupby(["row", *RUN_KEYS, "patient"], sort=False)["value"].mean().reset_index()
    grouped = per_run.groupby(["row", "patient"], sort=False)["value"]
    return pd.DataFrame({"value": grouped.mean(), "n_runs": grouped.size()}).reset_index()


def bootstrap_ci(
    values: np.ndarray, n_boot: int = N_BOOT, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean (NaN, NaN with fewer than 2 values)."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count)."""
    p = np.asarray(pvalues, dtype=float)
    valid = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(p.shape, np.nan)
    order = valid[np.argsort(p[valid])]
    m, running = len(order), 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def wilcoxon(differences: np.ndarray) -> tuple[float, float, float]:
    """(statistic, two-sided p, rank-biserial r) of the signed-rank test; zeros are dropped."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return 0.0, 1.0, 0.0  # no pair differs at all: nothing to detect
    ranks = stats.rankdata(np.abs(d))
    positive, negative = ranks[d > 0].sum(), ranks[d < 0].sum()
    r = float((positive - negative) / ranks.sum())
    result = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return float(result.statistic), float(result.pvalue), r


def compare_paired(
    per_patient: pd.DataFrame,
    reference: str,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Every column of a patient x row table against ``reference``, paired on patients both have.

    Returns:
        One row per compared row: ``row, reference, n_pairs, mean_row, mean_reference, mean_diff,
        diff_ci_low, diff_ci_high, wilcoxon_w, p, p_holm, rank_biserial, cohen_dz, verdict``.
    """
    if reference not in per_patient:
        raise KeyError(reference)
    out = []
    for row in per_patient.columns:
        if row == reference:
            continue
        pair = per_patient[[row, reference]].dropna()
        diff = (pair[row] - pair[reference]).to_numpy()
        statistic, p, r = wilcoxon(diff) if diff.size else (math.nan, math.nan, math.nan)
        low, high = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
        sd = float(np.std(diff, ddof=1)) if diff.size > 1 else math.nan
        out.append({
            "row": row, "reference": reference, "n_pairs": int(diff.size),
            "mean_row": float(pair[row].mean()) if diff.size else math.nan,
            "mean_reference": float(pair[reference].mean()) if diff.size else math.nan,
            "mean_diff": float(diff.mean()) if diff.size else math.nan,
            "diff_ci_low": low, "diff_ci_high": high, "wilcoxon_w": statistic, "p": p,
            "rank_biserial": r, "cohen_dz": float(diff.mean() / sd) if sd and sd > 0 else math.nan,
        })  # fmt: skip
    table = pd.DataFrame(out, columns=[
        "row", "reference", "n_pairs", "mean_row", "mean_reference", "mean_diff", "diff_ci_low", "diff_ci_high",
        "wilcoxon_w", "p", "rank_biserial", "cohen_dz",
    ])  # fmt: skip
    table.insert(table.columns.get_loc("p") + 1, "p_holm", holm(table["p"].tolist()))
    table["verdict"] = [_verdict(t, reference, higher_is_better, alpha) for t in table.itertuples()]
    return table


def _verdict(t, reference: str, higher_is_better: bool, alpha: float) -> str:
    if not (t.n_pairs and math.isfinite(t.p_holm)) or t.p_holm >= alpha:
        return f"not distinguishable from {reference}"
    better = (t.mean_diff > 0) == higher_is_better
    return f"{'better' if better else 'worse'} than {reference}"


# -------------------------------------------------------------------------- experiment-level tables
def ablation_table(cases: pd.DataFrame, rows: list[str], metrics: list[str] | None = None,
                   n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Per row: arm, schedule, patients, cases, seeds, folds, and mean / SD / 95% CI per metric."""
    metrics = metrics or [m for m in METRICS if METRICS[m].column in cases]
    out = []
    for row in rows:
        mine = cases[cases["row"] == row]
        if mine.empty:
            continue
        entry = {
            "row": row,
            "arm": _single(mine["arm"]),
            "schedule": _single(mine["schedule"]),
            "n_patients": int(mine["patient"].nunique()),
            "n_cases": int(mine["case"].nunique()),
            "n_seeds": int(mine[list(RUN_KEYS)].drop_duplicates().shape[0]),
            "n_folds": int(mine["fold"].nunique()),
        }
        for metric in metrics:
            values = patient_values(mine, metric)["value"].to_numpy(dtype=float)
            low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            entry.update({
                f"{metric}_mean": float(values.mean()) if values.size else math.nan,
                f"{metric}_sd": float(values.std(ddof=1)) if values.size > 1 else math.nan,
                f"{metric}_ci_low": low, f"{metric}_ci_high": high, f"{metric}_n": int(values.size),
            })  # fmt: skip
        out.append(entry)
    return pd.DataFrame(out)


def _single(values: pd.Series) -> str:
    distinct = [str(v) for v in values.dropna().unique()]
    return distinct[0] if len(distinct) == 1 else ", ".join(sorted(distinct))


def patient_matrix(cases: pd.DataFrame, metric: str, rows: list[str]) -> pd.DataFrame:
    """Patient x row table of :func:`patient_values` (rows in the given order)."""
    values = patient_values(cases, metric)
    matrix = values.pivot(index="patient", columns="row", values="value")
    return matrix.reindex(columns=[r for r in rows if r in matrix.columns])


def compare_rows(cases: pd.DataFrame, rows: list[str], reference: str, metric: str = "dice",
                 alpha: float = 0.05, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """:func:`compare_paired` on an experiment's per-case table."""
    matrix = patient_matrix(cases, metric, rows)
    return compare_paired(matrix, reference, metric_spec(metric).higher_is_better, alpha, n_boot, seed)


def seed_spread(cases: pd.DataFrame, rows: list[str], metric: str = "dice") -> pd.DataFrame:
    """Per row: the mean over patients for each run (seed, repeat) and their SD across runs."""
    values = case_values(cases, metric)
    out = []
    for row in rows:
        mine = values[values["row"] == row]
        if mine.empty:
            continue
        per_patient = mine.groupby([*RUN_KEYS, "patient"])["value"].mean()
        per_run = per_patient.groupby(level=list(range(len(RUN_KEYS)))).mean()
        out.append({
            "row": row, "n_runs": int(per_run.size), "mean_over_runs": float(per_run.mean()),
            "seed_sd": float(per_run.std(ddof=1)) if per_run.size > 1 else math.nan,
            "run_means": ", ".join(f"{v:.3f}" for v in per_run.to_numpy()),
        })  # fmt: skip
    return pd.DataFrame(out, columns=["row", "n_runs", "mean_over_runs", "seed_sd", "run_means"])


def spread_warnings(comparison: pd.DataFrame, spread: pd.DataFrame) -> list[str]:
    """Rows whose difference to the reference is smaller than either row's seed spread."""
    sd = dict(zip(spread["row"], spread["seed_sd"], strict=True))
    warnings = []
    for t in comparison.itertuples():
        noise = max((s for s in (sd.get(t.row), sd.get(t.reference)) if s is not None and math.isfinite(s)),
                    default=math.nan)  # fmt: skip
        if math.isfinite(noise) and math.isfinite(t.mean_diff) and abs(t.mean_diff) < noise:
            warnings.append(
                f"{t.row} vs {t.reference}: the difference ({t.mean_diff:+.3f}) is smaller than the seed spread "
                f"(SD {noise:.3f}); another seed could reverse it"
            )
    if not spread.empty and (spread["n_runs"] < 2).all():
        warnings.append("one seed per row: the seed spread is unknown; add seeds before trusting small differences")
    return warnings
