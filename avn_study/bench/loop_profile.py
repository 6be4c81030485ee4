"""Where a real trial's time goes outside the model: the CPU proxy of ``avn-study bench train``.

Runs a real arm through :class:`~avn_study.training.run.TrainingRun` on a phantom cohort with a
:class:`~avn_study.training.stage_timer.StageTimer`, the way a trial does (an evaluation and a checkpoint every
epoch), and reports each stage outside the model's work per training slice: batch fetch,
host-to-device transfer, augmentation, loss bookkeeping (the device-side sums and the epoch's one
sync), validation paste to 3D and metrics, and the checkpoint. The model's work is forward, backward
and the optimizer step, and the validation forward passes (``val_predict``, printed apart). Validation
is amortised over the epoch's training slices, the checkpoint over ``checkpoint_every`` epochs
(``ablation.yaml`` checkpoints every 5th), since that is what they cost a trial. Ray's own per-epoch
report is not in this loop; ``bench sweep`` measures it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from avn_study.data.layout import DATASET_JSON

TRAINING_STEP = ("forward", "backward", "optimizer")
OVERHEAD_TARGET_MS = 1.0  # everything outside the model, per training slice per core
STAGES = ("fetch", "transfer", "augment", "bookkeeping", "val_paste", "val_metrics", "checkpoint")


def profile_loop(
    work: Path,
    arm: str = "seg+recon+loc",
    cases: int = 16,
    size: int = 128,
    epochs: int = 2,
    base_channels: int = 16,
    depth: int = 4,
    seed: int = 0,
    tiny: bool = False,
    checkpoint_every: int = 5,
    n_folds: int = 5,
) -> dict[str, Any]:
    """Time every stage of ``epochs`` real epochs of ``arm`` (fold 0 of a ``cases``-patient phantom;
    ``tiny``: the coarse test phantom at 4 mm; ``n_folds``: the split's folds).

    Returns:
        ``ms_per_slice`` (stage -> milliseconds per training slice), ``model_ms_per_slice``,
        ``overhead_ms_per_slice``, ``val_ms_per_case``, ``train_slices`` and ``val_cases`` per epoch.
    """
    from avn_study.config import TrainConfig
    from avn_study.data.phantom import PhantomConfig, write_cohort
    from avn_study.training.fold import prepare_data
    from avn_study.training.run import TrainingRun
    from avn_study.training.stage_timer import StageTimer

    cohort = work / f"profile-cohort-{cases}-{seed}{'-tiny' if tiny else ''}"
    if not (cohort / DATASET_JSON).is_file():
        write_cohort(cohort, cases=cases, seed=seed, config=PhantomConfig.tiny() if tiny else PhantomConfig())
    flat = {"arm": arm, "slice_size": size, "inplane_spacing_mm": 4.0 if tiny else 2.0, "epochs": epochs,
            "base_channels": base_channels, "depth": depth, "schedule": "constant", "schedule_params": {},
            "fold": 0, "seed": seed, "n_folds": n_folds}  # fmt: skip
    config = TrainConfig.from_flat(flat)
    data = prepare_data(cohort, config, work / "profile-cache", work / f"profile-splits-{cases}-{seed}.json")
    run = TrainingRun(config, data)
    run.timer = timer = StageTimer(run.device)
    run.measure_reference()  # outside the timed loop, like torch's first-call warm-up
    slices = 0.0
    with tempfile.TemporaryDirectory(dir=work) as ckpt:
        while not run.done:
            slices += run.run_epoch()["train_slices"]
            with timer("checkpoint"):
                run.save(Path(ckpt) / f"epoch-{run.epoch}")
    timer.seconds["checkpoint"] /= checkpoint_every  # saved every epoch here, every checkpoint_every-th in a trial
    per_slice = {name: 1e3 * timer.seconds.get(name, 0.0) / slices for name in STAGES}
    val_calls = timer.calls.get("val_metrics", 0)
    val_seconds = sum(timer.seconds.get(n, 0.0) for n in ("val_predict", "val_paste", "val_metrics"))
    return {
        "arm": arm,
        "ms_per_slice": per_slice,
        "model_ms_per_slice": 1e3
        * sum(timer.seconds.get(n, 0.0) for n in ("forward", "backward", "optimizer"))
        / slices,
        "val_predict_ms_per_slice": 1e3 * timer.seconds.get("val_predict", 0.0) / slices,
        "overhead_ms_per_slice": 1e3 * timer.overhead() / slices,
        "val_ms_per_case": 1e3 * val_seconds / max(1, val_calls),
        "train_slices": slices / epochs,
        "val_cases": len(data.val),
    }


def profile_rows(profile: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows for :func:`avn_study.bench.benches.print_table`."""
    p, arm = profile, profile["arm"]
    rows = [(f"{arm}: {name}", f"{ms:.3f} ms/sl", "per training slice") for name, ms in p["ms_per_slice"].items()]
    every = f"{p['val_cases']} case(s) every epoch, {p['train_slices']:.0f} training slices per epoch"
    rows.append((f"{arm}: validation per case (all stages)", f"{p['val_ms_per_case']:.1f} ms", every))
    rows.append((f"{arm}: model (forward, backward, optimizer)", f"{p['model_ms_per_slice']:.3f} ms/sl", ""))
    rows.append((f"{arm}: validation forward passes", f"{p['val_predict_ms_per_slice']:.3f} ms/sl", "model work"))
    ok = p["overhead_ms_per_slice"] < OVERHEAD_TARGET_MS
    verdict = f"{'OK' if ok else 'MISSED'}: target < {OVERHEAD_TARGET_MS:g} ms per training slice per core"
    rows.append((f"{arm}: everything outside the model", f"{p['overhead_ms_per_slice']:.3f} ms/sl", verdict))
    return rows
