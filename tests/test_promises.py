"""Promises on bad input, each tried as a user meets it (issue 19): one line on stderr, exit 2,
no traceback, and the output location exactly as the command found it."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest

from mct_ray.cli import main
from mct_ray.data import idx
from tests.conftest import TINY
from tests.test_cli import one_line_error
from tests.test_data_formats import save_png
from tests.test_idx import idx_bytes

pytestmark = pytest.mark.core


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def snapshot(folder) -> dict:
    """Every path under `folder` with its bytes (None for folders); {} if it is absent."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))} | {".": None}


def image_folder(root, classes=("cat", "dog"), garbage=False):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in classes:
            for i in range(n):
                path = root / split / c / f"img{i}.png"
                if garbage:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"not a png at all")
                else:
                    save_png(path, rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))
    return root


@pytest.mark.parametrize("value", ["[1, 2]", "[null]", "[[resnet18]]"])
def test_a_list_of_names_holding_other_values_is_one_line(value, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(capsys, "run", "--local", "--out", str(out), *TINY, f"eval.models={value}")
    assert "config key 'eval.models' must be a list of names" in one_line_error(code, err)
    assert not out.exists()


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_bytes(b"base: digits\n# caf\xe9 in Latin-1\n")
    code, err = cli(capsys, "config", "--config", str(path))
    assert f"config file '{path}' is not UTF-8 text" in one_line_error(code, err)


@pytest.mark.parametrize("stored", ["[1, 2]", "null", "\"text\""])
def test_a_stored_config_that_is_not_a_mapping_is_one_line_on_resume(stored, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(stored)
    (out / "state.safetensors").write_bytes(b"")  # a started distillation
    before = snapshot(out)
    code, err = cli(capsys, "run", "--local", "--resume", "--out", str(out), *TINY)
    assert "config.json is not a run's config" in one_line_error(code, err)
    assert snapshot(out) == before


def test_a_gzip_with_flipped_bytes_is_one_line(tmp_path, capsys):
    folder = tmp_path / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (20, 28, 28)), "train_y": np.arange(20) % 10,
              "test_x": rng.integers(0, 256, (10, 28, 28)), "test_y": np.arange(10) % 10}
    for key, stem in idx.FILES.items():
        data = gzip.compress(idx_bytes(arrays[key]), mtime=0)
        if key == "train_x":  # deflate data damaged in the middle: zlib.error, not EOF
            middle = len(data) // 2
            data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) \
                + data[middle + 64:]
        (folder / f"{stem}.gz").write_bytes(data)
    out = tmp_path / "out"
    code, err = cli(capsys, "run", "--local", "--out", str(out), *TINY,
                    "data.name=fashion-mnist", f"data.root={tmp_path / 'data'}")
    assert "cannot read" in one_line_error(code, err) and "train-images" in err
    assert not out.exists()


@pytest.mark.parametrize("body, message", [
    ("raise SystemExit(0)\n", "cannot import"),  # on import
    ("def make(*args, **kwargs):\n    raise SystemExit(0)\n", "cannot be built"),  # on call
])
def test_system_exit_from_a_network_factory_is_an_error(body, message, tmp_path, capsys,
                                                         monkeypatch):
    name = f"quits_{len(body)}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    out = tmp_path / "out"
    code, err = cli(capsys, "run", "--local", "--out", str(out), *TINY, f"net.name={name}:make")
    assert message in one_line_error(code, err)
    assert not out.exists()


def test_fewer_than_two_classes_is_refused_before_any_work(tmp_path, capsys):
    root = image_folder(tmp_path / "images", classes=("cat",))
    out = tmp_path / "out"
    code, err = cli(capsys, "run", "--local", "--out", str(out), *TINY,
                    "data.name=imagefolder", f"data.root={root}")
    assert "needs at least 2" in one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize("case", ["factory", "augment", "no data", "bad images", "ipc"])
@pytest.mark.parametrize("existing", [False, True])
def test_a_command_that_fails_its_checks_leaves_the_output_as_it_found_it(
        case, existing, tmp_path, capsys):
    over = {"factory": ["net.name=no_such_module_here:make"],
            "augment": ["augment.strategy=color_zoom"],
            "no data": ["data.name=cifar10", f"data.root={tmp_path / 'nodata'}"],
            "bad images": ["data.name=imagefolder",
                           f"data.root={image_folder(tmp_path / 'junk', garbage=True)}"],
            "ipc": ["distill.ipc=500"]}[case]
    out = tmp_path / "out"
    if existing:  # a folder the user made, with something of theirs in it
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, err = cli(capsys, "run", "--local", "--out", str(out), *TINY, *over)
    one_line_error(code, err)
    assert snapshot(out) == before


def test_distill_reads_every_expert_before_writing(tmp_path, capsys):
    experts = tmp_path / "experts-run"
    assert main(["experts", "--local", "--out", str(experts), *TINY]) == 0
    capsys.readouterr()
    victim = experts / "experts" / "expert-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    out = tmp_path / "out"
    code, err = cli(capsys, "distill", "--local", "--out", str(out), "--experts", str(experts),
                    *TINY)
    assert "expert-00001.safetensors: checksum mismatch" in one_line_error(code, err)
    assert not out.exists()


def test_a_crafted_state_file_runs_no_code(tmp_path, capsys, monkeypatch):
    """A distillation state whose metadata names an importable function, everywhere a
    network or a factory could be looked for, with its checksum recomputed: --resume reads
    it as data and nothing of it is imported or called."""
    from mct_ray import formats
    from tests.test_formats import EVIL

    (tmp_path / "evil_mod.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["run", "--local", "--out", str(out), *TINY]) == 0
    path = out / "state.safetensors"
    tensors, meta = formats.unpack(path.read_bytes(), formats.STATE, path.name)
    net = {"name": "evil_mod:make", "channels": "evil_mod:make", "width": 8}
    meta["net"] = net
    meta["tree"] = {"__dict__": [*meta["tree"]["__dict__"], ["net", net],
                                 ["factory", "evil_mod:make"]]}
    path.write_bytes(formats.pack(formats.STATE, tensors, meta))
    capsys.readouterr()
    code = main(["run", "--local", "--resume", "--out", str(out), *TINY,
                 "distill.iterations=6"])
    assert code == 0  # the state was read (resumed at its iteration), as data
    assert '"resumed_from": 4' in capsys.readouterr().out
    assert not (tmp_path / "imported").exists() and not (tmp_path / "called").exists()
