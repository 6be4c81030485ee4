"""``avn-study bench``: throughput figures, printed as a table (benchmarks, never timed tests)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from avn_study.study.folder import RESULTS

TARGET_SLICES_PER_S_PER_CORE = 2000
TARGET_PEAK_RSS_GB = 1.5


def _slices_per_second(cases: list, size: int, num_workers: int, batches: int = 200) -> float:
    from avn_study.data.slices import SliceConfig, SliceDataset, make_loader

    loader = make_loader(
        SliceDataset(cases, SliceConfig(size=size, empty_slice_fraction=1.0)), batch_size=16, num_workers=num_workers
    )
    n, done = 0, 0
    it = iter(loader)
    next(it)  # start-up (worker processes) is not throughput
    start = time.perf_counter()
    while done < batches:
        for batch in it:
            n += batch["image"].shape[0]
            done += 1
            if done >= batches:
                break
        else:
            loader.batch_sampler.sampler.set_epoch(done)
            it = iter(loader)
    return n / (time.perf_counter() - start)


def _iterate_for_rss(data: str, cache_dir: str, size: int) -> tuple[float, int]:
    """Run in a fresh process: one full pass over every slice; return (peak RSS GB, slices)."""
    from avn_study.data.cache import build_cache
    from avn_study.data.slices import SliceConfig, SliceDataset, make_loader

    cases = build_cache(data, cache_dir=cache_dir)
    loader = make_loader(SliceDataset(cases, SliceConfig(size=size, empty_slice_fraction=1.0)), batch_size=16)
    n = sum(batch["image"].shape[0] for batch in loader)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, n


def bench_data(
    work: Path, rss_cases: int, size: int = 128, synth_cases: int = 50, batches: int = 200
) -> list[tuple[str, str, str]]:
    import torch

    from avn_study.data.cache import build_cache
    from avn_study.data.phantom import write_cohort

    rows = []
    t0 = time.perf_counter()
    n = synth_cases
    write_cohort(work / "synth", cases=n, seed=0)
    t_synth = time.perf_counter() - t0
    t0 = time.perf_counter()
    cases = build_cache(work / "synth", cache_dir=work / "cache")
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_cache(work / "synth", cache_dir=work / "cache")
    t_hit = time.perf_counter() - t0
    rows += [
        (f"synthesize {n} cases", f"{t_synth:.1f} s", f"{t_synth / n:.2f} s/case"),
        (f"preprocess {n} cases (cold cache)", f"{t_pre:.1f} s", f"{t_pre / n:.2f} s/case"),
        (f"open {n} cases (warm cache: hash only)", f"{t_hit:.2f} s", ""),
    ]
    torch.set_num_threads(1)
    one = _slices_per_second(cases, size, num_workers=0, batches=batches)
    rows.append(
        (
            f"slices/s at {size}x{size}, in-process loader (1 core, the default)",
            f"{one:,.0f}",
            _verdict(one >= TARGET_SLICES_PER_S_PER_CORE, f">= {TARGET_SLICES_PER_S_PER_CORE:,}/core"),
        )
    )
    two = _slices_per_second(cases, size, num_workers=1, batches=batches)
    rows.append((f"slices/s at {size}x{size}, 1 worker process", f"{two:,.0f}", "worker start-up excluded"))

    write_cohort(work / f"c{rss_cases}", cases=rss_cases, seed=1)
    with mp.get_context("spawn").Pool(1) as pool:
        peak, n = pool.apply(_iterate_for_rss, (str(work / f"c{rss_cases}"), str(work / "cache"), size))
    rows.append(
        (
            f"peak RSS iterating {rss_cases} cases ({n:,} slices)",
            f"{peak:.2f} GB",
            _verdict(peak < TARGET_PEAK_RSS_GB, f"< {TARGET_PEAK_RSS_GB} GB"),
        )
    )
    return rows


def _verdict(ok: bool, target: str) -> str:
    return f"target {target}: {'met' if ok else 'MISSED'}"


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul throughput of this process's CPU threads (FLOP/s), best of a few runs."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best


def _train_step_stats(model, batch: int, size: int, steps: int) -> dict[str, float]:
    """Seconds per training step (fwd + bwd + AdamW), inference slices/s, FLOPs per training step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 1, size, size)
    target = (torch.rand(batch, 1, size, size) > 0.95).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(x)
        out = out if isinstance(out, dict) else {"seg": out}
        loss = sum(
            torch.nn.functional.binary_cross_entropy_with_logits(v, target) if k != "recon" else (v - x).abs().mean()
            for k, v in out.items()
            if k in ("seg", "recon", "loc")
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    model.eval()
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        infer_s = (time.perf_counter() - start) / steps
    return {"step_s": step_s, "train_sps": batch / step_s, "infer_sps": batch / infer_s, "flops": flops}


def bench_train(
    size: int = 128, batch: int = 16, steps: int = 5, base_channels: int = 16, depth: int = 4
) -> list[tuple[str, str, str]]:
    import torch

    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model
    from avn_study.vocabulary import ARMS

    peak = matmul_peak_flops()
    rows = [
        (
            f"fp32 matmul peak ({torch.get_num_threads()} threads)",
            f"{peak / 1e9:.1f} GFLOP/s",
            "torch.mm 2048^2, best of 3",
        )
    ]
    stats = {}
    for arm in ARMS:
        torch.manual_seed(0)
        config = TrainConfig.from_flat({"arm": arm, "base_channels": base_channels, "depth": depth, "slice_size": size})
        model = build_model(config)
        stats[arm] = s = _train_step_stats(model, batch, size, steps)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append(
            (
                f"{arm}: train / infer slices/s",
                f"{s['train_sps']:.1f} / {s['infer_sps']:.1f}",
                f"{n_params:,} params, {s['flops'] / 1e9:.1f} GFLOP/step = "
                f"{s['flops'] / s['step_s'] / peak:.0%} of matmul peak",
            )
        )
    ratio = stats["seg+recon+loc"]["step_s"] / stats["seg"]["step_s"]
    rows.append(("step time seg+recon+loc / seg", f"{ratio:.2f}x", _verdict(ratio <= 1.7, "<= 1.7x")))
    rows += _peer_rows(stats["unet"], size, batch, steps, base_channels, depth, peak)
    return rows


def _peer_rows(
    ours: dict[str, float], size: int, batch: int, steps: int, base: int, depth: int, peak: float
) -> list[tuple[str, str, str]]:
    """MONAI's BasicUNet at the same widths (16..256, 4 down-samplings), batch norm and ReLU like ours."""
    try:
        from monai.networks.nets import BasicUNet
    except ImportError:
        return [("MONAI BasicUNet (peer)", "skipped", "pip install 'avn-study[bench]' for the comparison")]
    import torch

    if depth != 4:
        return [("MONAI BasicUNet (peer)", "skipped", "BasicUNet has exactly 4 down-samplings")]
    torch.manual_seed(0)
    features = (base, base * 2, base * 4, base * 8, base * 16, base)
    peer = BasicUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        features=features,
        act=("relu", {"inplace": True}),
        norm="batch",
        upsample="deconv",
    )
    s = _train_step_stats(peer, batch, size, steps)
    n_params = sum(p.numel() for p in peer.parameters())
    speed = s["step_s"] / ours["step_s"]
    return [
        (
            "MONAI BasicUNet: train / infer slices/s",
            f"{s['train_sps']:.1f} / {s['infer_sps']:.1f}",
            f"{n_params:,} params, {s['flops'] / 1e9:.1f} GFLOP/step = {s['flops'] / s['step_s'] / peak:.0%} of peak",
        ),
        (
            "our unet speed vs peer (step time ratio)",
            f"{speed:.2f}x",
            _verdict(speed >= 1.0, ">= 1.0x"),
        ),
    ]


def _sweep_space(path: Path, **changes: object):
    """search_spaces/smoke.yaml with changes (the bench's small, real sweeps)."""
    import yaml

    from avn_study.resources import shipped_space
    from avn_study.study.space import parse_space

    raw = {**yaml.safe_load(shipped_space("smoke").read_text()), **changes}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_space(raw, path)


def _trial_times(root: Path) -> list[dict[str, float]]:
    from avn_study.study.check import read_epochs

    out = []
    for result in sorted(root.glob(f"stage*/*/{RESULTS}")):
        records = read_epochs(result.parent)
        out.append({"total_s": records[-1]["time_total_s"], "val_dice": records[-1]["val_dice"],
                    "epoch_s": [r["time_this_iter_s"] for r in records[1:]]})  # fmt: skip
    return out


def _tune_overhead(work: Path, cohort: Path, base: dict, epochs: int = 8, rounds: int = 3) -> float:
    """Median epoch time of one trial running alone under Tune over that of the same run alone through
    :class:`TrainingRun` (what ``avn-study train`` drives), in alternating rounds so that the machine's
    drift hits both alike (Ray stays up, idle, while the plain run trains). Both checkpoint at the end
    only: checkpoints cost the same in or out of Tune, and how often a sweep writes them is the
    search-space file's ``checkpoint.frequency``."""
    import statistics

    from avn_study.config import TrainConfig
    from avn_study.study.driver import Study
    from avn_study.training.fold import prepare_data
    from avn_study.training.run import TrainingRun

    fixed = {**base["fixed"], "epochs": epochs, "lr": 2e-3}
    changes = {**base, "fixed": fixed, "search": {}, "trials": 1, "max_concurrent": 1, "scheduler": {"type": "none"},
               "checkpoint": {"frequency": epochs, "num_to_keep": 1}}  # fmt: skip
    config = TrainConfig.from_flat({**fixed, "arm": "unet", "schedule": "constant", "schedule_params": {},
                                    "threads": 1})  # fmt: skip
    data = prepare_data(cohort, config)
    in_tune, plain = [], []
    for round_ in range(rounds):
        space = _sweep_space(work / "overhead.yaml", **changes, name=f"bench-overhead-{round_}")
        study = Study(space, cohort, str(work / "storage"), progress=False)
        study.prepare(resume=False)
        study.run()
        in_tune += _trial_times(study.root)[0]["epoch_s"][:-1]  # the last epoch also checkpoints
        run = TrainingRun(config, data)
        seconds = []
        while not run.done:
            t0 = time.perf_counter()
            run.run_epoch()
            seconds.append(time.perf_counter() - t0)
        plain += seconds[1:]  # as in Tune's figures, the first (warm-up) epoch is left out
    return statistics.median(in_tune) / statistics.median(plain) - 1


def bench_sweep(work: Path, epochs: int = 4, trials: int = 8) -> list[tuple[str, str, str]]:
    from ray import tune

    from avn_study.data.phantom import PhantomConfig, write_cohort
    from avn_study.study.driver import Study, init_ray

    t_start = time.perf_counter()
    cohort = write_cohort(work / "cohort", cases=8, seed=0, config=PhantomConfig.tiny())
    first: dict[str, float] = {}

    class FirstResult(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            first.setdefault("t", time.perf_counter())

    unet = {"unet": {"schedule": "constant", "schedule_params": {}}}
    fixed = {**_sweep_space(work / "s.yaml").fixed, "epochs": epochs}
    base = {"protocol": "sweep", "arms": unet, "fixed": fixed, "trials": trials, "max_concurrent": 2,
            "search": {"lr": {"loguniform": [1.0e-3, 1.0e-2]}}}  # fmt: skip
    init_ray(None, num_cpus=2)
    rows = []
    results = {}
    for label, scheduler in (("none", {"type": "none"}), ("asha", {"type": "asha", "grace_period": 1,
                                                                   "reduction_factor": 2})):  # fmt: skip
        space = _sweep_space(work / f"{label}.yaml", **base, name=f"bench-{label}", scheduler=scheduler)
        study = Study(space, cohort, str(work / "storage"), progress=False, callbacks=[FirstResult()])
        study.prepare(resume=False)
        t0 = time.perf_counter()
        study.run()
        results[label] = (time.perf_counter() - t0, _trial_times(study.root))
        if label == "none":
            rows.append(("time from start to the first reported result", f"{first['t'] - t_start:.1f} s",
                         "synth + ray.init + cache + first epoch"))  # fmt: skip
    wall, times = results["none"]
    compute = sum(t["total_s"] for t in times)
    efficiency = compute / (wall * 2)
    rows.append((f"sweep efficiency, {trials} trials x {epochs} epochs on 2 CPUs", f"{efficiency:.2f}",
                 _verdict(efficiency >= 0.85, ">= 0.85")))  # fmt: skip
    overhead = _tune_overhead(work, cohort, base)
    rows.append(("Tune overhead per epoch (trainable vs avn-study train)", f"{overhead:+.1%}",
                 _verdict(overhead <= 0.05, "<= 5%; one trial alone vs one run alone, median epoch")))  # fmt: skip
    for label, (wall, times) in results.items():
        best = max(t["val_dice"] for t in times)
        rows.append((f"scheduler {label}: compute / best val_dice", f"{sum(t['total_s'] for t in times):.0f} s",
                     f"best val_dice {best:.3f}, wall {wall:.0f} s"))  # fmt: skip
    return rows


def _gpu_step_speed(model, batch: int, size: int, dtype, steps: int) -> tuple[float, float]:
    """(training slices/s, peak MiB) of ``steps`` AdamW steps on the GPU, autocast to ``dtype`` (None: fp32)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device="cuda").to(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
            out = out if isinstance(out, dict) else {"seg": out}
            loss = sum(v.float().square().mean() for v in out.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start), torch.cuda.max_memory_allocated() / 2**20


def _gpu_step_rows(size: int, batch: int, base_channels: int, depth: int, steps: int = 20) -> list:
    """Per arm on the GPU: training slices/s in fp32 and bf16 autocast, and the peak memory of a step."""
    import torch

    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model
    from avn_study.vocabulary import ARMS

    rows = []
    for arm in ARMS:
        config = TrainConfig.from_flat({"arm": arm, "base_channels": base_channels, "depth": depth, "slice_size": size})
        result = {}
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            torch.manual_seed(0)
            model = build_model(config).cuda().to(memory_format=torch.channels_last)
            result[label] = _gpu_step_speed(model, batch, size, dtype, steps)
            torch.cuda.empty_cache()
        rows.append((f"{arm}: train slices/s fp32 / bf16", f"{result['fp32'][0]:.0f} / {result['bf16'][0]:.0f}",
                     f"peak memory {result['fp32'][1]:.0f} / {result['bf16'][1]:.0f} MiB per step"))  # fmt: skip
    return rows


class _GpuSampler:
    """Samples GPU utilisation (NVML) every ``period`` seconds on a thread."""

    def __init__(self, period: float = 0.25) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self._stop.wait(period):
            self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    def __enter__(self) -> _GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_gpu(work: Path, per_gpu: int = 4, trials: int = 8, epochs: int = 8) -> list[tuple[str, str, str]]:
    """GPU paths: fp32 vs bf16 step speed and memory per arm, then trial packing: the same ``trials``
    run with ``gpu: 1`` (one at a time) and ``gpu: 1/per_gpu`` (``per_gpu`` at a time)."""
    import torch

    from avn_study.data.phantom import write_cohort
    from avn_study.errors import UsageError
    from avn_study.study.check import read_epochs
    from avn_study.study.driver import Study, init_ray

    if not torch.cuda.is_available():
        raise UsageError("avn-study bench gpu needs a CUDA GPU; this machine has none (torch.cuda.is_available())")
    import yaml

    from avn_study.resources import shipped_space

    repo = shipped_space("ablation")
    fixed = {**yaml.safe_load(repo.read_text())["fixed"], "epochs": epochs}
    rows = [("device", torch.cuda.get_device_name(0), f"torch {torch.__version__}")]
    rows += _gpu_step_rows(fixed["slice_size"], fixed["batch_size"], fixed["base_channels"], fixed["depth"])
    cohort = write_cohort(work / "cohort", cases=16, seed=0)
    init_ray(None, num_cpus=os.cpu_count())
    arms = {"seg+recon+loc": {"schedule": "recon_dependent", "schedule_params": {"pretrain_epochs": 2}}}
    cpus = max(1, min(4, (os.cpu_count() or 2) // per_gpu))
    for share in (1.0, 1.0 / per_gpu):
        label = f"gpu{share:g}"
        space = _sweep_space(work / f"{label}.yaml", name=f"bench-{label}", protocol="sweep", arms=arms, fixed=fixed,
                             search={}, trials=trials, scheduler={"type": "none"}, max_concurrent=per_gpu,
                             resources={"cpu": cpus, "gpu": share})  # fmt: skip
        study = Study(space, cohort, str(work / "storage"), progress=False)
        study.prepare(resume=False)
        with _GpuSampler() as sampler:
            t0 = time.perf_counter()
            study.run()
            wall = time.perf_counter() - t0
        records = [r for f in study.root.glob(f"stage1-*/*/{RESULTS}") for r in read_epochs(f.parent)]
        slices = sum(r["train_slices"] for r in records)
        epoch_s = sorted(r["train_seconds"] for r in records)
        peak = max(r.get("gpu_mem_peak_mb", 0.0) for r in records)
        util = sum(sampler.samples) / max(1, len(sampler.samples))
        rows.append((f"{trials} trials x {epochs} epochs at gpu {share:g} ({round(1 / share)} at a time)",
                     f"{slices / wall:.0f} sl/s", f"wall {wall:.0f} s, GPU busy {util:.0f}% (NVML mean), median "
                     f"train epoch {epoch_s[len(epoch_s) // 2]:.1f} s, peak {peak:.0f} MiB per trial"))  # fmt: skip
    return rows


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(title)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>12}  {note}")


BENCH_MARKER = ".avn-bench"  # in a --work-dir that bench made: only such a folder (or an empty one) is used


def work_folder(work_dir: str | Path | None) -> Path:
    """A fresh temp folder, or ``--work-dir`` when it is new, empty or one bench made before.

    Bench writes cohorts, studies and space files into it, so a folder holding anything else is
    refused rather than written into.

    Raises:
        UsageError: ``work_dir`` is a file, or a non-empty folder bench did not make.
    """
    from avn_study.errors import UsageError

    if not work_dir:
        work = Path(tempfile.mkdtemp(prefix="avn-bench-"))
    else:
        work = Path(work_dir)
        if work.exists() and not work.is_dir():
            raise UsageError(f"--work-dir {work}: is a file; give a new or empty folder")
        if work.is_dir() and any(work.iterdir()) and not (work / BENCH_MARKER).is_file():
            raise UsageError(
                f"--work-dir {work}: holds files avn-study bench did not make, and bench writes cohorts and "
                "studies there; give a new or empty folder"
            )
        work.mkdir(parents=True, exist_ok=True)
    (work / BENCH_MARKER).write_text("made by avn-study bench; its contents may be replaced by the next bench\n")
    return work


def _run_cluster(work: Path, args: argparse.Namespace) -> None:
    """``bench cluster``: both schedulings on Ray's logical resources, or (``--driver-only``) the driver alone."""
    shape = {"folds": list(range(args.outer_folds))} if args.outer_folds else {}
    if args.trials:
        shape["trials"] = args.trials
    folds = f", outer folds 0-{args.outer_folds - 1}" if args.outer_folds else ""
    trials = f", {args.trials} trials per search" if args.trials else ""
    if args.driver_only:
        import optuna

        from avn_study.bench.driver_only import bench_driver_only, driver_only_rows

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per Optuna study otherwise
        epoch_s = args.epoch_seconds or 60.0
        result = bench_driver_only(work, gpus=args.gpus, per_gpu=args.per_gpu, epoch_s=epoch_s, shape=shape,
                                   patients=args.patients)  # fmt: skip
        title = (f"avn-study bench cluster --driver-only (ablation.yaml's shape{folds}{trials}, concurrent rows, "
                 f"{args.gpus} logical GPUs x {args.per_gpu} trials, {args.patients} patients, stand-in trials "
                 f"of {epoch_s:g} simulated s per unet epoch)")  # fmt: skip
        print_table(title, driver_only_rows(result))
        return
    from avn_study.bench.cluster import bench_cluster, cluster_rows

    which = {"both": (False, True), "sequential": (False,), "concurrent": (True,)}[args.scheduling]
    epoch_s = args.epoch_seconds or 0.1
    results = bench_cluster(work, gpus=args.gpus, per_gpu=args.per_gpu, epoch_s=epoch_s, shape=shape or None,
                            schedulings=which, patients=args.patients)  # fmt: skip
    title = (f"avn-study bench cluster (ablation.yaml's shape{folds}{trials}, {args.gpus} logical GPUs x "
             f"{args.per_gpu} trials, {args.patients} patients, stand-in trials of {epoch_s:g} s per unet "
             "epoch)")  # fmt: skip
    print_table(title, cluster_rows(results))


def run(what: str, args: argparse.Namespace) -> int:
    work = work_folder(args.work_dir)
    try:
        if what == "data":
            print_table(f"avn-study bench data (cohorts in {work})", bench_data(work, args.cases or 200))
        elif what == "calibrate":
            from avn_study.bench.calibrate import calibrate, table_rows

            summary = calibrate(work, cases=args.cases or 24, seed=args.seed, epochs=args.epochs, tiny=args.tiny)
            title = (f"avn-study bench calibrate ({args.cases or 24} phantom patients, seed {args.seed}, "
                     f"{args.epochs} epochs, 3 folds, every row alike; Dice over patients with necrosis)")  # fmt: skip
            print_table(title, table_rows(summary))
        elif what == "cluster":
            _run_cluster(work, args)
        elif what == "controller":
            from avn_study.bench.controller import bench_controller, controller_rows

            trials = args.trials or 1000
            result = bench_controller(work, trials, args.epochs)
            title = (f"avn-study bench controller ({trials} trials of {args.epochs} reports telling Tune the metric "
                     f"and the epoch, a checkpoint every 5 epochs, 2 kept; local Ray, reused actors)")  # fmt: skip
            print_table(title, controller_rows(result))
        elif what == "verdicts":
            from avn_study.analysis.design import verdict_tables

            studies = args.cases or 1000
            print(f"avn-study bench verdicts ({studies} simulated studies per cell, seeded)\n")
            print("\n".join(verdict_tables(studies)))
        elif what == "sweep":
            print_table("avn-study bench sweep (local Ray, 2 CPUs, tiny phantom)", bench_sweep(work))
        elif what == "gpu":
            print_table("avn-study bench gpu (the ablation.yaml network)", bench_gpu(work, per_gpu=args.per_gpu))
        elif what == "train":
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            print_table(
                f"avn-study bench train (slice {args.slice_size}, batch 16, {torch.get_num_threads()} threads)",
                bench_train(size=args.slice_size),
            )
            from avn_study.bench.loop_profile import profile_loop, profile_rows

            cases = args.cases or 16
            profile = profile_loop(work, cases=cases, size=args.slice_size)
            title = (f"real training loop outside the model ({cases}-patient phantom, fold 0, 2 epochs, evaluation "
                     f"every epoch, a checkpoint every 5, {torch.get_num_threads()} threads)")  # fmt: skip
            print_table(title, profile_rows(profile))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0
