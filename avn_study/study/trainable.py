"""The Ray Tune function trainable: config in, :class:`~avn_study.training.run.TrainingRun` epochs out.

No training logic lives here. The trainable converts Ray's flat config to a
:class:`~avn_study.config.TrainConfig`, resumes from ``tune.get_checkpoint()``, runs one epoch at a
time, and writes each epoch's record (the trial's identity: row, arm, stage, fold, seed, split hash,
node; losses, loss weights, validation metrics) and its per-case metrics into the trial folder. Tune is
told only what it schedules on, the metric and the epoch (:func:`driver_view`): the driver keeps
statistics and copies of every number it is told, for every trial, so a full record (~45 numbers)
cost ~30 KB of experiment state per trial. Checkpoints are safetensors + JSON inside a
``tune.Checkpoint``.

Files of the trial (``resolved_config.json``, ``epochs/epoch_NNN.json``, ``per_case/epoch_NNN.json`` and,
in stage 2 when the split holds a test set, ``per_case/test_epoch_NNN.json`` of the last epoch) are
written straight into
the trial's folder *in the experiment storage*, through the filesystem Ray itself uses for
checkpoints (``tune.get_context().get_storage()``). ``get_trial_dir()`` would name a node-local
staging folder that Ray does not sync from worker nodes, so files written there would be missing
from a multi-node experiment.

Trial configs hold the flat TrainConfig keys, Optuna's sampled keys (``schedule_params.<p>`` allowed),
``_row``/``_stage``/``_repeat`` (identity) and ``_avn`` (where the data is; same for all trials).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from avn_study.baselines.nnunet.run import is_nnunet
from avn_study.study.folder import RESOLVED_CONFIG, epoch_file


def split_trial_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's Ray config -> (flat TrainConfig dict, identity and run-time meta)."""
    from avn_study.study.folder import merge_grid
    from avn_study.study.space import resolve_sampled

    merged = merge_grid(config)
    flat = {k: v for k, v in merged.items() if not k.startswith("_")}
    sampled = {k: flat.pop(k) for k in list(flat) if k.startswith("schedule_params.")}
    meta = {"row": merged.get("_row", flat.get("arm")), "stage": merged.get("_stage", 1),
            "repeat": merged.get("_repeat", 0), **merged.get("_avn", {})}  # fmt: skip
    return resolve_sampled(flat, sampled), meta


def _threads_for_trial() -> int:
    """Torch threads = the CPUs Ray gave this trial (at least 1)."""
    from ray import tune

    try:
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    except Exception:  # not running under Tune (e.g. a direct call in a test)
        cpus = 1
    return max(1, int(cpus))


def _identity(run: Any, meta: dict[str, Any]) -> dict[str, Any]:
    import ray

    from avn_study.models import n_parameters

    cfg = run.config
    return {
        "row": meta["row"], "arm": cfg.model.arm, "schedule": cfg.optim.schedule, "stage": meta["stage"],
        "fold": cfg.data.fold, "seed": cfg.runtime.seed, "repeat": meta["repeat"],
        "split_hash": run.data.split_hash, "data_fingerprint": run.data.data_fingerprint,
        "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
        "n_parameters": n_parameters(run.model),
    }  # fmt: skip


def write_whole(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on the pyarrow filesystem ``fs`` under a temporary name beside it, then move
    it into place: a trial killed mid-write (or retried while rewriting an epoch's record) leaves at most
    the temporary, never a torn file under the final name."""
    import uuid

    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(tmp, compression=None) as stream:  # (else a .gz name is gzipped again)
            stream.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


class TrialFiles:
    """Writes into the trial's folder of the experiment storage (local, shared or a pyarrow URI), and reads
    the study's frozen split from the study folder above it."""

    def __init__(self) -> None:
        from ray import tune

        storage = tune.get_context().get_storage()
        self.fs, self.root = storage.storage_filesystem, storage.trial_fs_path
        self.study = storage.storage_fs_path  # STORAGE/NAME: the study folder, which holds the experiments

    def split(self, meta: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The trial's (split, inner folds), found by the hash in its ``meta`` (:mod:`~avn_study.study.trial_split`)."""
        from avn_study.study.trial_split import trial_split

        return trial_split(meta, self.study, self._read_study)

    def _read_study(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.study}/{name}") as stream:
            return stream.read()

    def write(self, relative: str, data: str | bytes) -> None:
        write_whole(self.fs, f"{self.root}/{relative}", data.encode() if isinstance(data, str) else data)

    def exists(self, relative: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(f"{self.root}/{relative}").type != fs.FileType.NotFound


def driver_view(record: dict[str, Any], metric: str | None) -> dict[str, Any]:
    """What Tune is told of an epoch: the epoch and, when it was evaluated, the study's ``metric`` (all
    the schedulers, the searchers and the progress line read). ``metric`` None: a trial of a study from
    before the trials' epoch records, which reported everything to Tune (it still does)."""
    if metric is None:
        return record
    return {"epoch": record["epoch"], **({metric: record[metric]} if metric in record else {})}


def report_epoch(files: TrialFiles, record: dict[str, Any], meta: dict[str, Any], checkpoint_dir: Any = None) -> None:
    """Writes the epoch's full record into the trial folder, then reports it to Tune (:func:`driver_view`),
    with the checkpoint in ``checkpoint_dir`` if given. The record is written first, so every epoch Tune
    saw has one (``study.check.read_epochs`` holds a missing one for damage)."""
    from ray import tune

    view = driver_view(record, meta.get("metric"))
    if view is not record:
        files.write(epoch_file(record["epoch"]), json.dumps(record))
    if checkpoint_dir is None:
        tune.report(view)
    else:
        tune.report(view, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))


OVERLAY_CASES = 3  # validation cases per trial kept for figures: those with the most reference necrosis


def overlay_bytes(overlays: dict[str, dict[str, Any]], keep: int = OVERLAY_CASES) -> bytes:
    """An ``.npz`` (no pickles) of the ``keep`` cases with the most reference necrosis (ties: case id):
    per case ``{case}/image``, ``{case}/ref``, ``{case}/prob`` and ``{case}/slice``. The choice rests on the
    reference only, so every row's trial on a fold keeps the same cases."""
    import io

    import numpy as np

    chosen = sorted((c for c, o in overlays.items() if o["necrosis_voxels"] > 0),
                    key=lambda c: (-overlays[c]["necrosis_voxels"], c))[:keep]  # fmt: skip
    arrays = {}
    for case in chosen:
        o = overlays[case]
        arrays.update({f"{case}/image": o["image"], f"{case}/ref": o["ref"], f"{case}/prob": o["prob"],
                       f"{case}/slice": np.array(o["slice"])})  # fmt: skip
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def peak_memory_mb(device: Any) -> float:
    """The trial's peak memory so far: the GPU's allocator peak on CUDA, else the worker process's peak
    resident set (an upper bound: Ray reuses a worker for several trials)."""
    import resource

    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _maybe_inject_fault(meta: dict[str, Any], epoch: int, files: TrialFiles) -> None:
    """Test hook (``_avn.fault``): die once at an epoch, so the retry from a checkpoint is exercised."""
    fault = meta.get("fault") or {}
    if fault.get("kill_at_epoch") == epoch and not files.exists(".fault-injected"):
        files.write(".fault-injected", str(epoch))
        os._exit(17)  # a worker crash, not an exception: Ray sees the actor die


def _metrics_only(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("case", "patient")}


def nnunet_trial(flat: dict[str, Any], meta: dict[str, Any]) -> None:
    """A trial of an nnU-Net row (see :mod:`avn_study.baselines.nnunet.run`): nnU-Net's epochs reported as they
    end, then its validation (and test) predictions scored by our metrics in the last report."""
    import shutil

    import ray
    import torch
    from ray import tune

    from avn_study.baselines.nnunet.run import EpochHooks, NnUNetConfig, run_trial
    from avn_study.data.cache import default_cache_dir
    from avn_study.metrics.case import summarize
    from avn_study.study.folder import NNUNET_CHECKPOINT, per_case_file

    cfg = NnUNetConfig.from_flat(flat, source="trial config")
    torch.set_num_threads(cfg.base.runtime.threads)
    files = TrialFiles()
    files.write(RESOLVED_CONFIG, json.dumps(cfg.to_flat(), indent=1))
    identity = {
        "row": meta["row"], "arm": cfg.arm, "schedule": "nnunet", "stage": meta["stage"], "fold": cfg.base.data.fold,
        "seed": cfg.base.runtime.seed, "repeat": meta["repeat"], "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
    }  # fmt: skip

    def report(record: dict[str, Any], checkpoint_dir: Any) -> None:
        report_epoch(files, {**identity, **record}, meta, checkpoint_dir)

    scratch = Path(meta.get("cache_dir") or default_cache_dir()) / "nnunet" / "work"  # node-local, not /tmp
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trial-", dir=scratch))  # nnU-Net's checkpoints and logs; removed after
    try:
        resume_from = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                resume_from = work / "resume.pth"
                shutil.copyfile(Path(directory) / NNUNET_CHECKPOINT, resume_from)
        hooks = EpochHooks(report, int(meta.get("checkpoint_frequency", 1)))
        out = run_trial(cfg, meta["data"], meta.get("cache_dir"), files.split(meta)[0], work, hooks, resume_from,
                        processes=cfg.base.runtime.threads, test=bool(meta.get("test")))  # fmt: skip
        ids = {"split_hash": out["split_hash"], "data_fingerprint": out["data_fingerprint"],
               "n_parameters": out["n_parameters"]}  # fmt: skip
        identity.update(ids)
        epoch = cfg.epochs - 1
        files.write(per_case_file(epoch), json.dumps([{**identity, "epoch": epoch, **c} for c in out["val"]]))
        if out["test"]:
            rows = [{**identity, "epoch": epoch, **c} for c in out["test"]]
            files.write(per_case_file(epoch, test=True), json.dumps(rows))
        files.write("nnunet/splits_final.json", Path(out["splits_final"]).read_text())
        for prediction in sorted(Path(out["predictions"]).glob("*.nii.gz")):  # what the per-case rows score
            files.write(f"nnunet/predictions/{prediction.name}", prediction.read_bytes())
        files.write("nnunet/plans.json", json.dumps(out["plans"], indent=1, default=str))
        for log in sorted(Path(out["output_folder"]).glob("training_log_*.txt"))[-1:]:
            files.write(f"nnunet/{log.name}", log.read_bytes())
        scores = summarize([_metrics_only(c) for c in out["val"]])
        summary = {**out["record"], **scores, "nnunet_epochs": cfg.epochs, "nnunet_configuration": cfg.configuration,
                   "nnunet_iterations_per_epoch": cfg.iterations}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(out["checkpoint"], Path(tmp) / Path(out["checkpoint"]).name)
            report_epoch(files, {**identity, **summary, "epoch": epoch}, meta, tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_trial(config: dict[str, Any]) -> None:
    """The function trainable (see module docstring)."""
    import torch
    from ray import tune

    from avn_study.config import TrainConfig
    from avn_study.study.folder import calibration_file, overlay_file, per_case_file
    from avn_study.training.fold import prepare_data
    from avn_study.training.run import TrainingRun

    flat, meta = split_trial_config(config)
    flat["threads"] = _threads_for_trial()
    if is_nnunet(flat):
        return nnunet_trial(flat, meta)
    train_config = TrainConfig.from_flat(flat, source="trial config")
    torch.set_num_threads(train_config.runtime.threads)
    files = TrialFiles()
    split, inner = files.split(meta)
    data = prepare_data(meta["data"], train_config, meta.get("cache_dir"), meta.get("splits"), inner, split)
    run = TrainingRun(train_config, data)
    if run.device.type == "cuda":  # the peak this trial reaches, not a previous trial's in a reused worker
        torch.cuda.reset_peak_memory_stats(run.device)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            run.restore(directory)
    files.write(RESOLVED_CONFIG, json.dumps(run.config.to_flat(), indent=1))
    identity = _identity(run, meta)
    every = int(meta.get("checkpoint_frequency", 1))
    while not run.done:
        record = run.run_epoch()
        epoch = record["epoch"]
        if "val_dice" in record:
            rows = [{**identity, "epoch": epoch, **case} for case in run.last_per_case]
            files.write(per_case_file(epoch), json.dumps(rows))
        if run.done and run.last_extras:
            files.write(calibration_file(epoch), json.dumps(run.last_extras.get("calibration", {})))
            files.write(overlay_file(epoch), overlay_bytes(run.last_extras.get("overlay", {})))
        if run.done and meta.get("test") and run.data.test:  # stage 2: the held-out test set, once, at the end
            _, test_cases = run.evaluate_test()
            rows = [{**identity, "epoch": epoch, **case} for case in test_cases]
            files.write(per_case_file(epoch, test=True), json.dumps(rows))
        metrics = {**identity, **record, "peak_memory_mb": peak_memory_mb(run.device)}
        if run.done or (epoch + 1) % every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                run.save(tmp)
                report_epoch(files, metrics, meta, tmp)
        else:
            report_epoch(files, metrics, meta)
        _maybe_inject_fault(meta, epoch, files)
