"""bench.same_outputs, the before/after check of a change: equal where only wall-clock
fields, run ids, output paths or safetensors' header order differ; different where a
tensor, a metric or a config value does."""

from __future__ import annotations

import json
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench.same_outputs import compare
from mct_ray import formats
from mct_ray.nets import NetSpec
from mct_ray.synthetic import SyntheticSet

pytestmark = pytest.mark.core

SPEC = NetSpec("convnet", 1, 8, 3, 4, 1, "instancenorm")


def reordered(data: bytes) -> bytes:
    """The same safetensors file with its header's keys in another order."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    text = json.dumps({**dict(reversed(list(header.items()))),
                       "__metadata__": dict(reversed(list(meta.items())))},
                      separators=(",", ":")).encode()
    text += b" " * (n - len(text))  # the data offsets stay those of the original
    assert len(text) == n
    return struct.pack("<Q", n) + text + data[8 + n:]


def write_run(folder, images, seconds, acc, out):
    folder.mkdir()
    syn = SyntheticSet(images, torch.tensor([0, 1, 2]), 0.01, {"iteration": 5})
    (folder / "synthetic.safetensors").write_bytes(formats.save_synthetic(syn, SPEC))
    pq.write_table(pa.Table.from_pylist([{"iteration": 0, "acc_mean": acc, "loss": float("nan"),
                                          "seconds": seconds}]), folder / "metrics.parquet")
    (folder / "config.json").write_text(json.dumps({"run": {"out": out}, "seed": 0}))


def test_what_differs_by_nature_is_left_out_and_the_rest_is_compared(tmp_path):
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    write_run(tmp_path / "a", images, 1.5, 0.9, "/a")
    write_run(tmp_path / "b", images, 2.5, 0.9, "/b")
    path = tmp_path / "b" / "synthetic.safetensors"
    path.write_bytes(reordered(path.read_bytes()))
    assert compare(tmp_path / "a", tmp_path / "b") == []
    write_run(tmp_path / "c", images + 1e-7, 1.5, 0.91, "/c")
    assert compare(tmp_path / "a", tmp_path / "c") == ["differs: metrics.parquet",
                                                       "differs: synthetic.safetensors"]
    (tmp_path / "c" / "summary.json").write_text("{}")
    assert "only in" in compare(tmp_path / "a", tmp_path / "c")[0]
