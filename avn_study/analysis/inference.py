"""The statistical tests and intervals behind a verdict, on plain arrays (no pandas, no study folders).

Each function states what it claims; ``tests/analysis/test_inference.py`` checks the claims by
simulation (coverage of the intervals at 8-30 patients, the false-positive rate of the verdict when
two rows are the same arm with different seeds).

- :func:`bootstrap_ci`: a studentized (bootstrap-t) interval of a mean. Percentile intervals
  undercover at the cohort sizes of AVN studies (about 91 % for a nominal 95 % at 11 patients);
  the studentized interval corrects for the skew of per-patient Dice and covers 94-97 % there.
- :func:`signed_rank_test`: the Wilcoxon signed-rank test, exact under random signs given the
  ranks (ties and all), on differences rounded so that floating-point noise cannot break a tie.
- :func:`run_permutation_test`: the mean paired difference with the *trained models* as the random
  unit: the row labels of runs trained on the same fold are permuted. Patients evaluated by one model share
  its luck (a good seed lifts every patient of its fold), which the signed-rank test cannot see.
- :class:`ShiftPermutation`: the verdict's test. The row labels of whole *pipeline replicates* (a
  stage-1 search and the runs trained from its choice) are permuted within the folds they were
  evaluated on, and the same test is inverted under a shift to give the interval, so the interval
  excludes 0 exactly when the test rejects at the interval's level.
- :func:`holm`: Holm's step-down correction; :func:`holm_levels`: the level each contrast was decided at.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

N_BOOT = 10_000  # bootstrap resamples
N_PERM = 10_000  # run permutations: all of them when there are at most this many, else a random sample
TIE_TOLERANCE = 1e-12  # paired differences are rounded to this fraction of the data's scale
SD_FLOOR = 0.25  # bootstrap-t: a resample's SD counts as at least this share of the sample's


def bootstrap_ci(values: np.ndarray, n_boot: int = N_BOOT, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """Studentized (bootstrap-t) confidence interval of the mean, with a floor on resampled SDs.

    Resamples ``values`` with replacement, studentizes each resampled mean with its own standard
    error, and inverts the quantiles (order statistics) of that statistic around the sample mean
    (Efron and Tibshirani 1993, ch. 12.5). Each resample's SD is floored at :data:`SD_FLOOR` times
    the sample's: a resample of nearly one repeated value (common when most patients score ~0, or for
    discrete values such as lesion sensitivity) would otherwise get a huge statistic, and the interval
    would reach far beyond anything the data suggest (an upper bound of 1.0 for a mean Dice of 0.05).
    Simulated coverage of the 95 % interval, 8-30 patients: 94-97 % for skewed, zero-inflated and
    discrete per-patient values, 92-94 % for symmetric heavy tails (t with 3 df); see
    ``tests/analysis/test_inference.py``. All-equal values give the degenerate interval ``(mean, mean)``;
    fewer than 2 values give ``(nan, nan)``.
    """
    values = np.sort(np.asarray(values, dtype=float))  # sorted: the seeded resamples do not depend on row order
    n = values.size
    if n < 2:
        return math.nan, math.nan
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    if sd == 0:
        return mean, mean
    rng = np.random.default_rng(seed)
    resampled = values[rng.integers(0, n, size=(n_boot, n))]
    means = resampled.mean(axis=1)
    sds = np.maximum(resampled.std(axis=1, ddof=1), SD_FLOOR * sd)
    t = (means - mean) / (sds / math.sqrt(n))
    tail = (1 - confidence) / 2
    q_low, q_high = np.quantile(t, [tail, 1 - tail], method="inverted_cdf")
    se = sd / math.sqrt(n)
    return mean - float(q_high) * se, mean - float(q_low) * se


def binary_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson's exact interval for the mean of 0/1 values (covers at least ``confidence``).

    Where every sampled value is the same (every patient's lesions found), any bootstrap interval
    collapses to a point; this one does not. Wilson's interval is shorter but covers only ~91 % at some
    sizes (11 patients, p = 0.85).
    """
    from scipy.stats import beta

    values = np.asarray(values, dtype=float)
    n = values.size
    if n == 0:
        return math.nan, math.nan
    k, alpha = float(values.sum()), 1 - confidence
    low = float(beta.ppf(alpha / 2, k, n - k + 1)) if k > 0 else 0.0
    high = float(beta.ppf(1 - alpha / 2, k + 1, n - k)) if k < n else 1.0
    return low, high


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count)."""
    p = np.asarray(pvalues, dtype=float)
    valid = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(p.shape, np.nan)
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def tie_rounded(differences: np.ndarray, scale: float) -> np.ndarray:
    """Round paired differences to ``TIE_TOLERANCE * scale`` (scale: the largest |value| compared, at least 1).

    Per-patient means of discrete metrics (lesion counts, sensitivity, the empty-mask Dice) that should
    be equal differ by ~1e-16 after averaging; unrounded they would get distinct ranks and non-zero
    signs, and change the p-value.
    """
    step = TIE_TOLERANCE * max(1.0, float(scale))
    rounded = np.round(np.asarray(differences, dtype=float) / step) * step
    return rounded + 0.0  # no negative zeros


@dataclass(frozen=True)
class SignedRank:
    statistic: float  # R+ - R-: the signed rank sum; its sign is the direction of the effect
    p: float  # two-sided, exact given the ranks
    rank_biserial: float  # (R+ - R-) / (R+ + R-), in [-1, 1]
    n: int  # non-zero differences


def signed_rank_test(differences: np.ndarray) -> SignedRank:
    """Wilcoxon's signed-rank test (two-sided, zero differences dropped), exact given the ranks.

    The null distribution of R+ under independent random signs is computed by dynamic programming on
    the (doubled, hence integer) average ranks, so ties are handled exactly and the result does not
    depend on the SciPy version. Above 500 non-zero differences the normal approximation with the tie
    correction is used. Pass differences through :func:`tie_rounded` first.
    """
    from scipy.stats import norm, rankdata

    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    n = d.size
    if n == 0:
        return SignedRank(0.0, 1.0, 0.0, 0)
    ranks = rankdata(np.abs(d))
    total = float(ranks.sum())
    r_plus = float(ranks[d > 0].sum())
    statistic = 2 * r_plus - total
    if n > 500:
        ties = np.unique(ranks, return_counts=True)[1]
        variance = n * (n + 1) * (2 * n + 1) / 24 - float(((ties**3 - ties) / 48).sum())
        p = 2 * norm.sf(abs(r_plus - total / 2) / math.sqrt(variance))
        return SignedRank(statistic, float(min(1.0, p)), statistic / total, n)
    weights = np.rint(2 * ranks).astype(int)  # average ranks are multiples of 1/2
    distribution = np.zeros(int(weights.sum()) + 1)
    distribution[0] = 1.0
    for w in weights:  # each rank joins R+ with probability 1/2
        shifted = np.zeros_like(distribution)
        shifted[w:] = distribution[:-w]
        distribution = 0.5 * (distribution + shifted)
    centre = weights.sum() / 2
    extreme = np.abs(np.arange(distribution.size) - centre) >= abs(2 * r_plus - centre) - 1e-9
    p = float(min(1.0, distribution[extreme].sum()))
    return SignedRank(statistic, p, statistic / total, n)


@dataclass(frozen=True)
class RunPermutation:
    p: float  # two-sided
    assignments: int  # label assignments compared (all of them when exact)
    exact: bool
    min_p: float  # the smallest p this design can give


def run_permutation_test(values: np.ndarray, is_row: np.ndarray, strata: np.ndarray, scale: float,
                         n_perm: int = N_PERM, seed: int = 0) -> RunPermutation:  # fmt: skip
    """Permutation test of the mean paired difference with trained models (runs) as the random unit.

    Args:
        values: ``(runs, patients)`` metric of each run on each patient it evaluated (NaN elsewhere).
        is_row: ``(runs,)`` True for the runs of the compared row, False for the reference's.
        strata: ``(runs,)`` the training data of each run (its fold): labels are permuted within a
            stratum only, keeping each stratum's numbers of row and reference runs.
        scale: passed to :func:`tie_rounded`.

    Under the null hypothesis that the two rows train models from the same distribution, runs on the
    same fold are exchangeable, so every relabelling is as likely as the observed one: the p-value is
    exact whatever the run-to-run (seed) variance. A patient's difference is the mean over the row's
    runs that evaluated them minus the mean over the reference's. With one run per row and fold and F
    folds there are only 2^F labellings (p >= 2 / 2^F): add seeds.
    """
    values = np.asarray(values, dtype=float)
    is_row = np.asarray(is_row, dtype=bool)
    labelled, exact = labellings(is_row, strata, n_perm, seed)
    statistics = _labelled_statistics(values, labelled, scale)
    observed = _labelled_statistics(values, is_row[None, :], scale)[0]
    at_least = int((np.abs(statistics) >= abs(observed) - 1e-9).sum())
    smallest = int((np.abs(statistics) >= np.abs(statistics).max() - 1e-9).sum())
    count = labelled.shape[0]
    return RunPermutation(at_least / count, count, exact, smallest / count)


def _labelled_statistics(values: np.ndarray, labellings: np.ndarray, scale: float) -> np.ndarray:
    """The mean per-patient difference under each labelling ``(L, runs)``.

    The mean, not the signed-rank statistic: ranks saturate once every patient improves, so every
    relabelling that keeps all differences positive would tie with the observed one.
    """
    d = _patient_differences(values, labellings)
    keep = np.isfinite(d).all(axis=0)  # patients both rows evaluated (the same under every labelling)
    return tie_rounded(d[:, keep], scale).mean(axis=1)


def _patient_differences(values: np.ndarray, labelling: np.ndarray) -> np.ndarray:
    """``(L, patients)``: per patient, the mean over the units labelled row minus the mean over the others
    (NaN where one side evaluated no unit)."""
    present = np.isfinite(values)
    filled = np.where(present, values, 0.0)
    row = labelling.astype(float)
    ref = 1.0 - row
    with np.errstate(divide="ignore", invalid="ignore"):
        return (row @ filled) / (row @ present) - (ref @ filled) / (ref @ present)


# ------------------------------------------------------------------ pipeline replicates: test and interval
def labellings(is_row: np.ndarray, strata: np.ndarray, n_perm: int = N_PERM, seed: int = 0) -> tuple[np.ndarray, bool]:
    """Every relabelling of units that keeps each stratum's numbers of row and reference units.

    Returns:
        ``(labellings, exact)``: a boolean ``(L, units)`` array whose first row is the observed labelling,
        and whether it holds every labelling (at most ``n_perm`` of them) or ``n_perm`` random ones.
    """
    is_row = np.asarray(is_row, dtype=bool)
    strata = np.asarray(strata)
    groups = [np.flatnonzero(strata == s) for s in dict.fromkeys(strata.tolist())]
    choices = [list(itertools.combinations(idx.tolist(), int(is_row[idx].sum()))) for idx in groups]
    total = math.prod(len(c) for c in choices)
    if total <= n_perm:
        out = np.zeros((total, is_row.size), dtype=bool)
        for k, combo in enumerate(itertools.product(*choices)):
            out[k, [i for chosen in combo for i in chosen]] = True
        observed = int(np.flatnonzero((out == is_row).all(axis=1))[0])
        out[[0, observed]] = out[[observed, 0]]
        return out, True
    rng = np.random.default_rng(seed)
    out = np.zeros((n_perm, is_row.size), dtype=bool)
    for idx in groups:
        picks = np.argsort(rng.random((n_perm, idx.size)), axis=1)[:, : int(is_row[idx].sum())]
        sub = np.zeros((n_perm, idx.size), dtype=bool)
        np.put_along_axis(sub, picks, True, axis=1)
        out[:, idx] = sub
    return np.vstack([is_row[None, :], out]), False  # the observed labelling counts once


def labelled_means(values: np.ndarray, labelling: np.ndarray) -> np.ndarray:
    """The mean per-patient difference (row units minus reference units) under each labelling ``(L, units)``.

    ``values``: ``(units, patients)``, NaN where a unit did not evaluate a patient. A patient counts
    where both rows evaluated them; that set is the same under every labelling that keeps each
    stratum's counts, so the statistic is linear in ``values``.
    """
    d = _patient_differences(values, labelling)
    keep = np.isfinite(d[0])
    return d[:, keep].mean(axis=1) if keep.any() else np.full(labelling.shape[0], np.nan)


@dataclass(frozen=True)
class ShiftPermutation:
    """A permutation test of the mean paired difference over exchangeable units, and its inversion.

    Under the null hypothesis that the two rows' pipelines are exchangeable (the same arm, whatever its
    tuning luck, run luck and patients), every labelling in :attr:`t` is as likely as the observed one,
    so the p-value is exact. Under a shift model (every unit of the row is a reference unit plus
    ``delta``) the statistic of labelling L at ``delta`` is ``t[L] - a[L] * delta`` (it is linear in the
    values), and the interval is the set of shifts the test does not reject. Each ``|a| <= 1``, so the
    p-value falls monotonically on both sides of the estimate and bisection finds the bounds exactly.
    """

    t: np.ndarray  # (L,) the statistic of each labelling; t[0] is the observed one (the estimate)
    a: np.ndarray  # (L,) each labelling's statistic moves by -a * delta under a shift delta (a[0] = 1)
    exact: bool
    tolerance: float  # statistics this close count as ties

    @classmethod
    def from_units(cls, values: np.ndarray, is_row: np.ndarray, strata: np.ndarray, scale: float = 1.0,
                   n_perm: int = N_PERM, seed: int = 0) -> ShiftPermutation:  # fmt: skip
        """The test of ``values`` ``(units, patients)``, ``is_row`` ``(units,)`` and the ``strata`` (the
        folds) units are exchangeable within."""
        values = np.asarray(values, dtype=float)
        labelling, exact = labellings(is_row, strata, n_perm, seed)
        indicator = np.where(np.isfinite(values), np.asarray(is_row, dtype=float)[:, None], np.nan)
        t = labelled_means(values, labelling)
        a = labelled_means(indicator, labelling)
        return cls(t, a, exact, TIE_TOLERANCE * max(1.0, float(scale)) * 1e3)

    @property
    def estimate(self) -> float:
        return float(self.t[0])

    @property
    def count(self) -> int:
        return int(self.t.size)

    @property
    def min_p(self) -> float:
        """The smallest p this design can give, whatever the data: the labellings that move as much as the
        observed one (``|a| = 1``: itself and its mirror) tie with it when the effect is huge."""
        return float(np.mean(np.abs(np.abs(self.a) - 1.0) < 1e-9))

    def p(self, delta: float = 0.0) -> float:
        """Two-sided p of the null hypothesis "the row is the reference shifted by ``delta``"."""
        if not np.isfinite(self.estimate):
            return math.nan
        shifted = np.abs(self.t - self.a * delta)
        return float(np.mean(shifted >= abs(self.estimate - delta) - self.tolerance))

    def interval(self, alpha: float) -> tuple[float, float]:
        """The shifts not rejected at level ``alpha``: a ``1 - alpha`` interval of the mean difference,
        excluding 0 exactly when :meth:`p` ``(0) <= alpha``. Unbounded sides (a design whose smallest p
        is above ``alpha``) are infinite."""
        estimate = self.estimate
        if not np.isfinite(estimate):
            return math.nan, math.nan
        spread = float(np.nanmax(np.abs(self.t - estimate))) + 1.0
        bounds = []
        for side in (-1.0, 1.0):
            far = estimate + side * spread
            for _ in range(60):  # the rejection region may start further out: widen until it is reached
                if self.p(far) <= alpha:
                    break
                far = estimate + 2 * (far - estimate)
            else:
                bounds.append(side * math.inf)
                continue
            inside, outside = estimate, far
            for _ in range(80):
                middle = (inside + outside) / 2
                inside, outside = (middle, outside) if self.p(middle) > alpha else (inside, middle)
            bounds.append(outside)
        return bounds[0], bounds[1]


def holm_levels(pvalues: list[float], alpha: float) -> list[float]:
    """The level at which Holm's procedure decides each hypothesis: ``alpha / (m - j + 1)`` for the j-th
    smallest p while every smaller one was rejected, and the level of the first acceptance for all
    after it. An interval at ``1 - level`` then excludes its null value exactly when Holm rejects (given
    a test whose interval is its inversion)."""
    p = np.asarray(pvalues, dtype=float)
    valid = np.flatnonzero(np.isfinite(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    levels = np.full(p.shape, alpha)
    m, stopped = len(order), None
    for j, index in enumerate(order):
        level = alpha / (m - j) if stopped is None else stopped
        if stopped is None and p[index] >= level:
            stopped = level
        levels[index] = level
    return levels.tolist()
