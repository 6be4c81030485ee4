"""A trial's share of the driver's state does not grow with the cohort: its parameters name the split
by hash and the search its choice came from, never a patient list (docs/benchmarks.md, "Growth")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import small_space, write_toy_cohort

from avn_study.bench.footprint import experiment_states, params_bytes
from avn_study.study.folder import merge_grid

SIZES = (16, 200)  # patients


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same one-row fair ablation (one stage-1 trial, one stage-2 trial, one epoch each) on toy cohorts
    of 16 and 200 patients, run like a user runs it."""
    work = tmp_path_factory.mktemp("scale")
    space = small_space(work, arms={"unet": {"schedule": "constant", "schedule_params": {}}}, trials=1, folds=[1])
    raw = yaml.safe_load(space.read_text())
    raw["fixed"] = {**raw["fixed"], "epochs": 1, "slice_size": 32}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    roots = {}
    for n in SIZES:
        cohort = write_toy_cohort(work / f"toy{n}", n=n)
        command = [sys.executable, "-m", "avn_study", "sweep", str(space), "--data", str(cohort),
                   "--storage", str(work / f"storage{n}"), "--num-cpus", "2", "--quiet"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        roots[n] = work / f"storage{n}" / "smoke"
    return roots


def test_a_trials_experiment_state_is_the_same_size_at_16_and_200_patients(studies: dict[int, Path]) -> None:
    per_trial = {n: {s.experiment: s.per_trial for s in experiment_states(root)} for n, root in studies.items()}
    small, large = per_trial[SIZES[0]], per_trial[SIZES[1]]
    assert set(small) == set(large) == {"stage1-unet", "stage2"}
    for experiment, size in small.items():  # (it grew by ~1 KB per patient when trials carried the split)
        assert abs(large[experiment] - size) <= 0.1 * size, (experiment, size, large[experiment])
        # Tune is told the metric and the epoch: ~15 KB (Ray's floor ~14 KB; ~32 KB when told the full record)
        assert size <= 20_000, (experiment, size)
    sizes = [params_bytes(root) for root in studies.values()]
    assert abs(sizes[1] - sizes[0]) <= 0.1 * sizes[0], sizes


def test_no_trial_names_a_case_or_carries_a_split(studies: dict[int, Path]) -> None:
    root = studies[SIZES[1]]
    cases = {p.name.removesuffix(".nii.gz") for p in (root.parents[1] / "toy200" / "labelsTr").iterdir()}
    for params in root.glob("*/*/params.json"):
        text = params.read_text()
        assert not any(f'"{case}"' in text for case in cases), params
        meta = merge_grid(json.loads(text))["_avn"]
        assert "split" not in meta and "inner" not in meta and "_selected_on" not in merge_grid(json.loads(text))
        assert meta["split_hash"] == json.loads((root / "splits.json").read_text())["hash"]


def test_a_nested_studys_trials_read_their_inner_folds_by_reference(nested_experiment: Path) -> None:
    nested = json.loads((nested_experiment / "nested_splits.json").read_text())
    outers = set()
    for params in nested_experiment.glob("*/*/params.json"):
        merged = merge_grid(json.loads(params.read_text()))
        assert "inner" not in merged["_avn"] and "split" not in merged["_avn"], params
        assert merged["_avn"]["split_hash"] == nested["outer_hash"]
        if merged.get("_stage") == 1:
            outers.add(merged["_avn"]["outer"])
    assert outers == {int(k) for k in nested["inner"]}  # every outer fold's search read its own inner folds
