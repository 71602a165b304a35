"""The synthetic set's starting images: recorded by every run, and given to another run
(another seed, another method) so that both start from identical real images."""

from __future__ import annotations

import json

import pytest
import torch

from mct_ray import formats
from mct_ray.cli import main
from mct_ray.rng import generator
from mct_ray.synthetic import init_synthetic
from tests.conftest import TINY

pytestmark = pytest.mark.core


def last_set(folder):
    return formats.load_synthetic((folder / "last.safetensors").read_bytes(), "s")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--local", "--out", str(out), *TINY]) == 0
    return out


def test_a_run_records_its_starting_images_as_the_seed_draws_them(finished, tiny_ctx):
    rec = json.loads((finished / "init_indices.json").read_text())
    d = tiny_ctx.data
    assert (rec["format"], rec["data"], rec["ipc"], rec["num_train"]) == (1, "digits", 1,
                                                                           len(d.train_y))
    idx = torch.tensor(rec["indices"])
    images, labels = init_synthetic(d.train_x, d.train_y, d.num_classes, 1,
                                    generator(0, "init"))
    assert torch.equal(d.train_x[idx], images) and torch.equal(d.train_y[idx], labels)


def test_another_seed_and_method_start_from_the_given_images(finished, tmp_path):
    given = str(finished / "init_indices.json")
    for name, extra in (("seed", ["seed=5"]), ("mtt", ["seed=5", "distill.method=mtt"])):
        out = tmp_path / name
        experts = ["--experts", str(finished)] if name == "seed" else []
        command = "distill" if name == "seed" else "run"
        assert main([command, "--local", "--out", str(out), *experts, *TINY, *extra,
                     "distill.iterations=0", f"distill.init_indices={given}",
                     "expert.keep_full=true"]) == 0
        assert json.loads((out / "init_indices.json").read_text()) == \
            json.loads((finished / "init_indices.json").read_text())
        rec = json.loads((finished / "init_indices.json").read_text())
        from mct_ray.config import load_config
        from mct_ray.data import load_data
        data = load_data(load_config("digits", TINY).data)
        assert torch.equal(last_set(out).images, data.train_x[torch.tensor(rec["indices"])])
    # without the file, seed 5 draws other images
    assert main(["distill", "--local", "--out", str(tmp_path / "drawn"), "--experts",
                 str(finished), *TINY, "seed=5", "distill.iterations=0"]) == 0
    assert not torch.equal(last_set(tmp_path / "drawn").images, last_set(tmp_path / "seed")
                           .images)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(ipc=2), "ipc is 2, this run has 1"),
    (lambda r: r.update(data="mnist"), "data is 'mnist', this run has 'digits'"),
    (lambda r: r["indices"].reverse(), "not 1 distinct images per class"),
    (lambda r: r["indices"].pop(), "needs 10 indices"),
    (lambda r: r.pop("indices"), "not a starting-images file"),
])
def test_a_bad_starting_images_file_is_one_line_before_any_work(finished, tmp_path, capsys,
                                                                change, message):
    rec = json.loads((finished / "init_indices.json").read_text())
    change(rec)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rec))
    out = tmp_path / "out"
    code = main(["run", "--local", "--out", str(out), *TINY, f"distill.init_indices={bad}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1], err[-500:]
    assert not (out / "experts").exists()  # nothing trained
