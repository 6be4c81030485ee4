"""The study commands: ``sweep``, ``plan``, ``demo`` and ``analyze``.

Launching is :func:`avn_study.study.launch.run_study`'s and the plan's text :mod:`avn_study.study.plan`'s;
these commands parse, call them and print what finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avn_study.cli.args import _path, _positive_float, _positive_int, _text
from avn_study.data.layout import DATASET_JSON
from avn_study.errors import UsageError
from avn_study.study.folder import ERROR_FILE, MANIFEST
from avn_study.study.launch import run_study


def _summary_table(result, metric: str) -> str:
    """What finished: per stage and row, the trials' own final metric (mean, SD), in the order the rows ran.
    Not a ranking and not a verdict: per-patient statistics are ``avn-study analyze``'s."""
    import math
    import statistics

    from avn_study.study.folder import TERMINATED

    lines = [f"{'stage':<6} {'row':<28} {'trials':>6} {metric + ' mean':>14} {'SD':>7}"]
    groups: dict[tuple[int, str], list[float]] = {}
    for o in result.outcomes:
        if o.status == TERMINATED and o.metric is not None and not math.isnan(o.metric):
            groups.setdefault((o.stage, o.row), []).append(o.metric)
    for (stage, row), values in sorted(groups.items(), key=lambda kv: kv[0][0]):  # stable: rows as they ran
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(f"{stage:<6} {row:<28} {len(values):>6} {statistics.fmean(values):>14.4f} {sd:>7.4f}")
    return "\n".join(lines)


def _errored_summary(result) -> str:
    """The trials that errored after their retries, each with the last line of its error and its log."""
    lines = [f"{len(result.errored)} trial(s) errored after their retries:"]
    for o in result.errored:
        reason = next((line for line in reversed(o.error.splitlines()) if line.strip()), "unknown")
        lines.append(f"  - {o.trial_id} (stage {o.stage}, row {o.row}): {reason[:200]}\n    log: {o.path}/{ERROR_FILE}")
    return "\n".join(lines)


def _report(result, metric: str, where: str) -> int:
    """What finished, where things are, and the errored trials (exit 1 when there are any)."""
    print(_summary_table(result, metric))
    print(where)
    if result.errored:
        print(_errored_summary(result), file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``avn-study sweep``: run a search-space file (or print its ``--plan``) and report what finished."""
    from avn_study.resources import space_argument
    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    space = load_space(space_argument(args.space))
    if args.plan:
        return _print_plan(space, args.data, args.allow_no_verdict, gpus_per_trial=args.gpus_per_trial)
    study = Study(
        space,
        args.data,
        str(args.storage),
        args.name,
        args.max_concurrent,
        args.gpus_per_trial,
        progress=not args.quiet,
        force_unlock=args.force_unlock,
        track=args.track,
        allow_no_verdict=args.allow_no_verdict,
    )
    from avn_study.outputs import shell

    extra = ["--allow-no-verdict"] if args.allow_no_verdict else []
    resume_hint = shell("avn-study", "sweep", args.space, "--data", args.data, "--storage", args.storage, "--name",
                        study.name, "--resume", *extra)  # fmt: skip
    result = run_study(study, args.resume, args.address, args.num_cpus, resume_hint, args.connect_timeout)
    if result is None:
        return 130
    mirror = f" (JSON mirror: {study.root})" if study.remote else ""
    return _report(
        result,
        space.metric,
        f"results in {study.location}{mirror}\nstatistics and report: {shell('avn-study', 'analyze', study.root)}",
    )


def _sweep_parser(sub) -> None:
    """``avn-study sweep``'s arguments (next to :func:`cmd_sweep`)."""
    p = sub.add_parser("sweep", help="run a search-space file (a sweep, a nested or a fair ablation) on Ray Tune")
    p.add_argument("space", type=_path, help="search-space YAML file, or a shipped one by name (ablation, demo, ...)")
    p.add_argument("--data", type=_path, required=True, help="dataset folder, readable on every node")
    p.add_argument(
        "--storage", type=_text, required=True, help="experiment storage: a local/shared path or a pyarrow URI"
    )
    p.add_argument("--name", help="study name (default: the file's name key)")  # check_name refuses unsafe ones
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (trusts its storage)")
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: start Ray here)")
    p.add_argument("--connect-timeout", type=_positive_float, dest="connect_timeout", metavar="SECONDS",
                   help="how long to wait for --address before giving up with exit 1 (default "
                   "$AVN_STUDY_CONNECT_TIMEOUT, else 30)")  # fmt: skip
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs of a local Ray (default: all)")
    p.add_argument("--max-concurrent", type=int, dest="max_concurrent", help="trials at once (default: the file's)")
    p.add_argument("--gpus-per-trial", type=float, dest="gpus_per_trial", help="GPU share per trial, e.g. 0.25")
    p.add_argument("--quiet", action="store_true", help="no live progress lines")
    p.add_argument("--track", action="append", default=[], metavar="TOOL",
                   help="also log every trial to tensorboard, mlflow or wandb (repeatable; see README)")  # fmt: skip
    p.add_argument("--plan", action="store_true",
                   help="print the trials, epochs, attainable p and power of the space, and exit")  # fmt: skip
    p.add_argument("--allow-no-verdict", action="store_true", dest="allow_no_verdict",
                   help="run a design whose declared contrasts can never reach a verdict (see --plan)")  # fmt: skip
    p.add_argument("--force-unlock", action="store_true", dest="force_unlock",
                   help="take over the study's lock even if its driver looks alive (its host is gone)")  # fmt: skip
    p.set_defaults(func=cmd_sweep)


def _print_plan(space, data: Path | None, allow_no_verdict: bool, pilot: Path | None = None,
                patients: int | None = None, gpus_per_trial: float | None = None) -> int:  # fmt: skip
    """``sweep --plan`` and ``avn-study plan``: what the space runs and what its design can decide; exit 2
    (with the refusal the sweep would give) when no verdict can be reached, unless allowed."""
    from avn_study.study.plan import check_verdicts, cohort_sizes, plan_lines, plan_text

    reported, cohort = cohort_sizes(space, data)
    if patients is not None:
        reported, cohort = reported or patients, cohort or patients
    components = None
    if pilot is not None:
        from avn_study.analysis.pilot import pilot_components

        components = pilot_components(pilot, space.primary_metric)
        print(f"pilot study {pilot}: variance components of {space.primary_metric} estimated from its stage 2")
    print(plan_text(space, gpus_per_trial))
    print("\n".join(plan_lines(space, reported, cohort, components)))
    check_verdicts(space, reported, allow_no_verdict or space.allow_no_verdict)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``avn-study plan``: what a space runs and what its design can decide."""
    from avn_study.resources import space_argument
    from avn_study.study.space import load_space

    space = load_space(space_argument(args.space))
    return _print_plan(space, args.data, args.allow_no_verdict, args.pilot, args.patients)


def _plan_parser(sub) -> None:
    """``avn-study plan``'s arguments (next to :func:`cmd_plan`)."""
    p = sub.add_parser("plan", help="what a space's design can decide: attainable p, power, detectable effects")
    p.add_argument("space", type=_path, help="search-space YAML file, or a shipped one by name")
    p.add_argument("--data", type=_path, help="the cohort (for the reported patients with necrosis and the cost)")
    p.add_argument("--patients", type=_positive_int, help="reported patients, when the cohort is not at hand")
    p.add_argument("--pilot", type=_path, help="a finished study folder: estimate the variance components from it")
    p.add_argument("--allow-no-verdict", action="store_true", dest="allow_no_verdict",
                   help="exit 0 even when a contrast can never reach a verdict")  # fmt: skip
    p.set_defaults(func=cmd_plan)


def cmd_demo(args: argparse.Namespace) -> int:
    """``avn-study demo``: a phantom cohort, the demo study on it and its report, resumed when run again."""
    from avn_study.data.phantom import PhantomConfig, write_cohort
    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    out = args.out.resolve()
    cohort = out / "cohort"
    cases = args.cases or (6 if args.tiny else 16)
    if args.seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {args.seed}")
    space = load_space(_demo_space(args, out))
    if (cohort / DATASET_JSON).is_file():
        print(f"reusing the phantom cohort in {cohort}", file=sys.stderr)
    else:
        print(f"writing a phantom cohort of {cases} patients to {cohort}", file=sys.stderr)
        write_cohort(cohort, cases=cases, seed=args.seed, config=PhantomConfig.tiny() if args.tiny else PhantomConfig())
    study = Study(space, cohort, str(out / "experiments"), progress=not args.quiet)
    resume = (study.root / MANIFEST).is_file()
    from avn_study.outputs import shell

    result = run_study(study, resume, None, args.num_cpus, shell("avn-study", "demo", "--out", args.out))
    if result is None:
        return 130
    print(f"cohort: {cohort}\nexperiment: {study.root}")
    if result.errored:
        print(_errored_summary(result), file=sys.stderr)
    code = _analyze_and_print(study.root, out / "report")
    return 1 if result.errored else code


def _demo_space(args: argparse.Namespace, out: Path) -> Path:
    """The demo's search-space file: ``--space``, the tiny smoke space written into ``out``, or the shipped demo."""
    from avn_study.resources import shipped_space, space_argument

    if args.space:
        return space_argument(args.space)
    if args.tiny:  # the smoke space with one trial per search: a check of the install, not a study
        import yaml

        text = yaml.safe_dump({**yaml.safe_load(shipped_space("smoke").read_text()), "trials": 1}, sort_keys=False)
        out.mkdir(parents=True, exist_ok=True)
        space_file = out / "tiny.yaml"
        if space_file.exists() and space_file.read_text() != text:  # never replace a file the demo did not write
            raise UsageError(f"{space_file}: exists and is not the tiny demo's space; choose another --out")
        space_file.write_text(text)
        return space_file
    return shipped_space("demo")


def _demo_parser(sub) -> None:
    """``avn-study demo``'s arguments (next to :func:`cmd_demo`)."""
    p = sub.add_parser("demo", help="phantom cohort + the demo nested ablation + its report (the README's command)")
    p.add_argument("--out", type=_path, default=Path("avn-demo"), help="output folder (default ./avn-demo)")
    p.add_argument("--cases", type=_positive_int, help="phantom patients (default 16; 6 with --tiny)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--space", type=_path, help="search-space file or shipped name (default demo; smoke with --tiny)")
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs for Ray (default: all)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a minute-long smoke run: tiny phantom and the smoke space (checks an install)",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress lines")
    p.set_defaults(func=cmd_demo)


def _analyze_and_print(experiment: Path, out: Path, reference: str | None = None, metric: str = "dice") -> int:
    """Analyse an experiment into ``out`` and print the ablation table, the warnings and where the report is."""
    from avn_study.analysis import analyze, write_analysis
    from avn_study.analysis.report import ablation_markdown

    analysis = write_analysis(analyze(experiment, reference, metric), out)
    print(ablation_markdown(analysis))
    for warning in analysis.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report: {analysis.summary}\ntables and figures: {out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """``avn-study analyze``: tables, statistics, figures and summary.md of a study."""
    out = args.out or args.experiment / "analysis"
    return _analyze_and_print(args.experiment, out, args.reference, args.metric)


def _analyze_parser(sub) -> None:
    """``avn-study analyze``'s arguments (next to :func:`cmd_analyze`)."""
    p = sub.add_parser("analyze", help="tables, paired statistics, plots and summary.md of an experiment")
    p.add_argument("experiment", type=_path, help="study folder (STORAGE/NAME) or one Ray Tune experiment folder")
    p.add_argument("--out", type=_path, help="output folder (default EXPERIMENT/analysis)")
    p.add_argument("--reference", help="row the others are compared with (default unet, else the first row)")
    p.add_argument("--metric", default="dice", help="metric of the paired comparison (default dice)")
    p.set_defaults(func=cmd_analyze)


def add_parsers(sub) -> None:
    """The study commands, in the order ``avn-study --help`` lists them."""
    _sweep_parser(sub)
    _plan_parser(sub)
    _demo_parser(sub)
    _analyze_parser(sub)
