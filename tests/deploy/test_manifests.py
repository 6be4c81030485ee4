"""docker/compose.yaml, cluster.yaml and kuberay.yaml: schemas, and the parts that drift.

compose.yaml is validated against the Compose specification's schema (vendored in docker/schema/) and
cluster.yaml with Ray's own cluster-config validation. Then: the Ray version and image tags of every
manifest, every `avn-study sweep` command line in docker/ against the CLI's own parser, the GPU/CPU shape
of the worker nodes against the trial resources in search_spaces/, and what is published where.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
import shlex

import pytest
from deploy_files import (
    DOCKER,
    MANIFESTS,
    ROOT,
    SHARED,
    SearchSpace,
    final_user,
    kuberay,
    pyproject,
    ray_pods,
    ray_version,
    spaces,
    stages,
    yaml_docs,
)
from packaging.requirements import Requirement

from avn_study.cli.commands import build_parser

NEVER_PUBLISHED = {6379, 10001}  # the GCS and the Ray client port
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"  # see docker/README.md


# ----------------------------------------------------------------------------------------- every manifest
def test_manifests_use_the_pinned_ray_and_matching_image_tags() -> None:
    version, ray = pyproject()["project"]["version"], ray_version()
    compose = yaml_docs("compose.yaml")[0]
    for name, service in compose["services"].items():
        assert service["image"] == f"avn-study:{version}-ray{ray}-cpu", name
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
    cluster = kuberay("RayCluster")
    assert cluster["apiVersion"] == kuberay("RayJob")["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray
    for group, pod in ray_pods().items():
        for container in pod["template"]["spec"]["containers"]:
            repository, tag = container["image"].rsplit(":", 1)
            assert repository.endswith("/avn-study") and tag == f"{version}-ray{ray}-cuda", (group, container["image"])
    launcher = yaml_docs("cluster.yaml")[0]
    match = re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py3(\d+)-gpu", launcher["docker"]["image"])
    assert match, f"cluster.yaml: {launcher['docker']['image']} is not Ray {ray}'s GPU image"
    python_range = pyproject()["project"]["requires-python"]
    assert Requirement(f"python{python_range}").specifier.contains(f"3.{match[1]}")


def sweep_lines() -> list[tuple[str, int, str]]:
    """Every `avn-study sweep ...` command line written anywhere in docker/ (manifests and comments)."""
    found = []
    for path in sorted(DOCKER.iterdir()):
        if path.suffix in {".yaml", ".md"}:
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "avn-study sweep" in line:
                    found.append((path.name, n, line[line.index("avn-study sweep") :].strip()))
    return found


def parse_sweep(command: str):
    argv = shlex.split(command)
    assert argv[0] == "avn-study", command
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"the CLI rejects {command!r} (argparse's message is in the captured stderr)")


@pytest.mark.parametrize("file,line,command", sweep_lines(), ids=[f"{f}:{n}" for f, n, _ in sweep_lines()])
def test_sweep_command_lines_parse_with_the_cli(file: str, line: int, command: str) -> None:
    for variant in (command, command + " --resume"):  # the README's resume path appends --resume
        args = parse_sweep(variant)
        assert args.command == "sweep" and args.address == "auto", variant
        assert not args.space.is_absolute() and (ROOT / args.space).is_file(), f"{args.space} is not in the repo"
        assert args.space.stem in spaces()
        for path in (str(args.data), args.storage):
            assert path.startswith(SHARED + "/"), f"{file}:{line}: {path} is not on the shared storage"


def test_every_manifest_documents_its_sweep() -> None:
    files = {f for f, _, _ in sweep_lines()}
    assert set(MANIFESTS) <= files
    compose_sweep = yaml_docs("compose.yaml")[0]["x-avn-study"]["sweep"]
    entrypoint = kuberay("RayJob")["spec"]["entrypoint"]
    commands = {c for _, _, c in sweep_lines()}
    assert compose_sweep in commands and entrypoint in commands


# ----------------------------------------------------------------------------------------- trial resources
def gpu_spaces() -> dict[str, SearchSpace]:
    found = {name: s for name, s in spaces().items() if s.gpu > 0}
    assert {"ablation", "tune"} <= set(found), "the GPU search spaces disappeared"
    return found


def assert_node_fits(where: str, cpus: float, gpus: float) -> None:
    """A GPU node must run whole trials only and keep its GPUs busy: CPUs for every trial its GPUs take."""
    assert gpus >= 1 and float(gpus).is_integer(), f"{where}: {gpus} GPUs"
    for name, space in gpu_spaces().items():
        trials = gpus / space.gpu
        assert trials.is_integer(), f"{where}: {gpus} GPU(s) do not split into trials of {space.gpu} GPU ({name})"
        needed = trials * space.cpu
        assert cpus >= needed, f"{where}: {trials:g} trials of {name} need {needed:g} CPUs, the node has {cpus:g}"


def cpu_quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_kuberay_gpu_workers_match_trial_resources() -> None:
    groups = {k: v for k, v in ray_pods().items() if k != "head"}
    assert groups
    for name, group in groups.items():
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        gpus = int(limits["nvidia.com/gpu"])
        assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, "Kubernetes needs GPU requests == limits"
        cpus = cpu_quantity(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        assert cpus <= cpu_quantity(limits["cpu"]) and cpu_quantity(requests["cpu"]) <= cpu_quantity(limits["cpu"])
        assert cpu_quantity(group["rayStartParams"].get("num-gpus", gpus)) == gpus
        assert_node_fits(f"kuberay.yaml group {name}", cpus, gpus)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    head = ray_pods()["head"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs the driver, not trials"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_cluster_launcher_gpu_workers_match_trial_resources() -> None:
    config = yaml_docs("cluster.yaml")[0]
    types = config["available_node_types"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and types[config["head_node_type"]]["resources"] == {"CPU": 0}
    for name, node in workers.items():
        assert_node_fits(f"cluster.yaml {name}", node["resources"]["CPU"], node["resources"]["GPU"])
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]


def test_compose_sweep_fits_the_cpu_workers() -> None:
    compose = yaml_docs("compose.yaml")[0]
    args = parse_sweep(compose["x-avn-study"]["sweep"])
    space = spaces()[args.space.stem]
    gpu = space.gpu if args.gpus_per_trial is None else args.gpus_per_trial
    assert gpu == 0, "the compose cluster has no GPU: trials asking for one would wait forever"
    command = " ".join(compose["services"]["ray-worker"]["command"])
    cpus = re.search(r"--num-cpus=(?:\$\{\w+:-)?(\d+)", command)
    assert cpus and int(cpus[1]) >= space.cpu, f"a worker offers {cpus and cpus[1]} CPUs, a trial takes {space.cpu}"


# ----------------------------------------------------------------------------------------- compose
def test_compose_file_is_valid_against_the_compose_spec() -> None:
    import jsonschema

    schema_file = DOCKER / "schema" / "compose-spec.json"
    assert hashlib.sha256(schema_file.read_bytes()).hexdigest() == SCHEMA_SHA256, "the vendored schema changed"
    assert SCHEMA_SHA256 in (DOCKER / "README.md").read_text()
    validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(yaml_docs("compose.yaml")[0])]
    assert not errors, "\n".join(errors)


def published_ports(port: str | int | dict) -> tuple[str | None, int]:
    """(host address or None for all interfaces, container port) of a `ports:` entry."""
    if isinstance(port, dict):
        return port.get("host_ip"), int(port["target"])
    parts = str(port).split("/")[0].rsplit(":", 2)
    return (parts[0] if len(parts) == 3 else None), int(parts[-1])


def test_compose_publishes_only_the_dashboard_and_only_on_loopback() -> None:
    services = yaml_docs("compose.yaml")[0]["services"]
    published = {}
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name}: host networking publishes every Ray port"
        for port in service.get("ports", []):
            host, target = published_ports(port)
            assert host and ipaddress.ip_address(host.strip("[]")).is_loopback, f"{name}: {port} not on loopback"
            assert target not in NEVER_PUBLISHED, f"{name}: publishes {target}"
            published[name, target] = host
    assert set(published) == {("ray-head", 8265)}


def test_compose_cluster_shape() -> None:
    compose = yaml_docs("compose.yaml")[0]
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    assert "--head" in head["command"] and "--address=ray-head:6379" in worker["command"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "container_name" not in worker, "a fixed container name prevents --scale ray-worker=N"
    for name, service in compose["services"].items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}  # mount point -> volume
        assert {f"{SHARED}/cohort", f"{SHARED}/results"} <= set(mounts), name
        assert set(mounts.values()) <= set(compose["volumes"]), f"{name}: only named volumes are shared"
        assert "ray" in service["healthcheck"]["test"] and "health-check" in service["healthcheck"]["test"]
        assert re.fullmatch(r"\d+gb", service["shm_size"]), f"{name}: shm_size for Ray's object store"
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?.+\}", env["RAY_AUTH_TOKEN"]), "the token comes from docker/.env"
        assert service.get("user") in (None, final_user("Dockerfile")) and not service.get("privileged")
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


# ----------------------------------------------------------------------------------------- KubeRay
def test_kuberay_manifest_shape() -> None:
    docs = yaml_docs("kuberay.yaml")
    assert sorted(d["kind"] for d in docs) == ["PersistentVolumeClaim", "RayCluster", "RayJob"]
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in docs} == {"cluster", "sweep"}
    assert kuberay("RayJob")["metadata"]["labels"]["app.kubernetes.io/component"] == "sweep"
    pvc = kuberay("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray pod reads and writes the shared volume"
    cluster = kuberay("RayCluster")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert cluster["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert kuberay("RayJob")["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    uid = int(final_user("Dockerfile.cuda").split(":")[0])
    for group, pod in ray_pods().items():
        spec = pod["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == uid, group
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        }
        for container in spec["containers"]:
            assert container["workingDir"] == stages("Dockerfile.cuda")[-1].workdir, group
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims.get(mounts.get(SHARED)) == pvc["metadata"]["name"], f"{group}: {SHARED} is not the RWX claim"
            for env in container.get("env", []):
                assert not (env["name"].startswith("RAY_AUTH_TOKEN") and "value" in env), "a literal token"


# ----------------------------------------------------------------------------------------- cluster launcher
def test_cluster_launcher_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs first

    config = yaml_docs("cluster.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"
    run_options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options and f"{SHARED}:{SHARED}" in run_options
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "every node gets the token"
    assert config["file_mounts"]["~/avn-study"] == ".", "the checkout the setup commands install"
    assert any(f" {SHARED})" in c or c.endswith(f" {SHARED}") for c in config["initialization_commands"])
    (setup,) = config["setup_commands"]
    assert "-c ~/avn-study/docker/constraints.txt" in setup and " ~/avn-study " in setup
    head_start = " ".join(config["head_start_ray_commands"])
    assert "cd ~/avn-study" in head_start, "jobs run where the head started Ray: the checkout"
    assert "--dashboard-host=0.0.0.0" not in head_start and "--dashboard-host=127.0.0.1" in head_start
