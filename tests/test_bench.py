"""Smoke runs of the benchmarks (their figures are printed, never asserted as timings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from avn_study.bench.benches import bench_data, bench_train
from avn_study.vocabulary import ARMS


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

    from avn_study.cli.commands import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal path does not apply")
    assert main(["bench", "gpu", "--per-gpu", "4", "--work-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_calibrate_smoke(tmp_path: Path) -> None:
    """Every row alike on one cohort, plus the shortcut that knows where the head is."""
    from avn_study.bench.calibrate import ROWS, calibrate, table_rows

    rows = {row: ROWS[row] for row in ("unet", "unet/wide", "cascade")}
    summary = {s["row"]: s for s in calibrate(tmp_path, cases=6, epochs=1, rows=rows, tiny=True)}
    assert set(summary) == {"threshold in the true head", *rows}
    shortcut = summary["threshold in the true head"]
    assert shortcut["parameters"] == 0 and 0.0 < shortcut["dice_mean"] <= 1.0 and shortcut["n_patients"] > 0
    assert summary["unet/wide"]["parameters"] > summary["unet"]["parameters"]
    assert summary["cascade"]["parameters"] == 2 * summary["unet"]["parameters"]  # two full U-Nets
    assert all(0.0 <= s["dice_mean"] <= 1.0 for s in summary.values())
    assert all(len(s["fold_dice"]) == 3 and min(s["fold_dice"]) <= s["dice_mean"] <= max(s["fold_dice"])
               for s in summary.values())  # fmt: skip
    assert len(table_rows(list(summary.values()))) == 4


def test_loop_profile_times_every_stage_outside_the_model(tmp_path: Path) -> None:
    from avn_study.bench.loop_profile import STAGES, profile_loop, profile_rows

    p = profile_loop(tmp_path, cases=4, size=64, epochs=1, base_channels=4, depth=2, tiny=True, n_folds=2)
    assert set(p["ms_per_slice"]) == set(STAGES) and all(ms > 0 for ms in p["ms_per_slice"].values())
    assert p["overhead_ms_per_slice"] == pytest.approx(sum(p["ms_per_slice"].values()), rel=1e-9)
    assert p["model_ms_per_slice"] > 0 and p["val_predict_ms_per_slice"] > 0 and p["train_slices"] > 0
    assert p["val_cases"] == 2
    rows = profile_rows(p)
    assert rows[-1][0].endswith("everything outside the model") and "target < 1 ms" in rows[-1][2]


def test_bench_cluster_runs_both_schedulings_of_the_real_study(tmp_path: Path) -> None:
    """A tiny shape in a subprocess (the bench starts its own Ray with logical GPUs)."""
    import json
    import subprocess
    import sys

    shape = {"arms": {"unet": {"schedule": "constant"}, "seg+loc": {"schedule": "constant"}}, "groups": {},
             "folds": [0], "trials": 2, "seeds": [0], "fixed": {"epochs": 3, "n_folds": 5, "slice_size": 64,
             "inplane_spacing_mm": 4.0, "schedule_params": {}}, "scheduler": {"type": "asha", "grace_period": 1,
             "reduction_factor": 3}}  # fmt: skip
    code = (
        "import json, sys; from pathlib import Path; from avn_study.bench.cluster import bench_cluster; "
        f"print(json.dumps(bench_cluster(Path(sys.argv[1]), gpus=2, per_gpu=2, epoch_s=0.02, shape={shape!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["scheduling"] for r in results] == ["one row at a time", "concurrent rows"]
    for r in results:
        assert r["slots"] == 4 and all(0 < u <= 1.0 for u in r["utilisation"].values())
        assert r["busy_s"]["stage 1"] > 0 and r["busy_s"]["stage 2"] > 0
    assert (tmp_path / "storage" / "cluster-concurrent" / "stages").is_dir()
    # ablation.yaml gives every seed its own search
    assert (tmp_path / "storage" / "cluster-sequential" / "stage1-seg-loc-outer0-seed0").is_dir()
    from avn_study.bench.cluster import cluster_rows

    rows = cluster_rows(results)
    assert [r[0] for r in rows[-2:]] == ["concurrent rows vs one row at a time",
                                         "concurrent rows without any Ray overhead (model)"]  # fmt: skip
    assert 0 < results[1]["model_ceiling"] <= 1.0
    # what the study cost: a real trial's records (the cohort's own validation cases), analysed and resumed
    cohort = {p.name.removesuffix("_0000.nii.gz") for p in (tmp_path / "cohort-40" / "imagesTr").iterdir()}
    for r in results:
        f = r["footprint"]
        assert f["trials"] == 2 * 2 + 2 * 1  # two rows: a search of 2 trials each, then one stage-2 run each
        assert f["state_mb"] > 0 and f["state_kb_per_trial"] > 0 and f["files"] > 0 and f["resume_s"] > 0
        assert f["analyzed_cases"] >= 8 * f["trials"]  # every trial's 8 validation cases (40 patients, 5 folds)
    records = next((tmp_path / "storage" / "cluster-concurrent" / "stages").glob("*/per_case/epoch_000.json"))
    assert {c["case"] for c in json.loads(records.read_text())} <= cohort
    assert any(r[0] == "concurrent rows: Ray experiment state" for r in rows)


def test_the_driver_alone_runs_the_planned_trials_against_the_schedulings_ceiling(tmp_path: Path) -> None:
    from avn_study.bench.driver_only import bench_driver_only, driver_only_rows

    shape = {"arms": {"unet": {"schedule": "constant"}, "seg+loc": {"schedule": "constant"}}, "groups": {},
             "folds": [0, 1], "trials": 6, "seeds": [0], "fixed": {"epochs": 8, "n_folds": 5, "slice_size": 64,
             "inplane_spacing_mm": 4.0, "schedule_params": {}}, "scheduler": {"type": "asha", "grace_period": 2,
             "reduction_factor": 2}}  # fmt: skip
    result = bench_driver_only(tmp_path, gpus=4, per_gpu=2, epoch_s=60.0, shape=shape, patients=12)
    run = result["run"]
    assert run.trials == result["planned"] == 2 * 2 * 6 + 2 * 2  # 2 rows x 2 outer folds: 6 trials, 1 stage-2 run
    assert run.results < run.trials * 8  # ASHA stopped some trials early
    assert 0 < run.utilisation <= 1 and 0 < result["ceiling"] <= 1 and run.driver_calls > 2 * run.trials
    rows = driver_only_rows(result)
    assert rows[1][2].startswith(f"driver only / ceiling = {run.utilisation / result['ceiling']:.3f}")


def test_bench_cluster_rows_say_whether_the_target_is_met() -> None:
    from avn_study.bench.cluster import cluster_rows

    def result(name: str, wall: float, use: float) -> dict:
        return {
            "scheduling": name,
            "slots": 32,
            "wall_s": wall,
            "stage_wall_s": {"stage 1": wall, "stage 2": 1.0},
            "utilisation": {"stage 1": use, "stage 2": use, "all": use},
        }

    both = cluster_rows([result("one row at a time", 300.0, 0.3), result("concurrent rows", 100.0, 0.92)])
    assert both[-1] == ("concurrent rows vs one row at a time", "3.00x faster", "target >= 0.9 overall: met")
    alone = cluster_rows([result("concurrent rows", 100.0, 0.7)])
    assert alone[-1][1:] == ("(run alone)", "target >= 0.9 overall: missed") and len(alone) == 2
    assert len(cluster_rows([result("one row at a time", 300.0, 0.3)])) == 1


def test_the_cluster_model_bounds_the_scheduling(tmp_path: Path) -> None:
    """model_utilisation: it runs exactly the trials the space plans (every protocol, nnU-Net rows too);
    one slot is always busy; more outer folds fill 32 slots better (the tail of the last searches'
    stage 2 is a smaller share); the model is seeded."""
    import yaml

    from avn_study.bench.cluster import model_utilisation
    from avn_study.resources import shipped_space
    from avn_study.study.space import load_space

    raw = yaml.safe_load(shipped_space("ablation").read_text())
    raw["fixed"] = {**raw["fixed"], "epochs": 20}
    raw["scheduler"] = {**raw["scheduler"], "grace_period": 4}

    def space(base: dict = raw, **changes):
        merged = {**base, **changes}
        if merged["protocol"] != "nested_ablation":
            merged.pop("inner_folds", None)
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(merged))
        return load_space(tmp_path / "s.yaml")

    def utilisation(s, slots: int, seed: int = 0) -> float:
        return model_utilisation(s, slots, seed)["utilisation"]

    one_fold, five = space(folds=[0]), space()
    fair = space(protocol="fair_ablation", folds=[1, 2, 3], seeds=[0, 1], tuning_fold=0)
    sweep = space(protocol="sweep", folds=[0])
    vs_nnunet = yaml.safe_load(shipped_space("vs_nnunet").read_text())
    nnunet = space(vs_nnunet, folds=[0, 1])  # rows with no search
    nnunet_fair = space(vs_nnunet, protocol="fair_ablation", folds=[1, 2], tuning_fold=0)
    for s in (one_fold, five, fair, sweep, nnunet, nnunet_fair):
        plan = s.plan()
        planned = plan["stage1_trials"] + plan["stage2_trials"] + plan["nnunet_trials"]
        assert model_utilisation(s, 32)["trials"] == planned, s.protocol
    assert nnunet.plan()["nnunet_trials"] > 0
    assert utilisation(one_fold, 1) == pytest.approx(1.0)
    assert utilisation(one_fold, 32, seed=1) == utilisation(one_fold, 32, seed=1)
    assert 0.5 < utilisation(one_fold, 32) < utilisation(five, 32) <= 1.0
    assert utilisation(space(folds=[0], scheduler={"type": "none"}), 1) == pytest.approx(1.0)


def test_bench_cluster_flags_choose_the_schedulings_and_the_folds(monkeypatch, capsys) -> None:
    """``--scheduling`` and ``--outer-folds`` reach bench_cluster (which is replaced: the flags are tested)."""
    import avn_study.bench.cluster as bench_cluster
    from avn_study.cli.commands import main

    calls = []

    def fake(work, **kwargs):
        calls.append(kwargs)
        return [{"scheduling": "concurrent rows", "slots": 32, "wall_s": 10.0, "model_ceiling": 0.9,
                 "stage_wall_s": {"stage 1": 8.0, "stage 2": 4.0},
                 "utilisation": {"stage 1": 0.9, "stage 2": 0.9, "all": 0.91}}]  # fmt: skip

    monkeypatch.setattr(bench_cluster, "bench_cluster", fake)
    assert main(["bench", "cluster", "--scheduling", "concurrent", "--outer-folds", "2", "--epoch-seconds", "2"]) == 0
    assert calls == [{"gpus": 8, "per_gpu": 4, "epoch_s": 2.0, "shape": {"folds": [0, 1]}, "schedulings": (True,),
                      "patients": 40}]  # fmt: skip
    out = capsys.readouterr().out
    assert "outer folds 0-1" in out and "target >= 0.9 overall: met" in out
    assert main(["bench", "cluster", "--scheduling", "sequential"]) == 0
    assert calls[-1]["schedulings"] == (False,) and calls[-1]["shape"] is None
    assert main(["bench", "cluster"]) == 0 and calls[-1]["schedulings"] == (False, True)
    assert main(["bench", "cluster", "--patients", "1000", "--trials", "3"]) == 0
    assert (calls[-1]["patients"], calls[-1]["shape"], calls[-1]["epoch_s"]) == (1000, {"trials": 3}, 0.1)


def test_bench_controller_measures_rays_controller_per_trial(tmp_path: Path) -> None:
    """A few trials through the CLI in a subprocess (the bench starts its own Ray): trials shaped like the
    study's, telling Tune only the metric and the epoch."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "avn_study", "bench", "controller", "--trials", "8", "--epochs", "3",
               "--work-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "avn-study bench controller (8 trials of 3 reports" in done.stdout
    for label in ("driver RSS growth per trial", "experiment state per trial", "trial completions per second"):
        assert label in done.stdout, done.stdout
    results = [json.loads(line) for f in (tmp_path / "controller").glob("*/result.json")
               for line in f.read_text().splitlines()]  # fmt: skip
    assert len(results) == 8 * 3 and {"epoch", "val_dice"} <= set(results[0]) and "loss_0" not in results[0]
    state = float(done.stdout.split("experiment state per trial")[1].split("KB")[0])
    assert 5 < state < 20  # Ray's floor for two numbers and two kept checkpoints, ~14-16 KB
