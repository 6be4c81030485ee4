"""What we write survives damage, races and faults (issue 23): checksummed bundles, outputs renamed into
place whole and never over what we did not stage, clear refusals of unwritable folders, deep YAML, a live
driver, symlink loops; group-readable modes, quoted hints, nearly constant images, repaired headers.

Each case asserts on the exit code, the message and checksums of what must stay intact. Bundles are the
small random ones of ``test_predict`` (no study needed); races and kills run real processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import make_bundle, without_checksums
from test_safety import _scan, checksums

from avn_study.cli.commands import main
from avn_study.errors import DataError, UsageError
from avn_study.outputs import clean_stale, shell, staged_folder, temp_name

CORONAL = np.diag([2.0, 4.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("integrity") / "b")


@pytest.fixture
def bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def scans(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _scan(folder / f"case{i}_0000.nii.gz", CORONAL)
    return folder


def chattr(path: Path, flag: str) -> None:
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"chattr {flag} does not work here ({done.stderr.strip()}); root ignores chmod")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------------------ 1. integrity
def test_a_flipped_weight_byte_is_refused_naming_the_file(bundle_copy: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    config = json.loads((bundle_copy / "config.json").read_text())
    assert set(config["checksums"]) == {"model.safetensors", "metrics.json", "provenance.json"}
    weights = bundle_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40  # one bit of one weight: the header still parses, shapes still fit
    weights.write_bytes(bytes(data))
    scan = _scan(tmp_path / "scan.nii.gz", CORONAL)
    before = checksums(bundle_copy) | {"scan": checksums(tmp_path)["scan.nii.gz"]}
    assert main(["predict", str(bundle_copy), str(scan), str(tmp_path / "mask.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: SHA-256 " in err and "differs from the" in err and "altered or damaged after export" in err
    assert not (tmp_path / "mask.nii.gz").exists() and not (tmp_path / "mask.json").exists()
    assert checksums(bundle_copy) | {"scan": checksums(tmp_path)["scan.nii.gz"]} == before
    (bundle_copy / "metrics.json").write_text("{}")  # any listed file, not only weights
    with pytest.raises(DataError, match=r"metrics\.json: SHA-256"):
        from avn_study.bundle.format import load_bundle

        load_bundle(bundle_copy)


def test_a_bundle_from_before_checksums_loads_with_a_warning(bundle_copy: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from avn_study.bundle.format import load_bundle

    edit = json.loads((bundle_copy / "config.json").read_text())
    edit.pop("checksums")
    (bundle_copy / "config.json").write_text(json.dumps(edit))
    with pytest.raises(DataError, match="format version 3 bundle lists the SHA-256 of its files"):
        load_bundle(bundle_copy)  # a version-3 bundle stripped of them is refused
    without_checksums(bundle_copy)  # as version 2 wrote it
    assert load_bundle(bundle_copy).verified is False
    scan = _scan(tmp_path / "scan.nii.gz", CORONAL)
    assert main(["predict", str(bundle_copy), str(scan), str(tmp_path / "mask.nii.gz")]) == 0
    assert "written before bundles recorded checksums" in capsys.readouterr().err
    record = json.loads((tmp_path / "mask.json").read_text())
    assert any("could not be checked for damage" in w for w in record["warnings"]) and record["complete"] is True


def test_non_finite_probabilities_are_refused_naming_the_case(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_predict import ARCH

    from avn_study.bundle.format import write_bundle
    from avn_study.config import TrainConfig
    from avn_study.models.runtime import build_model

    config = TrainConfig.from_flat({**ARCH, "arm": "seg+loc", "gating": "none"})
    model = build_model(config).eval()
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] = float("nan")  # one weight
    bundle, _ = write_bundle(tmp_path / "nan", model, config.to_flat(), {}, {"trial_id": "nan"})
    inputs = scans(tmp_path / "in", 2)
    before = checksums(inputs)
    assert main(["predict", str(bundle), str(inputs / "case0_0000.nii.gz"), str(tmp_path / "m.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert f"{inputs / 'case0_0000.nii.gz'}: the model produced NaN/Inf for" in err and "'seg' probabilities" in err
    assert not (tmp_path / "m.nii.gz").exists() and not (tmp_path / "m.json").exists()
    assert main(["predict", str(bundle), str(inputs), str(tmp_path / "out")]) == 2  # folder mode: every case named
    err = capsys.readouterr().err
    assert "2 of 2 input(s) could not be predicted" in err and "case1_0000.nii.gz: the model produced NaN" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["volumes.json"] and checksums(inputs) == before


# ----------------------------------------------------------------------------------------- 2. atomic
def test_the_final_rename_never_removes_what_appeared_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()  # an empty folder may be used...
    with pytest.raises(UsageError, match="appeared while this command ran"), staged_folder(out) as staged:
        (staged / "metrics.json").write_text("{}")
        (out / "notes.txt").write_text("mine")  # ...but the user put a file into it while we worked
    assert checksums(tmp_path) == {"run/notes.txt": checksums(out)["notes.txt"]}  # nothing else, no temporary
    kept_message = r"the result is kept in .*run\.unplaced-"
    with pytest.raises(UsageError, match=kept_message), staged_folder(out, keep_on_conflict=True) as staged:
        (staged / "metrics.json").write_text('{"history": []}')  # train: a run is not thrown away
    kept = next(tmp_path.glob("run.unplaced-*"))
    assert (kept / "metrics.json").read_text() == '{"history": []}' and (out / "notes.txt").read_text() == "mine"


def test_train_never_deletes_a_file_put_into_its_output_while_it_runs(
    toy_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from avn_study.training.run import TrainingRun

    out = tmp_path / "run"
    out.mkdir()
    epoch = TrainingRun.run_epoch

    def epoch_while_the_user_writes(self: TrainingRun) -> dict:
        (out / "notes.txt").write_text("mine")
        return epoch(self)

    monkeypatch.setattr(TrainingRun, "run_epoch", epoch_while_the_user_writes)
    argv = ["train", "--data", str(toy_cohort), "--out", str(out), "--epochs", "1", "--slice-size", "32",
            "--base-channels", "4", "--depth", "2", "--set", "n_folds=3", "--quiet", "--arm", "unet",
            "--schedule", "constant", "--cache-dir", str(tmp_path / "c"),
            "--splits", str(tmp_path / "s.json")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out}: appeared while this command ran" in err and "the result is kept in" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    kept = next(tmp_path.glob("run.unplaced-*"))  # hours of training are not thrown away either
    assert json.loads((kept / "metrics.json").read_text())["history"] and (kept / "checkpoint").is_dir()


def test_overwrite_checks_the_kind_again_right_before_the_swap(bundle: Path, tmp_path: Path) -> None:
    from avn_study.bundle.format import is_bundle

    out = Path(shutil.copytree(bundle, tmp_path / "b"))
    with pytest.raises(UsageError, match="appeared while"), staged_folder(out, is_bundle) as staged:
        (staged / "x").write_text("new")
        shutil.rmtree(out)
        out.mkdir()
        (out / "thesis.tex").write_text("not a bundle")  # replaced by something else while we worked
    assert (out / "thesis.tex").read_text() == "not a bundle" and [p.name for p in tmp_path.iterdir()] == ["b"]
    copy = Path(shutil.copytree(bundle, tmp_path / "c"))
    with staged_folder(copy, is_bundle) as staged:  # still a bundle: swapped whole
        (staged / "new.txt").write_text("new")
    assert [p.name for p in copy.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_renames_never_replace_a_name_that_exists(renameat2: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from avn_study import outputs

    if not renameat2:  # another OS, or a file system without renameat2: link, exclusive mkdir, two renames
        monkeypatch.setattr(outputs, "_renameat2", lambda *args: False)
    for name, text in (("new.txt", "new"), ("theirs.txt", "theirs"), ("new/a", "new"), ("theirs/b", "theirs")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    before = checksums(tmp_path)
    for src, dst in (("new.txt", "theirs.txt"), ("new", "theirs"), ("new.txt", "theirs")):
        with pytest.raises(FileExistsError):
            outputs.rename_noreplace(tmp_path / src, tmp_path / dst)
    assert checksums(tmp_path) == before  # nothing replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "new.txt", "theirs", "theirs.txt"]  # no placeholder
    outputs.place(tmp_path / "new", tmp_path / "theirs", replace=lambda path: True)  # allowed: swapped whole
    outputs.place(tmp_path / "new.txt", tmp_path / "fresh.txt")
    assert sorted(checksums(tmp_path)) == ["fresh.txt", "theirs.txt", "theirs/a"]


def test_two_writers_of_one_folder_give_one_success_and_one_refusal(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    command = [sys.executable, "-m", "avn_study", "synth", str(out), "--cases", "1", "--tiny"]
    runs = [subprocess.Popen([*command, "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for seed in (1, 2)]  # fmt: skip
    results = [(r.wait(timeout=300), *r.communicate()) for r in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (_, won, _), (_, _, lost) = sorted(results, key=lambda r: r[0])
    assert "wrote a phantom cohort" in won and ("appeared while this command ran" in lost or "already exists" in lost)
    seed = 1 if "seed 1" in won else 2
    reference = tmp_path / "reference"
    assert main(["synth", str(reference), "--cases", "1", "--tiny", "--seed", str(seed)]) == 0
    assert checksums(out) == checksums(reference)  # the winner's cohort, whole; the loser left nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "reference"]


def test_stale_temporaries_of_a_killed_run_are_cleaned_by_the_next(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    host = temp_name("x").split("-")[1]
    stale = tmp_path / f".bundle.tmp-{host}-{dead_pid()}-0badcafe"
    live = tmp_path / f".bundle.tmp-{host}-{os.getpid()}-0000beef"  # a running export's: kept
    mine = tmp_path / ".bundle.tmp-notes"  # not our naming: kept
    legacy, fresh = tmp_path / ".bundle.tmp-k3j_x9a2", tmp_path / ".bundle.tmp-aaaa1111"  # mkdtemp's, before
    for folder in (stale, live, mine, legacy, fresh):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))  # an old version's, untouched for 2 hours
    make_bundle(out)
    assert not stale.exists() and live.exists() and mine.exists() and (out / "config.json").is_file()
    assert not legacy.exists() and fresh.exists()  # (fresh: maybe an old version's export still running)
    aside = tmp_path / f".gone.old-{host}-{dead_pid()}-0000cafe"  # a swap killed between its two renames
    aside.mkdir()
    (aside / "config.json").write_text("old bundle")
    assert clean_stale(tmp_path / "gone") == [aside] and (tmp_path / "gone" / "config.json").read_text() == "old bundle"
    assert clean_stale(out) == []


PREDICT_AND_HANG = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import avn_study.bundle.predict as predict

    original, calls = predict.save_in_geometry, []

    def write(labels, geometry, path):
        calls.append(path)
        if len(calls) == 2:  # the second mask: half written when SIGKILL comes
            Path(path).write_bytes(b"\\x1f\\x8b" + bytes(1000))
            Path(sys.argv[4]).write_text(str(path))
            time.sleep(300)
        return original(labels, geometry, path)

    predict.save_in_geometry = write
    from avn_study.cli.commands import main
    sys.exit(main(["predict", sys.argv[1], sys.argv[2], sys.argv[3], "--device", "cpu"]))
""")


def test_sigkill_during_predict_leaves_no_truncated_mask_and_overwrite_recovers(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs, out, ready = scans(tmp_path / "in", 3), tmp_path / "out", tmp_path / "ready"
    before = checksums(inputs)
    script = tmp_path / "hang.py"
    script.write_text(PREDICT_AND_HANG)
    child = subprocess.Popen([sys.executable, str(script), str(bundle), str(inputs), str(out), str(ready)],
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), child.stderr.read() if child.poll() is not None else "timed out"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if not n.startswith(".")] == ["case0.nii.gz", "volumes.json"]  # case1: no final name
    assert nib.load(out / "case0.nii.gz").shape == (40, 12, 40)  # the finished one is whole
    record = json.loads((out / "volumes.json").read_text())
    assert record["complete"] is False and record["planned"] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert main(["predict", str(bundle), str(inputs), str(out)]) == 2
    assert "case0.nii.gz: already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["predict", str(bundle), str(inputs), str(out), "--overwrite"]) == 0  # its own partial output
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz", "volumes.json"]
    assert json.loads((out / "volumes.json").read_text())["complete"] is True and checksums(inputs) == before


# ------------------------------------------------------------------------------------ 3. fail clearly
def test_an_immutable_cohort_or_cache_folder_exits_2_naming_it(toy_cohort: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cache = tmp_path / "cache"
    cache.mkdir()
    chattr(cache, "+i")
    try:
        assert main(["split", str(toy_cohort), "--folds", "3", "--cache-dir", str(cache)]) == 2
        err = capsys.readouterr().err
        assert f"{cache}: the preprocessing cache cannot be written" in err and "set AVN_STUDY_CACHE" in err
    finally:
        chattr(cache, "-i")
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AVN_STUDY_CACHE", raising=False)
    chattr(home / ".cache", "+i")
    try:
        train = ["train", "--data", str(toy_cohort), "--out", str(tmp_path / "run"), "--epochs", "1"]
        assert main(train) == 2
        err = capsys.readouterr().err
        assert f"{home / '.cache' / 'avn-study'}: the preprocessing cache cannot be written" in err
        assert "AVN_STUDY_CACHE" in err and "Traceback" not in err and not (tmp_path / "run").exists()
    finally:
        chattr(home / ".cache", "-i")
    before = checksums(toy_cohort)
    chattr(toy_cohort, "+i")
    try:
        assert main(["split", str(toy_cohort), "--folds", "3", "--cache-dir", str(cache)]) == 2
        err = capsys.readouterr().err
        assert f"{toy_cohort} cannot be written (Operation not permitted)" in err and "pass --out FILE" in err
    finally:
        chattr(toy_cohort, "-i")
    assert checksums(toy_cohort) == before


def test_an_output_place_that_cannot_be_written_fails_before_any_work(
    toy_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    chattr(shelf, "+i")
    try:
        started = time.perf_counter()
        assert main(["train", "--data", str(toy_cohort), "--out", str(shelf / "run"), "--epochs", "1"]) == 2
        assert f"--out {shelf / 'run'}: {shelf} cannot be written" in capsys.readouterr().err
        assert main(["synth", str(shelf / "deep" / "c"), "--cases", "1", "--tiny"]) == 2
        assert f"{shelf} cannot be written" in capsys.readouterr().err and time.perf_counter() - started < 10
        scan = _scan(tmp_path / "scan.nii.gz", CORONAL)
        assert main(["predict", str(make_bundle(tmp_path / "b")), str(scan), str(shelf / "m.nii.gz")]) == 2
        assert f"OUTPUT {shelf / 'm.nii.gz'}: {shelf} cannot be written" in capsys.readouterr().err
    finally:
        chattr(shelf, "-i")
    assert list(shelf.iterdir()) == []


def test_deeply_nested_yaml_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = tmp_path / "deep.yaml"
    space.write_text("name: deep\nfixed: {epochs: " + "[" * 500 + "]" * 500 + "}\n")
    assert main(["sweep", str(space), "--data", str(tmp_path), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{space}: line 2: lists or mappings nested more than 32 levels deep" in err and "Recursion" not in err
    deep = "schedule_params=" + "{a: " * 600 + "1" + "}" * 600
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set", deep]) == 2
    assert "--set schedule_params: line 1: lists or mappings nested more than 32" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.yaml"]


# ------------------------------------------------------------------------- 4. live driver, link loops
def test_export_refuses_a_live_driver_or_waits_for_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from avn_study.bundle import export as export

    study = tmp_path / "study"
    study.mkdir()
    lock = study / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                "heartbeat": time.time()}))  # fmt: skip
    before = checksums(study)
    assert main(["export", str(study), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"{study} is being run by a live driver (pid {os.getpid()} on {socket.gethostname()}" in err
    assert "pass --wait to wait for it" in err and not (tmp_path / "b").exists() and checksums(study) == before
    monkeypatch.setattr(export, "LOCK_POLL_S", 0.05)
    threading.Timer(0.5, lock.unlink).start()  # the driver finishes
    assert main(["export", str(study), "--out", str(tmp_path / "b"), "--wait"]) == 2  # (this folder has no trials)
    err = capsys.readouterr().err
    assert "waiting for the driver of" in err and "neither a study folder" in err and "live driver" not in err


def test_predict_reports_a_symlink_loop_in_its_input_folder(bundle: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    inputs = scans(tmp_path / "in", 1)
    (inputs / "loop_0000.nii.gz").symlink_to(inputs / "loop_0000.nii.gz")
    (inputs / "gone_0000.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    assert main(["predict", str(bundle), str(inputs), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{inputs / 'loop_0000.nii.gz'}: a symbolic link loop" in err
    assert f"{inputs / 'gone_0000.nii.gz'}: a symbolic link to {tmp_path / 'nowhere.nii.gz'}, which does not" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- 5. modes, hints, odd images
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_bundles_and_run_folders_get_the_umask_modes(mask: int, tmp_path: Path) -> None:
    from avn_study.training.checkpoint import save_weights

    old = os.umask(mask)
    try:
        bundle = make_bundle(tmp_path / "b")
        with staged_folder(tmp_path / "run") as run:
            save_weights(torch.nn.Linear(2, 2), run / "checkpoint", {})
    finally:
        os.umask(old)
    for folder in (bundle, tmp_path / "run", tmp_path / "run" / "checkpoint"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask, folder
    for file in [*bundle.iterdir(), *(tmp_path / "run" / "checkpoint").iterdir()]:
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file


def test_printed_hints_are_shell_quoted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shlex

    folder = tmp_path / "my cohort's scans"
    folder.mkdir()
    assert main(["verify", str(folder)]) == 2
    err = capsys.readouterr().err
    hint = err.split("(see `", 1)[1].split("`", 1)[0]
    assert shlex.split(hint) == ["avn-study", "verify", str(folder)]
    assert shlex.split(shell("avn-study", "demo", "--out", folder)) == ["avn-study", "demo", "--out", str(folder)]


def test_verify_warns_about_an_image_constant_but_for_one_voxel(toy_cohort: Path,
                                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    path = toy_cohort / "imagesTr" / "toy_000_0000.nii.gz"
    image = nib.load(path)
    data = np.full(image.shape, 100, np.int16)
    data[3, 3, 3] = 900
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
    assert main(["verify", str(toy_cohort)]) == 0  # a warning, not an error
    out = capsys.readouterr().out
    assert f"WARNING: {path}: image is constant but for 1 of 2,880 voxels (value 100)" in out
    assert "trained on, as all zeros" in out


def test_a_header_repair_is_blamed_on_the_file_that_holds_it(toy_cohort: Path, bundle: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    image = toy_cohort / "imagesTr" / "toy_000_0000.nii.gz"
    stored = nib.load(image)
    broken = nib.Nifti1Image(np.asarray(stored.dataobj), None)
    broken.header.set_qform(None, code=0)
    broken.header.set_sform(None, code=0)
    broken.header["pixdim"][1:4] = [0.0, 4.0, 2.0]  # nibabel reads 0 as 1, with only a log line
    nib.save(broken, image)
    assert main(["verify", str(toy_cohort)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert any(f"{image}: header field 'pixdim' holds an invalid value" in line for line in errors)
    assert not any("labelsTr" in line for line in errors), errors
    assert main(["predict", str(bundle), str(image), str(tmp_path / "m.nii.gz")]) == 2  # not predicted at 1 mm
    err = capsys.readouterr().err
    assert f"{image}: header field 'pixdim' holds an invalid value" in err and not (tmp_path / "m.nii.gz").exists()
