"""``avn-study analyze``: tables, statistics, plots and ``summary.md`` of an experiment folder."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from avn_study.analysis import plots, stats
from avn_study.analysis.importance import parameter_importance
from avn_study.analysis.stats import (
    METRICS,
    N_BOOT,
    ablation_table,
    capped_psnr_cases,
    compare_contrasts,
    metric_spec,
    seed_spread,
    spread_warnings,
)
from avn_study.analysis.tables import Experiment, load_experiment, write_tables
from avn_study.errors import UsageError, look_up
from avn_study.vocabulary import NNUNET_ARMS

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
    test_ablation: pd.DataFrame = field(default_factory=pd.DataFrame)  # the held-out test set, when there is one
    test_comparison: pd.DataFrame = field(default_factory=pd.DataFrame)
    calibration: pd.DataFrame | None = None  # per row: ECE over the femoral head region (when recorded)
    overlays: bool = False  # figures/overlays.png was drawn
    primary: bool = True  # ``metric`` is the study's declared primary metric (else the verdicts are exploratory)
    alpha: float = 0.05
    compute: pd.DataFrame = field(default_factory=pd.DataFrame)  # per row: parameters, compute hours, peak memory

    @property
    def tuning_only(self) -> bool:
        """The table shows tuning results (a sweep, or stage 2 not run): no verdicts."""
        return self.experiment.reported_stage == 1

    @property
    def summary(self) -> Path | None:
        return next((f for f in self.files if f.name == "summary.md"), None)


def default_reference(rows: list[str]) -> str:
    return "unet" if "unet" in rows else rows[0]


NO_VERDICT = "no verdict: tuning results (chosen on these patients)"


def analyze(path: str | Path, reference: str | None = None, metric: str | None = None, alpha: float | None = None,
            n_boot: int = N_BOOT) -> Analysis:  # fmt: skip
    """Load an experiment and compute every table (nothing is written; see :func:`write_analysis`).

    The verdicts are on the study's declared primary metric and contrasts (one Holm family); another
    ``metric``, or a ``reference`` that replaces the declared contrasts by "every row against it", gives
    exploratory verdicts, labelled so. The held-out test set is its own family.
    """
    experiment = load_experiment(path)
    metric = metric or experiment.primary_metric
    metric_spec(metric)  # unknown metric names fail here, with a suggestion
    alpha = experiment.alpha if alpha is None else alpha
    cases = experiment.evaluation_cases()
    rows = [r for r in experiment.rows if r in set(cases["row"])] if len(cases) else []
    if not rows:
        raise UsageError(f"{experiment.root}: no finished trial with per-case metrics yet; nothing to analyse")
    reference = look_up(reference, rows, what="reference row") if reference else None
    contrasts = experiment.contrasts(rows, reference)
    shown_reference = reference or (contrasts[0][2] if contrasts else default_reference(rows))
    ablation = ablation_table(cases, rows, n_boot=n_boot)
    comparison = compare_contrasts(cases, contrasts, metric, alpha)
    spread = seed_spread(cases, rows, metric)
    warnings = list(experiment.notes) + spread_warnings(comparison, spread)
    test_ablation, test_comparison = pd.DataFrame(), pd.DataFrame()
    if experiment.reported_stage == 1:
        comparison["verdict"] = NO_VERDICT
        warnings.append("rows are compared on the patients their configuration was chosen on: optimistic, and no "
                        "verdict is given; an ablation protocol (nested_ablation, fair_ablation) reports patients "
                        "that took no part in the choice")  # fmt: skip
    else:
        test = experiment.evaluation_test_cases()
        test_rows = [r for r in rows if len(test) and r in set(test["row"])]
        test_contrasts = [c for c in contrasts if c[1] in test_rows and c[2] in test_rows]
        if test_contrasts:
            test_ablation = ablation_table(test, test_rows, n_boot=n_boot)
            test_comparison = compare_contrasts(test, test_contrasts, metric, alpha)
        warnings += _design_warnings(comparison, alpha)
    primary = metric == experiment.primary_metric and reference is None
    if not primary:
        warnings.append(f"exploratory verdicts: the study declared {experiment.primary_metric} and its own "
                        f"contrasts; {metric} against {shown_reference} is a family the study was not run to "
                        "decide")  # fmt: skip
    psnr_capped = capped_psnr_cases(cases)
    if psnr_capped:
        warnings.append(f"{psnr_capped} case(s) had a perfect reconstruction (PSNR +inf); they count as "
                        f"{stats.PSNR_CAP_DB:.1f} dB (a one-ulp float32 error)")  # fmt: skip
    importance = _importance(experiment, warnings)
    return Analysis(experiment, shown_reference, metric, ablation, comparison, spread, importance, warnings,
                    test_ablation=test_ablation, test_comparison=test_comparison, primary=primary, alpha=alpha,
                    compute=row_compute(experiment))  # fmt: skip


def _importance(experiment: Experiment, warnings: list[str]) -> pd.DataFrame:
    """Parameter importance from the study's Optuna journal, checked first: a damaged journal is a warning
    (the rest of the report stands), not Optuna's traceback."""
    from avn_study.analysis.importance import COLUMNS
    from avn_study.study.check import DamagedFile, check_journal
    from avn_study.study.folder import JOURNAL

    try:
        check_journal(experiment.root / JOURNAL, [])
    except DamagedFile as error:
        warnings.append(f"{error.path}: {error.problem.split('. ')[0]}; parameter importance is not computed")
        return pd.DataFrame(columns=COLUMNS)
    return parameter_importance(experiment.root, experiment.manifest, experiment.rows)


def _design_warnings(comparison: pd.DataFrame, alpha: float) -> list[str]:
    """What the design cannot show, whatever the data: too few patients that differ, or too few replicates,
    for the level Holm's first step asks of a family of this size."""
    warnings, m = [], max(1, int(comparison["p"].notna().sum()))
    level = alpha / m
    floor = comparison["n_untied"].map(lambda n: 2.0 ** (1 - n) if n and n > 0 else 1.0)
    small = comparison[floor >= level]
    if len(small):
        warnings.append(f"too few patients whose values differ for {', '.join(_labels(small))}: the Wilcoxon test "
                        f"cannot go below p = {floor[small.index].min():.3g}, and Holm's first step over {m} "
                        f"contrast(s) needs p < {level:.3g} (tied pairs, both rows at 0, do not count)")  # fmt: skip
    coarse = comparison[comparison["p_replicates_min"] >= level]
    if len(coarse):
        smallest = coarse["p_replicates_min"].min()
        warnings.append(f"too few pipeline replicates for {', '.join(_labels(coarse))}: the replicate test (a "
                        f"search and its runs as the random unit) cannot go below p = {smallest:.3g}, and Holm "
                        f"over {m} contrast(s) needs p < {level:.3g}, so no verdict can be significant; give "
                        "every seed its own search (search_per_seed: true) with 2+ seeds and 3+ folds")  # fmt: skip
    return warnings


def _labels(table: pd.DataFrame) -> list[str]:
    return [f"{t.row} vs {t.reference}" for t in table.itertuples()]


def row_compute(experiment: Experiment) -> pd.DataFrame:
    """Per row: parameters, the training compute it used (stage 1 and stage 2, every trial that ran) and
    its trials' peak memory, so that a row that wins only by spending more is visible."""
    trials = experiment.trials
    resources = (experiment.manifest.get("resources") or (experiment.manifest.get("space") or {}).get("resources")
                 or {})  # fmt: skip
    gpu, cpu = float(resources.get("gpu", 0) or 0), float(resources.get("cpu", 1) or 1)
    share, unit = (gpu, "GPU-h") if gpu > 0 else (cpu, "CPU-h")
    sizes = row_parameters(experiment)
    out = []
    for row, group in trials.groupby("row", sort=False):
        seconds = pd.to_numeric(group["train_seconds"], errors="coerce").fillna(0.0)
        memory = pd.to_numeric(group["peak_memory_mb"], errors="coerce") if "peak_memory_mb" in group else None
        out.append({
            "row": str(row), "parameters": sizes.get(str(row), "-"),
            "stage1_hours": float(seconds[group["stage"] == 1].sum() * share / 3600),
            "stage2_hours": float(seconds[group["stage"] == 2].sum() * share / 3600),
            "unit": unit,
            "peak_memory_mb": float(memory.max()) if memory is not None and memory.notna().any() else float("nan"),
        })  # fmt: skip
    return pd.DataFrame(out, columns=["row", "parameters", "stage1_hours", "stage2_hours", "unit", "peak_memory_mb"])


def write_analysis(analysis: Analysis, out: Path) -> Analysis:
    """Parquet + CSV tables, PNG plots and ``summary.md`` in ``out``."""
    out = Path(out)
    exp = analysis.experiment
    files = write_tables(exp, out)
    for name in ("ablation", "comparison", "spread", "importance", "test_ablation", "test_comparison", "compute"):
        table: pd.DataFrame = getattr(analysis, name)
        if name.startswith("test_") and table.empty:
            continue
        table.to_csv(out / f"{name}.csv", index=False)
        files.append(out / f"{name}.csv")
    excluded = exp.excluded()
    if len(excluded):
        excluded.to_csv(out / "excluded.csv", index=False)
        files.append(out / "excluded.csv")
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
    calibration = exp.calibration()
    if len(calibration):
        files.append(plots.reliability(calibration, rows, figures / "reliability.png"))
        analysis.calibration = plots.expected_calibration_error(calibration)
        analysis.calibration.to_csv(out / "calibration.csv", index=False)
        files.append(out / "calibration.csv")
    overlay = plots.overlays(exp.overlays(), rows, figures / "overlays.png")
    if overlay is not None:
        files.append(overlay)
        analysis.overlays = True
    (out / "summary.md").write_text(summary_markdown(analysis, figures.relative_to(out)))
    files.append(out / "summary.md")
    files.append(write_notebook(exp.root, out))
    analysis.files = files
    return analysis


NOTEBOOK = "ablation_report.ipynb"


def write_notebook(experiment: Path, out: Path) -> Path:
    """The shipped report notebook, its default experiment set to ``experiment``, as ``out/ablation_report.ipynb``.

    A notebook already there is left as it is: it may hold the user's own cells and results."""
    import json

    from avn_study.resources import shipped_file

    path = Path(out) / NOTEBOOK
    if path.exists():
        return path
    notebook = json.loads(shipped_file("notebooks", NOTEBOOK).read_text())
    default = 'Path(os.environ.get("AVN_EXPERIMENT", "../avn-demo/experiments/demo"))'
    mine = f'Path(os.environ.get("AVN_EXPERIMENT", {json.dumps(str(Path(experiment).resolve()))}))'
    for cell in notebook["cells"]:
        cell["source"] = [line.replace(default, mine) for line in cell["source"]]
    path.write_text(json.dumps(notebook, indent=1) + "\n")
    return path


def _cell(row: pd.Series, metric: str, decimals: int) -> str:
    mean = row.get(f"{metric}_mean", math.nan)
    if not isinstance(mean, float) or not math.isfinite(mean):
        return "-"
    sd, low, high = row[f"{metric}_sd"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    text = f"{mean:.{decimals}f}"
    text += f" ± {sd:.{decimals}f}" if math.isfinite(sd) else ""
    text += f" [{low:.{decimals}f}, {high:.{decimals}f}]" if math.isfinite(low) else ""
    n, patients = row.get(f"{metric}_n"), row.get("n_patients")
    if METRICS[metric].subset == "defined" and n is not None and patients and n < patients:
        # e.g. HD95 of a model that finds no necrosis: defined only where both masks are empty (0 mm)
        text += f" (defined for {int(n)} of {int(patients)} patients)"
    return text


def ablation_markdown(analysis: Analysis, test: bool = False) -> str:
    """The paper-style table: per row its size and cost, its metrics (descriptive), and its contrast with
    the reference (``test``: the same for the held-out test set), grouped as the space file's ``groups``
    say. The other contrasts are in :func:`questions_markdown`."""
    ablation = analysis.test_ablation if test else analysis.ablation
    comparison_table = analysis.test_comparison if test else analysis.comparison
    shown = [m for m in SHOWN if f"{m}_mean" in ablation]
    header = ["row", "arm", "schedule", "parameters", "compute", "peak memory", "patients (with necrosis)", "seeds",
              "folds", *(METRICS[m].label for m in shown), f"Δ {analysis.metric} vs {analysis.reference} [CI]",
              "p (Holm)", "verdict"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    against = comparison_table[comparison_table["reference"] == analysis.reference] if len(comparison_table) else None
    comparison = against.drop_duplicates("row").set_index("row") if against is not None else pd.DataFrame()
    compute = analysis.compute.set_index("row") if len(analysis.compute) else pd.DataFrame()
    by_row = {str(r["row"]): r for _, r in ablation.iterrows()}
    for title, rows in row_groups(analysis.experiment, list(by_row)):
        if title:
            lines.append("| " + " | ".join([f"*{title}*", *[""] * (len(header) - 1)]) + " |")
        for name in rows:
            row = by_row[name]
            necrotic = f" ({row['dice_n']})" if "dice_n" in row else ""
            cost = compute.loc[name] if name in compute.index else None
            cells = [f"**{name}**", str(row["arm"]), str(row["schedule"]),
                     str(cost["parameters"]) if cost is not None else "-", _hours(cost), _memory(cost),
                     f"{row['n_patients']}{necrotic}", str(row["n_seeds"]), str(row["n_folds"]),
                     *(_cell(row, m, SHOWN[m]) for m in shown)]  # fmt: skip
            if name in comparison.index:
                c = comparison.loc[name]
                cells += [_difference(c), _p(c.p_holm), str(c.verdict)]
            else:
                cells += ["reference" if name == analysis.reference else "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference(c: Any) -> str:
    if not math.isfinite(c.mean_diff):
        return "-"
    text = f"{c.mean_diff:+.3f}"
    low, high = c.diff_ci_low, c.diff_ci_high
    if math.isfinite(low) or math.isfinite(high):
        text += f" [{_bound(low)}, {_bound(high)}]"
    return text + (f" ({100 * c.ci_level:.1f} %)" if math.isfinite(c.ci_level) else "")


def _bound(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else ("-inf" if value < 0 else "+inf")


def _hours(cost: Any) -> str:
    if cost is None:
        return "-"
    total = cost["stage1_hours"] + cost["stage2_hours"]
    return f"{total:.2f} {cost['unit']}" if total >= 0.01 else f"{total * 60:.1f} {cost['unit'][:-1]}min"


def _memory(cost: Any) -> str:
    if cost is None or not math.isfinite(cost["peak_memory_mb"]):
        return "-"
    return (
        f"{cost['peak_memory_mb'] / 1024:.1f} GiB"
        if cost["peak_memory_mb"] >= 1024
        else f"{cost['peak_memory_mb']:.0f} MiB"
    )


def questions_markdown(analysis: Analysis, test: bool = False) -> str:
    """Each question of the study, its contrasts and their verdicts in words (the primary family)."""
    table = analysis.test_comparison if test else analysis.comparison
    if table.empty:
        return "(no contrast)"
    lines = []
    for question, group in table.groupby("question", sort=False):
        lines.append(f"- **{question or 'Against the reference'}**")
        for c in group.itertuples():
            missing = (f" ({int(c.n_undefined)} patient(s) left out: {analysis.metric} undefined for them, e.g. an "
                       "empty prediction, which favours a model that misses lesions)"
                       if c.n_undefined == c.n_undefined and c.n_undefined else "")  # fmt: skip
            lines.append(f"  - {c.row} vs {c.reference}: {_difference(c)}, p = {_p(c.p_holm)} (Holm), {c.verdict}"
                         + missing)  # fmt: skip
    return "\n".join(lines)


def row_groups(experiment: Experiment, rows: list[str]) -> list[tuple[str, list[str]]]:
    """(title, rows) in the space file's ``groups`` order; rows in no group follow as "other rows"."""
    groups = experiment.questions()
    out, placed = [], set()
    for title, members in groups.items():
        mine = [r for r in members if r in rows and r not in placed]
        placed.update(mine)
        if mine:
            out.append((str(title), mine))
    rest = [r for r in rows if r not in placed]
    if rest:
        out.append(("other rows" if out else "", rest))
    return out


def row_parameters(experiment: Experiment) -> dict[str, str]:
    """Row -> its models' parameter count as text (a range when a searched width made it vary)."""
    trials = experiment.evaluation_trials()
    if "n_parameters" not in trials:
        return {}
    out = {}
    for row, values in trials.groupby("row")["n_parameters"]:
        counts = sorted({int(v) for v in values.dropna()})
        if counts:
            out[str(row)] = _millions(counts[0]) + (f"-{_millions(counts[-1])}" if len(counts) > 1 else "")
    return out


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


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


def protocol_lines(analysis: Analysis) -> list[str]:
    """What the numbers are: the protocol, which patients each table is over, who was left out and why."""
    exp = analysis.experiment
    space = exp.manifest.get("space") or {}
    cases = exp.evaluation_cases()
    n_patients = int(cases["patient"].nunique()) if len(cases) else 0
    folds = sorted({int(f) for f in cases["fold"].dropna()}) if len(cases) else []
    seeds = sorted({int(s) for s in cases["seed"].dropna()}) if len(cases) else []
    trials, tuning = space.get("trials", "?"), space.get("tuning_fold", 0)
    if analysis.tuning_only:
        lines = [
            f"**Tuning results** ({exp.protocol}): each row's best stage-1 trial, scored on the {n_patients} "
            "validation patients it was chosen on. Optimistic by construction: the table shows no verdicts."
        ]
    elif exp.protocol == "nested_ablation":
        lines = [
            f"**Protocol: nested cross-validation** (`nested_ablation`). In each of the outer folds {folds}, "
            f"every row was tuned with the same budget ({trials} Optuna trials, ASHA) on inner fold {tuning} "
            f"of {space.get('inner_folds', 3)} drawn from that fold's training patients only; the choice was "
            f"then trained on all of the outer fold's training patients with seeds {seeds} and evaluated on "
            f"the outer fold. The table is over the {n_patients} patients of the outer folds' validation sets, "
            "each evaluated by models configured without them."
        ]
    else:
        lines = [
            f"**Protocol: fair ablation** (`{exp.protocol}`). Every row was tuned with the same budget "
            f"({trials} Optuna trials, ASHA) on fold {tuning}; its choice was re-trained on folds {folds} with "
            f"seeds {seeds}. The table is over the {n_patients} validation patients of those folds; the "
            f"patients of fold {tuning} chose the configurations and are not reported."
        ]
    nnunet = sorted(set(exp.trials.loc[exp.trials["arm"].isin(list(NNUNET_ARMS)), "row"])) if len(exp.trials) else []
    if nnunet:
        lines.append(f"**nnU-Net rows** ({', '.join(nnunet)}): nnU-Net v2 configures itself, so these rows had no "
                     "Optuna search and no stage 1 (they rest on no validation patient); each was trained in stage 2 "
                     "on the same folds and seeds as the other rows, with its epochs and iterations recorded per "
                     "trial (`nnunet_epochs`, `nnunet_iterations_per_epoch`), and its predictions were scored by the "
                     "same metrics code on the same grid.")  # fmt: skip
    excluded = exp.excluded()
    if len(excluded):
        listed = "; ".join(f"{t.row}: {t.n_patients} ({t.patients})" for t in excluded.itertuples())
        lines.append(f"**Excluded:** patients whose validation results chose the row's configuration (they were "
                     f"in its stage-1 validation set, as in studies run before avn-study refused it): {listed}. "
                     "See `excluded.csv`.")  # fmt: skip
    test = exp.evaluation_test_cases()
    if len(test):
        lines.append(f"**Held-out test set:** {test['patient'].nunique()} patients frozen in the split before any "
                     "tuning, in no fold; each row's value per test patient is the mean over all its stage-2 "
                     "models (every fold x seed). Reported separately below.")  # fmt: skip
    return lines


STATISTICS_NOTE = (
    "The unit is the patient: a patient's value is the mean over its cases in one run, then over the runs of "
    "a pipeline replicate (a stage-1 search and the runs trained from its choice), then over the row's "
    "replicates. Dice is over cases with necrosis; `dice_all` uses the empty-mask rule on every case. The "
    "study declares one primary metric and the contrasts that answer its questions: they are one family, "
    "Holm-corrected; every other metric in the table is descriptive (mean ± SD over patients [95 % "
    "studentized-bootstrap CI], no verdict), and the held-out test set is a family of its own. Each contrast "
    "is tested twice, and both must reject: the row labels of whole pipeline replicates are permuted within "
    "the folds they were evaluated on (the random unit includes the search: which configuration won, and "
    "every seed's luck), and Wilcoxon's signed-rank test runs over the per-patient differences (patients as "
    "the random unit). p is the larger of the two, Holm-corrected. The interval is the replicate test "
    "inverted under a shift, at the level Holm decided the contrast at (shown beside it), so it excludes 0 "
    "exactly when that test rejects; *better*/*worse* is said only when the corrected p < alpha and the "
    "signed-rank statistic agrees with the mean difference's sign. A design with one replicate per row and "
    "fold cannot go below p = 2/2^F; `avn-study sweep --plan` says what a design can reach before it runs."
)


def summary_markdown(analysis: Analysis, figures: Path) -> str:
    exp = analysis.experiment
    trials = exp.trials
    evaluated = exp.evaluation_trials()
    counts = trials.groupby(["stage", "status"]).size().reset_index(name="trials")
    split = ", ".join(sorted({h[:12] for h in trials["split_hash"] if h})) or "unknown"
    parts = [
        f"# Ablation report: {exp.manifest.get('name', exp.root.name)}",
        f"Experiment `{exp.root}` ({exp.protocol}); split {split}; statistics on {len(evaluated)} finished "
        f"trial(s) of stage {', '.join(map(str, sorted(set(evaluated['stage']))))}; "
        f"{len(exp.damaged)} damaged or missing trial(s) excluded" + (" (**see Warnings**)." if exp.damaged else "."),
        "\n\n".join(protocol_lines(analysis)),
        "## Questions" if not analysis.tuning_only else "## Questions (tuning results: no verdicts)",
        f"The study's {'declared' if analysis.primary else 'exploratory (not declared)'} contrasts on per-patient "
        f"{analysis.metric}, one family (Holm, alpha = {analysis.alpha:g}): mean difference [CI at the level Holm "
        "decided it at], corrected p, verdict.",
        questions_markdown(analysis),
        "## Ablation table (cross-validation)" if not analysis.tuning_only else "## Tuning results",
        f"Per row: parameters, the training compute it used (stage 1 + stage 2) and its trials' peak memory; "
        f"metrics as mean ± SD over patients [95 % CI] (descriptive); the contrast with **{analysis.reference}** "
        "where the study asks it. Rows are listed in the order of the search-space file, not ranked.",
        ablation_markdown(analysis),
    ]
    if not analysis.test_ablation.empty:
        parts += ["## Held-out test set",
                  "The same statistics on the test patients, which no tuning or cross-validation step saw: the same "
                  "contrasts as a family of their own (Holm within it).",
                  questions_markdown(analysis, test=True), ablation_markdown(analysis, test=True)]  # fmt: skip
    if analysis.warnings:
        parts += ["## Warnings", "\n".join(f"- {w}" for w in analysis.warnings)]
    parts += [
        "## Seed spread",
        f"SD across seeds of each row's mean per-patient {analysis.metric}.",
        _table(analysis.spread.copy()),
        "## Figures",
        f"![per-patient {analysis.metric}]({figures}/per_case.png)",
        f"![learning curves]({figures}/learning_curves.png)",
        f"![loss weights]({figures}/loss_weights.png)",
    ]
    if (analysis.importance["importance"].notna()).any():
        parts.append(f"![parameter importance]({figures}/importance.png)")
    if analysis.overlays:
        parts.append(f"![validation slices]({figures}/overlays.png)")
    if analysis.calibration is not None and len(analysis.calibration):
        parts += [
            "## Calibration",
            "Expected calibration error of the necrosis probability over the voxels of the femoral head region "
            "(where necrosis can be; every voxel for a cohort without head labels), pooled over each row's "
            "evaluation cases, 10 equal bins. Lower is better; the reliability diagram shows where it comes from.",
            _table(analysis.calibration, 4),
            f"![reliability]({figures}/reliability.png)",
        ]
    parts += [
        "## Parameter importance (Optuna, PED-ANOVA, stage 1)",
        "Over each search's fully trained trials only (trials stopped early by ASHA are PRUNED in Optuna and "
        "left out; studies run before this rule counted them as complete), as the importance of reaching the "
        "top `target_quantile` of them, raised so that at least 5 trials are in it; not computed below 10.",
        _table(analysis.importance),
        "## Trials",
        _table(counts),
        "## How these numbers are computed",
        STATISTICS_NOTE + " Errored and unfinished trials are listed above and left out. Everything comes "
        "from the per-case metrics stored in the trial folders.",
    ]
    return "\n\n".join(parts) + "\n"
