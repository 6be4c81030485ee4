"""Power before the GPUs run: declared contrasts, attainable p, refusal of designs with no possible verdict,
the plan and a pilot study's variance components."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from avn_study.cli.parser import main
from avn_study.errors import UsageError
from avn_study.study.plan import check_verdicts, floors
from avn_study.study.space import load_space, parse_space

SPACES = Path(__file__).parents[1] / "search_spaces"


def ablation(tmp_path: Path, **changes: object) -> Path:
    raw = yaml.safe_load((SPACES / "ablation.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_ablation_declares_its_primary_metric_and_the_contrast_of_each_question() -> None:
    space = load_space(SPACES / "ablation.yaml")
    assert space.primary_metric == "dice" and space.reference == "unet" and space.search_per_seed
    labels = {c.question.split("?")[0]: c.label for c in space.contrasts}
    assert labels["Is it the gate or the extra loss"] == "seg+loc vs seg+loc/no-gate"
    assert labels["Is it the parameters"] == "seg+recon+loc vs unet/wide"
    assert labels["Is it the branch or the schedule"] == "seg+recon+loc vs seg+recon+loc/constant"
    assert len(space.contrasts) == 13
    assert all(f.reachable for f in floors(space, patients=150))


def test_default_contrasts_are_each_row_vs_the_reference_and_each_control_vs_its_row() -> None:
    raw = {"protocol": "nested_ablation", "arms": {"unet": {}, "seg+loc": {}, "seg+loc/no-gate": {"arm": "seg+loc"}},
           "groups": {"all": ["unet", "seg+loc", "seg+loc/no-gate"]}}  # fmt: skip
    labels = [c.label for c in parse_space(raw, Path("space.yaml")).contrasts]
    assert labels == ["seg+loc vs unet", "seg+loc/no-gate vs unet", "seg+loc/no-gate vs seg+loc"]


@pytest.mark.parametrize(("groups", "message"), [
    ({"q": {"rows": ["unet"], "contrasts": [["unet", "sge"]]}}, "did you mean 'seg'"),
    ({"q": {"rows": ["unet"], "contrasts": [["unet", "unet"]]}}, "cannot be compared with itself"),
    ({"q": {"rows": ["unet"], "contrasts": ["unet vs seg"]}}, "each contrast is a pair [row, against]"),
    ({"q": {"rows": ["unet"], "compare": []}}, "groups.q.compare"),
    ({"q": []}, "expected a non-empty list of row names"),
])  # fmt: skip
def test_bad_contrasts_are_refused_naming_the_key(groups: dict, message: str) -> None:
    with pytest.raises(UsageError, match="space") as err:
        parse_space({"protocol": "nested_ablation", "arms": ["unet", "seg"], "groups": groups}, Path("space"))
    assert message in str(err.value)


def test_seeds_0_is_refused_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = ablation(tmp_path, seeds=[0])
    assert main(["sweep", str(space), "--data", str(tmp_path), "--storage", str(tmp_path / "s"), "--plan"]) == 2
    captured = capsys.readouterr()
    assert "13 of 13 contrast(s) can never reach a verdict" in captured.err
    assert "p >= 0.0625" in captured.err and "Holm over 13 needs p < 0.00385" in captured.err
    assert "--allow-no-verdict" in captured.err and "search_per_seed: true" in captured.err
    assert "CANNOT reach a verdict" in captured.out
    assert not (tmp_path / "s").exists()  # nothing written
    args = ["sweep", str(space), "--data", str(tmp_path), "--storage", str(tmp_path / "s"), "--plan",
            "--allow-no-verdict"]  # fmt: skip
    assert main(args) == 0


def test_plan_prints_attainable_p_and_power_for_the_shipped_ablation(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "ablation", "--patients", "150"]) == 0
    out = capsys.readouterr().out
    assert "stage 1: 210 searches (14 rows x 5 outer folds x 3 seeds (a search per seed)) x 16 trials" in out
    assert "seg+loc vs seg+loc/no-gate: smallest p 6.25e-07" in out  # 2 / C(6, 3)^5, replicates
    assert "Holm at alpha 0.05 (first step p < 0.00385)" in out
    assert "power at +0.05" in out and "this design (150 patients, 5 folds x 3 seed(s)" in out
    assert "2 seeds (150 patients" in out and "GPU-h" in out


def test_check_verdicts_counts_the_patients_wilcoxon_needs() -> None:
    space = load_space(SPACES / "demo.yaml")
    assert check_verdicts(space, patients=10) == []
    with pytest.raises(UsageError, match="5 reported patient"):
        check_verdicts(space, patients=5)  # 2/2^5 = 0.0625 > 0.025
    assert check_verdicts(space, patients=5, allow_no_verdict=True)


def test_plan_with_a_pilot_study_estimates_the_variance_components(smoke_experiment: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    assert main(["plan", "demo", "--pilot", str(smoke_experiment), "--patients", "10"]) == 0
    out = capsys.readouterr().out
    assert f"pilot study {smoke_experiment}: variance components of dice estimated" in out
    components = next(line for line in out.splitlines() if line.startswith("variance components"))
    assert "patients: " in components and "(default)" in components  # one search per row: search luck is not
    assert "per patient and run: " in components.split(";")[1] and "(default)" not in components.split(";")[1]
    assert "power at +0.10" in out
    assert main(["plan", "demo", "--pilot", str(smoke_experiment.parent)]) == 2
