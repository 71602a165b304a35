"""The Ray runtime on a real two-node cluster on loopback (`ray.cluster_utils.Cluster`).

Experts spread over both nodes and survive losing one; the distillation actor resumes after
being killed; evaluation fan-out never pauses the loop; Ray and `--local` agree bit for bit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from mct_ray import formats
from mct_ray.cli import main
from mct_ray.config import load_config
from tests.conftest import TINY

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray")


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return printed_json(capsys)


def printed_json(capsys) -> dict:
    """The command's JSON report (Ray may print its own lines before it)."""
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n"):])


def synthetic(folder, name="last.safetensors"):
    return formats.load_synthetic((folder / name).read_bytes(), name)


def expert_tensors(folder):
    out = {}
    for path in sorted((folder / "experts").glob("expert-*.safetensors")):
        tensors, _ = formats.unpack(path.read_bytes(), formats.TRAJECTORY, path.name)
        out[path.name] = tensors
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    assert main(["run", "--local", "--out", str(out), *TINY, "expert.num_experts=4",
                 "eval.models=[mlp]"]) == 0
    return out


class _Hold:
    """Holds a CPU of one node while it lives."""

    def ready(self) -> bool:
        return True


def _hold_every_cpu_but(node_id: str) -> list:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    holders = [ray.remote(_Hold).options(
        num_cpus=n["Resources"]["CPU"],
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in ray.nodes()
        if n["Alive"] and n["NodeID"] != node_id and n["Resources"].get("CPU")]
    ray.get([h.ready.remote() for h in holders], timeout=180)
    return holders


LONGER = [*TINY, "expert.num_experts=4", "distill.iterations=60", "distill.syn_steps=10",
          "eval.every=20", "run.checkpoint_every=5"]


@pytest.fixture(scope="module")
def whole_run(local_run, tmp_path_factory):
    """The LONGER distillation uninterrupted, in one process."""
    out = tmp_path_factory.mktemp("whole")
    assert main(["distill", "--local", "--out", str(out), "--experts", str(local_run),
                 *LONGER]) == 0
    return out


@pytest.mark.slow
def test_ray_run_matches_local_run_and_spreads_experts(ray_cluster, local_run, tmp_path,
                                                       capsys):
    summary = run_json(capsys, "run", "--out", str(tmp_path), *TINY, "expert.num_experts=4",
                       "eval.models=[mlp]")
    a, b = synthetic(local_run), synthetic(tmp_path)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.step_size == b.step_size
    assert torch.equal(synthetic(local_run, "synthetic.safetensors").images,
                       synthetic(tmp_path, "synthetic.safetensors").images)
    local_rows = formats_rows(local_run)  # every point on the ConvNet and on the MLP
    assert [(r["iteration"], r["model"], r["acc_mean"]) for r in formats_rows(tmp_path)] == \
        [(r["iteration"], r["model"], r["acc_mean"]) for r in local_rows]
    assert {r["model"] for r in local_rows} == {"convnet", "mlp"}
    local_summary = json.loads((local_run / "summary.json").read_text())
    assert summary["random_baseline_acc_mean"] == local_summary["random_baseline_acc_mean"]
    assert summary["models"] == local_summary["models"]
    ta, tb = expert_tensors(local_run), expert_tensors(tmp_path)
    assert ta.keys() == tb.keys() and len(ta) == 4
    assert all(torch.equal(ta[k][n], tb[k][n]) for k in ta for n in ta[k])

    nodes = run_json(capsys, "experts", "--out", str(tmp_path / "e"), *TINY,
                     "expert.num_experts=4")["nodes"]
    assert len(nodes) == 2  # SPREAD puts work on both nodes


def formats_rows(folder):
    import pyarrow.parquet as pq

    return pq.read_table(folder / "metrics.parquet").to_pylist()


def test_losing_a_node_during_expert_generation_costs_only_its_experts(ray_cluster, tmp_path,
                                                                        capsys):
    slow = [*TINY, "expert.num_experts=6", "expert.epochs=30", "net.width=16"]
    victim = ray_cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
    ray_cluster.wait_for_nodes()
    out = tmp_path / "ray"
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=main(
        ["experts", "--out", str(out), *slow])))
    thread.start()
    deadline = time.time() + 60
    while not any(n["NodeID"] == victim.node_id and n["Alive"] for n in ray.nodes()) or \
            not _busy(victim.node_id):
        assert time.time() < deadline, "no expert ever ran on the third node"
        time.sleep(0.05)
    done_before = len(list((out / "experts").glob("*.safetensors")))
    ray_cluster.remove_node(victim)
    thread.join(timeout=300)
    assert result.get("code") == 0
    report = printed_json(capsys)
    assert done_before < 6 and report["experts"] == 6
    assert victim.node_id not in report["nodes"]

    assert main(["experts", "--local", "--out", str(tmp_path / "local"), *slow]) == 0
    ta, tb = expert_tensors(tmp_path / "local"), expert_tensors(out)
    assert sorted(tb) == [f"expert-{i:05d}.safetensors" for i in range(6)]
    assert all(torch.equal(ta[k][n], tb[k][n]) for k in ta for n in ta[k])


def _busy(node_id: str) -> bool:
    """Whether both CPUs of that node are taken (expert tasks are running there)."""
    from ray._private.state import available_resources_per_node

    available = available_resources_per_node()  # a resource at 0 is left out
    return node_id in available and available[node_id].get("CPU", 0) == 0


def _distill_actor(timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = [n for n in ray.util.list_named_actors() if n.startswith("mct-ray-distill-")]
        if names:
            return ray.get_actor(names[0])
        time.sleep(0.05)
    raise AssertionError("no distillation actor appeared")


def _state_iteration(folder) -> int:
    path = folder / "state.safetensors"
    if not path.exists():
        return -1
    try:
        return formats.load_state(path.read_bytes(), "s")["distiller"]["iteration"]
    except Exception:  # being replaced right now
        return -1


def _wait_for_iteration(folder, thread, n: int, timeout: float = 120) -> None:
    """Until the run in `folder` (a command running in `thread`) has checkpointed
    iteration n."""
    deadline = time.time() + timeout
    while _state_iteration(folder) < n:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.02)


def run_losing_its_node(ray_cluster, out, start, placed=lambda: None, wait_s: float = 120,
                        join_s: float = 300) -> None:
    """A command (`start()` -> its thread and result dict) that can only be placed on a new
    2-CPU node: once it is there (`placed()`) and has checkpointed iteration 10 in `out`, the
    node dies (its processes killed, as a SIGKILLed raylet); the command must still end
    with exit 0."""
    victim = ray_cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
    ray_cluster.wait_for_nodes()
    holders = _hold_every_cpu_but(victim.node_id)  # so the work can only start there
    thread, result = start()
    try:
        placed()
        _wait_for_iteration(out, thread, 10, timeout=wait_s)
    finally:
        for h in holders:
            ray.kill(h)
    ray_cluster.remove_node(victim, allow_graceful=False)
    thread.join(timeout=join_s)
    assert not thread.is_alive() and result.get("code") == 0


def resumed_like_whole(capsys, out, whole_run, last: int = 59) -> None:
    """The command resumed between iterations 10 and `last` and ended as the uninterrupted
    run."""
    summary = printed_json(capsys)
    assert summary["resumed_from"] is not None and 10 <= summary["resumed_from"] <= last
    a, b = synthetic(whole_run), synthetic(out)
    assert torch.equal(a.images, b.images) and a.step_size == b.step_size
    assert [(r["iteration"], r["acc_mean"]) for r in formats_rows(out)] == \
        [(r["iteration"], r["acc_mean"]) for r in formats_rows(whole_run)]


def test_killed_distillation_actor_resumes_and_reproduces_the_result(ray_cluster, local_run,
                                                                     whole_run, tmp_path,
                                                                     capsys):
    out = tmp_path / "killed"
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=main(
        ["distill", "--out", str(out), "--experts", str(local_run), *LONGER])))
    thread.start()
    actor = _distill_actor()
    _wait_for_iteration(out, thread, 10)
    ray.kill(actor, no_restart=False)
    thread.join(timeout=300)
    assert result.get("code") == 0
    resumed_like_whole(capsys, out, whole_run)


@pytest.mark.slow
def test_losing_the_distillation_node_resumes_elsewhere_with_the_same_result(
        ray_cluster, local_run, whole_run, tmp_path, capsys):
    """The worker node that runs the distillation actor dies (its processes killed, as a
    SIGKILLed raylet): the driver starts another actor on a node that is left, which resumes
    from the last checkpoint, and the run ends as an uninterrupted one."""
    out = tmp_path / "lost"

    def start():
        result = {}
        thread = threading.Thread(target=lambda: result.update(code=main(
            ["distill", "--out", str(out), "--experts", str(local_run), *LONGER])))
        thread.start()
        return thread, result

    run_losing_its_node(ray_cluster, out, start, placed=_distill_actor)
    resumed_like_whole(capsys, out, whole_run)


def _distill_within(seconds: float, out, experts, *overrides: str) -> int:
    """`mct-ray distill` of LONGER on Ray; its exit code, or a failure if it still waits
    after `seconds` (the thread is left behind, a daemon)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=main(
        ["distill", "--out", str(out), "--experts", str(experts), *LONGER, *overrides])),
        daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s: {overrides}"
    return result["code"]


def test_evaluations_that_fit_no_node_run_in_the_distillation_not_forever(
        ray_cluster, local_run, whole_run, tmp_path, capsys):
    """An evaluation task asking for more than any node has would wait forever; the actor
    sees that and evaluates in its own process, with the same numbers."""
    out = tmp_path / "small"
    code = _distill_within(240, out, local_run, "ray.eval_num_cpus=3")
    assert code == 0
    assert [(r["iteration"], r["acc_mean"]) for r in formats_rows(out)] == \
        [(r["iteration"], r["acc_mean"]) for r in formats_rows(whole_run)]


def test_work_that_fits_no_node_is_refused_before_anything_is_written(ray_cluster, local_run,
                                                                      tmp_path, capsys):
    out = tmp_path / "big"
    code = _distill_within(120, out, local_run, "ray.distill_num_cpus=8")
    err = capsys.readouterr().err
    assert code == 2 and "no node of the Ray cluster can run the distillation" in err
    assert "Traceback" not in err and not out.exists()


def test_work_waiting_to_start_is_logged_with_what_it_needs(ray_cluster, local_run, caplog):
    """Every CPU of the cluster is held: an evaluation and an expert wait to start, and
    each interval of ray.start_wait_s says so, naming what they need; once room is made,
    both run."""
    from mct_ray.context import Context
    from mct_ray.runtime.backend import RayBackend

    cfg = load_config("digits", [*TINY, "ray.start_wait_s=0.5"])
    backend = RayBackend(Context.build(cfg))
    holders = _hold_every_cpu_but("")
    try:
        with caplog.at_level(logging.INFO, logger="mct_ray.runtime.waits"):
            future = backend.evals.submit(synthetic(local_run), "probe")
            experts = backend.train_experts([0])
            expert = {}
            thread = threading.Thread(target=lambda: expert.update(value=next(experts)))
            thread.start()
            deadline = time.time() + 3
            while time.time() < deadline:
                assert not future.done()
                time.sleep(0.1)
            assert thread.is_alive()
    finally:
        for h in holders:
            ray.kill(h)
    waits = [r.getMessage() for r in caplog.records]
    assert any("evaluation 1 of" in m and "of probe at iteration" in m
               and "has waited" in m and "it needs {'CPU': 1.0}" in m for m in waits), waits
    assert any(m.startswith("the training of expert 0 has waited") for m in waits), waits
    assert 0 <= future.result().mean <= 1
    thread.join(timeout=120)
    assert expert["value"].expert_id == 0


@pytest.mark.slow
def test_evaluations_that_no_node_can_take_any_more_end_the_run_in_one_line(
        ray_cluster, local_run, whole_run, tmp_path, capsys):
    """Evaluations fit only one node (3 CPUs each; the others have 2), held until it is
    lost: they can never start, so the command ends with one line saying how to resume
    (not a wait without end), and --resume, which then evaluates in the distillation's own
    process, ends as the uninterrupted run."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    big = ray_cluster.add_node(num_cpus=4, object_store_memory=100 * 2**20)
    ray_cluster.wait_for_nodes()
    holder = ray.remote(_Hold).options(num_cpus=4, scheduling_strategy=(
        NodeAffinitySchedulingStrategy(big.node_id, soft=False))).remote()
    ray.get(holder.ready.remote(), timeout=180)
    out = tmp_path / "shrunk"
    argv = ["distill", "--out", str(out), "--experts", str(local_run), *LONGER,
            "ray.eval_num_cpus=3", "ray.start_wait_s=1"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=main(argv)))
    thread.start()
    _wait_for_iteration(out, thread, 10)
    ray_cluster.remove_node(big, allow_graceful=False)
    thread.join(timeout=120)
    assert not thread.is_alive() and result.get("code") == 1
    err = capsys.readouterr().err
    assert "can never start: no node of the Ray cluster has {'CPU': 3.0} beside the " \
        "distillation any more" in err and f"--resume --out {out}" in err, err
    assert "Traceback" not in err
    assert main([*argv, "--resume"]) == 0
    resumed_like_whole(capsys, out, whole_run, last=60)  # the loop may have ended first


def test_evaluation_fan_out_never_pauses_the_loop(ray_cluster, local_run, tmp_path):
    """The loop runs here (the way an actor or a grid trial runs it) and submits its
    evaluations through the Ray backend's fan-out, two CPUs each (one per node): no step
    waits for them. On this 2-core machine they time-share the cores with the loop."""
    from mct_ray.context import Context, Launch
    from mct_ray.loop import run_distillation
    from mct_ray.experts import load_experts
    from mct_ray.pipeline import make_distiller
    from mct_ray.runtime.codec import data_to_numpy
    from mct_ray.runtime.workers import RayEvals
    from mct_ray.storage import Storage
    from mct_ray.synthetic import SyntheticSet

    cfg = load_config("digits", [*TINY, "expert.num_experts=4", "distill.iterations=60",
                                 "distill.syn_steps=5", "eval.every=20", "eval.epochs=600",
                                 "ray.eval_num_cpus=2"])
    ctx = Context.build(cfg)
    evals = RayEvals(cfg, ray.put(data_to_numpy(ctx.data)))
    probe = synthetic(local_run)
    eval_seconds = []
    for _ in range(2):  # one per node; the second round runs on warm workers, as the loop's
        started = time.perf_counter()
        futures = [evals.submit(SyntheticSet(probe.images, probe.labels, probe.step_size,
                                             {"iteration": i}), "probe") for i in range(2)]
        [f.result() for f in futures]
        eval_seconds.append(time.perf_counter() - started)
    distiller = make_distiller(ctx, load_experts(Storage.open(str(local_run)), ctx.spec, False))
    times, step = [], distiller.step
    distiller.step = lambda: (step(), times.append(time.perf_counter()))[0]
    outcome = run_distillation(ctx, Storage.open(str(tmp_path)), distiller, evals.submit,
                               Launch(Storage.open(str(local_run)), False, "overlap",
                                      time.time()))
    assert [r.iteration for r in outcome.rows] == [0, 20, 40, 60]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(eval_seconds) > 0.5, eval_seconds  # an evaluation worth not waiting for
    assert max(gaps) < 0.5 * min(eval_seconds), (
        [(i, round(g, 3)) for i, g in enumerate(gaps) if g > 0.1], eval_seconds)


@pytest.mark.parametrize("env, args, message", [
    ({"RAY_ADDRESS": "127.0.0.1:1"}, [], "RAY_ADDRESS='127.0.0.1:1': no Ray cluster answers"),
    ({}, ["--out", "s3://bucket/run?endpoint_override=127.0.0.1:1&scheme=http"],
     "s3://bucket/run"),
    ({}, ["distill.ipc=0"], "config key 'distill.ipc' must be in"),
    ({}, ["--config", "missing.yaml"], "config file 'missing.yaml' cannot be read"),
])
def test_job_entrypoint_fails_fast_with_one_line_and_writes_nothing(env, args, message,
                                                                     tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jobs.run", *TINY,
            *(args if "--out" in args else ["--out", str(out), *args])]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)),
                          env={**os.environ, "AWS_ACCESS_KEY_ID": "x",
                               "AWS_SECRET_ACCESS_KEY": "x", **env})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("mct-ray: error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 60
    assert not out.exists()


def test_codec_round_trip_shares_memory_and_rejects_another_network(tiny_ctx, tiny_experts):
    from mct_ray.errors import FormatError
    from mct_ray.nets import make_spec
    from mct_ray.runtime.codec import expert_from_numpy, expert_to_numpy

    expert = tiny_experts[0]
    d = expert_to_numpy(expert, tiny_ctx.spec)
    back = expert_from_numpy(d, tiny_ctx.spec)
    assert torch.equal(back.convex.anchors, expert.convex.anchors)
    assert torch.equal(back.convex.beta, expert.convex.beta)
    assert torch.equal(back.full.checkpoints, expert.full.checkpoints)
    assert back.convex.anchors.data_ptr() == expert.convex.anchors.data_ptr()  # no copy
    assert back.convex.point(1.5).equal(expert.convex.point(1.5))
    other = make_spec(tiny_ctx.cfg.replace(**{"net.width": 16}).net, tiny_ctx.data.shape,
                      tiny_ctx.data.num_classes)
    with pytest.raises(FormatError, match="trained for another network"):
        expert_from_numpy(d, other)


def test_cross_architecture_eval_on_ray_equals_local(ray_cluster, local_run, tmp_path, capsys):
    """One task per (architecture, network), and the same accuracies as in one process."""
    import shutil

    shutil.copy(local_run / "synthetic.safetensors", tmp_path / "synthetic.safetensors")
    args = [*TINY, "expert.num_experts=4", "eval.models=[mlp,convnet-nn]", "eval.num_eval=2"]
    on_ray = run_json(capsys, "eval", "--out", str(tmp_path), *args)
    local = run_json(capsys, "eval", "--local", "--out", str(tmp_path), *args)
    assert on_ray["models"] == local["models"] and sorted(local["models"]) == ["convnet-nn",
                                                                               "mlp"]


@pytest.mark.slow
def test_learned_labels_on_ray_equal_the_local_run(ray_cluster, local_run, tmp_path, capsys):
    """The Ray path carries soft labels everywhere: the distiller actor learns them, the
    evaluation tasks (ConvNet and another architecture) train on them, and the best images
    are scored with hard labels too: all as in one process."""
    args = ["--experts", str(local_run), *TINY, "expert.num_experts=4", "eval.models=[mlp]",
            "distill.labels=learned"]
    on_ray = run_json(capsys, "distill", "--out", str(tmp_path / "ray"), *args)
    local = run_json(capsys, "distill", "--local", "--out", str(tmp_path / "local"), *args)
    a, b = synthetic(tmp_path / "ray"), synthetic(tmp_path / "local")
    assert a.soft and a.info["labels"] == "learned"
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    for key in ("labels", "best_acc_mean", "hard_label_acc_mean", "models"):
        assert on_ray[key] == local[key], key
    assert [(r["iteration"], r["model"], r["acc_mean"]) for r in formats_rows(tmp_path / "ray")] \
        == [(r["iteration"], r["model"], r["acc_mean"]) for r in formats_rows(tmp_path / "local")]


def test_without_ray_address_a_command_starts_its_own_ray_and_joins_no_other(ray_cluster,
                                                                             tmp_path):
    """A Ray already running on the machine (this session's, whose address file a plain
    ray.init() would find) is someone else's: a command without RAY_ADDRESS starts its own."""
    import os
    import subprocess
    import sys

    from ray._private import state

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "mct_ray.cli", "run", "--out",
                             str(tmp_path / "out"), *TINY, "ray.num_cpus=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "started a local Ray for this job (2.0 CPUs)" in err
    assert proc.pid not in {j["DriverPid"] for j in state.jobs()}


def test_a_command_never_joins_a_ray_started_with_ray_start(tmp_path):
    """Someone's `ray start --head` on the machine (its own RAY_TMPDIR, so its address file
    is where a plain ray.init() of this environment would look): a command without
    RAY_ADDRESS starts a Ray of its own beside it, and says so."""
    import os
    import shutil
    import subprocess
    import sys

    short = Path(f"/tmp/mr{os.getpid()}")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(short)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, "start", "--head", "--port=0", "--num-cpus=1",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env,
                   check=True, capture_output=True, timeout=120)
    try:
        proc = subprocess.run([sys.executable, "-m", "mct_ray.cli", "run", "--out",
                               str(tmp_path / "out"), *TINY, "ray.num_cpus=2"],
                              capture_output=True, text=True, env=env, timeout=300,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
    finally:  # only that Ray's processes: their command lines name its temp folder
        subprocess.run(["pkill", "-9", "-f", str(short)], check=False)
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "started a local Ray for this job (2.0 CPUs)" in proc.stderr


def test_a_soft_label_set_round_trips_through_the_object_store_codec():
    from mct_ray.runtime.codec import synthetic_from_numpy, synthetic_to_numpy
    from tests.test_soft_labels import soft_set

    syn = soft_set()
    again = synthetic_from_numpy(synthetic_to_numpy(syn))
    assert again.soft and torch.equal(again.labels, syn.labels)
    assert torch.equal(again.classes, syn.classes) and again.info == syn.info
