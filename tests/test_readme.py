"""Every command in README.md still works as written, short of running it: each `mct-ray`
or `python -m jobs.*` line parses with the CLI's own parser and its recipe and overrides
resolve to a valid config (a grid line: its spec builds); each module, script, file and
test marker it names exists. The two set-up commands themselves run in CI (.ci/run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mct_ray.cli import COMMAND_PHASES, _parser
from mct_ray.config import load_config
from mct_ray.grid import build_grid
from tests.conftest import MARKERS

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"run", "experts", "distill", "eval", "grid"}


def commands(markdown: str) -> list[list[str]]:
    """Each command of the fenced bash blocks: continuation lines joined, comments dropped,
    `a && b` split, `VAR=value` prefixes and `.venv/bin/` removed."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in " ".join(shlex.split(line, comments=True)).split(" && "):
                argv = shlex.split(part)
                while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                    argv = argv[1:]
                if argv:
                    out.append([a.removeprefix(".venv/bin/") for a in argv])
    return out


def check_mct_ray(argv: list[str]) -> None:
    """As `mct-ray ARGV` would start: parsed, then the config (or grid) resolved."""
    if not argv or argv[0] not in (*COMMAND_PHASES, "grid", "config"):
        argv = ["run", *argv]
    args, extra = _parser().parse_known_args(argv)
    assert not [a for a in extra if a.startswith("-")], argv
    overrides = [*args.overrides, *extra]
    if args.command == "grid":
        build_grid(args.spec or "digits", overrides)
    else:
        load_config(args.recipe, overrides)


def check(argv: list[str]) -> str:
    """What was checked, for the test's ids; fails on anything that would not run."""
    tool, rest = argv[0], argv[1:]
    if tool == "mct-ray":
        check_mct_ray(rest)
        return "mct-ray"
    if tool in ("python", "python3") and rest[:1] == ["-m"]:
        module = rest[1]
        if module.startswith("jobs."):
            assert module.split(".")[1] in JOBS and (ROOT / "jobs" / f"{rest[1][5:]}.py").exists()
            check_mct_ray([module.split(".")[1], *rest[2:]])
        elif module == "pytest":
            opts = rest[2:]
            expr = opts[opts.index("-m") + 1] if "-m" in opts else ""
            assert set(re.findall(r"\w+", expr)) <= set(MARKERS) | {"not", "and", "or"}, expr
        elif module != "venv":
            assert (ROOT / Path(*module.split("."))).with_suffix(".py").exists() or \
                (ROOT / Path(*module.split("."))).is_dir(), module
        return module
    if tool in ("python", "python3") and rest and rest[0].endswith(".py"):
        assert (ROOT / rest[0]).exists(), rest[0]
        return rest[0]
    if tool == "pip" and "-c" in rest:
        assert (ROOT / rest[rest.index("-c") + 1]).exists()
    if tool == "uv":
        assert (ROOT / rest[2]).exists() and "-o" in rest
    if tool == "ray" and "--" in rest:
        return check(rest[rest.index("--") + 1:])
    if tool == "ray" and "--runtime-env" in rest:
        assert (ROOT / rest[rest.index("--runtime-env") + 1]).exists()
    return tool


README = ROOT / "README.md"


@pytest.mark.parametrize("argv", commands(README.read_text()), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_would_run(argv):
    check(argv)


def test_the_readme_is_a_product_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for doc in re.findall(r"\]\((docs/[\w.-]+\.md)", text):
        assert (ROOT / doc).exists(), doc
    assert len(commands(text)) > 15


def test_the_checks_fail_on_a_wrong_command():
    for bad in (["mct-ray", "run", "distill.ipc=0"], ["mct-ray", "run", "--recipe", "nope"],
                ["mct-ray", "grid", "--spec", "nope"], ["python", "-m", "bench.nope"],
                ["python", "-m", "pytest", "-m", "quick"]):
        with pytest.raises(Exception):
            check(bad)
