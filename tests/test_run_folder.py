"""The run folder as a guarded record, and the pre-flight: one writer at a time, no run
replaced by mistake, nothing changed by a command that fails before its work, bad input
found in seconds, a cluster address that is not Ray refused in seconds, SIGTERM obeyed.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mct_ray import formats
from mct_ray.cli import main
from tests.conftest import TINY

pytestmark = pytest.mark.ray  # the SIGTERM test runs on Ray

ROOT = Path(__file__).resolve().parents[1]
LONG = [*TINY, "distill.iterations=150", "distill.syn_steps=10", "eval.every=75",
        "run.checkpoint_every=1"]


def cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line(code: int, err: str, expected: int = 2) -> str:
    assert code == expected, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("mct-ray: error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


def spawn(*argv: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mct_ray.cli", *argv], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.DEVNULL,
                            stderr=open(log, "w") if log else subprocess.PIPE)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", "--local", "--out", str(out), *TINY]) == 0
    return out


def test_two_writers_the_second_fails_in_one_line_the_first_finishes_intact(tmp_path,
                                                                            capsys):
    out = tmp_path / "shared"
    first = spawn("run", "--local", "--out", str(out), *LONG, log=tmp_path / "first.log")
    wait_for(lambda: (out / "state.safetensors").exists(), first)
    line = one_line(*cli(capsys, "run", "--local", "--out", str(out), *LONG, "seed=1"))
    assert f"{out} is in use by 'mct-ray run' (pid {first.pid} on " in line
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert not (out / ".lock").exists()
    assert main(["run", "--local", "--out", str(tmp_path / "alone"), *LONG]) == 0
    for name in ("config.json", "last.safetensors", "synthetic.safetensors"):
        a = (out / name).read_bytes()
        b = (tmp_path / "alone" / name).read_bytes()
        if name == "config.json":
            a, b = a.replace(str(out).encode(), b""), b.replace(str(tmp_path / "alone").encode(),
                                                               b"")
            assert a == b
        else:
            x, y = (formats.load_synthetic(v, name) for v in (a, b))
            assert torch.equal(x.images, y.images) and x.step_size == y.step_size


def test_a_finished_run_is_not_replaced_without_resume_or_overwrite(finished, capsys):
    before = snapshot(finished)
    for command in ("run", "distill", "experts"):
        line = one_line(*cli(capsys, command, "--local", "--out", str(finished), *TINY))
        assert f"{finished} already holds" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(finished) == before


@pytest.mark.parametrize("argv", [
    ["--local", "data.name=cifar10"],  # no data set there: found before anything is written
    ["--local", "--resume", "distill.ipc=2"],  # a resume that does not match the stored run
    ["--resume", "distill.ipc=2"],  # the same on the Ray path (refused before Ray starts)
    ["--local", "--overwrite", "data.name=cifar10"],  # replaced only once the checks pass
    ["--local", "--resume", "--overwrite"],
])
def test_a_command_that_fails_before_its_work_changes_nothing(finished, argv, tmp_path,
                                                              capsys):
    before = snapshot(finished)
    one_line(*cli(capsys, "run", "--out", str(finished), *TINY, *argv,
                  f"data.root={tmp_path / 'none'}"))
    assert snapshot(finished) == before


def test_overwrite_replaces_a_finished_run(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(finished, out)
    (out / "summary.json").write_text("{}")
    assert main(["run", "--local", "--out", str(out), "--overwrite", *TINY]) == 0
    assert (out / "summary.json").read_bytes() != b"{}"
    a, b = (formats.load_synthetic((f / "last.safetensors").read_bytes(), "s")
            for f in (out, finished))
    assert torch.equal(a.images, b.images) and a.step_size == b.step_size


@pytest.mark.parametrize("command, argv, message", [
    ("run", ["distill.ipc=500"], "config key 'distill.ipc' is 500, but class 8 ('8') of "
     "digits has only 139 training images"),
    ("distill", ["distill.max_start_epoch=20", "expert.epochs=30"],
     "config key 'distill.max_start_epoch' (20) must be below the experts' epochs (4, "),
    ("run", ["--resume", "expert.epochs=30", "expert.num_experts=3"],
     "has 4 epochs but expert.epochs is 30"),
])
def test_bad_input_fails_in_preflight_in_seconds_before_any_expert(finished, command, argv,
                                                                    message, tmp_path):
    """As a job would run it (the Ray path, its own process): one line, exit 2, with no
    Ray started and no expert trained. The bound is a 3x margin over what an idle machine
    takes (about 6 s, mostly the interpreter and torch starting; bench/fail_fast.py)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished / "experts", out / "experts")
    before = snapshot(out)
    target = {"run": tmp_path / "fresh" if "--resume" not in argv else out,
              "distill": out / "run"}[command]
    extra = ["--experts", str(out)] if command == "distill" else []
    started = time.monotonic()
    proc = spawn(command, "--out", str(target), *extra, *TINY, *argv)
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - started
    assert message in one_line(proc.returncode, err.decode())
    assert seconds < 30, seconds
    assert "Started a local Ray" not in err.decode()
    assert snapshot(out) == before
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]


class _Silent(threading.Thread):
    """A TCP server that accepts and never answers (a firewall, a stuck service)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port, self.held = self.sock.getsockname()[1], []

    def run(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return


@pytest.mark.parametrize("server", ["silent", "http"])
def test_a_ray_address_that_is_not_ray_fails_in_seconds(server, tmp_path):
    if server == "silent":
        srv = _Silent()
        srv.start()
        port = srv.port
    else:  # the dashboard's port, say
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                http.server.SimpleHTTPRequestHandler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        port = httpd.server_address[1]
    started = time.monotonic()
    proc = spawn("run", "--out", str(tmp_path / "out"), *TINY,
                 env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    _, err = proc.communicate(timeout=120)
    # Ray itself would retry for minutes; ours answers in about 10 s on an idle machine
    # (a 5 s handshake limit and the start-up; bench/fail_fast.py): a 4x margin.
    assert time.monotonic() - started < 45
    line = one_line(proc.returncode, err.decode())
    assert f"RAY_ADDRESS='127.0.0.1:{port}'" in line and "not a Ray cluster" in line
    if server == "http":
        assert "an HTTP server" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", ["--local", "ray", "gang"])
def test_sigterm_ends_a_run_at_once_and_frees_the_folder(tmp_path, path):
    """One line and exit 143 on every path (ray.init installs a SIGTERM handler of its own,
    which made the Ray path exit 1 or 134 with stack dumps; Ray Train's wait for a gang let
    no handler run)."""
    out = tmp_path / "out"
    local = {"--local": ["--local"], "ray": ["ray.num_cpus=2"],
             "gang": ["ray.num_cpus=2", "ray.distill_workers=2"]}[path]
    proc = spawn("run", *local, "--out", str(out), *LONG, log=tmp_path / "log")
    if path == "ray":  # mid-run on Ray: its experts are being trained by Ray tasks
        wait_for(lambda: "started a local Ray" in (tmp_path / "log").read_text(), proc)
    elif path == "gang":  # mid-distillation, on the gang
        wait_for(lambda: "Started training worker group" in (tmp_path / "log").read_text(),
                 proc)
    else:
        wait_for(lambda: (out / "state.safetensors").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143  # a hang guard: Ray's shutdown takes seconds
    log = (tmp_path / "log").read_text()
    assert log.strip().splitlines()[-1] == "mct-ray: terminated (SIGTERM)", log[-3000:]
    assert "Traceback" not in log and "*** " not in log, log[-3000:]
    assert not (out / ".lock").exists()


def test_a_list_valued_safetensors_header_is_one_line_and_exit_2(finished, tmp_path, capsys):
    import shutil

    shutil.copytree(finished / "experts", tmp_path / "experts")
    header = b"[1, 2]"
    (tmp_path / "experts" / "expert-00000.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header)
    line = one_line(*cli(capsys, "distill", "--local", "--out", str(tmp_path / "run"),
                         "--experts", str(tmp_path), *TINY))
    assert "expert-00000.safetensors" in line


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        assert main(["run", "--local", "--resume", "--out", str(tmp_path), *TINY]) == 0
    assert any("nothing to resume" in r.getMessage() for r in caplog.records)
