"""``avn-study bench``: throughput, calibration, cluster scheduling and the verdict's simulations.

The public names of ``avn_study.bench.benches`` are importable from here too, as they were before the package
existed.
"""

from __future__ import annotations

from avn_study import lazy_exports

__getattr__ = lazy_exports(
    "avn_study.bench.benches",
    (
        "BENCH_MARKER",
        "TARGET_PEAK_RSS_GB",
        "TARGET_SLICES_PER_S_PER_CORE",
        "bench_data",
        "bench_gpu",
        "bench_sweep",
        "bench_train",
        "matmul_peak_flops",
        "print_table",
        "run",
        "work_folder",
    ),
)
