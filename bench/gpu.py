"""The one prepared device check: every GPU figure the README asks for, in one run that
fits in 8 minutes on one H100/H200, written to a folder.

    python -m bench.gpu OUT             # on a machine with a CUDA device
    python -m bench.gpu OUT --dry-run   # the same steps on the CPU at tiny sizes (< 30 s)

Steps (each its own process with a time limit; a failed step is recorded and the next runs):
  device       torch/CUDA versions, device name, measured matmul peaks (fp32, tf32, bf16)
  pytest_gpu   `pytest -m gpu`: every gradient mode on CUDA (hand-written and builtin
               kernels) against the CPU float64 reference, bf16, device-side DSA, data
               resident on the device
  unroll_*     bench/unroll_speed.py at the CIFAR-10 shape (ipc 10, N=30) and the Tiny
               ImageNet shape (ConvNetD4, 64x64, ipc 10, N=20) against the MTT-style
               reference: seconds per iteration, peak memory, achieved TFLOP/s against the
               measured peak; and the CIFAR-10 shape with the builtin (cuDNN) kernels
  packing      expert throughput with 1, 2, 4 and 8 expert tasks sharing one GPU
               (ray.expert_num_gpus = 1/k), after a warm-up round per k
  end_to_end   `mct-ray run` through Ray with evaluation fan-out (Fashion-MNIST when its
               files are present, else random data of the CIFAR-10 shape)
  distill_parallel  (on a device with several GPUs) bench/distill_parallel.py: one
               distillation iteration on one GPU against all of them (NCCL), at the CIFAR-10
               shape and the ImageNet subsets' 128x128 shape at ipc 10: memory per GPU,
               seconds per iteration, gradient agreement
OUT gets one log and one JSON per step, bench tables (parquet) and summary.json; the last
line printed is `gpu_check=<steps passed>/<steps>`. On a device the steps run one after
another, each in its own process with a time limit; a dry run proves only the plumbing, so
it runs every step in this one process, on one Ray started once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import runpy
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (name, argv after `python`, time limit in seconds on the device) ; dry-run sizes beside.
UNROLL = {
    "unroll_cifar10": (["--shape", "cifar10", "--ipc", "10", "--steps", "30", "--repeats", "3",
                        "--memory-modes", "reference", "unroll", "checkpoint", "tesla"],
                       ["--shape", "cifar10", "--ipc", "1", "--steps", "2", "--repeats", "1",
                        "--width", "8", "--batch-syn", "10", "--modes", "unroll", "tesla",
                        "--memory", "rss", "--memory-modes", "unroll"]),
    "unroll_tinyimagenet": (["--shape", "tinyimagenet", "--ipc", "10", "--steps", "20",
                             "--repeats", "2", "--memory-modes", "reference", "unroll",
                             "checkpoint"],
                            ["--shape", "tinyimagenet", "--ipc", "1", "--steps", "2",
                             "--repeats", "1", "--batch-syn", "20", "--width", "8",
                             "--modes", "checkpoint", "--memory"]),
    "unroll_cifar10_builtin": (["--shape", "cifar10", "--ipc", "10", "--steps", "30",
                                "--repeats", "3", "--kernels", "builtin", "--memory"],
                               ["--shape", "cifar10", "--ipc", "1", "--steps", "2",
                                "--repeats", "1", "--kernels", "builtin", "--width", "8",
                                "--batch-syn", "10", "--modes", "unroll", "--memory"]),
}
LIMITS = {"pytest_gpu": 90, "unroll_cifar10": 120, "unroll_tinyimagenet": 120,
          "unroll_cifar10_builtin": 60, "packing": 90, "end_to_end": 120,
          "distill_parallel": 150}


def distill_parallel_argv(dry: bool, gpus: int) -> list[str]:
    """The gang step: on the CPU a tiny case with two gloo workers; on a device all its
    GPUs (a step only when there are several)."""
    if dry:
        return ["-m", "bench.distill_parallel", "--quick"]
    return ["-m", "bench.distill_parallel", "--device", "cuda", "--workers", str(gpus),
            "--cases", "cifar10", "imagenet128-ipc10"]


def device_info(dry: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": dry}
    device = "cpu" if dry else "cuda"
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        info["device"] = "cpu (dry run)"
    n = 512 if dry else 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ a
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        info[f"peak_{name}_tflops"] = 2 * n**3 / best / 1e12
    return info


def run_step(out: pathlib.Path, name: str, argv: list[str], limit: float, env: dict) -> dict:
    started = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return step_result(out, name, rc, started)


def step_result(out: pathlib.Path, name: str, rc, started: float) -> dict:
    lines = (out / f"{name}.log").read_text().strip().splitlines()
    result = {"step": name, "rc": rc, "seconds": round(time.monotonic() - started, 1),
              "last_line": lines[-1] if lines else ""}
    print(f"{name}: rc={rc} in {result['seconds']} s: {result['last_line']}", flush=True)
    return result


def packing(out: pathlib.Path, dry: bool) -> None:
    """Expert throughput with k expert tasks sharing one GPU (k = 1, 2, 4, 8)."""
    import ray

    from mct_ray.config import load_config
    from mct_ray.context import Context
    from mct_ray.pipeline import train_missing_experts
    from mct_ray.runtime.backend import RayBackend
    from mct_ray.storage import Storage

    ours = not ray.is_initialized()  # a dry run's Ray is its caller's
    if ours:
        ray.init(address="local", include_dashboard=False)  # never a Ray already running
    ks = (1, 2) if dry else (1, 2, 4, 8)
    data = (["net.width=8", "net.depth=1"] if dry else
            ["data.name=random", "data.channels=3", "data.resolution=32",
             "data.num_train=20000", "data.num_test=1000", "data.num_classes=10"])
    rows = []
    for k in ks:
        cfg = load_config("digits", [*data, f"expert.epochs={2 if dry else 4}",
                                     "distill.max_start_epoch=1",
                                     "expert.batch=256", "run.progress=false",
                                     f"ray.expert_num_gpus={0 if dry else 1 / k}",
                                     f"ray.max_expert_workers={k}", "ray.expert_num_cpus=1"])
        ctx = Context.build(cfg)
        backend = RayBackend(ctx)
        seconds = []
        for round_, n in (("warm-up", k), ("timed", 2 * k)):
            store = Storage.open(str(out / "packing" / f"k{k}-{round_}"))
            t0 = time.perf_counter()
            sized = dataclasses.replace(ctx, cfg=cfg.replace(**{"expert.num_experts": n}))
            train_missing_experts(sized, store, backend)
            seconds.append(time.perf_counter() - t0)
        rows.append({"experts_per_gpu": k, "experts": 2 * k, "seconds": seconds[1],
                     "experts_per_second": 2 * k / seconds[1]})
        print(rows[-1], flush=True)
    base = rows[0]["experts_per_second"]
    for r in rows:
        r["throughput_vs_1"] = r["experts_per_second"] / base
    (out / "packing.json").write_text(json.dumps(rows, indent=2))
    print(f"packing_4_vs_1={rows[-1 if dry else 2]['throughput_vs_1']:.2f}")
    if ours:
        ray.shutdown()


def end_to_end_argv(out: pathlib.Path, dry: bool) -> list[str]:
    run = ["-m", "mct_ray.cli", "run", "--out", str(out / "end_to_end_run")]
    if dry:
        return [*run, "net.width=8", "net.depth=1", "expert.num_experts=2", "expert.epochs=2",
                "distill.iterations=4", "distill.syn_steps=3", "distill.max_start_epoch=1",
                "distill.expert_epochs=1", "eval.every=2", "eval.num_eval=2", "eval.epochs=3"]
    fashion = pathlib.Path("/usr/share/datasets/fashion-mnist")
    data = ["--recipe", "fashion-mnist-ipc10"] if fashion.exists() else \
        ["--recipe", "cifar10-ipc10", "data.name=random", "data.zca=false",
         "data.num_train=20000", "data.num_test=2000"]
    return [*run, *data, "expert.num_experts=8", "expert.epochs=10", "expert.anchors=[4]",
            "distill.iterations=200", "distill.max_start_epoch=4", "eval.every=100",
            "eval.num_eval=4", "eval.epochs=300", "ray.expert_num_gpus=0.25",
            "ray.distill_num_gpus=0.5", "ray.eval_num_gpus=0.125", "run.progress=false"]


def run_inline(out: pathlib.Path, name: str, argv: list[str]) -> dict:
    """A dry-run step in this process (the same argv as on a device, run as `python ARGV`
    would run it): no interpreter, torch or Ray start per step, so the plumbing of every
    step is proven in seconds. The Ray steps share the Ray this process started."""
    started = time.monotonic()
    saved = sys.argv
    with open(out / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # recorded like a failed process, and the next step runs
            print(f"{type(exc).__name__}: {exc}", file=log)
            rc = 1
        finally:
            sys.argv = saved
    return step_result(out, name, rc, started)


def dry_run(out: pathlib.Path, steps: list, env: dict) -> list[dict]:
    import ray

    os.environ.update(env)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    ray.init(address="local", include_dashboard=False, num_cpus=2,
             object_store_memory=150 * 2**20, log_to_driver=False)
    try:
        return [run_inline(out, n, a) for n, a in steps]
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for every figure and log")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a child's step
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.step == "packing":
        packing(out, args.dry_run)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device (use --dry-run to check the script on a CPU)",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    env = {**os.environ, "MCT_RAY_BENCH_RESULTS": str(out / "tables"),
           "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    info = device_info(args.dry_run)
    (out / "device.json").write_text(json.dumps(info, indent=2))
    print(f"device: {info}", flush=True)
    device = ["--device", "cpu" if args.dry_run else "cuda"]
    plain = [("pytest_gpu", ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                             "tests/test_gpu.py", f"--junitxml={out / 'pytest_gpu.xml'}"])]
    plain += [(name, ["bench/unroll_speed.py", *device, *(dry if args.dry_run else full)])
              for name, (full, dry) in UNROLL.items()]
    on_ray = [("packing", ["-m", "bench.gpu", str(out), "--step", "packing",
                           *(["--dry-run"] if args.dry_run else [])]),
              ("end_to_end", end_to_end_argv(out, args.dry_run))]
    gpus = 2 if args.dry_run else torch.cuda.device_count()
    # its own processes in a dry run too: its workers are spawned from its module
    spawning = [("distill_parallel", distill_parallel_argv(args.dry_run, gpus))] \
        if gpus > 1 else []
    if args.dry_run:
        steps = dry_run(out, plain + on_ray, env)
    else:
        steps = [run_step(out, n, a, LIMITS[n], env) for n, a in plain + on_ray]
    steps += [run_step(out, n, a, LIMITS[n], env) for n, a in spawning]
    passed = sum(s["rc"] == 0 for s in steps)
    summary = {"device": info, "steps": steps, "seconds": round(time.monotonic() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"gpu_check={passed}/{len(steps)} in {summary['seconds']} s")
    return 0 if passed == len(steps) else 1


if __name__ == "__main__":
    sys.exit(main())
