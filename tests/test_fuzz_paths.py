"""Random names and paths thrown at every place a user's string becomes a path (seeded, table-driven).

Whatever the string, the command either refuses it with a usage error or writes only where it should:
every file outside the intended target keeps its checksum.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import small_space
from test_safety import _scan, checksums

from avn_study.cli.commands import main
from avn_study.errors import UsageError

PIECES = ["a", "Z", "7", ".", "..", "/", "\\", " ", "-", "+", "_", "~", "$HOME", "*", "é", "\x00", "\n", "x" * 40,
          "seg+loc", "stage2", "study.json", "../", "./", "//", "run", "ab", "v2", "cohort"]  # fmt: skip


def _exit_code(argv: list[str]) -> int:
    """``main``'s exit code, also when argparse refuses an argument (a NUL byte in a path) by exiting."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


def random_names(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    names = []
    for _ in range(count):
        names.append("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6))))
    return names


@pytest.mark.parametrize("name", random_names(1, 60))
def test_study_names_stay_inside_the_storage(name: str, tmp_path: Path) -> None:
    from avn_study.study.driver import Study
    from avn_study.study.space import load_space

    storage = tmp_path / "storage"
    space = load_space(small_space(tmp_path))
    try:
        study = Study(space, tmp_path, str(storage), name=name, progress=False)
    except UsageError as err:
        assert "is not a safe folder name" in str(err)
        return
    assert study.root.resolve().parent == storage.resolve() and study.root.name == name


@pytest.mark.parametrize("seed", range(6))
def test_row_names_become_one_safe_folder_each_or_are_refused(seed: int, tmp_path: Path) -> None:
    from avn_study.study.folder import Stage1
    from avn_study.study.space import load_space

    rows = {name: {"arm": "unet", "schedule": "constant", "schedule_params": {}} for name in random_names(seed, 4)}
    try:
        space = load_space(small_space(tmp_path, arms=rows))
    except UsageError as err:
        assert any(text in str(err) for text in ("not a safe folder name", "map to the same folder",
                                                 "printable characters", "Unknown"))  # fmt: skip
        return
    folders = [Stage1(row).experiment for row in space.arms]
    assert len({f.lower() for f in folders}) == len(folders)
    for folder in folders:
        assert "/" not in folder and folder not in (".", "..") and not folder.startswith(".")


def _sandbox_paths(seed: int, count: int) -> list[str]:
    """Path strings relative to a sandbox (tmp/a/b/work), most of them hostile; "{tmp}" becomes the
    test's tmp_path, so absolute paths stay inside it too."""
    rng = random.Random(seed)
    out = []
    for name in random_names(seed, count):
        prefix = rng.choice(["", "./", "../", "../../", "sub/", "{tmp}/", "{tmp}/a/b/work/"])
        out.append(prefix + name)
    return out


@pytest.mark.parametrize("target", _sandbox_paths(3, 10))
def test_export_out_changes_nothing_but_its_own_folder(target: str, smoke_experiment: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    sandbox = tmp_path / "a" / "b" / "work"
    sandbox.mkdir(parents=True)
    (sandbox / "keep.txt").write_text("keep")
    (tmp_path / "a" / "keep.txt").write_text("keep")
    monkeypatch.chdir(sandbox)
    before, study_before = checksums(tmp_path), checksums(smoke_experiment)
    target = target.replace("{tmp}", str(tmp_path))
    code = _exit_code(["export", str(smoke_experiment), "--out", target, "--overwrite"])
    after = checksums(tmp_path)
    assert code in (0, 1, 2) and checksums(smoke_experiment) == study_before
    written = Path(target).resolve() if code == 0 else None
    for name, digest in before.items():
        assert after.get(name) == digest, name  # nothing that existed changed or vanished
    for name in set(after) - set(before):
        assert written is not None and written in (tmp_path / name).resolve().parents, name
    if written is not None:
        assert json.loads((written / "config.json").read_text())["format"] == "avn-study-bundle"


@pytest.fixture(scope="module")
def bundle(smoke_experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-bundle") / "bundle"
    assert main(["export", str(smoke_experiment), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("target", _sandbox_paths(5, 10))
def test_predict_output_changes_nothing_but_its_outputs(target: str, bundle: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    sandbox = tmp_path / "a" / "b" / "work"
    sandbox.mkdir(parents=True)
    scan = _scan(sandbox / "scan.nii.gz", np.diag([2.0, 4.0, 2.0, 1.0]))
    (tmp_path / "a" / "keep.json").write_text('{"mine": 1}')
    monkeypatch.chdir(sandbox)
    before, bundle_before = checksums(tmp_path), checksums(bundle)
    target = target.replace("{tmp}", str(tmp_path))
    name = target if target.endswith((".nii", ".nii.gz")) else target + ".nii.gz"
    code = _exit_code(["predict", str(bundle), str(scan), name, "--overwrite"])
    after = checksums(tmp_path)
    assert code in (0, 2) and checksums(bundle) == bundle_before
    for existing, digest in before.items():
        assert after.get(existing) == digest, existing
    if code == 0:
        out = Path(name).resolve() if not Path(name).is_dir() else Path(name).resolve() / "scan.nii.gz"
        created = {(tmp_path / n).resolve() for n in set(after) - set(before)}
        assert created <= {out, out.with_name(out.name.removesuffix(".gz").removesuffix(".nii") + ".json")}
