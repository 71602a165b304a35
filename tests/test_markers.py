"""Every test file declares its tier (`pytestmark`: core, system or ray), and the
declaration matches what the file does: a `core` file starts no Ray, no subprocess and no
server; a file that uses a Ray cluster is marked `ray`."""

from __future__ import annotations

import ast
import re
import tokenize
from pathlib import Path

import pytest

from tests.conftest import MARKERS, TIERS

pytestmark = pytest.mark.core

TESTS = Path(__file__).resolve().parent
# What a core file must not contain: a Ray cluster or task, a child process, a server.
NOT_CORE = re.compile(r"\bray_cluster\b|\bray\.init\b|\bimport ray\b|\bfrom ray\b|"
                      r"\bmct_ray\.runtime\b|\bsubprocess\b|\bPopen\b|\bmoto\b|"
                      r"\bsocket\b|\bhttp\.server\b|\bspawn\(")
USES_RAY = re.compile(r"\bray_cluster\b|\bray\.init\b|\bRayBackend\b|\bcluster_utils\b")


def declared(path: Path) -> set[str]:
    """The marker names of the module-level `pytestmark` (one mark or a list of them)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            marks = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) \
                else [node.value]
            return {m.attr for m in marks if isinstance(m, ast.Attribute)}
    return set()


def code(path: Path) -> str:
    """The file with its strings and comments blanked (a docstring may name what it avoids)."""
    lines = path.read_text().splitlines(keepends=True)
    with open(path, "rb") as f:
        for t in tokenize.tokenize(f.readline):
            if t.type in (tokenize.STRING, tokenize.COMMENT):
                (r0, c0), (r1, c1) = t.start, t.end
                for r in range(r0, r1 + 1):
                    a, b = (c0 if r == r0 else 0), (c1 if r == r1 else len(lines[r - 1]))
                    lines[r - 1] = lines[r - 1][:a] + " " * (b - a) + lines[r - 1][b:]
    return "".join(lines)


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.stem)
def test_each_file_declares_a_tier_that_matches_its_content(path):
    marks = declared(path)
    assert marks, f"{path.name} has no module-level pytestmark"
    assert marks <= set(MARKERS), f"{path.name}: unknown marker in {marks}"
    assert len(marks & set(TIERS)) == 1, f"{path.name}: not exactly one of {set(TIERS)}"
    text = code(path)
    if "core" in marks:
        found = NOT_CORE.search(text)
        assert found is None, f"{path.name} is marked core but uses {found[0]!r}"
    if USES_RAY.search(text):
        assert "ray" in marks, f"{path.name} uses a Ray cluster but is not marked ray"


def test_the_checks_catch_what_they_look_for(tmp_path):
    assert len(list(TESTS.glob("test_*.py"))) > 10
    sample = tmp_path / "test_sample.py"
    sample.write_text('"""No subprocess here."""\nimport subprocess  # a child\nray.init()\n')
    assert code(sample).count("subprocess") == 1 and NOT_CORE.search(code(sample))
    assert USES_RAY.search(code(sample))
    assert NOT_CORE.search("proc = subprocess.run(argv)")
    assert NOT_CORE.search("def test_x(ray_cluster):")
    assert not NOT_CORE.search("from mct_ray.cli import main")
    assert USES_RAY.search("def test_x(ray_cluster):")
