"""A trial's history is its epochs, not its lines; the selection rule's tie-break is stable."""

from __future__ import annotations

import json
from pathlib import Path

from avn_study.analysis.tables import load_experiment
from avn_study.study.folder import epoch_history
from avn_study.study.results import best_trial, read_trials


def _results(iterations: list[int], values: list[float]) -> list[dict]:
    return [{"training_iteration": i, "val_dice": v, "trial_id": "t"} for i, v in zip(iterations, values, strict=True)]


def test_a_retried_epoch_replaces_the_earlier_report() -> None:
    # 4 planned epochs, checkpoint at 2, the node lost after epoch 3: Ray reports epoch 3 again
    history = epoch_history(_results([1, 2, 3, 3, 4], [0.1, 0.2, 0.25, 0.3, 0.4]))
    assert [r["training_iteration"] for r in history] == [1, 2, 3, 4]
    assert history[2]["val_dice"] == 0.3  # the last write of the epoch wins


def test_the_choice_compares_completed_epochs_and_breaks_ties_by_sampling_order() -> None:
    # a retried trial (5 lines, 4 epochs) no longer outranks a better trial that ran 4 epochs
    assert best_trial([("a", 0.0505, 4, 0), ("b", 0.0602, 4, 1)], "max") == "b"
    # ties go to the configuration sampled first, whatever Ray's trial ids are
    assert best_trial([("zz_00001", 0.0, 4, 0), ("aa_00002", 0.0, 4, 1)], "max") == "zz_00001"
    assert best_trial([("x_00002", 0.0, 4), ("x_00001", 0.0, 4)], "max") == "x_00001"  # ids: creation order
    assert best_trial([("a", 3.0, 4, 1), ("b", 2.0, 4, 0)], "min") == "b"
    assert best_trial([("a", float("nan"), 4, 0), ("b", None, 4, 1)], "max") is None
    assert best_trial([("a", 0.9, 2, 0), ("b", 0.1, 4, 1)], "max") == "b"  # the longest first


def _trial(root: Path, name: str, iterations: list[int], values: list[float], sample: int) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"epochs": 4, "_row": "unet", "_stage": 1, "_sample": sample}))
    lines = [json.dumps({**r, "trial_id": name, "epoch": r["training_iteration"] - 1})
             for r in _results(iterations, values)]  # fmt: skip
    (folder / "result.json").write_text("\n".join(lines) + "\n")


def test_the_folder_readers_count_epochs_like_the_live_searcher(tmp_path: Path) -> None:
    experiment = tmp_path / "stage1-unet"
    _trial(experiment, "trial_a", [1, 2, 3, 3, 4], [0.03, 0.04, 0.05, 0.05, 0.0505], sample=0)
    _trial(experiment, "trial_b", [1, 2, 3, 4], [0.02, 0.03, 0.05, 0.0602], sample=1)
    outcomes = {o.trial_id: o for o in read_trials(experiment)}
    assert outcomes["trial_a"].epochs == outcomes["trial_b"].epochs == 4
    chosen = best_trial([(o.trial_id, o.metric, o.epochs, o.order) for o in outcomes.values()], "max")
    assert chosen == "trial_b"
    trials = load_experiment(experiment).trials.set_index("trial_id")
    assert trials.loc["trial_a", "epochs"] == 4 and not trials.loc["trial_a", "stopped_early"]


def _brief_trial(folder: Path, reported: list[int], records: dict[int, object]) -> Path:
    """A trial that told Tune only ``val_dice`` and the epoch (``_avn.metric``), with its epoch records."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"epochs": 3, "_row": "unet", "_avn": {"metric": "val_dice"}}))
    lines = [{"training_iteration": e + 1, "epoch": e, "val_dice": 0.1 * e, "trial_id": "t", "time_total_s": e}
             for e in reported]  # fmt: skip
    (folder / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "epochs").mkdir()
    for epoch, record in records.items():
        (folder / "epochs" / f"epoch_{epoch:03d}.json").write_text(
            record if isinstance(record, str) else json.dumps(record)
        )
    return folder


def test_a_trials_epochs_are_tunes_lines_with_its_records_laid_over(tmp_path: Path) -> None:
    from avn_study.study.check import read_epochs

    full = {e: {"epoch": e, "val_dice": 0.1 * e, "loss_seg": 1.0 - 0.1 * e, "node_id": "n"} for e in range(3)}
    trial = _brief_trial(tmp_path / "trial_t", [0, 1], full)  # epoch 2's record: written, never reported
    epochs = read_epochs(trial)
    assert [e["epoch"] for e in epochs] == [0, 1]  # result.json says which epochs completed
    assert epochs[1]["loss_seg"] == 0.9 and epochs[1]["time_total_s"] == 1 and epochs[1]["node_id"] == "n"
    older = tmp_path / "old"  # a study from before the records: full lines, read as they are
    older.mkdir()
    (older / "params.json").write_text(json.dumps({"epochs": 1, "_avn": {"data": "x"}}))
    (older / "result.json").write_text(json.dumps({"training_iteration": 1, "epoch": 0, "loss_seg": 0.5}) + "\n")
    assert read_epochs(older) == [{"training_iteration": 1, "epoch": 0, "loss_seg": 0.5}]


def test_a_missing_or_damaged_epoch_record_is_named(tmp_path: Path) -> None:
    from avn_study.study.check import trial_damage

    good = {"epoch": 0, "val_dice": 0.0}
    missing = _brief_trial(tmp_path / "a" / "trial_a", [0, 1], {0: good})
    assert trial_damage(missing, finished=False).startswith(f"{missing / 'epochs' / 'epoch_001.json'}: missing")
    truncated = _brief_trial(tmp_path / "b" / "trial_b", [0], {0: '{"epoch": 0, "val_d'})
    assert "epoch_000.json: not valid JSON" in trial_damage(truncated, finished=False)
    listed = _brief_trial(tmp_path / "c" / "trial_c", [0], {0: "[1, 2]"})
    assert "a JSON list, expected the trial's record of one epoch" in trial_damage(listed, finished=False)
    (outcome,) = read_trials(tmp_path / "a")
    assert outcome.status == "DAMAGED" and "epoch_001.json: missing" in outcome.error
