"""``avn-study bench cluster``: how full a protocol keeps a cluster, on Ray's logical resources.

Runs the *real* :class:`~avn_study.study.driver.Study` (protocol, Optuna, ASHA, stage-2 grid, resume files)
of ``search_spaces/ablation.yaml``'s shape on a local Ray that pretends to have ``gpus`` GPUs, with a
stand-in trainable (``Study(trainable=stand_in_trial)``) that sleeps through each epoch instead of
training. Epoch durations per arm come from this machine's measured step rates (``bench train``,
relative to ``unet``), +-20 % per epoch (seeded by the trial's configuration), scaled so one ``unet``
epoch lasts ``epoch_s`` seconds. The metric follows a seeded learning curve of the learning rate, so
ASHA and Optuna have something to compare.

Utilisation = busy slot-seconds (the trials' sleeps) / (slots x wall), for stage 1, stage 2 and the
whole study, for both schedulings side by side: one Ray experiment per row and outer fold one after
another, then stage 2 (``concurrent_rows: false``), and the whole study in one experiment, every
stage-1 search at once and each row's stage 2 as soon as its search has chosen (``concurrent_rows:
true``). A stage's wall is its span: stage 1 from the study's start to its last trial's end, stage 2
from its first trial's start to its last trial's end (with concurrent rows they overlap).
"""

from __future__ import annotations

import functools
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any

from avn_study.data.layout import DATASET_JSON
from avn_study.study.folder import PARAMS

# train slices/s of each arm relative to unet, measured here by `avn-study bench train` (1 thread, 128 px)
ARM_COST = {"unet": 1.0, "seg": 1.2, "unet+head": 1.17, "seg+recon": 1.67, "seg+loc": 1.43,
            "seg+recon+loc": 2.02, "cascade": 2.05}  # fmt: skip


class StandIn:
    """A stand-in trial's epoch durations and learning curve, seeded by its row, fold, seed and learning
    rate: the same numbers in a Ray worker (:func:`stand_in_trial`) and in the driver-only simulation."""

    def __init__(self, flat: dict[str, Any], row: str, epoch_s: float) -> None:
        import random

        key = json.dumps({"row": row, **{k: flat.get(k) for k in ("fold", "inner_fold", "seed", "lr")}},
                         sort_keys=True)  # fmt: skip
        self._seed = zlib.crc32(key.encode())
        rng = random.Random(self._seed)
        self.scale = epoch_s * ARM_COST.get(str(flat.get("arm", "unet")), 1.0)
        optimum = rng.uniform(-3.5, -2.5)  # this row's best log10(lr)
        self.ceiling = 0.4 + 0.3 * rng.random() - 0.5 * (math.log10(float(flat.get("lr", 1e-3))) - optimum) ** 2
        self.epochs = int(flat["epochs"])

    def _rng(self, epoch: int):
        import random

        return random.Random(self._seed * 1_000_003 + epoch)

    def epoch_s(self, epoch: int) -> float:
        """Seconds of ``epoch``: the arm's cost, +-20 %."""
        return self.scale * self._rng(epoch).uniform(0.8, 1.2)

    def value(self, epoch: int) -> float:
        """The metric after ``epoch``: a saturating curve to the learning rate's ceiling, with noise."""
        noise = self._rng(epoch + 7919).gauss(0, 0.01)
        return self.ceiling * (1 - math.exp(-3 * (epoch + 1) / self.epochs)) + noise


@functools.cache
def _patients_of(data: str) -> dict[str, str]:
    """Case id -> patient id of the cohort at ``data`` (its dataset.json), read once per worker."""
    from avn_study.data.layout import read_dataset_json

    spec, _ = read_dataset_json(Path(data))
    patients = (spec or {}).get("patients", {})
    return patients if isinstance(patients, dict) else {}


def _validation_cases(flat: dict[str, Any], split: dict[str, Any] | None, inner: dict[str, Any] | None) -> list[str]:
    """The case ids a trial of ``flat`` validates on: its inner fold's (nested stage 1) or its fold's."""
    if split is None:
        return []
    inner_fold = int(flat.get("inner_fold", -1))
    folds, fold = (inner, inner_fold) if inner is not None and inner_fold >= 0 else (split, int(flat["fold"]))
    return list(folds["folds"][fold]["val"])


def stand_in_trial(config: dict[str, Any]) -> None:
    """A trial that sleeps through its epochs (see the module docstring) and reports and writes like the real
    one: per-case records of its fold's real validation cases (read from the study's split by hash), so
    ``analyze`` and ``export`` read the bench study at its real size."""
    from avn_study.study.folder import per_case_file
    from avn_study.study.trainable import TrialFiles, report_epoch, split_trial_config

    flat, meta = split_trial_config(config)
    files = TrialFiles()
    stand_in = StandIn(flat, meta["row"], float(meta["bench_epoch_s"]))
    patients = _patients_of(str(meta["data"]))
    cases = _validation_cases(flat, *files.split(meta))
    started = time.time()
    for epoch in range(stand_in.epochs):
        busy = stand_in.epoch_s(epoch)
        time.sleep(busy)
        value = stand_in.value(epoch)
        rows = [{"case": c, "patient": patients.get(c, c), "epoch": epoch, "dice": value, "has_necrosis": 1}
                for c in cases]  # fmt: skip
        files.write(per_case_file(epoch), json.dumps(rows))
        record = {"val_dice": value, "busy_s": busy, "epoch": epoch, "t_start": started, "t_end": time.time()}
        report_epoch(files, record, meta)


def _asha_epochs(recorded: dict[int, list[float]], value: float, rungs: list[int], reduction_factor: float,
                 epochs: int) -> int:  # fmt: skip
    """The epochs a trial of final ``value`` runs under async ASHA (Ray's rule: it stops at the first rung
    where it is below the ``1 - 1/reduction_factor`` percentile of the values recorded there so far, its
    own included); records ``value`` at every rung it reaches."""
    import numpy as np

    for rung in rungs:
        recorded.setdefault(rung, []).append(value)
        if value < np.percentile(recorded[rung], (1 - 1 / reduction_factor) * 100):
            return rung
    return epochs


def model_utilisation(space: Any, slots: int, seed: int = 0) -> dict[str, float]:
    """The ceiling of ``concurrent_rows`` scheduling for ``space`` on ``slots``, with no Ray overhead at
    all: a discrete-event model of the stand-in trials (the same per-arm costs, +-20 % per epoch) under
    the study's hand-out rule (stage-1 trials round-robin over the searches with budget, each search's
    stage 2 once its trials have ended, stage 1 first) and async ASHA per search (Ray's rule: a trial
    stops at a rung when its value is below the ``1 - 1/reduction_factor`` percentile of the values
    recorded there so far). Metric values are uniform random. Returns ``utilisation`` (busy slot-time /
    (slots x wall)) and ``trials`` (how many it ran: the space's plan).
    """
    import heapq
    import random

    from avn_study.config import TrainConfig
    from avn_study.study.space import ABLATIONS

    rng = random.Random(seed)
    epochs, sched = TrainConfig.from_flat(space.fixed).optim.epochs, space.scheduler
    rungs = sched.rungs(epochs) if sched.type != "none" else []

    def cost(row: str) -> float:
        return ARM_COST.get(str(space.trial_config(row).get("arm", "unet")), 1.0)

    per_row = space.searches_per_row()  # per outer fold (nested), and per seed (and fold) with search_per_seed
    searches = [(row, cost(row)) for _ in range(per_row) for row in space.searched_rows]
    runs = len(space.folds) * len(space.seeds) * space.repeats if space.protocol in ABLATIONS else 0  # per row
    per_search = runs // per_row  # each search chooses for its own outer fold, fold or seed only
    started, ended = [0] * len(searches), [0] * len(searches)
    recorded: list[dict[int, list[float]]] = [{} for _ in searches]
    queue = [cost(r) for r in space.arms if r not in space.searched_rows for _ in range(runs)]  # nothing to wait for
    events: list[tuple[float, int]] = []  # (end time, search index or -1 for stage 2)
    now, free, busy, n_trials = 0.0, slots, 0.0, 0

    def epochs_time(c: float, n: int) -> float:
        return sum(c * rng.uniform(0.8, 1.2) for _ in range(n))

    def launch() -> None:
        nonlocal free, busy, n_trials
        while free:
            open_ = [i for i in range(len(searches)) if started[i] < space.trials]
            if open_:
                i = min(open_, key=lambda k: (started[k], k))
                started[i] += 1
                run = _asha_epochs(recorded[i], rng.random(), rungs, sched.reduction_factor, epochs)
                duration, who = epochs_time(searches[i][1], run), i
            elif queue:
                duration, who = epochs_time(queue.pop(0), epochs), -1
            else:
                return
            free, busy, n_trials = free - 1, busy + duration, n_trials + 1
            heapq.heappush(events, (now + duration, who))

    launch()
    while events:
        now, who = heapq.heappop(events)
        free += 1
        if who >= 0:
            ended[who] += 1
            if ended[who] == space.trials:
                queue += [searches[who][1]] * per_search
        launch()
    return {"utilisation": busy / (slots * now) if now else math.nan, "trials": n_trials}


def stage_times(root: Path) -> dict[int, dict[str, float]]:
    """Stage -> the trials' summed ``busy_s``, the first trial's start and the last trial's end (from
    their epoch records)."""
    from avn_study.study.check import read_epochs
    from avn_study.study.folder import merge_grid, stage_folders

    out = {s: {"busy_s": 0.0, "start": math.inf, "end": -math.inf} for s in (1, 2)}
    for experiment in stage_folders(root):
        for params in experiment.glob(f"*/{PARAMS}"):
            raw = json.loads(params.read_text())
            stage, lines = int(merge_grid(raw).get("_stage", 1)), read_epochs(params.parent, raw)
            if lines:
                t = out[stage]
                t["busy_s"] += sum(r["busy_s"] for r in lines)
                t["start"], t["end"] = min(t["start"], lines[0]["t_start"]), max(t["end"], lines[-1]["t_end"])
    return out


def bench_cluster(work: Path, gpus: int = 8, per_gpu: int = 4, epoch_s: float = 0.1,
                  shape: dict[str, Any] | None = None, schedulings: tuple[bool, ...] = (False, True),
                  patients: int = 40) -> list[dict[str, Any]]:  # fmt: skip
    """Both schedulings (``schedulings``: ``concurrent_rows`` values) of one study shape on ``gpus x per_gpu``
    logical slots, on a tiny phantom cohort of ``patients``; one dict per scheduling, with its utilisation
    and what the study cost its driver and its storage (:func:`footprint`).

    ``shape`` overrides keys of ``ablation.yaml`` (default: its rows, folds and trials, with 20 epochs
    and ASHA grace 4 standing in for 100 and 20, the same rung ratios at a fifth of the reports).
    """
    import ray

    from avn_study.study.driver import init_ray

    raw = bench_space(per_gpu, shape)
    cohort = bench_cohort(work, patients)
    slots = gpus * per_gpu
    init_ray(None, num_cpus=slots, num_gpus=gpus)
    out = []
    try:
        for concurrent in schedulings:
            study = _bench_study(work, raw, cohort, concurrent, epoch_s)
            study.prepare(resume=False)
            start = time.time()
            study.run()
            wall = time.time() - start
            resume = functools.partial(_resume, work, raw, cohort, concurrent, epoch_s)
            out.append({**_utilisation(study.root, start, wall, slots), "patients": patients,
                        "scheduling": "concurrent rows" if concurrent else "one row at a time",
                        "footprint": footprint(study.root, resume)})  # fmt: skip
            if concurrent:
                out[-1]["model_ceiling"] = model_utilisation(study.space, slots)["utilisation"]
    finally:
        ray.shutdown()
    return out


def bench_space(per_gpu: int, shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ablation.yaml`` as the cluster benches run it (see :func:`bench_cluster`)."""
    import yaml

    from avn_study.resources import shipped_space

    raw = yaml.safe_load(shipped_space("ablation").read_text())
    raw["fixed"] = {**raw["fixed"], "epochs": 20}
    raw["scheduler"] = {**raw["scheduler"], "grace_period": 4}
    raw.update({"resources": {"cpu": 1, "gpu": 1 / per_gpu}, "max_concurrent": 0, "checkpoint": {"frequency": 1000}})
    return {**raw, **(shape or {})}


def bench_cohort(work: Path, patients: int) -> Path:
    """A tiny phantom cohort of ``patients`` in ``work`` (made once; the stand-in trials read only its split)."""
    from avn_study.data.phantom import PhantomConfig, write_cohort

    cohort = work / f"cohort-{patients}"
    if not (cohort / DATASET_JSON).is_file():
        write_cohort(cohort, cases=patients, seed=0, config=PhantomConfig.tiny())
    return cohort


def _bench_study(work: Path, raw: dict[str, Any], cohort: Path, concurrent: bool, epoch_s: float,
                 name: str | None = None):  # fmt: skip
    """The real Study of one scheduling with the stand-in trainable (a scheduling bench, not a study: its
    shapes need not reach a verdict)."""
    import yaml

    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    name = name or f"cluster-{'concurrent' if concurrent else 'sequential'}"
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": name, "concurrent_rows": concurrent}, sort_keys=False))
    return Study(load_space(path), cohort, str(work / "storage"), progress=False, allow_no_verdict=True,
                 trainable=stand_in_trial, trial_meta={"bench_epoch_s": epoch_s})  # fmt: skip


def _resume(work: Path, raw: dict[str, Any], cohort: Path, concurrent: bool, epoch_s: float) -> None:
    """``--resume`` of the finished bench study: Ray restores every experiment and finds nothing to run."""
    study = _bench_study(work, raw, cohort, concurrent, epoch_s)
    study.prepare(resume=True)
    study.run(resume=True)


def _utilisation(root: Path, start: float, wall: float, slots: int) -> dict[str, Any]:
    """Slot utilisation per stage and overall, from the stand-in trials' own timestamps."""
    times = stage_times(root)
    # a stage's span: stage 1 from the study's start to its last trial's end, stage 2 from its first
    # trial's start to its last's end (with concurrent rows the two overlap)
    spans = {"stage 1": times[1]["end"] - start, "stage 2": max(0.0, times[2]["end"] - times[2]["start"])}
    busy = {"stage 1": times[1]["busy_s"], "stage 2": times[2]["busy_s"]}
    use = {k: busy[k] / (slots * spans[k]) if spans[k] > 0 else math.nan for k in spans}
    return {"slots": slots, "wall_s": wall, "stage_wall_s": spans, "busy_s": busy,
            "utilisation": {**use, "all": sum(busy.values()) / (slots * wall)}}  # fmt: skip


def footprint(root: Path, resume: Any) -> dict[str, float]:
    """What the finished study at ``root`` cost: Ray's experiment state (MB in all, KB per trial), a trial's
    ``params.json``, the study folder (MB, files), the driver's peak resident memory so far, and the
    seconds of ``analyze`` and of ``resume()`` (a no-op resume of the finished study)."""
    from avn_study.analysis import analyze
    from avn_study.bench.footprint import experiment_states, folder_size, params_bytes, peak_rss_mb

    states = experiment_states(root)
    trials = sum(s.trials for s in states)
    start = time.perf_counter()
    analysis = analyze(root)
    analyze_s = time.perf_counter() - start
    start = time.perf_counter()
    resume()
    resume_s = time.perf_counter() - start
    size, files = folder_size(root)
    return {"trials": trials, "state_mb": sum(s.bytes for s in states) / 2**20,
            "state_kb_per_trial": sum(s.per_trial * s.trials for s in states) / max(trials, 1) / 1024,
            "params_b": params_bytes(root), "folder_mb": size / 2**20, "files": files,
            "driver_rss_mb": peak_rss_mb(), "analyze_s": analyze_s, "analyzed_cases": len(analysis.experiment.cases),
            "resume_s": resume_s}  # fmt: skip


def cluster_rows(results: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Rows for :func:`avn_study.bench.benches.print_table` (``results`` as :func:`bench_cluster` returns them)."""
    rows = []
    for r in results:
        u, w = r["utilisation"], r["stage_wall_s"]
        rows.append((f"{r['scheduling']}: utilisation stage 1 / stage 2 / all",
                     f"{u['stage 1']:.2f} / {u['stage 2']:.2f} / {u['all']:.2f}",
                     f"{r['slots']} slots, wall {r['wall_s']:.0f} s (stage 1 {w['stage 1']:.0f} s, "
                     f"stage 2 {w['stage 2']:.0f} s)"))  # fmt: skip
        if "footprint" in r:
            rows += footprint_rows(r["scheduling"], r["footprint"], r.get("patients"))
    by = {r["scheduling"]: r for r in results}
    if "concurrent rows" in by:
        concurrent = by["concurrent rows"]
        ok = concurrent["utilisation"]["all"] >= 0.9
        speed = (f"{by['one row at a time']['wall_s'] / concurrent['wall_s']:.2f}x faster"
                 if "one row at a time" in by else "(run alone)")  # fmt: skip
        rows.append(("concurrent rows vs one row at a time", speed,
                     f"target >= 0.9 overall: {'met' if ok else 'missed'}"))  # fmt: skip
        if "model_ceiling" in concurrent:
            rows.append(("concurrent rows without any Ray overhead (model)", f"{concurrent['model_ceiling']:.2f}",
                         "the scheduling's own ceiling for this shape: see model_utilisation"))  # fmt: skip
    return rows


def footprint_rows(label: str, f: dict[str, float], patients: int | None) -> list[tuple[str, str, str]]:
    """Rows of :func:`footprint`'s figures for :func:`avn_study.bench.benches.print_table`."""
    who = f"{int(f['trials'])} trials" + (f", {patients} patients" if patients else "")
    return [
        (f"{label}: Ray experiment state", f"{f['state_mb']:.1f} MB",
         f"{f['state_kb_per_trial']:.1f} KB per trial ({who}); {PARAMS} {f['params_b']:.0f} B"),
        (f"{label}: study folder", f"{f['folder_mb']:.1f} MB", f"{int(f['files'])} files"),
        (f"{label}: driver peak RSS", f"{f['driver_rss_mb']:.0f} MB", "this process, so far"),
        (f"{label}: analyze / resume", f"{f['analyze_s']:.1f} s / {f['resume_s']:.1f} s",
         f"analyze read {int(f['analyzed_cases'])} per-case rows; resume of the finished study"),
    ]  # fmt: skip
