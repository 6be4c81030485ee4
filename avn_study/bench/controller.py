"""``bench controller``: Ray Tune's own controller, per trial, with trials shaped like the study's.

The driver-only bench (:mod:`avn_study.bench.driver_only`) measures our searchers and schedulers without
Ray; the cluster bench measures the whole study but, on a small machine, mostly how fast Ray starts
workers. This one measures what Ray Tune's controller keeps per trial: many short trials, run in this
process's Tune with reused actors, that tell Tune what a real trial tells it (the study's metric and
the epoch: :func:`avn_study.study.trainable.driver_view` of a full record), keep checkpoints like a
study (``checkpoint.num_to_keep`` 2) and carry a config of the study's shape (identity keys and
``_avn``). After every eighth of the trials it samples the driver's resident memory; the growth per
trial is the slope of a least-squares line through those samples, and the experiment state's size
per trial is read from Ray's newest snapshot (:mod:`avn_study.bench.footprint`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

NUM_TO_KEEP = 2  # the search spaces' default checkpoint.num_to_keep


def _rss_mb() -> float:
    """This process's resident memory now (not its peak: the growth is what is measured)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def _record(epoch: int) -> dict[str, Any]:
    """A full epoch record of a real trial's size: identity, 16 losses and weights, 24 validation metrics."""
    record: dict[str, Any] = {"row": "seg+recon+loc", "arm": "seg+recon+loc", "schedule": "recon_dependent",
                              "stage": 1, "fold": 0, "seed": 0, "repeat": 0, "split_hash": "0" * 64,
                              "node_id": "f" * 56, "hostname": "node", "epoch": epoch}  # fmt: skip
    record.update({f"loss_{i}": 1.0 / (epoch + i + 1) for i in range(8)})
    record.update({f"w_{i}": 0.1 * i for i in range(8)})
    record.update({f"val_{i}": 0.5 + epoch / 1000 + i / 100 for i in range(23)})
    return {**record, "val_dice": 0.5 + epoch / 1000}


def controller_trial(config: dict[str, Any]) -> None:
    """A trial that tells Tune what a study's trial tells it, each epoch, and checkpoints every ``every``."""
    from ray import tune

    from avn_study.study.trainable import driver_view

    epochs, every = int(config["epochs"]), int(config["every"])
    for epoch in range(epochs):
        view = driver_view(_record(epoch), "val_dice")
        if epoch == epochs - 1 or (epoch + 1) % every == 0:
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "state.json").write_text("{}")
                tune.report(view, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(view)


def _slope(samples: list[tuple[int, float]]) -> float:
    """Least-squares MB per trial through (trials, MB) samples (0 with fewer than two)."""
    if len(samples) < 2:
        return 0.0
    xs, ys = [float(x) for x, _ in samples], [y for _, y in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


class _Sampler(Callback):
    """The driver's resident memory after every ``step`` trials that end."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.samples: list[tuple[int, float]] = []
        self.ends: list[float] = []

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) % self.step == 0:
            self.samples.append((len(self.ends), _rss_mb()))


def bench_controller(work: Path, trials: int, epochs: int, every: int = 5) -> dict[str, Any]:
    """Run ``trials`` controller trials of ``epochs`` reports (a checkpoint every ``every``) on a local Ray.

    Returns:
        trials, epochs, checkpoints per trial, wall seconds, trial completions per second in the first and
        the last eighth, the RSS samples, their slope (KB per trial), and the experiment state per trial.
    """
    import ray
    from ray import tune

    from avn_study.bench.footprint import experiment_states

    sampler = _Sampler(max(1, trials // 8))
    meta = {"data": "/data/nnUNet_raw/Dataset501_AVN", "split_hash": "0" * 64, "metric": "val_dice",
            "checkpoint_frequency": every, "fault": None, "test": False}  # fmt: skip
    space = {"lr": tune.loguniform(1e-4, 1e-2), "arm": "seg+recon+loc", "schedule": "recon_dependent", "fold": 0,
             "seed": 0, "epochs": epochs, "every": every, "_row": "seg+recon+loc", "_stage": 1, "_repeat": 0,
             "_avn": meta}  # fmt: skip
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(controller_trial, {"cpu": 1}), param_space=space,
            tune_config=tune.TuneConfig(num_samples=trials, metric="val_dice", mode="max", reuse_actors=True),
            run_config=tune.RunConfig(name="controller", storage_path=str(work), verbose=0, callbacks=[sampler],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=NUM_TO_KEEP)),
        )  # fmt: skip
        tuner.fit()
        wall = time.perf_counter() - t0
    finally:
        if started_ray:
            ray.shutdown()
    (state,) = experiment_states(work) or [None]
    ends, step = sampler.ends, sampler.step

    def rate(window: list[float]) -> float:
        return (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 and window[-1] > window[0] else 0.0

    return {
        "trials": trials, "epochs": epochs, "checkpoints": -(-epochs // every), "wall_s": wall,
        "first_rate": rate(ends[:step]), "last_rate": rate(ends[-step:]), "samples": sampler.samples,
        "kb_per_trial": _slope(sampler.samples) * 1024, "state_kb_per_trial": state.per_trial / 1024 if state else 0.0,
    }  # fmt: skip


def controller_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    samples = ", ".join(f"{n}: {mb:.0f}" for n, mb in result["samples"])
    return [
        ("driver RSS growth per trial", f"{result['kb_per_trial']:.0f} KB",
         f"least squares through (trials done: MB) {samples}"),
        ("experiment state per trial", f"{result['state_kb_per_trial']:.1f} KB", "Ray's newest snapshot"),
        ("trial completions per second", f"{result['first_rate']:.1f} -> {result['last_rate']:.1f}",
         f"first vs last eighth of the trials; wall {result['wall_s']:.0f} s"),
    ]  # fmt: skip
