"""How fast bad input ends a command, as a user meets it: each case a fresh `mct-ray run`
process (the Ray path), timed side by side with the interpreter's own start-up.

    python -m bench.fail_fast [--repeats 3]

Cases: a bad config value (pre-flight), a RAY_ADDRESS where a silent server listens (the
5 s handshake limit), an S3 endpoint where nothing listens. The tests assert only generous
bounds (3x or more over these figures); the figures are here. Last line:
`fail_fast_max_s=<the slowest case's median seconds>`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True)
    return time.perf_counter() - started, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    out = tempfile.mkdtemp()
    run = ["-m", "mct_ray.cli", "run", "--out", f"{out}/run"]  # the digits recipe
    cases = {
        "python + import mct_ray.cli (start-up alone)": (["-c", "import mct_ray.cli"], {}, ""),
        "bad config value (distill.ipc=0)": ([*run, "distill.ipc=0"], {}, "distill.ipc"),
        "RAY_ADDRESS of a silent server": (run, {"RAY_ADDRESS":
                                                 f"127.0.0.1:{silent.getsockname()[1]}"},
                                           "not a Ray cluster"),
        "s3:// endpoint where nothing listens": (
            ["-m", "mct_ray.cli", "run", "--out",
             f"s3://bucket/run?endpoint_override=127.0.0.1:{_free_port()}&scheme=http"],
            {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}, "cannot reach"),
    }
    base = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    medians = {}
    for _ in range(args.repeats):  # cases interleaved, so machine noise hits them alike
        for name, (argv, env, message) in cases.items():
            seconds, proc = timed(argv, {**base, **env})
            assert proc.returncode == (2 if message else 0) and message in proc.stderr, \
                f"{name}: exit {proc.returncode}: {proc.stderr[-500:]}"
            medians.setdefault(name, []).append(seconds)
    start_up = statistics.median(medians.pop(next(iter(cases))))
    print(f"{'case':42s} {'median s':>9s} {'x start-up':>11s}")
    print(f"{'start-up alone':42s} {start_up:9.2f} {1:11.2f}")
    for name, values in medians.items():
        m = statistics.median(values)
        print(f"{name:42s} {m:9.2f} {m / start_up:11.2f}")
    print(f"fail_fast_max_s={max(statistics.median(v) for v in medians.values()):.2f}")


if __name__ == "__main__":
    main()
