"""One run's training (fold data, epoch loop, validation): every arm x schedule trains, runs are deterministic
and resumable, NaN stops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avn_study.cli.commands import main
from avn_study.config import TrainConfig
from avn_study.data.slices import SliceDataset, augment_batch, validation_volumes
from avn_study.errors import AvnError
from avn_study.models import runtime
from avn_study.training import loop, validation
from avn_study.training.fold import prepare_data
from avn_study.training.loop import NonFiniteLossError
from avn_study.training.run import TrainingRun
from avn_study.training.schedules import create_schedule, list_schedules
from avn_study.vocabulary import ARMS

# small enough for seconds per run on 2 CPU cores; 4 mm x 64 px still holds both hips
TINY = {
    "slice_size": 64,
    "inplane_spacing_mm": 4.0,
    "base_channels": 4,
    "depth": 2,
    "batch_size": 8,
    "n_folds": 3,
    "epochs": 2,
    "threads": 1,
    "schedule_params": {},
}
TRAIN_ARGS = [
    "--slice-size",
    "64",
    "--base-channels",
    "4",
    "--depth",
    "2",
    "--batch-size",
    "8",
    "--threads",
    "1",
    "--set",
    "n_folds=3",
    "--set",
    "inplane_spacing_mm=4.0",
    "--quiet",
]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def tiny_data(tiny_phantom: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    splits = tmp_path_factory.mktemp("splits") / "splits.json"
    return prepare_data(tiny_phantom, TrainConfig.from_flat(TINY), shared_cache, splits)


def _needs_recon(schedule: str) -> bool:
    try:
        create_schedule(schedule, ("seg", "loc"))
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("schedule", list_schedules())
@pytest.mark.parametrize("arm", ARMS)
def test_train_cli_runs_every_arm_and_schedule(
    arm: str, schedule: str, tiny_phantom: Path, shared_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params = "{pretrain_epochs: 1}" if schedule in ("pretrain", "recon_dependent") else "{}"
    argv = [
        "train",
        "--data",
        str(tiny_phantom),
        "--out",
        str(tmp_path / "run"),
        "--arm",
        arm,
        "--schedule",
        schedule,
        "--epochs",
        "2",
        "--cache-dir",
        str(shared_cache),
        "--splits",
        str(tmp_path / "splits.json"),
        "--set",
        f"schedule_params={params}",
        *TRAIN_ARGS,
    ]
    code = main(argv)
    err = capsys.readouterr().err
    if "recon" not in arm and _needs_recon(schedule):
        assert code == 2 and f"schedule '{schedule}' needs the 'recon' branch" in err
        return
    assert code == 0, err
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    from avn_study.vocabulary import ARMS as ARM_SPECS

    branches = ARM_SPECS[arm].branches
    for record in metrics["history"]:
        assert {f"w_{b}" for b in branches} <= set(record)
        assert all(math.isfinite(record[f"loss_{b}"]) for b in branches)
    assert 0.0 <= metrics["final"]["val_dice"] <= 1.0
    assert metrics["provenance"]["split_hash"]
    assert (tmp_path / "run/per_case.csv").read_text().startswith("case,patient,dice")
    assert (tmp_path / "run/checkpoint/model.safetensors").is_file()


def _history(config: TrainConfig, data) -> list[dict]:
    run = TrainingRun(config, data)
    while not run.done:
        run.run_epoch()
    return run.history


def _comparable(history: list[dict]) -> str:
    """JSON text without timings (NaN-safe: NaN == NaN only when it is the same object)."""
    return json.dumps([{k: v for k, v in r.items() if k != "train_seconds"} for r in history], sort_keys=True)


def test_same_seed_same_metrics(tiny_data) -> None:
    config = TrainConfig.from_flat({**TINY, "arm": "seg+recon+loc", "schedule": "dwa"})
    assert _comparable(_history(config, tiny_data)) == _comparable(_history(config, tiny_data))
    other = _history(config.replace(seed=1), tiny_data)
    assert _comparable(other) != _comparable(_history(config, tiny_data))


def test_resume_continues_exactly(tiny_data, tmp_path: Path) -> None:
    # on the CPU: bitwise equality is the point, and CUDA kernels are not bitwise deterministic
    config = TrainConfig.from_flat({**TINY, "arm": "seg+recon+loc", "schedule": "uncertainty", "epochs": 3,
                                    "device": "cpu"})  # fmt: skip
    straight = _history(config, tiny_data)
    first = TrainingRun(config, tiny_data)
    first.run_epoch()
    first.run_epoch()
    first.save(tmp_path / "ckpt")
    resumed = TrainingRun(config, tiny_data)
    resumed.restore(tmp_path / "ckpt")
    assert resumed.epoch == 2
    resumed.run_epoch()
    assert _comparable(resumed.history) == _comparable(straight)


def test_nan_loss_stops_with_epoch_and_term(tiny_data, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop.branch_losses

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        losses["loc"] = losses["loc"] * float("nan")
        return losses

    monkeypatch.setattr(loop, "branch_losses", poisoned)
    run = TrainingRun(TrainConfig.from_flat({**TINY, "arm": "seg+loc", "schedule": "constant"}), tiny_data)
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 0: loss term 'loc' is nan"):
        run.run_epoch()


def test_train_cli_reports_nan_as_runtime_failure(
    tiny_phantom: Path, shared_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "train",
        "--data",
        str(tiny_phantom),
        "--out",
        str(tmp_path / "r"),
        "--arm",
        "seg",
        "--lr",
        "1e30",
        "--schedule",
        "constant",
        "--epochs",
        "2",
        "--cache-dir",
        str(shared_cache),
        "--splits",
        str(tmp_path / "s.json"),
        *TRAIN_ARGS,
    ]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "loss term" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--arm", "seg+rcon"], "Unknown arm 'seg+rcon'; did you mean 'seg+recon'?"),
        (["--schedule", "linaer"], "Unknown schedule 'linaer'; did you mean 'linear'?"),
        (["--slice-size", "62"], "slice_size=62 must be divisible by 2**depth=4"),
        (["--set", "fold=7"], "fold must be in [0, n_folds - 1] = [0, 2], got fold=7"),
        (["--set", "lr"], "--set expects KEY=VALUE"),
    ],
)
def test_train_cli_bad_arguments(
    extra: list[str],
    fragment: str,
    tiny_phantom: Path,
    shared_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    argv = [
        "train",
        "--data",
        str(tiny_phantom),
        "--out",
        str(tmp_path / "r"),
        "--epochs",
        "1",
        "--cache-dir",
        str(shared_cache),
        "--splits",
        str(tmp_path / "s.json"),
        *TRAIN_ARGS,
        *extra,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_train_refuses_broken_data(toy_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (toy_cohort / "labelsTr/toy_001.nii.gz").write_bytes(b"\x1f\x8b broken")
    assert (
        main(["train", "--data", str(toy_cohort), "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
        == 2
    )
    assert "toy_001.nii.gz: corrupt gzip data" in capsys.readouterr().err


def test_evaluate_scores_a_perfect_prediction(tiny_data, monkeypatch: pytest.MonkeyPatch) -> None:
    """Predicting exactly the (cropped) reference gives Dice 1 everywhere, healthy cases included."""
    config = TrainConfig.from_flat({**TINY, "arm": "unet", "schedule": "constant"})
    run = TrainingRun(config, tiny_data)
    dataset = SliceDataset(tiny_data.val, run.slice_config)
    targets, start = [], 0
    for case in tiny_data.val:
        n = case.image.shape[0]
        targets.append({"seg": dataset.__getitems__(list(range(start, start + n)))["seg"][:, 0].numpy()})
        start += n
    answers = iter(targets)
    monkeypatch.setattr(validation, "predict_slices", lambda *args, **kwargs: next(answers))
    summary, per_case = validation.evaluate(run.model, tiny_data.val, run.slice_config, torch.device("cpu"))
    assert [c["dice"] for c in per_case] == [1.0] * len(per_case)
    assert summary["val_dice"] == 1.0 and summary["n_cases"] == len(tiny_data.val)
    assert {c["case"] for c in per_case} == {c.case_id for c in tiny_data.val}


def test_device_names_are_checked() -> None:
    from avn_study.errors import AvnError, UsageError

    assert runtime.resolve_device("cpu").type == "cpu"
    with pytest.raises(UsageError, match=r"'gpu'.*use auto, cpu, cuda or cuda:N"):
        runtime.resolve_device("gpu")
    if torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA device"):
            runtime.resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(AvnError, match="CUDA is not available"):
            runtime.resolve_device("cuda:0")


def test_recon_dependent_reference_is_the_untrained_loss_whatever_the_learning_rate(tiny_data) -> None:
    """L_ref is measured before the first step, so it cannot depend on lr (epoch 0's mean loss did)."""
    flat = {**TINY, "arm": "seg+recon", "schedule": "recon_dependent", "schedule_params": {"pretrain_epochs": 1}}
    references, first_epoch = [], []
    for lr in (1e-4, 3e-3):
        run = TrainingRun(TrainConfig.from_flat({**flat, "lr": lr}), tiny_data)
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        measured = run.measure_reference()
        after = run.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
        record = run.run_epoch()
        assert record["ref_loss_recon"] == measured["recon"] == run.schedule.state_dict()["reference_loss"]
        references.append(record["ref_loss_recon"])
        first_epoch.append(record["loss_recon"])
        assert "ref_loss_recon" not in run.run_epoch()  # measured once, kept in the schedule's state
    assert references[0] == references[1]  # same seed, same untrained network, same slices
    assert abs(first_epoch[0] - first_epoch[1]) > 1e-3  # while the first epoch's mean loss moved with lr


def test_schedules_without_a_reference_train_as_before(tiny_data) -> None:
    run = TrainingRun(TrainConfig.from_flat({**TINY, "arm": "seg+recon", "schedule": "linear"}), tiny_data)
    assert run.schedule.has_reference and not any(k.startswith("ref_loss_") for k in run.run_epoch())


def test_inner_fold_trains_and_validates_inside_the_outer_training_patients(
    tiny_phantom: Path, shared_cache: Path, tmp_path: Path
) -> None:
    splits = tmp_path / "splits.json"
    outer = prepare_data(tiny_phantom, TrainConfig.from_flat(TINY), shared_cache, splits)
    for inner_fold in (0, 1):
        config = TrainConfig.from_flat({**TINY, "inner_fold": inner_fold, "n_inner_folds": 2})
        inner = prepare_data(tiny_phantom, config, shared_cache, splits)
        train, val = {c.case_id for c in inner.train}, {c.case_id for c in inner.val}
        assert train | val == {c.case_id for c in outer.train} and not train & val and val
        assert inner.split_hash == outer.split_hash and inner.inner_split_hash


def test_train_scores_the_held_out_test_set_apart(tiny_phantom: Path, shared_cache: Path, tmp_path: Path) -> None:
    from avn_study.data.splits import make_splits, write_splits

    cases = [p.name.removesuffix("_0000.nii.gz") for p in sorted((tiny_phantom / "imagesTr").glob("*.nii.gz"))]
    splits = write_splits(make_splits({c: c for c in cases}, k=2, seed=0, test_fraction=0.34), tmp_path / "s.json")
    test_cases = json.loads(splits.read_text())["test"]
    argv = ["train", "--data", str(tiny_phantom), "--out", str(tmp_path / "run"), "--arm", "unet", "--schedule",
            "constant", "--epochs", "1", "--splits", str(splits), "--cache-dir", str(shared_cache), "--set",
            "n_folds=2", *TRAIN_ARGS[:-5], "--set", "inplane_spacing_mm=4.0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["provenance"]["test_cases"] == test_cases and "val_dice" in metrics["test"]
    scored = (tmp_path / "run" / "test_per_case.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in scored) == sorted(test_cases)
    assert not set(metrics["provenance"]["val_cases"]) & set(test_cases)
    assert all("test" not in key for record in metrics["history"] for key in record)  # never in an epoch record


def test_nan_loss_is_found_at_its_step_though_the_epoch_syncs_once(tiny_data, monkeypatch) -> None:
    """Losses are read once per epoch; a NaN at a later step still names that step, term and value."""
    real, calls = loop.branch_losses, []

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:  # steps 2, 3, ... (the network is NaN after step 2 anyway)
            losses["seg"] = losses["seg"] + float("inf")
        return losses

    monkeypatch.setattr(loop, "branch_losses", poisoned)
    run = TrainingRun(TrainConfig.from_flat({**TINY, "arm": "seg+loc", "schedule": "constant"}), tiny_data)
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 2: loss term 'seg' is inf"):
        run.run_epoch()


def _old_epoch_loop(run: TrainingRun, epoch: int) -> dict[str, float]:
    """The epoch loop before losses were summed on the device: a host sync and ``.item()`` per step."""
    from collections import defaultdict

    model, weights = run.model, run.schedule.weights(epoch, run.history)
    model.train()
    run.batches.set_epoch(epoch)
    generator = torch.Generator().manual_seed(run.config.runtime.seed * 1_000_003 + epoch)
    sums: dict[str, float] = defaultdict(float)
    n = 0
    for batch in run.batches:
        batch = runtime.move_batch(batch, run.device, False)
        if run.augment is not None:
            batch = augment_batch(batch, run.augment, generator)
        outputs = model(batch["image"])
        losses = loop.branch_losses({k: v.float() for k, v in outputs.items()}, batch, tuple(model.branches),
                                      run.loss_config)  # fmt: skip
        total = run.schedule.combine(losses, weights)
        assert torch.isfinite(total)
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
        run.optimizer.step()
        b = batch["image"].shape[0]
        n += b
        sums["loss_total"] += total.item() * b
        for name, value in losses.items():
            sums[f"loss_{name}"] += value.item() * b
    return {k: v / n for k, v in sums.items()}


@pytest.mark.parametrize("arm", ["seg+recon+loc", "unet"])
def test_epoch_loop_gives_the_numbers_of_the_per_step_loop(tiny_data, arm: str) -> None:
    """Bit-identical losses and weights on CPU: summing on the device changed no number."""
    config = TrainConfig.from_flat({**TINY, "arm": arm, "schedule": "constant", "eval_every": 100})
    new, old = TrainingRun(config, tiny_data), TrainingRun(config, tiny_data)
    for epoch in range(2):
        for group in (*new.optimizer.param_groups, *old.optimizer.param_groups):
            group["lr"] = loop.cosine_lr(config.optim.lr, epoch, config.optim.epochs)
        record = new.run_epoch()
        new_losses = {k: v for k, v in record.items() if k.startswith("loss_")}
        assert new_losses == _old_epoch_loop(old, epoch)  # exact, not approximate
        old.history.append(record)
    for a, b in zip(new.model.state_dict().values(), old.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_stage_timer_names_every_stage_of_a_real_epoch(tiny_data) -> None:
    from avn_study.training.stage_timer import MODEL_STAGES, StageTimer

    run = TrainingRun(TrainConfig.from_flat({**TINY, "arm": "seg+recon+loc", "epochs": 1}), tiny_data)
    run.timer = StageTimer(run.device)
    record = run.run_epoch()
    stages = set(run.timer.seconds)
    assert {"fetch", "transfer", "augment", "bookkeeping", *MODEL_STAGES} <= stages
    assert {"val_predict", "val_paste", "val_metrics"} <= stages
    assert run.timer.calls["forward"] == run.timer.calls["optimizer"] == len(run.batches)
    assert 0 < run.timer.overhead() < sum(run.timer.seconds.values())
    assert "val_dice" in record


# ------------------------------------------------------------------------------- batch sources


def test_resident_batches_are_the_streamed_batches(tiny_data) -> None:
    from avn_study.data.batches import ResidentBatches, StreamedBatches
    from avn_study.data.slices import SliceConfig, SliceDataset

    dataset = SliceDataset(tiny_data.train, SliceConfig(size=64, necrosis_oversample=2))
    resident = ResidentBatches(dataset, batch_size=8, seed=3, device=torch.device("cpu"))
    streamed = StreamedBatches(dataset, batch_size=8, seed=3)
    assert resident.kind == "resident" and streamed.kind == "streamed"
    for epoch in range(2):
        resident.set_epoch(epoch)
        streamed.set_epoch(epoch)
        pairs = list(zip(resident, streamed, strict=True))
        assert len(pairs) == len(resident) == len(streamed) > 1
        for a, b in pairs:
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype == torch.float32
                assert torch.equal(a[key], b[key]), (epoch, key)
    assert resident.seg.dtype == torch.bool and bool(resident.seg.any())


def test_a_run_on_resident_slices_gives_the_same_numbers(tiny_data) -> None:
    """CPU runs stay bit-identical whichever source feeds them (augmentation included)."""
    config = TrainConfig.from_flat({**TINY, "arm": "seg+recon+loc", "schedule": "dwa", "augment": True})
    runs = [TrainingRun(config.replace(resident=mode), tiny_data) for mode in ("on", "off")]
    assert [r.batches.kind for r in runs] == ["resident", "streamed"]
    histories = [_comparable(_history(config.replace(resident=mode), tiny_data)) for mode in ("on", "off")]
    assert histories[0] == histories[1]
    assert runs[0].provenance()["batch_source"] == "resident"
    assert runs[1].provenance()["autocast"] == "off"


def test_read_ahead_yields_the_loader_batches_and_passes_errors_on(tiny_data) -> None:
    from avn_study.data import batches as batches_module
    from avn_study.data.slices import SliceDataset

    loader = batches_module.make_loader(SliceDataset(tiny_data.train), batch_size=8, seed=1)
    expected = list(loader)
    got = list(batches_module._read_ahead(loader, depth=2))
    assert len(got) == len(expected)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, expected, strict=True))
    partial = batches_module._read_ahead(loader, depth=1)  # abandoned early: the reader thread ends
    next(partial)
    partial.close()

    def broken():
        yield expected[0]
        raise OSError("cache file vanished")

    with pytest.raises(OSError, match="cache file vanished"):
        list(batches_module._read_ahead(broken(), depth=2))


def test_batch_source_on_cuda_keeps_slices_resident_only_when_they_fit(tiny_data, monkeypatch) -> None:
    from avn_study.data import batches as batches_module
    from avn_study.data.slices import SliceDataset

    dataset = SliceDataset(tiny_data.train)
    need = batches_module.resident_bytes(dataset)
    monkeypatch.setattr(batches_module.ResidentBatches, "__init__", lambda self, *a: None)
    free = {"bytes": 100 * need}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 100 * need))
    cuda = torch.device("cuda")

    def kind(**kwargs) -> str:
        return batches_module.batch_source(dataset, batch_size=8, seed=0, device=cuda, **kwargs).kind

    assert kind() == "resident"  # 1 % of the device
    assert kind(memory_fraction=0.005) == "prefetched"  # over the share: streamed, read ahead
    assert kind(resident="off") == "prefetched"
    free["bytes"] = need // 2
    assert kind() == "prefetched"
    with pytest.raises(AvnError, match=r"resident=on: the fold's \d+ training slices need"):
        kind(resident="on")
    assert batches_module.batch_source(dataset, batch_size=8, seed=0, device=torch.device("cpu")).kind == "streamed"


def test_full_metrics_every_adds_hd95_on_every_nth_validation_and_the_last(tiny_data) -> None:
    config = TrainConfig.from_flat({**TINY, "arm": "seg", "schedule": "constant", "epochs": 5, "full_metrics_every": 2})
    quick, full = _history(config, tiny_data), _history(config.replace(full_metrics_every=1), tiny_data)
    assert ["hd95_mm" in r for r in quick] == [False, True, False, True, True]
    assert all("hd95_mm" in r and "lesion_sensitivity" in r for r in full)
    for q, f in zip(quick, full, strict=True):  # the cheap metrics are the same numbers either way
        assert {k: f[k] for k in q if k != "train_seconds"} == {k: v for k, v in q.items() if k != "train_seconds"}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("eval_every", 0, "eval_every must be >= 1"),
        ("full_metrics_every", 0, "full_metrics_every must be >= 1"),
        ("threshold", 1.5, r"threshold must be in \(0, 1\)"),
        ("amp", "fp16", "amp must be one of auto, bf16, off"),
        ("resident", "yes", "resident must be one of auto, on, off"),
        ("resident_memory_fraction", 0.0, r"resident_memory_fraction must be in \(0, 1\]"),
        ("threads", -1, "threads must be >= 0"),
    ],
)
def test_runtime_options_are_checked_when_the_config_is_built(key: str, value, message: str) -> None:
    from avn_study.errors import UsageError

    with pytest.raises(UsageError, match=f"trial config: {message}"):
        TrainConfig.from_flat({key: value}, source="trial config")


def test_train_a_unet_without_naming_a_schedule(tiny_phantom: Path, shared_cache: Path, tmp_path: Path) -> None:
    """The default schedule follows the arm: `train --arm unet` runs (constant weights), as the help says."""
    args = ["train", "--data", str(tiny_phantom), "--out", str(tmp_path / "run"), "--arm", "unet", "--epochs", "1",
            "--cache-dir", str(shared_cache), "--splits", str(tmp_path / "splits.json"), *TRAIN_ARGS]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["schedule"] == "constant"


@pytest.mark.parametrize("slice_size", [64, 32])  # 32 px: the crop cuts the reference
def test_a_quick_validation_counts_on_the_device_what_the_pasted_volumes_give(tiny_data, slice_size: int) -> None:
    """The cheap metrics of a quick validation (voxel counts taken on the model's device, only integers
    copied back) equal case_metrics on the pasted volumes, case by case, for every output."""
    config = TrainConfig.from_flat({**TINY, "arm": "seg+recon+loc", "schedule": "constant", "slice_size": slice_size})
    run = TrainingRun(config, tiny_data)
    torch.manual_seed(0)
    for p in run.model.parameters():  # an untrained network predicts ~0.5 everywhere: spread its outputs
        torch.nn.init.normal_(p, std=0.3)
    first = next(validation_volumes(list(tiny_data.val), run.slice_config))
    probs = validation.predict_slices(run.model, first.image, torch.device("cpu"))
    threshold = float(np.median(probs["seg"]))  # half of the voxels predicted: partial overlaps
    args = (run.model, tiny_data.val, run.slice_config, torch.device("cpu"), None, threshold)
    _, quick = validation.evaluate(*args, full=False)
    _, full = validation.evaluate(*args, full=True)
    # not trivial: predictions and references on the same cases, partial overlaps
    assert any(c["pred_volume_ml"] > 0 and c["ref_volume_ml"] > 0 for c in full)
    assert any(0 < c["loc_dice"] < 1 for c in full) and (slice_size == 32 or any(0 < c["dice"] < 1 for c in full))
    for q, f in zip(quick, full, strict=True):
        assert set(q) == {"case", "patient", "dice", "volume_error_ml", "abs_volume_error_ml", "ref_volume_ml",
                          "pred_volume_ml", "has_necrosis", "loc_dice", "recon_psnr"}  # fmt: skip
        assert q == {k: f[k] for k in q}  # exactly, not approximately
