"""Shared by tests/deploy/: facts of the project, a small Dockerfile reader and the manifests' documents.

The deployment files in docker/ are checked statically (no Docker engine, no network): see test_images.py
and test_manifests.py.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from avn_study.study.space import SearchSpace, load_space

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
MANIFESTS = ("compose.yaml", "cluster.yaml", "kuberay.yaml")
SHARED = "/shared"  # where every manifest mounts the shared storage (cohort and results)


# ----------------------------------------------------------------------------------------- project facts
@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def dependencies() -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in pyproject()["project"]["dependencies"])
    return {canonicalize_name(r.name): r for r in reqs}


def requirement_lines(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


@cache
def ray_version() -> str:
    (pin,) = requirement_lines(DOCKER / "constraints.txt")
    (spec,) = pin.specifier
    assert canonicalize_name(pin.name) == "ray" and spec.operator == "==", f"expected ray==X.Y.Z, got {pin}"
    return spec.version


@cache
def spaces() -> dict[str, SearchSpace]:
    return {p.stem: load_space(p) for p in sorted((ROOT / "search_spaces").glob("*.yaml"))}


def yaml_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DOCKER / name).read_text()) if d]


def kuberay(kind: str) -> dict:
    (doc,) = [d for d in yaml_docs("kuberay.yaml") if d["kind"] == kind]
    return doc


def ray_pods() -> dict[str, dict]:
    spec = kuberay("RayCluster")["spec"]
    pods = {"head": spec["headGroupSpec"]}
    pods.update({g["groupName"]: g for g in spec["workerGroupSpecs"]})
    return pods


# ----------------------------------------------------------------------------------------- Dockerfiles
@dataclass
class Stage:
    """One build stage: its base, its RUN commands, and which container paths hold which repo paths."""

    base: str
    name: str | None
    workdir: str = "/"
    paths: dict[str, str] = field(default_factory=dict)  # container path -> repo path (COPY, bind mounts)
    runs: list[str] = field(default_factory=list)
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comment lines dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        keyword, _, args = (buf + text).partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def _mounts(args: str) -> list[dict[str, str]]:
    return [dict(kv.split("=", 1) for kv in m.split(",")) for m in re.findall(r"--mount=(\S+)", args)]


@cache
def stages(dockerfile: str) -> list[Stage]:
    result: list[Stage] = []
    for keyword, args in _instructions(DOCKER / dockerfile):
        if keyword == "FROM":
            words = args.split()
            result.append(Stage(base=words[0], name=words[2] if len(words) == 3 else None))
            continue
        stage = result[-1]
        stage.instructions.append((keyword, args))
        if keyword == "WORKDIR":
            stage.workdir = posixpath.join(stage.workdir, args)
        elif keyword == "COPY" and "--from=" not in args:
            *sources, dest = [w for w in args.split() if not w.startswith("--")]
            for src in sources:
                target = posixpath.join(stage.workdir, dest)
                if not (ROOT / src).is_dir() and (dest.endswith("/") or len(sources) > 1):
                    target = posixpath.join(target, posixpath.basename(src))
                stage.paths[posixpath.normpath(target)] = src.rstrip("/")
        elif keyword == "RUN":
            for mount in _mounts(args):
                if mount.get("type") == "bind" and "from" not in mount:
                    stage.paths[mount["target"]] = mount["source"]
            stage.runs.append(re.sub(r"--mount=\S+\s*", "", args))
    return result


def repo_path(stage: Stage, path: str) -> str | None:
    """The repository path a container path of ``stage`` holds, or None."""
    full = posixpath.normpath(posixpath.join(stage.workdir, path))
    for target, source in stage.paths.items():
        if full == target or full.startswith(target + "/"):
            return posixpath.normpath(posixpath.join(source, full[len(target) + 1 :]))
    return None


def shell_commands(run: str) -> list[list[str]]:
    """A RUN line as its commands (split at && || ; |), each as argv; quotes respected."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


@dataclass
class Pip:
    command: str  # install | wheel
    options: dict[str, list[str]]
    targets: list[str]
    generated: dict[str, str]  # files written by `>` earlier in the same RUN -> the command that wrote them


PIP_VALUE_OPTIONS = {"-c": "--constraint", "-r": "--requirement", "-i": "--index-url", "-w": "--wheel-dir"}
PIP_VALUE_OPTIONS |= {v: v for v in [*PIP_VALUE_OPTIONS.values(), "--extra-index-url", "--find-links"]}


def pip_commands(stage: Stage) -> list[Pip]:
    found = []
    for run in stage.runs:
        generated: dict[str, str] = {}
        for argv in shell_commands(run):
            if ">" in argv:
                generated[argv[argv.index(">") + 1]] = " ".join(argv)
            if argv[:3] == ["python", "-m", "pip"]:
                argv = argv[2:]
            if argv[0] not in {"pip", "pip3"}:
                continue
            options: dict[str, list[str]] = {}
            targets = []
            words = iter(argv[2:])
            for word in words:
                if word in PIP_VALUE_OPTIONS:
                    options.setdefault(PIP_VALUE_OPTIONS[word], []).append(next(words))
                elif word.startswith("-"):
                    options.setdefault(word, [])
                else:
                    targets.append(word)
            found.append(Pip(argv[1], options, targets, dict(generated)))
    return found


def is_project(stage: Stage, target: str) -> bool:
    """`.` (a folder holding the repo's pyproject.toml) or the project's wheel built in another stage."""
    if re.fullmatch(r"\S*/avn_study-[^/]*\.whl", target):
        return True
    return repo_path(stage, posixpath.join(target, "pyproject.toml")) == "pyproject.toml"


def final_user(dockerfile: str) -> str:
    users = [args for keyword, args in stages(dockerfile)[-1].instructions if keyword == "USER"]
    assert users, f"{dockerfile}: the final stage sets no USER (runs as root)"
    return users[-1]


def ray_pin() -> Requirement:
    return Requirement(f"ray=={ray_version()}")
