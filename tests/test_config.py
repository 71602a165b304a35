"""Config tree: recipes, overrides, validation messages, frozen values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mct_ray.config import config_from_json, load_config, recipe_names
from mct_ray.errors import ConfigError

pytestmark = pytest.mark.core


def test_all_shipped_recipes_load():
    names = recipe_names()
    for ipc in (1, 10, 50):
        for data in ("cifar10", "cifar100", "tinyimagenet"):
            assert f"{data}-ipc{ipc}" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.recipe == name


def test_recipes_carry_the_reference_hyperparameters():
    """MCT: the authors' run_command.md; MTT: its hyper-parameter table (sources in the YAML)."""
    mct = [load_config(f"cifar10-ipc{i}").distill for i in (1, 10, 50)]
    mtt = [load_config(f"cifar10-ipc{i}", ["distill.method=mtt"]).distill for i in (1, 10, 50)]
    assert [(d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr)
            for d in mct] == [(60, 6, 4, 1000, 1e-7), (30, 15, 8, 1000, 1e-5),
                              (30, 2, 40, 1000, 1e-5)]
    assert [(d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr, d.lr_teacher)
            for d in mtt] == [(50, 2, 2, 100, 1e-7, 0.01), (30, 2, 20, 100, 1e-5, 0.001),
                              (30, 2, 40, 1000, 1e-5, 0.001)]
    assert all(d.grad_mode == "tesla" and d.lr_teacher == 0.01 and d.batch_syn == 0
               for d in mct)
    assert [load_config(f"cifar10-ipc{i}", [f"distill.method={m}"]).data.zca
            for m in ("mct", "mtt") for i in (1, 10, 50)] == [True] * 5 + [False]
    tiny = load_config("tinyimagenet-ipc1")
    assert tiny.net.depth == 3 and tiny.data.zca and tiny.expert.anchors == (15, 30)
    assert load_config("tinyimagenet-ipc1", ["distill.method=mtt"]).data.zca is False


def test_datm_recipes_carry_datms_configs():
    """DATM's ConvIN configs (NUS-HPC-AI-Lab/DATM configs/*/ConvIN/IPC*.yaml; sources in the
    YAML): N, M, start window, max start, lr_img, lr_lr, lr_y, batch_syn, the init filter."""
    got = {}
    for data in ("cifar10", "cifar100", "tinyimagenet"):
        for ipc in (1, 10, 50):
            cfg = load_config(f"datm-{data}-ipc{ipc}")
            d = cfg.distill
            assert (d.method, d.labels, cfg.data.zca, cfg.expert.epochs) == \
                ("mtt", "learned", True, 100)
            got[(data, ipc)] = (d.syn_steps, d.expert_epochs, d.start_window, d.max_start_epoch,
                                d.lr_img, d.lr_lr, d.lr_label, d.batch_syn, d.init_filter)
    assert got == {
        ("cifar10", 1): (80, 2, (), 4, 100, 1e-7, 5, 10, "correct"),
        ("cifar10", 10): (80, 2, (0, 10, 1000), 20, 100, 1e-5, 2, 100, "correct"),
        ("cifar10", 50): (80, 2, (0, 20, 2000), 40, 1000, 1e-5, 2, 500, "correct"),
        ("cifar100", 1): (40, 3, (0, 20, 1000), 30, 1000, 1e-5, 10, 0, "correct"),
        ("cifar100", 10): (80, 2, (0, 30, 2000), 50, 1000, 1e-5, 10, 0, "correct"),
        ("cifar100", 50): (80, 2, (20, 70, 1), 70, 1000, 1e-5, 10, 1000, "none"),
        ("tinyimagenet", 1): (40, 2, (0, 15, 2000), 20, 10000, 1e-4, 10, 0, "correct"),
        ("tinyimagenet", 10): (40, 2, (10, 50, 1), 50, 100, 1e-4, 10, 500, "correct"),
        ("tinyimagenet", 50): (20, 2, (40, 70, 1), 70, 100, 1e-4, 10, 1000, "correct")}
    assert load_config("datm-tinyimagenet-ipc10").net.depth == 4


def test_overrides_are_typed_and_nested():
    cfg = load_config("digits", ["distill.ipc=10", "seed=3", "distill.lr_lr=1e-6",
                                 "expert.anchors=[2, 5]", "augment.enabled=false"])
    assert cfg.distill.ipc == 10 and cfg.seed == 3 and cfg.distill.lr_lr == 1e-6
    assert cfg.expert.anchors == (2, 5) and cfg.augment.enabled is False


def test_config_is_frozen_and_round_trips_through_json():
    cfg = load_config("digits", ["seed=5"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    assert config_from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("override, message", [
    ("distill.ipcc=1", "unknown config key 'distill.ipcc'"),
    ("nope=1", "unknown config key 'nope'"),
    ("distill.ipc=0", "config key 'distill.ipc' must be in [1, 100000]"),
    ("distill.ipc=1.5", "config key 'distill.ipc' must be an integer"),
    ("distill.method=foo", "config key 'distill.method' must be one of mct, mtt"),
    ("distill.grad_mode=fast", "config key 'distill.grad_mode' must be one of"),
    ("distill.lr_img=nan", "config key 'distill.lr_img' must be finite"),
    ("augment.enabled=maybe", "config key 'augment.enabled' must be true or false"),
    ("distill=3", "config key 'distill' is a section"),
    ("distill.max_start_epoch=40", "must be below the experts' epochs (30, expert.epochs)"),
    ("expert.anchors=[50]", "config key 'expert.anchors' must be increasing"),
    ("ipc", "must look like key=value"),
])
def test_bad_values_name_the_key_and_the_allowed_range(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("digits", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_mtt_needs_whole_epochs():
    with pytest.raises(ConfigError, match="whole number for method mtt"):
        load_config("digits", ["distill.method=mtt", "distill.expert_epochs=1.5"])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'cifar11'.*digits"):
        load_config("cifar11")


def test_first_difference_reads_both_configs_as_json_would_store_them():
    from mct_ray.config import first_difference

    a = load_config("digits").to_dict()
    stored = json.loads(json.dumps(a))  # tuples come back as lists: no difference
    assert first_difference(stored, a) is None
    b = load_config("digits", ["distill.ipc=3", "run.out=elsewhere"]).to_dict()
    assert first_difference(a, b) == ("distill.ipc", 1, 3)
    assert first_difference(a, b, lambda key: key == "distill.ipc") == ("run.out", "", "elsewhere")
    assert first_difference(a, b, lambda key: key in ("distill.ipc", "run.out")) is None


def test_one_definition_of_the_same_experts():
    """What makes two configs train the same experts is decided once (config.EXPERT_KEYS):
    the grid's groups, a grid's expert folders and a run folder's --resume all read it."""
    from mct_ray.config import experts_difference, experts_key

    base = load_config("digits")
    same = ["distill.ipc=10", "distill.method=mtt", "eval.num_eval=1", "run.out=x",
            "ray.num_cpus=1", "expert.keep_full=true", "expert.num_experts=3"]
    for override in same:
        other = load_config("digits", [override])
        assert experts_key(other) == experts_key(base), override
        assert experts_difference(base.to_dict(), other.to_dict()) is None, override
    for override in ("seed=1", "expert.lr=0.02", "data.zca=true", "net.width=32",
                     "augment.strategy=crop"):
        other = load_config("digits", [override])
        assert experts_key(other) != experts_key(base), override
        key = override.split("=")[0]
        assert experts_difference(base.to_dict(), other.to_dict())[0] == key
    more = load_config("digits", ["expert.num_experts=3"])  # as many: only with count
    assert experts_key(more, count=True) != experts_key(base, count=True)
    assert experts_difference(base.to_dict(), more.to_dict(), count=True)[0] == \
        "expert.num_experts"


def test_the_method_table_decides_what_each_method_reads_and_draws():
    from mct_ray.config import METHODS

    assert load_config("digits", ["distill.method=mtt"]).needs_full
    assert not load_config("digits", ["distill.method=mct"]).needs_full
    assert [(m.reads_full, m.continuous) for m in METHODS.values()] == [(False, True),
                                                                       (True, False)]
