"""Statistics of an ablation with the patient as the unit, computed from stored per-case metrics.

Rules (the report repeats them; ``inference`` holds the tests and intervals):

- **Unit.** A patient's value is the mean over that patient's cases of one run, then the mean over
  the runs (seeds, repeats) of the row. Patients are independent; cases and seeds of one patient are
  not, so they are averaged, never counted as extra samples.
- **Which cases.** ``dice``, ``lesion_sensitivity``: cases with necrosis in the reference. ``dice_all``
  (Dice with the empty-mask rule), ``lesion_fp``, ``abs_volume_error_ml``: every case. ``hd95_mm``:
  cases where it is defined. ``loc_dice``, ``recon_psnr``: rows whose model has that branch; a perfect
  reconstruction (PSNR +inf) counts as :data:`PSNR_CAP_DB`, the PSNR of a one-ulp float32 error.
- **Per row.** Mean and SD over patients and a 95 % studentized-bootstrap CI of the mean (patients
  resampled, the trained models taken as fixed; Clopper-Pearson's when every value is 0 or 1), cut
  to the metric's range.
- **Paired comparison** with a reference row on the patients both have: mean difference with its
  studentized-bootstrap CI; two tests: patients as the random unit (Wilcoxon signed-rank, exact, on
  differences rounded so ties are ties) and trained models as the random unit (the row labels of runs
  on the same fold permuted, mean difference). ``p`` is the larger of the two (both must reject),
  Holm-corrected across the compared rows. The verdict's direction is the sign of the signed-rank
  statistic R+ - R-; see :func:`verdict` for when it is *inconclusive*.
- **Seed spread.** Per row, the SD across seeds of the row's mean over patients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from avn_study.analysis.inference import (
    N_BOOT,
    N_PERM,
    ShiftPermutation,
    binary_ci,
    bootstrap_ci,
    holm,
    holm_levels,
    signed_rank_test,
    tie_rounded,
)
from avn_study.vocabulary import CASE_METRICS

PSNR_CAP_DB = 20 * math.log10(1 / float(np.finfo(np.float32).eps))  # 138.5 dB: a one-ulp error of a unit range


@dataclass(frozen=True)
class MetricSpec:
    column: str  # per-case column the value comes from
    subset: str  # necrotic | all | defined
    higher_is_better: bool
    label: str
    low: float = 0.0  # the metric's range: a CI is cut to it (the mean cannot leave it, so coverage holds)
    high: float = math.inf

    def clip(self, low: float, high: float, difference: bool = False) -> tuple[float, float]:
        """A CI of a mean (or of a difference of two means) intersected with what the metric allows."""
        lo, hi = (self.low - self.high, self.high - self.low) if difference else (self.low, self.high)
        if math.isnan(low) or math.isnan(high):
            return low, high
        return min(max(low, lo), hi), max(min(high, hi), lo)


_UP = {name: mode == "max" for name, mode in CASE_METRICS.items()}  # directions: avn_study.vocabulary
METRICS: dict[str, MetricSpec] = {
    "dice": MetricSpec("dice", "necrotic", _UP["dice"], "Dice (cases with necrosis)", 0.0, 1.0),
    "dice_all": MetricSpec("dice", "all", _UP["dice_all"], "Dice, all cases (empty rule)", 0.0, 1.0),
    "hd95_mm": MetricSpec("hd95_mm", "defined", _UP["hd95_mm"], "HD95 (mm)"),
    "abs_volume_error_ml": MetricSpec(
        "abs_volume_error_ml", "all", _UP["abs_volume_error_ml"], "abs. volume error (ml)"
    ),
    "lesion_sensitivity": MetricSpec(
        "lesion_sensitivity", "necrotic", _UP["lesion_sensitivity"], "lesion sensitivity", 0.0, 1.0
    ),
    "lesion_fp": MetricSpec("lesion_fp", "all", _UP["lesion_fp"], "false-positive lesions / case"),
    "loc_dice": MetricSpec("loc_dice", "defined", _UP["loc_dice"], "localisation Dice", 0.0, 1.0),
    "recon_psnr": MetricSpec(
        "recon_psnr", "defined", _UP["recon_psnr"], "reconstruction PSNR (dB)", -math.inf, PSNR_CAP_DB
    ),
}
assert set(METRICS) == set(CASE_METRICS), "every per-case metric needs a spec here and a direction in vocabulary"
RUN_KEYS = ("seed", "repeat")


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
    if spec.column == "recon_psnr":
        values["value"] = values["value"].clip(upper=PSNR_CAP_DB)  # +inf: a perfect reconstruction
    return values[np.isfinite(values["value"])]


def capped_psnr_cases(cases: pd.DataFrame) -> int:
    """How many cases had a perfect reconstruction (PSNR +inf, counted as :data:`PSNR_CAP_DB`)."""
    if "recon_psnr" not in cases:
        return 0
    return int(np.isposinf(pd.to_numeric(cases["recon_psnr"], errors="coerce")).sum())


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


def mean_ci(values: np.ndarray, spec: MetricSpec, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """95 % CI of a row's mean over patients: Clopper-Pearson's when every value is 0 or 1 in a [0, 1]
    metric (a bootstrap interval collapses when, say, every patient's lesions were all found), else the
    studentized bootstrap, cut to the metric's range."""
    values = np.asarray(values, dtype=float)
    if spec.low == 0.0 and spec.high == 1.0 and values.size and np.isin(values, (0.0, 1.0)).all():
        return binary_ci(values)
    return spec.clip(*bootstrap_ci(values, n_boot=n_boot, seed=seed))


def _paired(d: np.ndarray, n_boot: int, seed: int, spec: MetricSpec | None = None) -> dict[str, float]:
    """Patient-level statistics of rounded paired differences ``d`` (of the metric ``spec``, if known)."""
    test = signed_rank_test(d)
    low, high = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    if spec is not None:
        low, high = spec.clip(low, high, difference=True)
    sd = float(np.std(d, ddof=1)) if d.size > 1 else math.nan
    return {
        "mean_diff": float(d.mean()) if d.size else math.nan, "diff_ci_low": low, "diff_ci_high": high,
        "statistic": test.statistic if d.size else math.nan, "p_patients": test.p if d.size else math.nan,
        "rank_biserial": test.rank_biserial if d.size else math.nan,
        "cohen_dz": float(d.mean() / sd) if sd and sd > 0 else math.nan,
    }  # fmt: skip


def compare_paired(
    per_patient: pd.DataFrame,
    reference: str,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Every column of a patient x row table against ``reference``, paired on patients both have.

    Patients are the only random unit here (the trained models are taken as fixed): ``p`` is the
    signed-rank test's. :func:`compare_rows` also tests against run-to-run variation.

    Returns:
        One row per compared row with the columns of :data:`COMPARISON_COLUMNS` (the run columns NaN).
    """
    if reference not in per_patient:
        raise KeyError(reference)
    out = []
    for row in per_patient.columns:
        if row == reference:
            continue
        pair = per_patient[[row, reference]].dropna()
        d = tie_rounded((pair[row] - pair[reference]).to_numpy(), _scale(pair))
        stats_ = _paired(d, n_boot, seed)
        out.append({"row": row, "reference": reference, "n_pairs": int(d.size), **_means(pair, row, reference),
                    **stats_, "p": stats_["p_patients"]})  # fmt: skip
    return _finish(out, reference, higher_is_better, alpha)


def _scale(pair: pd.DataFrame) -> float:
    return float(np.abs(pair.to_numpy()).max()) if pair.size else 1.0


def _means(pair: pd.DataFrame, row: str, reference: str) -> dict[str, float]:
    empty = pair.empty
    return {"mean_row": math.nan if empty else float(pair[row].mean()),
            "mean_reference": math.nan if empty else float(pair[reference].mean())}  # fmt: skip


def _finish(out: list[dict], reference: str, higher_is_better: bool, alpha: float) -> pd.DataFrame:
    table = pd.DataFrame(out).reindex(columns=COMPARISON_COLUMNS)
    table["p_holm"] = holm(table["p"].astype(float).tolist())
    table["verdict"] = [verdict(t, reference, higher_is_better, alpha) for t in table.itertuples()]
    return table


def verdict(t: Any, reference: str, higher_is_better: bool, alpha: float) -> str:
    """better / worse only when the corrected p (both tests) is below ``alpha`` and the rank statistic
    agrees with the mean difference; the direction is the mean difference's (the replicate test's
    statistic, whose inverted interval then excludes 0 on the same side).

    A contrast whose replicate interval excludes 0 while the patients' test does not reject is
    *inconclusive*, never "not distinguishable", so the table cannot print a CI far from 0 beside a
    verdict of no difference.
    """
    significant = bool(t.n_pairs) and math.isfinite(t.p_holm) and t.p_holm < alpha
    if not significant:
        low, high = getattr(t, "diff_ci_low", math.nan), getattr(t, "diff_ci_high", math.nan)
        inverted = math.isfinite(getattr(t, "p_replicates", math.nan))  # the interval is the replicate test's
        if inverted and (low > 0 or high < 0):
            return "inconclusive (the replicates differ, the patients' test does not agree)"
        return f"not distinguishable from {reference}"
    if np.sign(t.rank_biserial) != np.sign(t.mean_diff):
        return "inconclusive (median and mean disagree)"
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
            low, high = mean_ci(values, metric_spec(metric), n_boot=n_boot, seed=seed)
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


def run_values(cases: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One value per row x run (fold, seed, repeat) x patient: the patient's cases in that run averaged,
    with the run's pipeline replicate (``unit``: the stage-1 search its configuration came from)."""
    values = case_values(cases, metric)
    if "unit" not in values:  # tables from before replicates were recorded: every run its own
        values = values.assign(unit=[f"run:{f}:{s}:{r}" for f, s, r in
                                     zip(values["fold"], values["seed"], values["repeat"], strict=True)])  # fmt: skip
    keys = ["row", "unit", "fold", *RUN_KEYS, "patient"]
    if values.empty:
        return pd.DataFrame(columns=[*keys, "value"])
    return values.groupby(keys, sort=False)["value"].mean().reset_index()


def replicate_values(cases: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, dict[tuple[str, str], str]]:
    """Per row x pipeline replicate x patient: the mean over the replicate's runs (its seeds, repeats).

    Returns:
        ``(values, strata)``: columns ``row, unit, patient, value``, and per ``(row, unit)`` its stratum
        (the folds it was evaluated on): replicates are exchangeable only within a stratum.
    """
    per_run = run_values(cases, metric)
    units = per_run.groupby(["row", "unit", "patient"], sort=False)["value"].mean().reset_index()
    folds = per_run.groupby(["row", "unit"], sort=False)["fold"].agg(lambda f: ",".join(map(str, sorted(set(f)))))
    return units, {key: str(value) for key, value in folds.items()}


COMPARISON_COLUMNS = [
    "question", "row", "reference", "n_pairs", "n_undefined", "n_untied", "mean_row", "mean_reference", "mean_diff",
    "diff_ci_low", "diff_ci_high", "ci_level", "statistic", "p_patients", "n_replicates_row", "n_replicates_reference",
    "p_replicates", "p_replicates_min", "p", "p_holm", "rank_biserial", "cohen_dz", "verdict",
]  # fmt: skip


def compare_contrasts(cases: pd.DataFrame, contrasts: list[tuple[str, str, str]], metric: str = "dice",
                      alpha: float = 0.05, n_perm: int = N_PERM, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """The contrasts ``(question, row, against)`` of one family on an experiment's per-case table.

    Each is tested twice, and both must reject (an intersection-union test: the larger p is valid):

    - **pipeline replicates as the random unit** (the verdict's test): the row labels of whole
      replicates (a stage-1 search and the runs trained from its choice) are permuted within the folds
      they were evaluated on (:class:`~avn_study.analysis.inference.ShiftPermutation`). Exact whatever
      the tuning luck, the run luck and the patients, when replicates are independent;
    - **patients as the random unit**: Wilcoxon's signed-rank test on the per-patient differences.

    ``p`` is Holm-corrected over the family. The interval is the replicate test inverted under a shift
    at the level Holm decided the contrast at (:func:`~avn_study.analysis.inference.holm_levels`), so
    it excludes 0 exactly when the replicate test rejects at that level.

    Returns:
        :data:`COMPARISON_COLUMNS`, one row per contrast, in the given order (``reference``: ``against``).
    """
    spec = metric_spec(metric)
    units, strata = replicate_values(cases, metric)
    per_patient = units.groupby(["row", "patient"], sort=False)["value"].mean().unstack("row")
    out, tests = [], []
    for question, row, against in contrasts:
        entry: dict[str, Any] = {"question": question, "row": row, "reference": against}
        test = None
        if row in per_patient and against in per_patient:
            pair = per_patient[[row, against]].dropna()
            scale = _scale(pair)
            d = tie_rounded((pair[row] - pair[against]).to_numpy(), scale)
            entry.update(n_pairs=int(d.size), **_means(pair, row, against), **_patient_test(d))
            mine = units[units["row"].isin([row, against]) & units["patient"].isin(pair.index)]
            matrix = mine.pivot_table(index=["row", "unit"], columns="patient", values="value")
            labels = matrix.index.get_level_values("row") == row
            entry.update(n_replicates_row=int(labels.sum()), n_replicates_reference=int((~labels).sum()))
            if d.size and labels.any() and (~labels).any():
                folds = np.array([strata[k] for k in matrix.index])
                test = ShiftPermutation.from_units(matrix.to_numpy(), labels, folds, scale, n_perm=n_perm, seed=seed)
                entry.update(p_replicates=test.p(0.0), p_replicates_min=test.min_p)
        else:
            entry["n_pairs"] = 0
        if spec.subset == "defined" and len(cases):  # e.g. HD95 with an empty mask: left out, and counted
            both = cases[cases["row"].isin([row, against])]
            entry["n_undefined"] = int(both["patient"].nunique()) - int(entry["n_pairs"])
        entry["p"] = max(entry["p_patients"], entry["p_replicates"]) if "p_replicates" in entry else math.nan
        out.append(entry)
        tests.append(test)
    table = pd.DataFrame(out).reindex(columns=COMPARISON_COLUMNS)
    table["p_holm"] = holm(table["p"].astype(float).tolist())
    table["ci_level"] = [1 - level for level in holm_levels(table["p"].astype(float).tolist(), alpha)]
    lows, highs = [], []
    for test, level in zip(tests, table["ci_level"], strict=True):
        low, high = test.interval(1 - level) if test is not None else (math.nan, math.nan)
        low, high = spec.clip(low, high, difference=True)
        lows.append(low)
        highs.append(high)
    table["diff_ci_low"], table["diff_ci_high"] = lows, highs
    table["verdict"] = [verdict(t, t.reference, spec.higher_is_better, alpha) for t in table.itertuples()]
    return table


def _patient_test(d: np.ndarray) -> dict[str, float]:
    test = signed_rank_test(d)
    sd = float(np.std(d, ddof=1)) if d.size > 1 else math.nan
    return {
        "mean_diff": float(d.mean()) if d.size else math.nan, "n_untied": test.n,
        "statistic": test.statistic if d.size else math.nan, "p_patients": test.p if d.size else math.nan,
        "rank_biserial": test.rank_biserial if d.size else math.nan,
        "cohen_dz": float(d.mean() / sd) if sd and sd > 0 else math.nan,
    }  # fmt: skip


def compare_rows(cases: pd.DataFrame, rows: list[str], reference: str, metric: str = "dice", alpha: float = 0.05,
                 n_boot: int = N_BOOT, seed: int = 0, n_perm: int = N_PERM) -> pd.DataFrame:  # fmt: skip
    """Every row against ``reference`` (one family): :func:`compare_contrasts` with those contrasts.

    ``n_boot`` is accepted for callers of the patient-bootstrap era and unused: the interval now comes
    from the replicate test itself.
    """
    present = set(cases["row"]) if len(cases) else set()
    if reference not in present:
        raise KeyError(reference)
    contrasts = [("", row, reference) for row in rows if row != reference and row in present]
    return compare_contrasts(cases, contrasts, metric, alpha, n_perm=n_perm, seed=seed)


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
