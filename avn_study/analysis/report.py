"""``avn-study analyze``: tables, statistics, plots and ``summary.md`` of an experiment folder."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from avn_study.analysis import plots
from avn_study.analysis.importance import parameter_importance
from avn_study.analysis.stats import (
    METRICS,
    N_BOOT,
    ablation_table,
    compare_rows,
    metric_spec,
    seed_spread,
    spread_warnings,
)
from avn_study.analysis.tables import Experiment, load_experiment, write_tables
from avn_study.errors import UsageError, look_up

# columns of the paper-style table: metric -> decimals
SHOWN = {"dice": 3, "dice_all": 3, "hd95_mm": 1, "lesion_fp": 2, "lesion_sensitivity": 2, "abs_volume_error_ml": 2}


@dataclass
class Analysis:
    experiment: Experiment
    reference: str
    metric: str
    ablation: pd.DataFrame
    comparison: pd.DataFrame
    spread: pd.DataFrame
    importance: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def summary(self) -> Path | None:
        return next((f for f in self.files if f.name == "summary.md"), None)


def default_reference(rows: list[str]) -> str:
    return "unet" if "unet" in rows else rows[0]


def analyze(path: str | Path, reference: str | None = None, metric: str = "dice", alpha: float = 0.05,
            n_boot: int = N_BOOT) -> Analysis:  # fmt: skip
    """Load an experiment and compute every table (nothing is written; see :func:`write_analysis`)."""
    experiment = load_experiment(path)
    metric_spec(metric)  # unknown metric names fail here, with a suggestion
    cases = experiment.evaluation_cases()
    rows = [r for r in experiment.rows if r in set(cases["row"])] if len(cases) else []
    if not rows:
        raise UsageError(f"{experiment.root}: no finished trial with per-case metrics yet; nothing to analyse")
    reference = look_up(reference, rows, what="reference row") if reference else default_reference(rows)
    ablation = ablation_table(cases, rows, n_boot=n_boot)
    comparison = compare_rows(cases, rows, reference, metric, alpha, n_boot)
    spread = seed_spread(cases, rows, metric)
    warnings = list(experiment.notes) + spread_warnings(comparison, spread)
    if experiment.protocol == "sweep" or not (experiment.trials["stage"] == 2).any():
        warnings.append("rows are compared on the tuning fold with the configuration chosen on it: optimistic; "
                        "a fair ablation (stage 2) re-trains on every fold")  # fmt: skip
    small = comparison[comparison["n_pairs"] < 6]
    if len(small):
        warnings.append(f"fewer than 6 paired patients for {', '.join(small['row'])}: the Wilcoxon test cannot "
                        "reach p < 0.05 (two-sided), whatever the effect")  # fmt: skip
    name = str(experiment.manifest.get("name", Path(path).name))
    importance = parameter_importance(experiment.root, experiment.rows, name)
    return Analysis(experiment, reference, metric, ablation, comparison, spread, importance, warnings)


def write_analysis(analysis: Analysis, out: Path) -> Analysis:
    """Parquet + CSV tables, PNG plots and ``summary.md`` in ``out``."""
    out = Path(out)
    exp = analysis.experiment
    files = write_tables(exp, out)
    for name in ("ablation", "comparison", "spread", "importance"):
        table: pd.DataFrame = getattr(analysis, name)
        table.to_csv(out / f"{name}.csv", index=False)
        files.append(out / f"{name}.csv")
    cases = exp.evaluation_cases()
    rows = list(analysis.ablation["row"])
    figures = out / "figures"
    files.append(plots.per_case_plot(cases, rows, analysis.reference, figures / "per_case.png", analysis.metric))
    evaluated = exp.history[exp.history["trial_id"].isin(set(exp.evaluation_trials()["trial_id"]))]
    files.append(plots.learning_curves(evaluated, rows, figures / "learning_curves.png"))
    files.append(plots.loss_weights(evaluated, rows, figures / "loss_weights.png"))
    if analysis.importance["importance"].notna().any():
        files.append(plots.importance_plot(analysis.importance.dropna(subset=["importance"]),
                                           figures / "importance.png"))  # fmt: skip
    (out / "summary.md").write_text(summary_markdown(analysis, figures.relative_to(out)))
    files.append(out / "summary.md")
    analysis.files = files
    return analysis


def _cell(row: pd.Series, metric: str, decimals: int) -> str:
    mean = row.get(f"{metric}_mean", math.nan)
    if not isinstance(mean, float) or not math.isfinite(mean):
        return "-"
    sd, low, high = row[f"{metric}_sd"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    text = f"{mean:.{decimals}f}"
    text += f" ± {sd:.{decimals}f}" if math.isfinite(sd) else ""
    text += f" [{low:.{decimals}f}, {high:.{decimals}f}]" if math.isfinite(low) else ""
    return text


def ablation_markdown(analysis: Analysis) -> str:
    """The paper-style table: per row its metrics and the paired comparison with the reference."""
    shown = [m for m in SHOWN if f"{m}_mean" in analysis.ablation]
    header = ["row", "arm", "schedule", "patients (with necrosis)", "seeds", "folds",
              *(METRICS[m].label for m in shown), f"Δ {analysis.metric} vs {analysis.reference} [95% CI]",
              "p (Holm)", "r", "verdict"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    comparison = analysis.comparison.set_index("row")
    for _, row in analysis.ablation.iterrows():
        necrotic = f" ({row['dice_n']})" if "dice_n" in row else ""
        cells = [f"**{row['row']}**", str(row["arm"]), str(row["schedule"]), f"{row['n_patients']}{necrotic}",
                 str(row["n_seeds"]), str(row["n_folds"]), *(_cell(row, m, SHOWN[m]) for m in shown)]  # fmt: skip
        if row["row"] in comparison.index:
            c = comparison.loc[row["row"]]
            ci = f" [{c.diff_ci_low:+.3f}, {c.diff_ci_high:+.3f}]" if math.isfinite(c.diff_ci_low) else ""
            cells += [f"{c.mean_diff:+.3f}{ci}", _p(c.p_holm), f"{c.rank_biserial:+.2f}", str(c.verdict)]
        else:
            cells += ["reference", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _table(frame: pd.DataFrame, decimals: int = 3) -> str:
    if frame.empty:
        return "(none)"
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(f"{v:.{decimals}f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def summary_markdown(analysis: Analysis, figures: Path) -> str:
    exp = analysis.experiment
    trials = exp.trials
    evaluated = exp.evaluation_trials()
    counts = trials.groupby(["stage", "status"]).size().reset_index(name="trials")
    split = ", ".join(sorted({h[:12] for h in trials["split_hash"] if h})) or "unknown"
    parts = [
        f"# Ablation report: {exp.manifest.get('name', exp.root.name)}",
        f"Experiment `{exp.root}` ({exp.protocol}); split {split}; statistics on {len(evaluated)} finished "
        f"trial(s) of stage {', '.join(map(str, sorted(set(evaluated['stage']))))}.",
        "## Ablation table",
        f"Per row: mean ± SD over patients [95% bootstrap CI]. Comparison with **{analysis.reference}** on "
        f"per-patient {analysis.metric}: mean difference [95% paired bootstrap CI], Wilcoxon signed-rank p "
        "(Holm-corrected across rows), rank-biserial r. Rows are listed in the order of the search-space file; "
        "a row is called better or worse only when its corrected p < 0.05.",
        ablation_markdown(analysis),
    ]
    if analysis.warnings:
        parts += ["## Warnings", "\n".join(f"- {w}" for w in analysis.warnings)]
    spread = analysis.spread.copy()
    parts += [
        "## Seed spread",
        f"SD across seeds of each row's mean per-patient {analysis.metric}.",
        _table(spread),
        "## Figures",
        f"![per-patient {analysis.metric}]({figures}/per_case.png)",
        f"![learning curves]({figures}/learning_curves.png)",
        f"![loss weights]({figures}/loss_weights.png)",
    ]
    if (analysis.importance["importance"].notna()).any():
        parts.append(f"![parameter importance]({figures}/importance.png)")
    parts += ["## Parameter importance (Optuna, PED-ANOVA, stage 1)", _table(analysis.importance)]
    parts += [
        "## Trials",
        _table(counts),
        "## How these numbers are computed",
        "The unit is the patient: a patient's value is the mean over its validation cases in one run, then over "
        "the row's seeds. Dice is over cases with necrosis; `dice_all` uses the empty-mask rule on every case. "
        "CIs: percentile bootstrap over patients (10,000 resamples, seed 0). Errored and unfinished trials are "
        "listed above and left out. Everything comes from the per-case metrics stored in the trial folders.",
    ]
    return "\n\n".join(parts) + "\n"
