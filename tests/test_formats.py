"""File formats: round trips, and every corrupt or mismatched file gives a clear FormatError."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

from mct_ray import formats
from mct_ray.errors import FormatError
from mct_ray.synthetic import SyntheticSet
from mct_ray.trajectory import ConvexTrajectory, FullTrajectory

pytestmark = pytest.mark.core


def test_convex_round_trip(tiny_experts):
    traj = tiny_experts[0].convex
    back = formats.load_trajectory(formats.save_trajectory(traj), "t", traj.spec)
    assert isinstance(back, ConvexTrajectory)
    assert back.anchor_epochs == traj.anchor_epochs and back.spec == traj.spec
    assert torch.equal(back.anchors, traj.anchors) and torch.equal(back.beta, traj.beta)
    assert back.info == traj.info
    assert torch.equal(back.point(1.7), traj.point(1.7))


def test_full_round_trip(tiny_experts):
    traj = tiny_experts[0].full
    back = formats.load_trajectory(formats.save_trajectory(traj), "t", traj.spec)
    assert isinstance(back, FullTrajectory) and torch.equal(back.checkpoints, traj.checkpoints)


def test_init_stored_as_seed_is_rebuilt_bitwise_and_smaller(tiny_experts):
    result = tiny_experts[0]
    stored = formats.save_trajectory(result.convex)
    seeded = formats.save_trajectory(result.convex, init_seed=result.init_seed)
    assert len(seeded) < len(stored)
    back = formats.load_trajectory(seeded, "t", result.convex.spec)
    assert torch.equal(back.anchors, result.convex.anchors)
    with pytest.raises(FormatError, match="not the network initialisation"):
        formats.save_trajectory(result.convex, init_seed=result.init_seed + 1)


def test_init_seed_checksum_mismatch_is_reported(tiny_experts, monkeypatch):
    result = tiny_experts[0]
    seeded = formats.save_trajectory(result.convex, init_seed=result.init_seed)
    spec_cls = type(result.convex.spec)
    original = spec_cls.init_params
    # A platform whose initialisation differs in the last bit.
    monkeypatch.setattr(spec_cls, "init_params",
                        lambda self, gen: [p + 1e-7 for p in original(self, gen)])
    with pytest.raises(FormatError, match="does not match the stored checksum"):
        formats.load_trajectory(seeded, "t.safetensors")


def test_synthetic_and_state_round_trip(tiny_experts):
    spec = tiny_experts[0].convex.spec
    images, labels = torch.randn(10, 1, 8, 8), torch.arange(10)
    data = formats.save_synthetic(SyntheticSet(images, labels, 0.02, {"iteration": 7}), spec)
    back = formats.load_synthetic(data, "s", spec)
    assert torch.equal(back.images, images) and torch.equal(back.labels, labels)
    assert back.step_size == 0.02 and back.info == {"iteration": 7} and back.iteration == 7
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.5)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {"opt": opt.state_dict(), "iteration": 3, "x": torch.arange(4.0), "t": (1, "a")}
    back = formats.load_state(formats.save_state(state), "state")
    assert back["iteration"] == 3 and torch.equal(back["x"], state["x"])
    assert torch.equal(back["opt"]["state"][0]["momentum_buffer"],
                       state["opt"]["state"][0]["momentum_buffer"])
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]


def _rewrite_meta(data: bytes, **changes) -> bytes:
    """Change header metadata without fixing the checksum (or with, via sha256=...)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:100], "not a safetensors file"),
    (lambda d: b"garbage!" * 4, "not a safetensors file"),
    (lambda d: d[:-16], "corrupt tensor data"),
    (lambda d: d[:-4] + bytes(4), "checksum mismatch"),
    (lambda d: _rewrite_meta(d, version="99"), "version '99' is not supported"),
    (lambda d: _rewrite_meta(d, format="other"), "expected a mct-ray-trajectory file"),
    (lambda d: _rewrite_meta(d, kind='"weird"'), "checksum mismatch"),
])
def test_corrupt_trajectory_files_are_rejected(tiny_experts, damage, message):
    data = formats.save_trajectory(tiny_experts[0].convex)
    with pytest.raises(FormatError) as info:
        formats.load_trajectory(damage(data), "experts/expert-00000.safetensors")
    assert message in str(info.value)
    assert "experts/expert-00000.safetensors" in str(info.value)


def test_mismatched_architecture_is_rejected(tiny_experts):
    traj = tiny_experts[0].convex
    other = dataclasses.replace(traj.spec, width=16)
    with pytest.raises(FormatError, match="network does not match the config .*width 8 != 16"):
        formats.load_trajectory(formats.save_trajectory(traj), "t", other)


def test_synthetic_file_is_not_a_trajectory(tiny_experts):
    spec = tiny_experts[0].convex.spec
    data = formats.save_synthetic(SyntheticSet(torch.zeros(2, 1, 8, 8), torch.arange(2), 0.1),
                                  spec)
    with pytest.raises(FormatError, match="expected a mct-ray-trajectory file"):
        formats.load_trajectory(data, "x")


def test_no_pickle_in_the_package():
    import pathlib

    import mct_ray

    root = pathlib.Path(mct_ray.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, path


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"__metadata__": [1]}', b'"text"',
                                    b'{"__metadata__": {"format": 3}}'])
def test_header_that_is_json_but_not_an_object(header):
    data = struct.pack("<Q", len(header)) + header
    with pytest.raises(FormatError, match="not a JSON object of strings"):
        formats.read_header(data, "x.safetensors")


EVIL = '''
import pathlib
pathlib.Path(__file__).with_name("imported").write_text("the module ran")
def make(*args, **kwargs):
    pathlib.Path(__file__).with_name("called").write_text("the factory ran")
'''


@pytest.mark.parametrize("kind", ["trajectory", "synthetic"])
def test_a_crafted_file_naming_a_factory_runs_no_code(tiny_experts, tmp_path, monkeypatch,
                                                      capsys, kind):
    """A file whose network description names an importable function (with a checksum
    recomputed, as anyone can) is refused, by the loaders and by the commands that read
    such files, and nothing of its is imported or called."""
    (tmp_path / "evil_mod.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    traj = tiny_experts[0].convex
    if kind == "trajectory":
        data, fmt = formats.save_trajectory(traj), formats.TRAJECTORY
    else:
        syn = SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), 0.01, {})
        data, fmt = formats.save_synthetic(syn, traj.spec), formats.SYNTHETIC
    tensors, meta = formats.unpack(data, fmt, "x")
    meta["net"]["name"] = "evil_mod:make"
    crafted = formats.pack(fmt, tensors, meta)
    load = formats.load_trajectory if kind == "trajectory" else formats.load_synthetic
    with pytest.raises(FormatError, match="network does not match the config"):
        load(crafted, "x", traj.spec)
    with pytest.raises(FormatError, match="which a file alone never imports"):
        load(crafted, "x")
    from mct_ray import layout
    from mct_ray.cli import main
    from tests.conftest import TINY

    folder = tmp_path / "shared"
    if kind == "trajectory":
        (folder / "experts").mkdir(parents=True)
        (folder / layout.expert_name(0)).write_bytes(crafted)
        argv = ["distill", "--local", "--out", str(tmp_path / "out"), "--experts",
                str(folder), *TINY]
    else:
        folder.mkdir()
        (folder / "set.safetensors").write_bytes(crafted)
        argv = ["eval", "--local", "--out", str(tmp_path / "out"), "--synthetic",
                str(folder / "set.safetensors"), *TINY]
    assert main(argv) == 2
    assert "network does not match the config" in capsys.readouterr().err
    assert not (tmp_path / "imported").exists() and not (tmp_path / "called").exists()
