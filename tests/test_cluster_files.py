"""cluster/: launcher configs against Ray's own schema and checks, KubeRay manifests against the
fields the ray.io/v1 CRDs require, the runtime_env against Ray's RuntimeEnv. Each validator is
also shown to reject a broken copy, so a passing test means something."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = {"aws.yaml": "aws", "gcp.yaml": "gcp"}
KUBERAY_FILES = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}
JOB_MODULES = {"jobs.run", "jobs.experts", "jobs.distill", "jobs.eval", "jobs.grid"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _load(*parts: str) -> dict:
    with open(CLUSTER.joinpath(*parts)) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------------------
# Launcher configs.

def _ray_schema() -> dict:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


def _validate_launcher(config: dict) -> None:
    """Ray's JSON schema, then the checks `ray up` runs, before and after Ray merges in its
    provider defaults. Raises on the first problem."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = _ray_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(config)
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))


def _launcher_problems(config: dict) -> list[str]:
    """What this project asks of a launcher config beyond Ray's schema."""
    problems = []
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        problems.append("head must advertise CPU 0")
    if not any("--num-cpus=0" in cmd for cmd in config.get("head_start_ray_commands", [])):
        problems.append("head ray start lacks --num-cpus=0")
    gpu_types = [t for n, t in types.items()
                 if n != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    if not gpu_types:
        problems.append("no GPU worker type")
    for t in gpu_types:
        if not 0 <= t.get("min_workers", 0) <= t.get("max_workers", -1) <= config["max_workers"]:
            problems.append("GPU workers need 0 <= min_workers <= max_workers <= max_workers")
    if "mct-ray" not in config.get("docker", {}).get("image", ""):
        problems.append("docker.image is not the project image")
    return problems


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_config_is_valid_for_ray(name):
    config = _load(name)
    assert config["provider"]["type"] == LAUNCHER_FILES[name]
    _validate_launcher(config)
    assert _launcher_problems(config) == []
    assert config["max_workers"] >= 1 and config["idle_timeout_minutes"] > 0


def _set(path: str | tuple, value: Any) -> Callable[[dict], None]:
    """A change to a copy: set (or delete) the value at a dotted path or a tuple of keys."""
    def apply(doc: dict) -> None:
        *parents, last = path.split(".") if isinstance(path, str) else path
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return apply


_DELETE = object()

NODE_TYPES = "available_node_types"
HEAD, GPU = "head.cpu", "worker.gpu"

BROKEN_LAUNCHER = {  # a change, and what Ray says about it
    "typo at top level": (_set("max_worker", 3), "'max_worker' was unexpected"),
    "no provider": (_set("provider", _DELETE), "'provider' is a required property"),
    "string resource": (_set((NODE_TYPES, GPU, "resources"), {"CPU": 8, "GPU": "one"}),
                        "'one' is not of type 'integer'"),
    "negative resource": (_set((NODE_TYPES, HEAD, "resources"), {"CPU": -1}),
                          "less than the minimum of 0"),
    "unknown docker key": (_set("docker.images", "x"), "'images' was unexpected"),
    "head type missing": (_set("head_node_type", "head.big"), "must be one of"),
    "min over global max": (_set((NODE_TYPES, GPU, "min_workers"), 9), "sum of `min_workers`"),
    "no node_config": (_set((NODE_TYPES, GPU, "node_config"), _DELETE),
                       "'node_config' is a required property"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN_LAUNCHER))
def test_broken_launcher_config_is_rejected(breakage):
    change, message = BROKEN_LAUNCHER[breakage]
    config = _load("aws.yaml")
    change(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        _validate_launcher(config)


@pytest.mark.parametrize("change, problem", [
    (_set((NODE_TYPES, HEAD, "resources"), {"CPU": 4}), "CPU 0"),
    (_set("head_start_ray_commands", ["ray start --head"]), "--num-cpus=0"),
    (_set((NODE_TYPES, GPU, "resources"), {"CPU": 8}), "no GPU worker"),
    (_set((NODE_TYPES, GPU, "max_workers"), 20), "max_workers"),
    (_set("docker.image", "rayproject/ray:2.60.0-py311-cu130"), "project image"),
])
def test_project_rules_for_launcher_catch_mistakes(change, problem):
    config = _load("aws.yaml")
    change(config)
    assert any(problem in p for p in _launcher_problems(config))


# ---------------------------------------------------------------------------------------
# KubeRay manifests.

def _string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in value.items())


def _containers(template: Any, where: str, problems: list[str]) -> list[dict]:
    containers = (template or {}).get("spec", {}).get("containers") if isinstance(
        template, dict) else None
    if not containers:
        problems.append(f"{where}.template.spec.containers missing or empty")
        return []
    for i, c in enumerate(containers):
        for key in ("name", "image"):
            if not isinstance(c.get(key), str) or not c.get(key):
                problems.append(f"{where}.template.spec.containers[{i}].{key} missing")
    return containers


def _cluster_spec_problems(spec: Any, where: str) -> list[str]:
    """The fields the ray.io/v1 RayCluster CRD requires (headGroupSpec.rayStartParams and
    template; workerGroupSpecs[].groupName, minReplicas, maxReplicas, rayStartParams,
    template; rayStartParams is map[string]string) plus this project's shape."""
    problems: list[str] = []
    if not isinstance(spec, dict):
        return [f"{where} missing"]
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [f"{where}.headGroupSpec missing"]
    params = head.get("rayStartParams")
    if not _string_map(params):
        problems.append(f"{where}.headGroupSpec.rayStartParams must map strings to strings")
    elif params.get("num-cpus") != "0":
        problems.append(f"{where}.headGroupSpec.rayStartParams.num-cpus must be \"0\"")
    _containers(head.get("template"), f"{where}.headGroupSpec", problems)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{where}.workerGroupSpecs missing or empty"]
    num_gpu_groups = 0
    for i, group in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(group.get("groupName"), str) or not DNS_LABEL.match(
                group.get("groupName", "")):
            problems.append(f"{at}.groupName missing or not a DNS label")
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, n)):
            problems.append(f"{at}: minReplicas, maxReplicas (and replicas) must be integers")
        elif not 0 <= lo <= n <= hi and not (n == 0 and 0 <= lo <= hi):
            problems.append(f"{at}: need 0 <= minReplicas <= replicas <= maxReplicas")
        if not _string_map(group.get("rayStartParams")):
            problems.append(f"{at}.rayStartParams must map strings to strings")
        for c in _containers(group.get("template"), at, problems):
            gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None and int(gpus) >= 1:
                num_gpu_groups += 1
    if not num_gpu_groups:
        problems.append(f"{where}: no worker group has an nvidia.com/gpu limit")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling must be true")
    return problems


def _kuberay_problems(doc: Any, kind: str) -> list[str]:
    if not isinstance(doc, dict):
        return ["not a mapping"]
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    if doc.get("kind") != kind:
        problems.append(f"kind {doc.get('kind')!r} is not {kind}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not DNS_LABEL.match(name) or len(name) > 50:
        problems.append("metadata.name missing or not a short DNS label")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec missing"]
    if kind == "RayCluster":
        return problems + _cluster_spec_problems(spec, "spec")
    problems += _cluster_spec_problems(spec.get("rayClusterSpec"), "spec.rayClusterSpec")
    problems += _entrypoint_problems(spec.get("entrypoint"))
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
        if not isinstance(env, dict):
            raise ValueError("not a mapping")
        from ray.runtime_env import RuntimeEnv

        RuntimeEnv(**env)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        problems.append(f"spec.runtimeEnvYAML is not a valid runtime_env ({exc})")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append("spec.submissionMode unknown")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes must be true (GPU nodes would linger)")
    return problems


def _entrypoint_problems(entrypoint: Any) -> list[str]:
    if not isinstance(entrypoint, str):
        return ["spec.entrypoint missing"]
    words = entrypoint.split()
    if words[:2] != ["python", "-m"] or len(words) < 3 or words[2] not in JOB_MODULES:
        return [f"spec.entrypoint must be `python -m <{'|'.join(sorted(JOB_MODULES))}> ...`"]
    problems = []
    if "--recipe" in words:
        recipe = words[words.index("--recipe") + 1]
        if not (ROOT / "mct_ray" / "recipes" / f"{recipe}.yaml").is_file():
            problems.append(f"spec.entrypoint: no recipe {recipe!r}")
    if "--out" not in words or not re.match(r"^(s3|gs)://[^/]+/", words[words.index("--out") + 1]):
        problems.append("spec.entrypoint: --out must be an s3:// or gs:// folder")
    return problems


@pytest.mark.parametrize("name", sorted(KUBERAY_FILES))
def test_kuberay_manifest_has_what_the_crd_requires(name):
    assert _kuberay_problems(_load("kuberay", name), KUBERAY_FILES[name]) == []


def test_rayjob_output_uri_opens_as_storage(monkeypatch):
    from mct_ray.storage import Storage

    monkeypatch.setenv("AWS_REGION", "us-west-2")  # parse only: no region look-up
    words = _load("kuberay", "rayjob.yaml")["spec"]["entrypoint"].split()
    store = Storage.open(words[words.index("--out") + 1])
    assert store.kind in ("s3", "gs") and "/" in store.root


BROKEN_KUBERAY = {
    "old api": ("raycluster.yaml", _set("apiVersion", "ray.io/v1alpha1"), "ray.io/v1"),
    "no name": ("raycluster.yaml", _set("metadata.name", _DELETE), "metadata.name"),
    "bad name": ("raycluster.yaml", _set("metadata.name", "MCT_Ray"), "metadata.name"),
    "no head params": ("raycluster.yaml", _set("spec.headGroupSpec.rayStartParams", _DELETE),
                       "rayStartParams"),
    "int param": ("raycluster.yaml",
                  _set("spec.headGroupSpec.rayStartParams", {"num-cpus": 0}), "strings"),
    "head cpus": ("raycluster.yaml",
                  _set("spec.headGroupSpec.rayStartParams", {"num-cpus": "4"}), "num-cpus"),
    "no image": ("raycluster.yaml",
                 _set("spec.headGroupSpec.template.spec.containers.0.image", _DELETE), "image"),
    "no group name": ("raycluster.yaml", _set("spec.workerGroupSpecs.0.groupName", _DELETE),
                      "groupName"),
    "no max": ("raycluster.yaml", _set("spec.workerGroupSpecs.0.maxReplicas", _DELETE),
               "integers"),
    "min over max": ("raycluster.yaml", _set("spec.workerGroupSpecs.0.minReplicas", 9),
                     "minReplicas <="),
    "no gpu": ("raycluster.yaml", _set(
        "spec.workerGroupSpecs.0.template.spec.containers.0.resources",
        {"limits": {"cpu": "8"}}), "nvidia.com/gpu"),
    "no workers": ("raycluster.yaml", _set("spec.workerGroupSpecs", []), "workerGroupSpecs"),
    "wrong kind": ("rayjob.yaml", _set("kind", "RayCluster"), "kind"),
    "no cluster": ("rayjob.yaml", _set("spec.rayClusterSpec", _DELETE), "rayClusterSpec"),
    "unknown job": ("rayjob.yaml", _set("spec.entrypoint", "python -m jobs.nope --out s3://b/x"),
                    "entrypoint"),
    "unknown recipe": ("rayjob.yaml", _set(
        "spec.entrypoint", "python -m jobs.run --recipe cifar11 --out s3://b/x"), "recipe"),
    "local out": ("rayjob.yaml", _set(
        "spec.entrypoint", "python -m jobs.run --recipe digits --out runs/x"), "--out"),
    "bad runtime env": ("rayjob.yaml", _set("spec.runtimeEnvYAML", "env_vars:\n  A: 1\n"),
                        "runtimeEnvYAML"),
    "lingering": ("rayjob.yaml", _set("spec.shutdownAfterJobFinishes", False), "shutdown"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN_KUBERAY))
def test_broken_kuberay_manifest_is_rejected(breakage):
    name, change, problem = BROKEN_KUBERAY[breakage]
    doc = _load("kuberay", name)
    change(doc)
    problems = _kuberay_problems(doc, KUBERAY_FILES[name])
    assert any(problem in p for p in problems), problems


def test_rayjob_entrypoint_module_exists_once_jobs_are_written():
    words = _load("kuberay", "rayjob.yaml")["spec"]["entrypoint"].split()
    module = ROOT / (words[2].replace(".", "/") + ".py")
    if not any((ROOT / "jobs").glob("*.py")):
        pytest.skip("jobs/ has no modules yet")
    assert module.is_file(), f"{words[2]} is not in jobs/"


# ---------------------------------------------------------------------------------------
# runtime_env.

def _runtime_env_problems(env: Any) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    if not isinstance(env, dict):
        return ["not a mapping"]
    unknown = set(env) - RuntimeEnv.known_fields
    if unknown:
        return [f"unknown runtime_env fields {sorted(unknown)}"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        return [str(exc)]
    return []


def test_runtime_env_is_valid_and_ships_the_code_not_the_data():
    from ray._private.runtime_env.packaging import _get_excludes

    env = _load("runtime_env.yaml")
    assert _runtime_env_problems(env) == []
    assert env["working_dir"] == "." and "PYTHONUNBUFFERED" in env["env_vars"]
    excluded = _get_excludes(ROOT, env["excludes"])
    for kept in ("mct_ray/data/__init__.py", "mct_ray/storage.py", "jobs/run.py",
                 "pyproject.toml", "mct_ray/recipes/digits.yaml"):
        assert not excluded(ROOT / kept), kept
    for dropped in ("data/cifar10/x.bin", "runs/r/metrics.parquet", ".venv/bin/python",
                    ".git/HEAD", "bench/results/storage.png", "mct_ray/__pycache__/a.pyc"):
        assert excluded(ROOT / dropped), dropped


@pytest.mark.parametrize("change", [
    {"working_directory": "."}, {"env_vars": {"OMP_NUM_THREADS": 4}}, {"excludes": "runs/"}])
def test_broken_runtime_env_is_rejected(change):
    env = {**_load("runtime_env.yaml"), **change}
    assert _runtime_env_problems(env)
