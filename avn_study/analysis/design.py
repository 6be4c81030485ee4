"""What a study's design can decide, before any GPU runs: smallest attainable p, power, detectable effects.

A verdict (:func:`avn_study.analysis.stats.compare_contrasts`) needs two tests to reject at Holm's
level: the permutation of whole pipeline replicates within folds, and Wilcoxon's signed-rank test over
patients. Both have a floor that no effect can beat: the replicate test cannot go below
:func:`replicate_floor` (the labellings that tie with the most extreme one), Wilcoxon's below
``2 / 2**n`` with ``n`` the patients whose values differ. A design whose floor is not below
``alpha / m`` (m contrasts, Holm's first step) can only ever say "not distinguishable".

Power comes from simulating whole studies with every source of variance a rerun would change
(:class:`Components`: patients, each run's luck, each search's luck, per-patient noise, patients every
model misses) and running the verdict's own tests on them (the same linear statistic as
:class:`~avn_study.analysis.inference.ShiftPermutation`, the same signed-rank test). The simulation is
also the proof of the verdict's false-positive rate (``tests/analysis/test_design.py``).

Plain numpy and the statistics module: no pandas, no Ray, no study folder.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from avn_study.analysis.inference import holm, labellings, signed_rank_test, tie_rounded

PROTOCOLS = ("nested_ablation", "fair_ablation")


@dataclass(frozen=True)
class Components:
    """Variance components of a per-patient metric (Dice by default), in the metric's units.

    The defaults are those of a careful reviewer's simulation of AVN studies (issue 22): they are a
    starting point; ``avn-study plan --pilot STUDY`` estimates them from a finished study.
    """

    mean: float = 0.45  # typical per-patient value of the reference
    patient_sd: float = 0.15  # between patients (shared by every row: it cancels in a paired contrast)
    noise_sd: float = 0.05  # per patient and run: what one model gets wrong on one patient
    run_sd: float = 0.03  # per run (a seed's luck), shared by every patient the run evaluates
    search_sd: float = 0.02  # per search (the configuration's luck), shared by every run of its choice
    zero_fraction: float = 0.3  # patients every model scores 0 on (a missed lesion): tied pairs
    low: float = 0.0  # the metric's range: values are clipped to it
    high: float = 1.0
    noise_df: float = math.inf  # per-patient noise ~ t with this many degrees of freedom (inf: normal)
    estimated: tuple[str, ...] = field(default=(), compare=False)  # components a pilot study estimated

    def noise(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Per patient and run noise with SD :attr:`noise_sd` (heavy-tailed when :attr:`noise_df` is finite)."""
        if math.isinf(self.noise_df):
            return rng.normal(0.0, self.noise_sd, shape)
        draws = rng.standard_t(self.noise_df, shape)
        scale = math.sqrt((self.noise_df - 2) / self.noise_df) if self.noise_df > 2 else 1.0  # t2: no finite SD
        return self.noise_sd * scale * draws

    def describe(self) -> list[str]:
        names = {"patient_sd": "patients", "noise_sd": "per patient and run", "run_sd": "run (seed) luck",
                 "search_sd": "search (tuning) luck", "zero_fraction": "share of patients at 0"}  # fmt: skip
        return [f"{label}: {getattr(self, key):.3f}" + ("" if key in self.estimated else " (default)")
                for key, label in names.items()]  # fmt: skip


@dataclass(frozen=True)
class Design:
    """The shape of an ablation as far as its verdicts are concerned."""

    protocol: str  # nested_ablation | fair_ablation
    patients: int  # reported patients the primary metric is defined on (with necrosis, for Dice)
    folds: int  # reported folds (the outer folds of a nested ablation)
    seeds: int  # stage-2 runs per row and fold (seeds x repeats)
    search_per_seed: bool  # every seed has its own stage-1 search (a replicate of the whole pipeline)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol=}")
        if self.patients < 1 or self.folds < 1 or self.seeds < 1:
            raise ValueError(f"patients, folds and seeds must be >= 1, got {self}")

    @property
    def replicates_per_fold(self) -> int:
        """Independent pipeline replicates of one row that a fold's patients are evaluated by."""
        return self.seeds if self.search_per_seed else 1

    @property
    def shared_search(self) -> bool:
        """One search serves every fold (a fair ablation without ``search_per_seed``)."""
        return self.protocol == "fair_ablation" and not self.search_per_seed

    def describe(self) -> str:
        per = "its own search per seed" if self.search_per_seed else (
            "one search for all folds" if self.shared_search else "one search per fold")  # fmt: skip
        return f"{self.patients} patients, {self.folds} folds x {self.seeds} seed(s), {per}"


# --------------------------------------------------------------------------------- the unit layout
@dataclass(frozen=True)
class _Layout:
    """Units of a 2-row contrast: which runs (fold, seed) each averages, its stratum, its row."""

    fold_of_patient: np.ndarray  # (n,)
    unit_fold: np.ndarray  # (U,) the unit's fold, -1 for a unit spanning every fold
    unit_seeds: list[list[int]]  # the seeds each unit averages
    unit_row: np.ndarray  # (U,) 0 = the compared row, 1 = the reference
    weights: np.ndarray  # (L, U): T_L = weights @ unit sums / n
    a: np.ndarray  # (L,): how each labelling moves under a shift (1 for the observed one)


def _patient_folds(design: Design) -> np.ndarray:
    return np.arange(design.patients) % design.folds


def _layout(design: Design, replicate_units: bool, n_perm: int, seed: int) -> _Layout:
    """``replicate_units``: the verdict's units (pipeline replicates); else every run is a unit (the
    run-permutation test of the earlier verdict, which takes a row's runs as independent)."""
    folds = _patient_folds(design)
    unit_fold, unit_seeds, unit_row = [], [], []
    for row in (0, 1):
        if replicate_units and design.shared_search:
            unit_fold.append(-1)
            unit_seeds.append(list(range(design.seeds)))
            unit_row.append(row)
            continue
        for f in range(design.folds):
            if replicate_units and not design.search_per_seed:
                unit_fold.append(f)
                unit_seeds.append(list(range(design.seeds)))
                unit_row.append(row)
            else:
                for s in range(design.seeds):
                    unit_fold.append(f)
                    unit_seeds.append([s])
                    unit_row.append(row)
    unit_fold_a, unit_row_a = np.array(unit_fold), np.array(unit_row)
    labels, _ = labellings(unit_row_a == 0, unit_fold_a, n_perm=n_perm, seed=seed)
    weights = np.zeros(labels.shape, dtype=float)
    for stratum in np.unique(unit_fold_a):
        idx = np.flatnonzero(unit_fold_a == stratum)
        k_row = int((unit_row_a[idx] == 0).sum())
        k_ref = idx.size - k_row
        weights[:, idx] = np.where(labels[:, idx], 1.0 / k_row, -1.0 / k_ref)
    patients_in = np.array([design.patients if f < 0 else int((folds == f).sum()) for f in unit_fold_a])
    a = (weights * (patients_in * (unit_row_a == 0))[None, :]).sum(axis=1) / design.patients
    return _Layout(folds, unit_fold_a, unit_seeds, unit_row_a, weights / design.patients, a)


def replicate_floor(design: Design) -> float:
    """The smallest p the replicate test can give in this design, whatever the data: the observed
    labelling and (with as many units of each row in every stratum) its mirror tie at the extreme, out
    of every labelling that keeps each stratum's counts."""
    layout = _layout(design, replicate_units=True, n_perm=1, seed=0)
    total, mirrored = 1, True
    for stratum in np.unique(layout.unit_fold):
        rows = layout.unit_row[layout.unit_fold == stratum]
        k, size = int((rows == 0).sum()), rows.size
        total *= math.comb(size, k)
        mirrored &= 2 * k == size
    return min(1.0, (2 if mirrored else 1) / total)


def patient_floor(patients: int) -> float:
    """The smallest two-sided p of Wilcoxon's exact test on ``patients`` non-zero differences."""
    return min(1.0, 2.0 ** (1 - patients)) if patients > 0 else 1.0


def attainable_p(design: Design, tied: int = 0) -> float:
    """The smallest p a verdict can rest on in this design (``tied``: patients expected to tie)."""
    return max(replicate_floor(design), patient_floor(design.patients - tied))


# ----------------------------------------------------------------------------------- simulation
def simulate_runs(design: Design, components: Components, effects: list[float], studies: int,
                  rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """Per-patient values of every run of every row in ``studies`` simulated studies.

    Returns:
        ``(studies, rows, seeds, patients)``: row r's run with seed s evaluated on patient p (each
        patient by the runs of its fold), with row r shifted by ``effects[r]``. A search's luck is
        shared by the runs trained from its choice (all seeds of a fold, or of every fold for a fair
        ablation's one search, or one seed with ``search_per_seed``); a run's luck by its patients.
    """
    c = components
    rows, folds, seeds, n = len(effects), design.folds, design.seeds, design.patients
    fold = _patient_folds(design)
    # the search's luck is drawn last: designs that differ only in how searches are shared see the same
    # patients, runs and noise (common random numbers), so their verdicts compare draw by draw
    patient = rng.normal(0.0, c.patient_sd, (studies, 1, 1, n))
    zero = rng.random((studies, 1, 1, n)) < c.zero_fraction
    run = rng.normal(0.0, c.run_sd, (studies, rows, folds, seeds))
    noise = c.noise(rng, (studies, rows, seeds, n))
    if design.shared_search:
        search = np.broadcast_to(rng.normal(0.0, c.search_sd, (studies, rows, 1, 1)), run.shape)
    elif design.search_per_seed:
        search = rng.normal(0.0, c.search_sd, (studies, rows, folds, seeds))
    else:
        search = np.broadcast_to(rng.normal(0.0, c.search_sd, (studies, rows, folds, 1)), run.shape)
    luck = (search + run)[:, :, fold, :].transpose(0, 1, 3, 2)  # (studies, rows, seeds, patients)
    shift = np.asarray(effects, dtype=float)[None, :, None, None]
    values = np.clip(c.mean + patient + shift + luck + noise, c.low, c.high)
    return np.where(zero, 0.0, values)


def _replicate_p(runs: np.ndarray, row: int, ref: int, layout: _Layout, tolerance: float = 1e-9) -> np.ndarray:
    """p of the replicate (or run) permutation test of ``row`` vs ``ref`` in every simulated study."""
    sums = np.empty((runs.shape[0], layout.unit_row.size))
    for u, (f, seeds, which) in enumerate(zip(layout.unit_fold, layout.unit_seeds, layout.unit_row, strict=True)):
        patients = np.ones(runs.shape[-1], dtype=bool) if f < 0 else layout.fold_of_patient == f
        source = runs[:, row if which == 0 else ref][:, seeds][:, :, patients]
        sums[:, u] = source.mean(axis=1).sum(axis=1)
    t = sums @ layout.weights.T  # (studies, L)
    return np.mean(np.abs(t) >= np.abs(t[:, :1]) - tolerance, axis=1)


def _patient_p(runs: np.ndarray, row: int, ref: int, needed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, mean difference) of the signed-rank test per study (p computed only where ``needed``)."""
    d = runs[:, row].mean(axis=1) - runs[:, ref].mean(axis=1)  # (studies, patients)
    p = np.ones(d.shape[0])
    for i in np.flatnonzero(needed):
        test = signed_rank_test(tie_rounded(d[i], 1.0))
        p[i] = test.p if np.sign(test.rank_biserial) == np.sign(d[i].mean()) else 1.0
    return p, d.mean(axis=1)


@dataclass(frozen=True)
class SimulatedVerdicts:
    """Per simulated study and contrast: whether the verdict said better/worse, and its direction."""

    rejected: np.ndarray  # (studies, contrasts) bool
    positive: np.ndarray  # (studies, contrasts) bool: the difference's sign is +

    def any_rate(self) -> float:
        return float(self.rejected.any(axis=1).mean())

    def rate(self, contrast: int, positive: bool = True) -> float:
        hit = self.rejected[:, contrast] & (self.positive[:, contrast] == positive)
        return float(hit.mean())


def simulate_verdicts(design: Design, components: Components, effects: list[float], studies: int, seed: int,
                      alpha: float = 0.05, verdict: str = "replicates", n_perm: int = 2_000,
                      contrasts: int | None = None) -> SimulatedVerdicts:  # fmt: skip
    """Run the verdict on ``studies`` simulated studies of rows shifted by ``effects`` (row 0 the
    reference; every other row is compared with it, Holm over the ``contrasts`` of the family, default
    ``len(effects) - 1``).

    ``verdict``: ``"replicates"`` (this version: pipeline replicates and patients), or ``"runs"`` (the
    earlier verdict: runs within folds and patients, which treats a row's seeds as independent).
    """
    rng = np.random.default_rng(seed)
    runs = simulate_runs(design, components, effects, studies, rng)
    layout = _layout(design, replicate_units=verdict == "replicates", n_perm=n_perm, seed=seed)
    rows = len(effects) - 1
    m = contrasts if contrasts is not None else rows
    p = np.ones((studies, rows))
    means = np.zeros((studies, rows))
    for k in range(rows):
        p_rep = _replicate_p(runs, k + 1, 0, layout)
        p_pat, means[:, k] = _patient_p(runs, k + 1, 0, needed=p_rep < alpha)  # only where it can matter
        p[:, k] = np.maximum(p_rep, p_pat)
    if m > rows:  # the rest of the family: contrasts with no effect, which only raise Holm's bar
        p = np.hstack([p, np.ones((studies, m - rows))])
    adjusted = np.array([holm(list(row)) for row in p])[:, :rows]
    return SimulatedVerdicts(adjusted < alpha, means > 0)


def power(design: Design, components: Components, effect: float, contrasts: int = 1, alpha: float = 0.05,
          studies: int = 300, seed: int = 0) -> float:  # fmt: skip
    """The share of simulated studies whose verdict finds a planted ``effect`` (the right direction), in
    a family of ``contrasts`` under Holm (the others null: the least favourable case)."""
    result = simulate_verdicts(design, components, [0.0, effect], studies, seed, alpha, contrasts=contrasts)
    return result.rate(0, positive=effect > 0)


def detectable_effect(
    design: Design,
    components: Components,
    contrasts: int = 1,
    alpha: float = 0.05,
    target: float = 0.8,
    studies: int = 200,
    seed: int = 0,
    largest: float = 0.5,
) -> float:
    """The smallest planted effect found with probability ``target`` (bisection with common random
    numbers: every candidate effect is simulated on the same draws). ``inf`` when even ``largest``
    is not found that often (or the design cannot reach ``alpha / contrasts``)."""
    if attainable_p(design) >= alpha / contrasts:
        return math.inf
    if power(design, components, largest, contrasts, alpha, studies, seed) < target:
        return math.inf
    low, high = 0.0, largest
    for _ in range(8):
        middle = (low + high) / 2
        if power(design, components, middle, contrasts, alpha, studies, seed) >= target:
            high = middle
        else:
            low = middle
    return high


# -------------------------------------------------------------------------- a pilot study's components
def estimate_components(runs: Any, default: Components | None = None) -> Components:
    """Variance components estimated from a finished study by the method of moments.

    Args:
        runs: a DataFrame with ``row, unit, fold, run, patient, value`` (one value per run and patient,
            the run's cases averaged): :func:`avn_study.analysis.stats.run_values` with a run key.

    Residuals after each patient's mean over every run of every row give, per run, a run mean and a
    within-run spread (noise); the spread of run means within a replicate (beyond noise) is the run
    luck, and the spread of replicate means within a row and fold (beyond both) the search luck. A
    component the design cannot separate (one run per replicate, one replicate per row and fold) keeps
    its default, and :attr:`Components.estimated` says which were estimated.
    """
    base = default or Components()
    frame = runs.copy()
    if frame.empty:
        return base
    estimated: dict[str, float] = {}
    patient_mean = frame.groupby("patient")["value"].transform("mean")
    frame["residual"] = frame["value"] - patient_mean
    per_patient = frame.groupby("patient")["value"].mean()
    if per_patient.size > 2:
        estimated["patient_sd"] = float(per_patient.std(ddof=1))
        estimated["mean"] = float(per_patient.mean())
        estimated["zero_fraction"] = float((frame.groupby("patient")["value"].max() == 0).mean())
    run_keys = ["row", "unit", "run"]
    run_mean = frame.groupby(run_keys)["residual"].transform("mean")
    within = frame["residual"] - run_mean
    sizes = frame.groupby(run_keys)["residual"].transform("size")
    df = float((sizes > 1).sum() - frame[sizes > 1].groupby(run_keys).ngroups)
    noise_var = float((within[sizes > 1] ** 2).sum() / df) if df > 0 else math.nan
    if math.isfinite(noise_var):
        estimated["noise_sd"] = math.sqrt(noise_var)
    per_run = frame.groupby(run_keys).agg(mean=("residual", "mean"), n=("residual", "size")).reset_index()
    run_var = _between(per_run, ["row", "unit"], noise_var)
    if math.isfinite(run_var):
        estimated["run_sd"] = math.sqrt(max(0.0, run_var))
    per_unit = per_run.groupby(["row", "unit"]).agg(mean=("mean", "mean"), n=("n", "mean"),
                                                    runs=("mean", "size")).reset_index()  # fmt: skip
    per_unit = per_unit.merge(frame.groupby(["row", "unit"])["fold"].agg(lambda f: min(f)).reset_index(),
                              on=["row", "unit"])  # fmt: skip
    within_unit = (max(0.0, run_var) if math.isfinite(run_var) else base.run_sd**2) / per_unit["runs"].mean()
    noise_part = (noise_var if math.isfinite(noise_var) else base.noise_sd**2) / (
        per_unit["n"] * per_unit["runs"]
    ).mean()
    search_var = _between(per_unit, ["row", "fold"], None, offset=within_unit + noise_part)
    if math.isfinite(search_var):
        estimated["search_sd"] = math.sqrt(max(0.0, search_var))
    return replace(base, **estimated, estimated=tuple(k for k in estimated if k.endswith(("_sd", "_fraction"))))


def _between(table: Any, keys: list[str], noise_var: float | None, offset: float = 0.0) -> float:
    """Pooled variance of ``mean`` within groups of ``keys`` minus what noise (per value ``noise_var / n``)
    or ``offset`` explains; NaN when no group has two members."""
    groups = [g for _, g in table.groupby(keys) if len(g) > 1]
    if not groups:
        return math.nan
    ss = sum(float(((g["mean"] - g["mean"].mean()) ** 2).sum()) for g in groups)
    df = sum(len(g) - 1 for g in groups)
    explained = offset
    if noise_var is not None:
        if not math.isfinite(noise_var):
            return math.nan
        explained += noise_var * float(np.mean([float((1 / g["n"]).mean()) for g in groups]))
    return ss / df - explained


# ------------------------------------------------------------------------- the tables of docs/analysis.md
def verdict_tables(studies: int = 1000, seed: int = 0) -> list[str]:
    """The A/A, power and coverage tables of docs/analysis.md (``avn-study bench verdicts``), as Markdown.

    A/A: three rows of one arm, two contrasts under Holm, the share of studies with any verdict; this
    version (a search per seed, 2 seeds) and, in brackets, the earlier verdict (one search per row and
    fold or per row, the same 2 seeds, runs taken as independent). Power: a +0.05 row against the
    reference with a third null row, same designs. Coverage: the 95 % interval of a planted +0.05 shift.
    """
    sizes, folds = (10, 30, 100), (3, 5)
    head = (
        "| protocol | tuning luck SD | run luck SD | "
        + " | ".join(f"n={n}, K={k}" for n in sizes for k in folds)
        + " |"
    )
    rule = "|---|---|---|" + "---|" * (len(sizes) * len(folds))
    lines = [f"A/A: share of {studies} simulated studies with any verdict (nominal 5 %); this version [earlier]", "",
             head, rule]  # fmt: skip
    power_lines = [f"Power at +0.05 (share of {studies} studies that find it); this version [earlier]", "", head, rule]
    for i, (protocol, tau, run_sd) in enumerate(itertools.product(PROTOCOLS, (0.0, 0.02, 0.05), (0.01, 0.05))):
        components = Components(search_sd=tau, run_sd=run_sd)
        aa, pw = [], []
        for n, k in itertools.product(sizes, folds):
            new, old = Design(protocol, n, k, 2, True), Design(protocol, n, k, 2, False)
            a = simulate_verdicts(new, components, [0, 0, 0], studies, seed + i).any_rate()
            b = simulate_verdicts(old, components, [0, 0, 0], studies, seed + i, verdict="runs").any_rate()
            aa.append(f"{100 * a:.1f} [{100 * b:.1f}]")
            if tau <= 0.02:
                c = simulate_verdicts(new, components, [0, 0.05, 0], studies, seed + i).rate(0)
                d = simulate_verdicts(old, components, [0, 0.05, 0], studies, seed + i, verdict="runs").rate(0)
                pw.append(f"{100 * c:.0f} [{100 * d:.0f}]")
        label = f"| {protocol} | {tau:g} | {run_sd:g} | "
        lines.append(label + " | ".join(aa) + " |")
        if pw:
            power_lines.append(label + " | ".join(pw) + " |")
    coverage = ["Coverage of the 95 % interval of a +0.05 shift (search luck 0.02, run luck 0.03, 3 folds x 2 "
                "seeds, a search per seed)", "", "| per-patient noise | n = 8 | n = 11 | n = 20 | n = 30 |",
                "|---|---|---|---|---|"]  # fmt: skip
    for name, df in (("normal, SD 0.05", math.inf), ("t with 2 df, scale 0.05", 2.0)):
        cells = [f"{100 * interval_coverage(n, df, studies // 2, seed):.1f} %" for n in (8, 11, 20, 30)]
        coverage.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, "", *power_lines, "", *coverage]


def interval_coverage(n: int, noise_df: float, studies: int, seed: int, effect: float = 0.05) -> float:
    """Share of simulated studies whose 95 % replicate interval covers a planted shift ``effect``."""
    from avn_study.analysis.inference import ShiftPermutation

    design = Design("nested_ablation", n, 3, 2, True)
    components = Components(search_sd=0.02, noise_df=noise_df, zero_fraction=0.0, mean=0.5, low=-9.0, high=9.0)
    runs = simulate_runs(design, components, [0.0, effect], studies, np.random.default_rng(seed + n))
    fold = _patient_folds(design)
    strata = np.repeat(np.arange(3), 4)
    is_row = np.tile([True, True, False, False], 3)
    covered = 0
    for study in runs:
        values = np.full((12, n), np.nan)
        for f in range(3):
            for j, (row, s) in enumerate(itertools.product((1, 0), (0, 1))):
                values[4 * f + j, fold == f] = study[row, s, fold == f]
        low, high = ShiftPermutation.from_units(values, is_row, strata, n_perm=2000).interval(0.05)
        covered += low <= effect <= high
    return covered / studies
