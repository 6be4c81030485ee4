"""Smoke runs of the benchmarks (their figures are printed, never asserted as timings)."""

from __future__ import annotations

from pathlib import Path

from avn_study.bench import bench_data, bench_train
from avn_study.config import ARMS


def test_bench_data_smoke(tmp_path: Path) -> None:
    rows = bench_data(tmp_path, rss_cases=2, size=64, synth_cases=2, batches=3)
    names = [r[0] for r in rows]
    assert any(n.startswith("slices/s at 64x64, in-process") for n in names)
    assert any(n.startswith("peak RSS iterating 2 cases") for n in names)
    assert all(r[1] for r in rows)


def test_bench_train_smoke() -> None:
    rows = bench_train(size=32, batch=2, steps=1, base_channels=4, depth=4)
    names = [r[0] for r in rows]
    for arm in ARMS:
        assert f"{arm}: train / infer slices/s" in names
    assert "step time seg+recon+loc / seg" in names
    assert any("BasicUNet" in n for n in names)


def test_bench_gpu_without_cuda_is_a_usage_error(tmp_path: Path, capsys) -> None:
    import pytest
    import torch

    from avn_study.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal path does not apply")
    assert main(["bench", "gpu", "--per-gpu", "4", "--work-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
