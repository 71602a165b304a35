"""Whether two run (or grid) folders hold the same outputs: the check that a change leaves
behaviour unchanged (run the same command with the code before and after, then compare).

    python -m bench.same_outputs runs/before runs/after

Every .safetensors file: every tensor byte and every header value (the header's key order
is safetensors' own, a Rust HashMap's, which differs from one process to the next, so the
files are never equal byte for byte); state.safetensors as loaded. Parquet rows and JSON
records: equal but for what differs by nature (wall-clock seconds, the run id, output
paths). Other files but pictures, logs and Tune's or TensorBoard's: byte for byte. Last line
`differing_files=<n>`; exit 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import struct
import sys

import pyarrow.parquet as pq
import torch

from mct_ray import formats

# What differs between two runs of one command by nature: wall-clock fields, the run id
# (random per command) and where the outputs are.
BY_NATURE = {"seconds", "wall_seconds", "parts", "run_id", "since", "out", "experts"}
SKIPPED_FOLDERS = {"tune", "tb"}
SKIPPED_SUFFIXES = {".log", ".png"}


def comparable(x):
    """A record with what differs by nature left out, NaN equal to NaN, tensors as bytes."""
    if isinstance(x, dict):
        return {k: comparable(v) for k, v in x.items() if k not in BY_NATURE}
    if isinstance(x, (list, tuple)):
        return [comparable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype), tuple(x.shape), x.numpy().tobytes())
    return x


def _header_and_data(path: pathlib.Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    if a.name == "state.safetensors":  # holds the run id and the parts' seconds
        return comparable(formats.load_state(a.read_bytes(), str(a))) == \
            comparable(formats.load_state(b.read_bytes(), str(b)))
    if a.suffix == ".safetensors":
        return _header_and_data(a) == _header_and_data(b)
    if a.suffix == ".parquet":
        return comparable(pq.read_table(a).to_pylist()) == comparable(pq.read_table(b).to_pylist())
    if a.suffix == ".json":
        return comparable(json.loads(a.read_text())) == comparable(json.loads(b.read_text()))
    return a.read_bytes() == b.read_bytes()


def outputs(root: pathlib.Path) -> set[pathlib.Path]:
    return {p.relative_to(root) for p in root.rglob("*")
            if p.is_file() and p.name != ".lock" and p.suffix not in SKIPPED_SUFFIXES
            and not SKIPPED_FOLDERS & set(p.relative_to(root).parts)}


def compare(a: pathlib.Path, b: pathlib.Path) -> list[str]:
    """What differs, one line each (empty: the same outputs)."""
    in_a, in_b = outputs(a), outputs(b)
    return [f"only in {a if p in in_a else b}: {p}" for p in sorted(in_a ^ in_b)] + \
        [f"differs: {p}" for p in sorted(in_a & in_b) if not same_file(a / p, b / p)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=pathlib.Path)
    parser.add_argument("after", type=pathlib.Path)
    args = parser.parse_args(argv)
    differences = compare(args.before, args.after)
    print("\n".join(differences + [f"{len(outputs(args.before))} files compared",
                                   f"differing_files={len(differences)}"]))
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
