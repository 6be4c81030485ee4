"""``avn-study bench``: throughput figures, printed as a table (benchmarks, never timed tests)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

TARGET_SLICES_PER_S_PER_CORE = 2000
TARGET_PEAK_RSS_GB = 1.5


def _slices_per_second(cases: list, size: int, num_workers: int, batches: int = 200) -> float:
    from avn_study.data.slices import SliceConfig, SliceDataset, make_loader

    loader = make_loader(SliceDataset(cases, SliceConfig(size=size, empty_slice_fraction=1.0)),
                         batch_size=16, num_workers=num_workers)
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


def bench_data(work: Path, rss_cases: int, size: int = 128) -> list[tuple[str, str, str]]:
    import torch

    from avn_study.data.cache import build_cache
    from avn_study.data.phantom import write_cohort

    rows = []
    t0 = time.perf_counter()
    write_cohort(work / "c50", cases=50, seed=0)
    t_synth = time.perf_counter() - t0
    t0 = time.perf_counter()
    cases = build_cache(work / "c50", cache_dir=work / "cache")
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_cache(work / "c50", cache_dir=work / "cache")
    t_hit = time.perf_counter() - t0
    rows += [("synthesize 50 cases", f"{t_synth:.1f} s", f"{t_synth / 50:.2f} s/case"),
             ("preprocess 50 cases (cold cache)", f"{t_pre:.1f} s", f"{t_pre / 50:.2f} s/case"),
             ("open 50 cases (warm cache: hash only)", f"{t_hit:.2f} s", "")]
    torch.set_num_threads(1)
    one = _slices_per_second(cases, size, num_workers=0)
    rows.append((f"slices/s at {size}x{size}, in-process loader (1 core, the default)", f"{one:,.0f}",
                 f"target >= {TARGET_SLICES_PER_S_PER_CORE:,}/core: {'met' if one >= TARGET_SLICES_PER_S_PER_CORE else 'MISSED'}"))
    two = _slices_per_second(cases, size, num_workers=1)
    rows.append((f"slices/s at {size}x{size}, 1 worker process", f"{two:,.0f}", "worker start-up excluded"))

    write_cohort(work / f"c{rss_cases}", cases=rss_cases, seed=1)
    with mp.get_context("spawn").Pool(1) as pool:
        peak, n = pool.apply(_iterate_for_rss, (str(work / f"c{rss_cases}"), str(work / "cache"), size))
    rows.append((f"peak RSS iterating {rss_cases} cases ({n:,} slices)", f"{peak:.2f} GB",
                 f"target < {TARGET_PEAK_RSS_GB} GB: {'met' if peak < TARGET_PEAK_RSS_GB else 'MISSED'}"))
    return rows


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(title)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>12}  {note}")


def run(what: str, args: argparse.Namespace) -> int:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="avn-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if what == "data":
            print_table(f"avn-study bench data (cohorts in {work})", bench_data(work, args.cases))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0
