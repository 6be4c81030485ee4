"""The verdict's claims proved by simulating whole studies: every source a rerun changes (patients, seeds,
the search) varies; seeded, a few seconds in all. The tables in docs/analysis.md come from the same code
(``avn-study bench verdicts``)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from avn_study.analysis.design import (
    Components,
    Design,
    attainable_p,
    detectable_effect,
    estimate_components,
    patient_floor,
    power,
    replicate_floor,
    simulate_runs,
    simulate_verdicts,
)
from avn_study.analysis.inference import ShiftPermutation, holm_levels, labellings
from avn_study.analysis.stats import compare_contrasts

STUDIES = 400  # per cell: the Monte Carlo SD of a 5 % rate is 1.1 points
MC_LIMIT = 0.05 + 2.5 * math.sqrt(0.05 * 0.95 / STUDIES)

GRID = list(itertools.product(
    ("nested_ablation", "fair_ablation"), (0.0, 0.02, 0.05), (0.01, 0.05), (10, 30, 100), (3, 5),
))  # fmt: skip


def test_aa_three_identical_rows_under_holm_hold_5_percent_on_the_whole_grid() -> None:
    """Tuning luck SD 0 / 0.02 / 0.05, run luck 0.01 / 0.05, 10-100 patients, 3 and 5 folds, both
    protocols: three rows of one arm, two contrasts under Holm. The verdict with pipeline replicates
    (a search per seed) holds the family-wise rate; the earlier verdict (one search per row and fold,
    runs taken as independent) does not once the search has luck."""
    worst_new, worst_old = 0.0, 0.0
    for i, (protocol, tau, run_sd, n, folds) in enumerate(GRID):
        components = Components(search_sd=tau, run_sd=run_sd)
        new = simulate_verdicts(Design(protocol, n, folds, 2, True), components, [0, 0, 0], STUDIES, seed=i)
        assert new.any_rate() <= MC_LIMIT, (protocol, tau, run_sd, n, folds, new.any_rate())
        worst_new = max(worst_new, new.any_rate())
        if tau == 0.05:
            old = simulate_verdicts(Design(protocol, n, folds, 2, False), components, [0, 0, 0], STUDIES, seed=i,
                                    verdict="runs")  # fmt: skip
            worst_old = max(worst_old, old.any_rate())
    assert worst_new <= MC_LIMIT and worst_old > 0.2  # the 11-38 % (and worse for fair ablations)


def test_with_no_tuning_luck_the_new_verdict_has_the_old_ones_power_draw_for_draw() -> None:
    # where the earlier verdict was valid (the search has no luck) a search per seed costs no power: on the
    # same simulated patients, runs and noise the replicate test is the run test, so the verdicts agree
    for protocol, run_sd, n, folds in itertools.product(PROTOCOLS, (0.01, 0.05), (10, 30), (3, 5)):
        components = Components(search_sd=0.0, run_sd=run_sd)
        new = simulate_verdicts(Design(protocol, n, folds, 2, True), components, [0, 0.05, 0], 200, seed=n)
        old = simulate_verdicts(Design(protocol, n, folds, 2, False), components, [0, 0.05, 0], 200, seed=n,
                                verdict="runs")  # fmt: skip
        assert new.rate(0) >= old.rate(0), (protocol, run_sd, n, folds)
    assert power(Design("nested_ablation", 30, 5, 2, True), Components(search_sd=0.0, run_sd=0.01), 0.05) > 0.8


PROTOCOLS = ("nested_ablation", "fair_ablation")


def test_designs_that_can_never_reach_a_verdict_are_known_in_advance() -> None:
    # one replicate per row and fold: 2^F labellings, and Holm over 2 contrasts needs p < 0.025
    assert replicate_floor(Design("nested_ablation", 30, 5, 3, False)) == pytest.approx(2 / 2**5)
    assert replicate_floor(Design("nested_ablation", 30, 6, 1, True)) == pytest.approx(2 / 2**6)
    assert replicate_floor(Design("fair_ablation", 30, 4, 3, False)) == 1.0  # one search for every fold
    assert replicate_floor(Design("nested_ablation", 30, 3, 2, True)) == pytest.approx(2 / 6**3)
    assert replicate_floor(Design("nested_ablation", 30, 2, 2, True)) == pytest.approx(2 / 36)
    assert patient_floor(6) == pytest.approx(2 / 64) and patient_floor(5) == pytest.approx(1 / 16)
    assert attainable_p(Design("nested_ablation", 9, 3, 2, True), tied=4) == pytest.approx(1 / 16)
    assert math.isinf(detectable_effect(Design("nested_ablation", 30, 5, 1, True), Components(), contrasts=2))
    assert simulate_verdicts(Design("nested_ablation", 30, 6, 1, True), Components(), [0, 0.5, 0.5], 50,
                             seed=0).any_rate() == 0.0  # fmt: skip


def test_the_simulated_study_has_the_structure_it_claims() -> None:
    rng = np.random.default_rng(0)
    design = Design("nested_ablation", 20, 4, 3, False)
    runs = simulate_runs(design, Components(zero_fraction=0.0, noise_sd=0.0, run_sd=0.0, patient_sd=0.0,
                                            search_sd=0.1), [0.0, 0.0], 200, rng)  # fmt: skip
    fold = np.arange(20) % 4
    # one search per fold: its seeds agree, and every patient of a fold gets the fold's value
    assert np.allclose(runs[:, :, 0], runs[:, :, 2])
    assert np.allclose(runs[:, :, :, fold == 1], runs[:, :, :, [1]])
    per_seed = simulate_runs(Design("nested_ablation", 20, 4, 3, True), Components(zero_fraction=0.0, noise_sd=0.0,
                             run_sd=0.0, patient_sd=0.0, search_sd=0.1), [0.0, 0.0], 200, rng)  # fmt: skip
    assert np.std(per_seed[:, 0, 0] - per_seed[:, 0, 1]) == pytest.approx(0.1 * math.sqrt(2), rel=0.15)


# --------------------------------------------------------------------------- the test and its interval
def test_the_interval_is_the_tests_inversion_and_excludes_0_exactly_when_it_rejects() -> None:
    rng = np.random.default_rng(5)
    for _ in range(60):
        values = rng.normal(0.5, 0.1, (8, 12))
        values[:4] += rng.normal(0.03, 0.03)
        is_row = np.array([True, False] * 4)
        strata = np.repeat([0, 1, 2, 3], 2)
        values[np.ix_([0, 1], range(3, 12))] = np.nan  # stratum 0 evaluates patients 0-2, and so on
        values[np.ix_([2, 3], [*range(0, 3), *range(6, 12)])] = np.nan
        values[np.ix_([4, 5], [*range(0, 6), *range(9, 12)])] = np.nan
        values[np.ix_([6, 7], range(0, 9))] = np.nan
        test = ShiftPermutation.from_units(values, is_row, strata)
        for alpha in (0.05, 0.2, 0.4):
            low, high = test.interval(alpha)
            assert low <= test.estimate <= high
            assert (low > 0 or high < 0) == (test.p(0.0) <= alpha)
            if math.isfinite(low):
                assert test.p(low - 1e-6) <= alpha < test.p(low + 1e-6)
            else:  # 2^4 labellings: no p below 2/16
                assert test.min_p > alpha


def test_the_statistic_is_linear_in_a_shift() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0.5, 0.1, (6, 10))
    is_row, strata = np.array([1, 1, 0, 0, 1, 0], bool), np.array([0, 0, 0, 0, 1, 1])
    test = ShiftPermutation.from_units(values, is_row, strata)
    shifted = values - 0.07 * is_row[:, None]
    again = ShiftPermutation.from_units(shifted, is_row, strata)
    assert np.allclose(again.t, test.t - 0.07 * test.a)
    assert test.a[0] == pytest.approx(1.0) and np.all(np.abs(test.a) <= 1 + 1e-12)
    assert labellings(is_row, strata)[0].shape == (6 * 2, 6)  # C(4,2) x C(2,1)


@pytest.mark.parametrize("noise_df", [math.inf, 2.0])
def test_the_interval_covers_under_a_shift_with_normal_and_t2_noise(noise_df: float) -> None:
    """Coverage of the 95 % interval of a planted +0.05 shift, 11 and 30 patients: at least nominal,
    normal or heavy-tailed (t with 2 df) per-patient noise, with search and run luck."""
    for n in (11, 30):
        design = Design("nested_ablation", n, 3, 2, True)
        components = Components(search_sd=0.02, noise_df=noise_df, zero_fraction=0.0, mean=0.5, low=-9, high=9)
        runs = simulate_runs(design, components, [0.0, 0.05], 300, np.random.default_rng(n))
        covered = 0
        fold = np.arange(n) % 3
        strata = np.array([f for f in range(3) for _ in range(4)])
        for study in runs:
            values = np.full((12, n), np.nan)
            is_row = np.zeros(12, bool)
            for f in range(3):
                for j, (row, seed) in enumerate(itertools.product((1, 0), (0, 1))):
                    values[4 * f + j, fold == f] = study[row, seed, fold == f]
                    is_row[4 * f + j] = row == 1
            low, high = ShiftPermutation.from_units(values, is_row, strata, n_perm=2000).interval(0.05)
            covered += low <= 0.05 <= high
        assert covered / 300 >= 0.95 - 2.5 * math.sqrt(0.05 * 0.95 / 300), (n, noise_df, covered)


def test_holm_levels_make_the_interval_agree_with_the_corrected_verdict() -> None:
    p = [0.001, 0.04, 0.012, 0.3]
    levels = holm_levels(p, 0.05)
    assert levels == pytest.approx([0.05 / 4, 0.05 / 2, 0.05 / 3, 0.05 / 2])  # 0.04 stops Holm at 0.05/2
    assert [pi < level for pi, level in zip(p, levels, strict=True)] == [True, False, True, False]


# ------------------------------------------------------------------------------------ the real thing
def replicate_cases(rng: np.random.Generator, effects: dict[str, float], n: int = 24, folds: int = 3,
                    seeds: int = 2, search_sd: float = 0.03) -> pd.DataFrame:  # fmt: skip
    """A per-case table of a nested ablation with a search per seed (``unit``: the search)."""
    difficulty = rng.normal(0.55, 0.15, n)
    fold_of = np.arange(n) % folds
    records = []
    for row, effect in effects.items():
        for fold in range(folds):
            for seed in range(seeds):
                luck = rng.normal(0, search_sd) + rng.normal(0, 0.02)
                for p in np.flatnonzero(fold_of == fold):
                    records.append({"row": row, "unit": f"stage1-{row}-outer{fold}-seed{seed}", "fold": fold,
                                    "seed": seed, "repeat": 0, "patient": f"P{p:02d}", "case": f"P{p:02d}",
                                    "dice": difficulty[p] + effect + luck + rng.normal(0, 0.05),
                                    "has_necrosis": 1.0})  # fmt: skip
    return pd.DataFrame(records)


def test_compare_contrasts_on_a_case_table_answers_each_question_with_its_own_family() -> None:
    rng = np.random.default_rng(11)
    cases = replicate_cases(rng, {"unet": 0.0, "seg+loc": 0.12, "seg+loc/no-gate": 0.12})
    contrasts = [("Does localisation help?", "seg+loc", "unet"), ("Is it the gate?", "seg+loc", "seg+loc/no-gate")]
    table = compare_contrasts(cases, contrasts).set_index("question")
    helps, gate = table.loc["Does localisation help?"], table.loc["Is it the gate?"]
    assert helps.verdict == "better than unet" and helps.reference == "unet"
    assert helps.n_replicates_row == 6 and helps.p_replicates == pytest.approx(2 / 6**3)
    assert helps.diff_ci_low > 0 and helps.ci_level == pytest.approx(1 - 0.05 / 2)
    assert gate.verdict == "not distinguishable from seg+loc/no-gate"
    assert gate.diff_ci_low < 0 < gate.diff_ci_high


def test_estimated_components_recover_the_planted_ones() -> None:
    design = Design("nested_ablation", 60, 3, 3, True)
    truth = Components(patient_sd=0.12, noise_sd=0.06, run_sd=0.03, search_sd=0.04, zero_fraction=0.2)
    runs = simulate_runs(design, truth, [0.0, 0.0], 1, np.random.default_rng(3))[0]
    fold = np.arange(60) % 3
    frame = pd.DataFrame([
        {"row": r, "unit": f"{r}-{fold[p]}-{s}", "fold": int(fold[p]), "run": f"{fold[p]}-{s}", "patient": p,
         "value": runs[r, s, p]} for r in (0, 1) for s in range(3) for p in range(60)
    ])  # fmt: skip
    estimate = estimate_components(frame)
    assert set(estimate.estimated) >= {"patient_sd", "noise_sd", "search_sd", "zero_fraction"}
    assert estimate.noise_sd == pytest.approx(0.06, rel=0.25)
    assert estimate.zero_fraction == pytest.approx(0.2, abs=0.1)
    assert estimate.search_sd + estimate.run_sd == pytest.approx(0.07, abs=0.04)
