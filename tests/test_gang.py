"""One distillation over a gang of workers on Ray Train (`ray.distill_workers`), on the
session's two-node loopback cluster: the same synthetic set as one worker, refused in
pre-flight when the cluster cannot place it, and a worker killed mid-run recovering to the
uninterrupted result."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import torch

from mct_ray import starting
from mct_ray.cli import main
from mct_ray.config import load_config
from mct_ray.context import Context
from tests.conftest import TINY
from tests.test_runtime import (_wait_for_iteration, formats_rows, printed_json, run_json,
                                run_losing_its_node, synthetic)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")

# Long enough to kill a worker in the middle; the digits recipe's checkpoint mode and DSA.
LONGER = [*TINY, "expert.num_experts=4", "distill.iterations=30", "eval.every=15",
          "run.checkpoint_every=5", "distill.batch_syn=6"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    assert main(["experts", "--local", "--out", str(out), *TINY, "expert.num_experts=4"]) == 0
    return out


@pytest.fixture(scope="module")
def single(experts, tmp_path_factory, ray_cluster):
    """The run on one worker (the distillation actor)."""
    out = tmp_path_factory.mktemp("single")
    assert main(["distill", "--out", str(out), "--experts", str(experts), *LONGER]) == 0
    return out


def starting_images(out):
    ctx = Context.build(load_config("digits", LONGER))
    raw = (out / "init_indices.json").read_bytes()
    return ctx.data.train_x[starting.parse(raw, "init_indices.json", ctx)]


def close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_gang_of_two_gives_the_single_worker_set(ray_cluster, experts, single, tmp_path,
                                                   capsys):
    out = tmp_path / "gang"
    summary = run_json(capsys, "distill", "--out", str(out), "--experts", str(experts),
                       *LONGER, "ray.distill_workers=2")
    a, b = synthetic(single), synthetic(out)
    assert close(a.images, b.images) and abs(a.step_size - b.step_size) < 1e-6
    assert not close(a.images, starting_images(out))  # the sets compared moved
    assert [r["iteration"] for r in formats_rows(out)] == [0, 15, 30]
    assert summary["resumed_from"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())


def test_a_gang_the_cluster_cannot_place_is_refused_before_any_work(ray_cluster, experts,
                                                                    tmp_path, capsys):
    out = tmp_path / "too-big"
    assert main(["distill", "--out", str(out), "--experts", str(experts), *LONGER,
                 "ray.distill_workers=9"]) == 2
    err = capsys.readouterr().err
    assert "cannot place a distillation gang of 9 workers of {'CPU': 1.0} each" in err
    assert "room for 4" in err and not out.exists()


def _gang_workers(cluster) -> list[psutil.Process]:
    """The Ray Train workers of this test cluster (children of its raylets), not of any
    other Ray on the machine."""
    raylets = {info.process.pid for node in [cluster.head_node, *cluster.worker_nodes]
               for info in node.all_processes.get("raylet", [])}
    return [p for p in psutil.process_iter(["cmdline", "ppid"]) if p.info["ppid"] in raylets
            and any("RayTrainWorker" in part for part in p.info["cmdline"] or [])]


def _gang_in_thread(out, experts, *extra: str) -> tuple[threading.Thread, dict]:
    """`mct-ray distill` of LONGER on a gang of two, in a thread; its exit code lands in the
    dict."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=main(
        ["distill", "--out", str(out), "--experts", str(experts), *LONGER,
         "ray.distill_workers=2", *extra])), daemon=True)
    thread.start()
    return thread, result


def test_a_gang_worker_killed_mid_run_recovers_to_the_same_set(ray_cluster, experts, single,
                                                               tmp_path, capsys):
    out = tmp_path / "killed"
    thread, result = _gang_in_thread(out, experts)
    _wait_for_iteration(out, thread, 10, timeout=240)
    victims = _gang_workers(ray_cluster)
    assert len(victims) == 2
    os.kill(victims[-1].pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and result.get("code") == 0
    summary = printed_json(capsys)
    a, b = synthetic(single), synthetic(out)
    assert close(a.images, b.images) and abs(a.step_size - b.step_size) < 1e-6
    assert [r["iteration"] for r in formats_rows(out)] == [0, 15, 30]
    assert summary["resumed_from"] >= 10  # the gang was started again, from a checkpoint


def test_a_gang_that_fills_every_node_evaluates_in_its_first_worker(ray_cluster, experts,
                                                                     single, tmp_path, capsys):
    """Two workers of 2 CPUs take both 2-CPU nodes: no evaluation task could ever start, so
    worker 0 evaluates in its own process (as a single actor does), with the same numbers."""
    out = tmp_path / "full"
    thread, result = _gang_in_thread(out, experts, "ray.distill_num_cpus=2")
    thread.join(timeout=400)
    assert not thread.is_alive() and result.get("code") == 0
    a, b = synthetic(single), synthetic(out)
    assert close(a.images, b.images)
    for r, s in zip(formats_rows(out), formats_rows(single), strict=True):
        assert r["iteration"] == s["iteration"] and abs(r["acc_mean"] - s["acc_mean"]) < 0.02


def test_losing_the_gangs_node_restarts_it_elsewhere_with_the_same_set(ray_cluster, experts,
                                                                       single, tmp_path,
                                                                       capsys):
    """Both workers on a node that dies (its processes killed, as a SIGKILLed raylet): Ray
    Train starts the gang again on the nodes left, from the last checkpoint."""
    out = tmp_path / "lost"
    run_losing_its_node(ray_cluster, out, lambda: _gang_in_thread(out, experts), wait_s=240,
                        join_s=400)
    assert printed_json(capsys)["resumed_from"] >= 10
    assert close(synthetic(single).images, synthetic(out).images)


def test_an_error_of_worker_0_alone_ends_the_gang_at_once(ray_cluster, experts, tmp_path,
                                                          capsys):
    """Worker 0 cannot write its checkpoint any more (a folder stands where the file goes):
    the command ends with that one-line error, not after the others' collective times out,
    and the gang is not restarted for it."""
    out = tmp_path / "unwritable"
    thread, result = _gang_in_thread(out, experts)
    _wait_for_iteration(out, thread, 5, timeout=240)
    blocked = out / "last.safetensors"
    while not blocked.is_dir():  # worker 0 may replace the file meanwhile: until it holds
        try:
            blocked.unlink(missing_ok=True)
            (blocked / "inside").mkdir(parents=True)
        except OSError:
            pass
    started = time.time()
    thread.join(timeout=300)
    assert not thread.is_alive() and result.get("code") not in (0, None)
    assert time.time() - started < 120
    err = capsys.readouterr().err
    assert "last.safetensors" in err.strip().splitlines()[-1]
