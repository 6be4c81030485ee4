"""The data commands end to end: synth -> verify, corruption named per file, split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avn_study.cli.parser import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "c"
    assert main(["synth", str(out), "--cases", "8", "--seed", "1"]) == 0
    return out


def test_synth_then_verify_is_clean(cohort: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(cohort)]) == 0
    assert "OK, 8 labelled case(s) checked" in capsys.readouterr().out
    spec = json.loads((cohort / "dataset.json").read_text())
    assert spec["numTraining"] == 8 and len(spec["patients"]) == 8


def test_corrupting_any_file_is_named(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cohort, broken)
    files = sorted(broken.glob("*Tr/*.nii.gz"))
    for path in files:  # flip one byte in the middle of each compressed stream and one of its CRC-32
        data = bytearray(path.read_bytes())  # (a mid-stream flip alone can decode to the same bytes: in a
        data[len(data) // 2] ^= 0xFF  # label map of zeros, a back-reference moved to other zeros is harmless)
        data[-8] ^= 0xFF
        path.write_bytes(bytes(data))
    assert main(["verify", str(broken)]) == 2
    err = capsys.readouterr().err
    for path in files:
        assert f"{path}: corrupt gzip data" in err
    (broken / "dataset.json").write_text('{"labels": ')
    assert main(["verify", str(broken)]) == 2
    assert f"{broken / 'dataset.json'}: not valid JSON" in capsys.readouterr().err


def test_split_command_freezes_folds(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "splits.json"
    assert main(["split", str(cohort), "--folds", "4", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    splits = json.loads(out.read_text())
    assert splits["k"] == 4 and sorted(c for f in splits["folds"] for c in f["val"]) == sorted(
        json.loads((cohort / "dataset.json").read_text())["patients"]
    )
    capsys.readouterr()
    argv = ["split", str(cohort), "--folds", "9", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--overwrite"]
    assert main(argv) == 2
    assert "k must be between 2 and the number of patients (8)" in capsys.readouterr().err
    assert json.loads(out.read_text()) == splits  # a refused split leaves the frozen one alone


def test_split_holds_out_a_test_set(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "splits.json"
    argv = ["split", str(cohort), "--folds", "3", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--test-fraction", "0.25"]) == 0
    assert "held out of every fold" in capsys.readouterr().out
    splits = json.loads(out.read_text())
    assert splits["test"] and not set(splits["test"]) & {c for f in splits["folds"] for c in f["val"]}
    with pytest.raises(SystemExit):
        main([*argv, "--test-fraction", "1"])
    assert "--test-fraction: must be in [0, 1), got 1.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["synth", "x", "--cases", "0"], "must be >= 1"),
        (["verify"], "the following arguments are required"),
        (["bench", "cluster", "--epoch-seconds", "0"], "must be a positive number of seconds, got 0"),
        (["bench", "cluster", "--epoch-seconds", "nan"], "must be a positive number of seconds, got nan"),
    ],
)
def test_bad_usage_exits_2(argv: list[str], fragment: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_bench_refuses_a_work_dir_holding_files_it_did_not_make(tmp_path: Path, capsys) -> None:
    from avn_study.bench.benches import BENCH_MARKER, work_folder

    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "storage").write_text("a user's file")
    assert main(["bench", "data", "--cases", "1", "--work-dir", str(mine)]) == 2
    assert "holds files avn-study bench did not make" in capsys.readouterr().err
    assert (mine / "storage").read_text() == "a user's file" and not (mine / BENCH_MARKER).exists()
    assert main(["bench", "data", "--work-dir", str(mine / "storage")]) == 2
    assert "is a file" in capsys.readouterr().err
    fresh = work_folder(tmp_path / "new")
    (fresh / "cohort").mkdir()
    assert work_folder(fresh) == fresh  # bench's own folder is reused


def test_verify_of_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "dataset folder does not exist" in capsys.readouterr().err


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys) -> None:
    """Only the project's own errors are messages (exit 2/1); anything else is a bug: traceback, exit 3."""
    from avn_study.cli import parser as cli

    def broken(args):
        raise ValueError("an internal invariant broke")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_verify(parser(), broken))
    assert cli.main(["verify", "x"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err and "please report it" in err


def _with_verify(parser, func):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.choices["verify"].set_defaults(func=func)
    return parser


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["synth", "x", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["demo", "--seed", "-3"], "--seed must be an integer >= 0, got -3"),
    ],
)
def test_inputs_that_once_escaped_as_value_errors_are_usage_errors(
    argv, fragment, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_demo_tiny_never_replaces_a_file_it_did_not_write(tmp_path: Path, capsys) -> None:
    (tmp_path / "tiny.yaml").write_text("mine: 1\n")
    assert main(["demo", "--tiny", "--out", str(tmp_path), "--quiet"]) == 2
    assert "is not the tiny demo's space" in capsys.readouterr().err
    assert (tmp_path / "tiny.yaml").read_text() == "mine: 1\n" and not (tmp_path / "cohort").exists()


def test_the_old_module_still_holds_every_name_it_had() -> None:
    """``avn_study.cli.commands`` held every command before the split by group: its names resolve to the new
    homes' objects, the plan helpers without importing the plan module early."""
    from avn_study.cli import bundle, commands, data, parser, study
    from avn_study.study import launch, plan

    moved = {"main": parser.main, "build_parser": parser.build_parser, "cmd_verify": data.cmd_verify,
             "cmd_sweep": study.cmd_sweep, "_inference_args": bundle._inference_args, "run_study": launch.run_study,
             "_stop_on_sigterm": launch._stop_on_sigterm, "_plan_text": plan.plan_text,
             "_cohort_patients": plan.cohort_sizes}  # fmt: skip
    for name, obj in moved.items():
        assert getattr(commands, name) is obj, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        commands.nope  # noqa: B018
