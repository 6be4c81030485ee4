"""The statistics against synthetic results with known effects (no Ray, no training)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from avn_study.analysis.stats import (
    ablation_table,
    bootstrap_ci,
    compare_paired,
    compare_rows,
    holm,
    patient_values,
    seed_spread,
    spread_warnings,
)


def synthetic_cases(effects: dict[str, float], patients: int = 20, seeds: int = 3, cases_per_patient: int = 2,
                    noise: float = 0.05, patient_sd: float = 0.15, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """A per-case table like the experiment's: each row adds its effect to a shared patient difficulty."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.6, patient_sd, size=patients)
    records = []
    for row, effect in effects.items():
        for s in range(seeds):
            for p in range(patients):
                for c in range(cases_per_patient):
                    records.append({
                        "trial_id": f"{row}-{s}-{p % 3}", "row": row, "arm": row, "schedule": "constant",
                        "fold": p % 3, "seed": s, "repeat": 0, "patient": f"P{p:02d}", "case": f"P{p:02d}_{c}",
                        "dice": float(difficulty[p] + effect + rng.normal(0, noise)), "has_necrosis": 1.0,
                        "lesion_fp": float(rng.poisson(1.0)), "hd95_mm": float(rng.gamma(2, 3)),
                    })  # fmt: skip
    return pd.DataFrame(records)


def test_patient_is_the_unit_cases_then_seeds_are_averaged() -> None:
    cases = pd.DataFrame([
        {"row": "a", "seed": 0, "repeat": 0, "patient": "P1", "case": "c1", "dice": 0.2, "has_necrosis": 1.0},
        {"row": "a", "seed": 0, "repeat": 0, "patient": "P1", "case": "c2", "dice": 0.4, "has_necrosis": 1.0},
        {"row": "a", "seed": 1, "repeat": 0, "patient": "P1", "case": "c1", "dice": 0.9, "has_necrosis": 1.0},
        {"row": "a", "seed": 0, "repeat": 0, "patient": "P2", "case": "c3", "dice": 0.0, "has_necrosis": 0.0},
    ])  # fmt: skip
    values = patient_values(cases, "dice")
    # P1: seed 0 -> mean(0.2, 0.4) = 0.3; seed 1 -> 0.9; patient value 0.6. P2 has no necrosis: excluded
    assert values[["patient", "value", "n_runs"]].values.tolist() == [["P1", pytest.approx(0.6), 2]]
    everyone = patient_values(cases, "dice_all")
    assert sorted(everyone["patient"]) == ["P1", "P2"]


def test_holm_matches_the_textbook_example() -> None:
    # p = (0.01, 0.04, 0.03, 0.005): sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 with running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, float("nan"), 0.01])
    assert adjusted[0] == pytest.approx(0.2) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.5, 0.1, 10), rng.normal(0.5, 0.1, 1000)
    low_s, high_s = bootstrap_ci(small)
    low_l, high_l = bootstrap_ci(large, n_boot=2000)
    assert low_s < small.mean() < high_s and low_l < large.mean() < high_l
    assert (high_l - low_l) < (high_s - low_s) / 5
    # about 1.96 standard errors each side for a large normal sample; near Student's t for small ones
    assert high_l - low_l == pytest.approx(2 * 1.96 * large.std(ddof=1) / np.sqrt(1000), rel=0.1)
    ratios = []
    for i in range(100):
        x = rng.normal(0.5, 0.1, 10)
        low, high = bootstrap_ci(x, n_boot=1000, seed=i)
        ratios.append((high - low) / (2 * scipy_stats.t.ppf(0.975, 9) * x.std(ddof=1) / np.sqrt(10)))
    assert np.median(ratios) == pytest.approx(1.0, abs=0.08)
    assert np.isnan(bootstrap_ci(np.array([0.3]))[0])
    assert bootstrap_ci(np.array([0.3, 0.3, 0.3])) == (0.3, 0.3)


def test_a_known_effect_is_found_with_the_right_sign_size_and_correction() -> None:
    cases = synthetic_cases({"unet": 0.0, "big": 0.08, "none": 0.0, "worse": -0.06})
    table = compare_rows(cases, ["unet", "big", "none", "worse"], "unet", n_boot=2000).set_index("row")
    assert table.loc["big", "mean_diff"] == pytest.approx(0.08, abs=0.02)
    assert table.loc["big", "diff_ci_low"] < 0.08 < table.loc["big", "diff_ci_high"]
    assert table.loc["big", "verdict"] == "better than unet"
    assert table.loc["worse", "verdict"] == "worse than unet"
    assert table.loc["none", "verdict"] == "not distinguishable from unet"
    assert table.loc["big", "rank_biserial"] > 0.9 and table.loc["worse", "rank_biserial"] < -0.9
    assert (table["p_holm"] >= table["p"]).all()
    # the patient-level test is scipy's on the per-patient differences (seeds and cases averaged)
    values = patient_values(cases, "dice").pivot(index="patient", columns="row", values="value")
    expected = scipy_stats.wilcoxon(values["big"] - values["unet"]).pvalue
    assert table.loc["big", "p_patients"] == pytest.approx(expected)
    # the run-level test: 3 folds x (3 + 3 runs) = 20^3 labellings, the observed one the most extreme
    assert table.loc["big", "p_replicates"] == pytest.approx(2 / 20**3)
    assert table.loc["big", "p"] == max(table.loc["big", "p_patients"], table.loc["big", "p_replicates"])
    assert table.loc["big", "n_pairs"] == 20 and table.loc["big", "n_replicates_row"] == 9


def test_lower_is_better_metrics_flip_the_verdict() -> None:
    cases = synthetic_cases({"unet": 0.0, "b": 0.0})
    cases.loc[cases["row"] == "b", "hd95_mm"] -= 5.0  # b has clearly smaller distances
    table = compare_rows(cases, ["unet", "b"], "unet", metric="hd95_mm", n_boot=500)
    assert table.iloc[0]["verdict"] == "better than unet"


def test_a_null_effect_is_declared_significant_at_most_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(7)
    simulations, alpha, hits = 400, 0.05, 0
    for _ in range(simulations):
        base = rng.normal(0.6, 0.15, 15)
        matrix = pd.DataFrame({"ref": base + rng.normal(0, 0.05, 15), "arm": base + rng.normal(0, 0.05, 15)})
        verdict = compare_paired(matrix, "ref", n_boot=50, alpha=alpha).iloc[0]["verdict"]
        hits += not verdict.startswith("not distinguishable")
    rate = hits / simulations
    # nominal 5%; the upper bound leaves 3 binomial SDs (sd = 1.1% at n = 400)
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / simulations)
    assert rate > 0.005  # and the test is not vacuously conservative


def test_ablation_table_counts_and_ci() -> None:
    cases = synthetic_cases({"unet": 0.0, "big": 0.1}, patients=12, seeds=2)
    table = ablation_table(cases, ["unet", "big"], metrics=["dice", "lesion_fp"], n_boot=1000).set_index("row")
    assert table.loc["big", "n_patients"] == 12 and table.loc["big", "n_seeds"] == 2
    assert table.loc["big", "n_folds"] == 3
    assert table.loc["big", "dice_ci_low"] < table.loc["big", "dice_mean"] < table.loc["big", "dice_ci_high"]
    assert table.loc["big", "dice_mean"] - table.loc["unet", "dice_mean"] == pytest.approx(0.1, abs=0.03)


def test_seed_spread_and_the_warning_when_a_difference_is_within_it() -> None:
    cases = synthetic_cases({"unet": 0.0, "tiny": 0.005}, seeds=4, noise=0.01)
    # make seed means of 'tiny' wander by +-0.05: the 0.005 difference is then within the spread
    shift = {0: 0.05, 1: -0.05, 2: 0.05, 3: -0.05}
    tiny = cases["row"] == "tiny"
    cases.loc[tiny, "dice"] += cases.loc[tiny, "seed"].map(shift)
    spread = seed_spread(cases, ["unet", "tiny"])
    sd = spread.set_index("row")["seed_sd"]
    assert sd["tiny"] == pytest.approx(np.std([0.05, -0.05, 0.05, -0.05], ddof=1), rel=0.2)
    comparison = compare_rows(cases, ["unet", "tiny"], "unet", n_boot=500)
    warnings = spread_warnings(comparison, spread)
    assert any("tiny vs unet" in w and "seed spread" in w for w in warnings)
    single = seed_spread(synthetic_cases({"unet": 0.0}, seeds=1), ["unet"])
    assert any("one seed" in w for w in spread_warnings(comparison.iloc[0:0], single))


def test_unknown_metric_gets_a_suggestion() -> None:
    from avn_study.errors import UsageError

    with pytest.raises(UsageError, match="did you mean 'dice'"):
        compare_rows(synthetic_cases({"unet": 0.0, "b": 0.0}), ["unet", "b"], "unet", metric="dic")
