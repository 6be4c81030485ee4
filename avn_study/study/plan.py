"""Before any GPU runs: can this study's design answer its questions, and at what cost?

For every declared contrast of a search-space file (:attr:`~avn_study.study.space.SearchSpace.contrasts`) this
module finds the smallest p the design can reach (the replicate test's floor from the folds, seeds and
searches; Wilcoxon's from the reported patients with necrosis, when the cohort is known) and compares it
with Holm's first step, ``alpha / m``. ``avn-study sweep`` refuses a design that can reach no verdict
(unless ``--allow-no-verdict``); ``sweep --plan`` and ``avn-study plan`` print the floors, the power for
planted effects and the smallest effect found at 80 % power, for the design and a few cheaper or larger
ones, with their GPU-hours from :data:`COST_MODEL`, after :func:`plan_text`'s trials and epochs. The
simulation is :mod:`avn_study.analysis.design`'s, which also proves the verdict's false-positive rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from avn_study.data.layout import DATASET_JSON
from avn_study.errors import UsageError
from avn_study.study.space import ABLATIONS, SearchSpace

EFFECTS = (0.02, 0.05, 0.10)  # planted differences of the primary metric the power table shows
POWER_STUDIES = 200  # simulated studies per power figure (Monte Carlo SD <= 3.5 points)
NECROTIC_METRICS = ("dice", "lesion_sensitivity")  # defined on patients with necrosis only


@dataclass(frozen=True)
class CostModel:
    """GPU-hours of a study from its epochs: a model, not a measurement (README "Cost of a study")."""

    slices_per_second: float = 645.0  # training slices/s per GPU: 4 real trials packed on one H200 (issue 13)
    slices_per_patient: float = 20.0  # coronal training slices per patient and epoch at 2 mm, 128 px

    def gpu_hours(self, epochs: float, training_patients: float) -> float:
        return epochs * training_patients * self.slices_per_patient / self.slices_per_second / 3600


COST_MODEL = CostModel()


@dataclass(frozen=True)
class ContrastFloor:
    """What one contrast can reach in a design."""

    label: str
    question: str
    replicate_floor: float  # the replicate test's smallest p
    patient_floor: float | None  # Wilcoxon's smallest p on the reported patients (None: cohort unknown)
    level: float  # Holm's first step: alpha / m

    @property
    def floor(self) -> float:
        return max(self.replicate_floor, self.patient_floor or 0.0)

    @property
    def reachable(self) -> bool:
        return self.floor < self.level


def design_of(space: SearchSpace, patients: int | None, row: str | None = None, against: str | None = None):
    """The :class:`~avn_study.analysis.design.Design` of a contrast (``patients``: reported patients the
    primary metric is defined on; unknown: the folds' count, enough for the replicate floor)."""
    from avn_study.analysis.design import Design

    unsearched = set(space.arms) - set(space.searched_rows)
    per_seed = space.search_per_seed or (row in unsearched and against in unsearched)
    protocol = space.protocol if space.protocol in ABLATIONS else "nested_ablation"
    n = patients if patients else max(len(space.folds), 1) * 2
    return Design(protocol, n, len(space.folds), len(space.seeds), per_seed)


def reported_patients(space: SearchSpace, cases: list[Any], splits: Any) -> int:
    """Patients whose values enter the primary metric's statistics: those of the reported folds (with
    necrosis, for Dice and lesion sensitivity)."""
    reported = {c for k in space.folds for c in splits.fold(k).val}
    by_patient: dict[str, bool] = {}
    for case in cases:
        if case.case_id in reported:
            by_patient[case.patient_id] = by_patient.get(case.patient_id, False) or bool(case.has_necrosis)
    if space.primary_metric in NECROTIC_METRICS:
        return sum(by_patient.values())
    return len(by_patient)


def floors(space: SearchSpace, patients: int | None) -> list[ContrastFloor]:
    """Every declared contrast's floors against Holm's first step."""
    from avn_study.analysis.design import patient_floor, replicate_floor

    m = max(1, len(space.contrasts))
    out = []
    for c in space.contrasts:
        design = design_of(space, patients, c.row, c.against)
        out.append(ContrastFloor(c.label, c.question, replicate_floor(design),
                                 patient_floor(patients) if patients else None, space.alpha / m))  # fmt: skip
    return out


def check_verdicts(space: SearchSpace, patients: int | None = None, allow_no_verdict: bool = False) -> list[str]:
    """Refuse a design whose declared contrasts can never reach a verdict.

    Returns:
        Warnings (contrasts that cannot be decided, when ``allow_no_verdict``).

    Raises:
        UsageError: a study protocol with contrasts none of which can reach ``alpha / m``, or some that
            cannot (naming them, their floor, and what would fix the design), unless ``allow_no_verdict``.
    """
    if space.protocol not in ABLATIONS or not space.contrasts:
        return []
    stuck = [f for f in floors(space, patients) if not f.reachable]
    if not stuck:
        return []
    listed = "; ".join(f"{f.label}: p >= {f.floor:.3g}" for f in stuck[:6]) + ("; ..." if len(stuck) > 6 else "")
    level = stuck[0].level
    fixes = []
    if any(f.replicate_floor >= level for f in stuck):
        replicates = len(space.seeds) if space.search_per_seed else 1
        fixes.append(f"the replicate test has {replicates} pipeline replicate(s) per row and fold: give every seed "
                     "its own search (search_per_seed: true) with 2+ seeds and 3+ folds")  # fmt: skip
    if any((f.patient_floor or 0) >= level for f in stuck):
        fixes.append(f"{patients} reported patient(s) whose values can differ are too few for Wilcoxon's test")
    message = (f"{space.path}: {len(stuck)} of {len(space.contrasts)} contrast(s) can never reach a verdict "
               f"({listed}); Holm over {len(space.contrasts)} needs p < {level:.3g} at its first step: "
               f"{' and '.join(fixes)}. Run anyway with --allow-no-verdict (the table will say "
               "'not distinguishable' whatever the effect)")  # fmt: skip
    if not allow_no_verdict:
        raise UsageError(message)
    return [message]


# ------------------------------------------------------------------------------------------ the plan
def plan_text(space: SearchSpace, gpus_per_trial: float | None = None) -> str:
    """``sweep --plan``: the trials and epochs a space will run, before anything starts.

    Args:
        space: the search space.
        gpus_per_trial: ``--gpus-per-trial``, which overrides the space's GPU share (None: the space's).
    """
    plan = space.plan()
    searched = len(space.searched_rows)
    lines = [
        f"{space.path}: {space.protocol}, {plan['rows']} rows",
        f"stage 1: {plan['searches']} searches ({_search_shape(space)}) x "
        f"{space.trials} trials = {plan['stage1_trials']} trials, ~{plan['stage1_epochs']:,.0f} epochs with "
        f"{space.scheduler.type} (at most {plan['stage1_epochs_max']:,})",
    ]
    if plan["stage2_trials"]:
        lines.append(f"stage 2: {searched} rows x {len(space.folds)} folds x {len(space.seeds) * space.repeats} "
                     f"seeds = {plan['stage2_trials']} trials, {plan['stage2_epochs']:,} epochs")  # fmt: skip
    if plan["nnunet_trials"]:
        lines.append(f"stage 2, nnU-Net rows (no search: nnU-Net configures itself): {plan['nnunet_trials']} trials")
    if space.concurrent_rows:
        lines.append(
            "scheduling: one Ray experiment, every search at once"
            + (", each row's stage 2 as soon as its search has chosen" if plan["stage2_trials"] else "")
        )
    else:
        lines.append("scheduling: one search after another" + (", then stage 2" if plan["stage2_trials"] else "")
                     + " (concurrent_rows: true keeps a cluster fuller)")  # fmt: skip
    gpu = space.gpu if gpus_per_trial is None else gpus_per_trial
    lines.append(f"each trial: {space.cpu:g} CPU, {gpu:g} GPU" + (" (--gpus-per-trial)" if gpus_per_trial is not None
                                                                   else ""))  # fmt: skip
    return "\n".join(lines)


def _search_shape(space: SearchSpace) -> str:
    """How stage 1's searches multiply out: rows x folds (x seeds), or one per row."""
    searched = len(space.searched_rows)
    if space.protocol == "nested_ablation":
        return f"{searched} rows x {len(space.folds)} outer folds" + (
            f" x {len(space.seeds)} seeds (a search per seed)" if space.search_per_seed else "")  # fmt: skip
    if space.search_per_seed:
        return f"{searched} rows x {len(space.folds)} reported folds x {len(space.seeds)} seeds (a search per seed)"
    return "one per row"


def cohort_sizes(space: SearchSpace, data: Path | None) -> tuple[int | None, int | None]:
    """(reported patients the primary metric is defined on, every patient) of a cohort, or (None, None)
    when there is no cohort at ``data``: the plan then shows the replicate floors only."""
    if data is None or not (Path(data) / DATASET_JSON).is_file():
        return None, None
    from avn_study.config import TrainConfig
    from avn_study.training.fold import cohort_split

    searched = space.searched_rows
    config = TrainConfig.from_flat(space.trial_config(searched[0]) if searched else space.fixed)
    cases, splits = cohort_split(data, config)
    return reported_patients(space, cases, splits), len({c.patient_id for c in cases})


def alternatives(space: SearchSpace) -> list[tuple[str, SearchSpace, float]]:
    """The design and a few cheaper or larger ones: (label, space, patient factor)."""
    out = [("this design", space, 1.0)]
    seeds = len(space.seeds)
    if not space.search_per_seed:
        out.append(("a search per seed", replace(space, search_per_seed=True), 1.0))
    if seeds > 2:
        out.append((f"{seeds - 1} seeds", replace(space, seeds=space.seeds[:-1]), 1.0))
    out.append((f"{seeds + 1} seeds", replace(space, seeds=(*space.seeds, max(space.seeds) + 1)), 1.0))
    out.append(("2 x the patients", space, 2.0))
    return out


def cost(space: SearchSpace, patients: int | None) -> float | None:
    """GPU-hours of a space's plan on ``patients`` (all of the cohort's, reported or not)."""
    if not patients:
        return None
    plan = space.plan()
    training = patients * (len(space.folds) - 1) / max(len(space.folds), 1)
    return COST_MODEL.gpu_hours(plan["stage1_epochs"] + plan["stage2_epochs"], training)


def plan_lines(space: SearchSpace, patients: int | None = None, cohort_patients: int | None = None,
               components: Any = None, studies: int = POWER_STUDIES) -> list[str]:  # fmt: skip
    """What the design can decide: floors per contrast, power and detectable effects, costs."""
    from avn_study.analysis.design import Components, detectable_effect, power

    if space.protocol not in ABLATIONS or not space.contrasts:
        return ["verdicts: none (a sweep or a single row: nothing is compared)"]
    components = components or Components()
    m = len(space.contrasts)
    where = f"{patients} reported patients" if patients else "patients unknown (give --data for Wilcoxon's floor)"
    lines = [f"verdicts: {m} contrast(s) on {space.primary_metric}, Holm at alpha {space.alpha:g} (first step "
             f"p < {space.alpha / m:.3g}); {where}"]  # fmt: skip
    for f in floors(space, patients):
        patient = f", Wilcoxon >= {f.patient_floor:.3g}" if f.patient_floor is not None else ""
        state = "reachable" if f.reachable else "CANNOT reach a verdict"
        lines.append(f"  {f.label}: smallest p {f.floor:.3g} (replicates >= {f.replicate_floor:.3g}{patient}): {state}")
    lines.append("variance components: " + "; ".join(components.describe()))
    header = "  design | " + " | ".join(f"power at {e:+.2f}" for e in EFFECTS) + " | effect at 80 % | GPU-h"
    lines += [f"power (a planted difference in one contrast, the other {m - 1} null, {studies} simulated studies "
              "each):", header]  # fmt: skip
    base = patients or 2 * len(space.folds)
    for label, variant, factor in alternatives(space):
        n = round(base * factor)
        design = design_of(variant, n)
        powers = [power(design, components, e, m, variant.alpha, studies) for e in EFFECTS]
        detectable = detectable_effect(design, components, m, variant.alpha, studies=studies)
        gpu = cost(variant, round(cohort_patients * factor) if cohort_patients else None)
        shown = "never" if math.isinf(detectable) else f"{detectable:.3f}"
        lines.append(f"  {label} ({design.describe()}) | " + " | ".join(f"{p:.2f}" for p in powers)
                     + f" | {shown} | " + (f"{gpu:,.0f}" if gpu is not None else "-"))  # fmt: skip
    lines.append("  (GPU-hours: a model, at 645 training slices/s per GPU and ~20 slices per patient and epoch)")
    return lines
