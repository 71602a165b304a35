"""One typed config tree, validated once at the entrypoint, then frozen.

A run's config is: dataclass defaults <- recipe YAML (which may name a `base` recipe)
<- the recipe's `by_method.<method>` section for the run's distill.method (a recipe carries
MCT's and MTT's presets side by side) <- command-line `key=value` overrides. `load_config`
is the only constructor the entrypoints use; every value is checked against the bounds
declared next to its field, so a bad key or value fails before any work starts with a
message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, get_args, get_origin, get_type_hints

import yaml

from mct_ray import zoo
from mct_ray.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """What a distillation method reads and how it draws its start epochs: the one place
    the config, the grid and the distillation learn it."""

    name: str
    reads_full: bool  # full trajectories (every epoch kept) rather than convex ones
    continuous: bool  # start epochs drawn continuously; otherwise whole stored epochs


METHODS = {"mct": Method("mct", reads_full=False, continuous=True),
           "mtt": Method("mtt", reads_full=True, continuous=False)}


def _f(default: Any, *, lo: float | None = None, hi: float | None = None,
       choices: tuple | None = None, doc: str = "") -> Any:
    """A config field with its allowed range or choices (checked by `validate`)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    name: str = _f("digits", choices=("digits", "mnist", "fashion-mnist", "cifar10", "cifar100",
                                      "tinyimagenet", "imagenet-subset", "imagefolder",
                                      "random"))
    subset: str = _f("", choices=("", "imagenette", "imagewoof", "imagefruit", "imagemeow",
                                  "imagesquawk", "imageyellow"),
                     doc="imagenet-subset: which of MTT's 10-class subsets")
    root: str = _f("data", doc="where data sets are looked for (and downloaded to)")
    download: bool = _f(False)
    resolution: int = _f(0, lo=0, hi=1024, doc="0 keeps the native size")
    zca: bool = _f(False)
    zca_eps: float = _f(0.1, lo=0.0, hi=10.0)
    test_fraction: float = _f(0.2, lo=0.05, hi=0.5, doc="digits: stratified test split")
    # Only for `random` (benchmarks): the shape and size of the generated data.
    channels: int = _f(3, lo=1, hi=16)
    num_classes: int = _f(10, lo=2, hi=10000)
    num_train: int = _f(1000, lo=1, hi=10_000_000)
    num_test: int = _f(200, lo=1, hi=10_000_000)


@dataclass(frozen=True)
class NetConfig:
    name: str = _f("convnet", doc="convnet (the functional ConvNet), any other network of "
                   "mct_ray.zoo (resnet18, vgg11, convnet-bn, ...), or a factory "
                   "'my_pkg.module:function' taking (channels, num_classes, resolution) and "
                   "returning an nn.Module; width, depth and norm apply to the ConvNets")
    width: int = _f(128, lo=1, hi=4096)
    depth: int = _f(0, lo=0, hi=8, doc="0 picks the depth from the resolution")
    norm: str = _f("instancenorm", choices=("instancenorm", "none"))


@dataclass(frozen=True)
class AugmentConfig:
    """Differentiable siamese augmentation with MTT's strengths."""

    enabled: bool = _f(True)
    strategy: str = _f("color_crop_cutout_flip_scale_rotate")
    mode: str = _f("single", choices=("single", "all"),
                   doc="single: one family per batch (MTT's default); all: every family")
    scale: float = _f(1.2, lo=1.0, hi=4.0)
    rotate: float = _f(15.0, lo=0.0, hi=180.0, doc="degrees")
    crop: float = _f(0.125, lo=0.0, hi=0.5)
    cutout: float = _f(0.5, lo=0.0, hi=1.0)
    brightness: float = _f(1.0, lo=0.0, hi=4.0)
    saturation: float = _f(2.0, lo=0.0, hi=8.0)
    contrast: float = _f(0.5, lo=0.0, hi=4.0)
    flip: float = _f(0.5, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class ExpertConfig:
    num_experts: int = _f(10, lo=1, hi=100_000)
    epochs: int = _f(50, lo=1, hi=10_000, doc="K")
    lr: float = _f(0.01, lo=0.0, hi=10.0)
    batch: int = _f(256, lo=1, hi=1_000_000)
    momentum: float = _f(0.0, lo=0.0, hi=0.999)
    weight_decay: float = _f(0.0, lo=0.0, hi=1.0)
    anchors: tuple = _f((), doc="interior epochs where the convex path bends (paper: 6, 25)")
    smooth_anchors: bool = _f(False, doc="each interior anchor as the mean of its neighbouring "
                              "epochs, the end as the mean of the last two (authors' "
                              "trajectory_compression.py)")
    keep_full: bool = _f(False, doc="also keep every epoch (the MTT trajectory)")
    store_init_as_seed: bool = _f(False, doc="store theta(0) as its seed, rebuilt on load")


@dataclass(frozen=True)
class DistillConfig:
    method: str = _f("mct", choices=tuple(METHODS))
    ipc: int = _f(1, lo=1, hi=100_000)
    iterations: int = _f(5000, lo=0, hi=10_000_000)
    syn_steps: int = _f(50, lo=1, hi=10_000, doc="N")
    expert_epochs: float = _f(2.0, lo=0.0, hi=10_000.0, doc="M")
    max_start_epoch: float = _f(20.0, lo=0.0, hi=10_000.0)
    start_window: tuple[float, ...] = _f((), doc="[min, initial max, iterations]: DATM's "
                                         "window of start epochs, from [min, initial max) "
                                         "growing to [min, max_start_epoch) over that many "
                                         "iterations; empty: [0, max_start_epoch) throughout")
    batch_syn: int = _f(0, lo=0, hi=1_000_000, doc="0 uses the whole synthetic set")
    lr_img: float = _f(1000.0, lo=0.0, hi=1e7)
    lr_lr: float = _f(1e-5, lo=0.0, hi=10.0)
    lr_teacher: float = _f(0.01, lo=0.0, hi=10.0, doc="initial learnable step size")
    momentum: float = _f(0.5, lo=0.0, hi=0.999)
    min_step_size: float = _f(1e-6, lo=0.0, hi=1.0, doc="floor kept on the step size")
    grad_mode: str = _f("unroll", choices=("unroll", "checkpoint", "tesla"))
    labels: str = _f("hard", choices=("hard", "teacher", "learned"),
                     doc="hard: the class of each image; teacher: each iteration, the "
                     "sampled expert's softmax at max_start_epoch on the images (the MCT "
                     "authors' --teacher_label); learned: DATM's label logits, learned "
                     "beside the images")
    lr_label: float = _f(2.0, lo=0.0, hi=1e6, doc="learned labels' SGD rate (DATM lr_y)")
    momentum_label: float = _f(0.9, lo=0.0, hi=0.999, doc="their momentum (DATM Momentum_y)")
    init_indices: str = _f("", doc="a starting-images file (another run's "
                           "init_indices.json): start from those real images")
    init_filter: str = _f("none", choices=("none", "correct"),
                          doc="correct: start from images the first expert's final network "
                          "classifies correctly (DATM)")
    image_grad_scale: float = _f(1.0, lo=0.0, hi=1e6,
                                 doc="multiplies the images' gradient before their update "
                                 "(the authors' MCT code: 0.5, see fidelity)")
    checkpoint_segments: int = _f(0, lo=0, hi=10_000, doc="0: one per step (least memory)")
    autocast: str = _f("none", choices=("none", "bf16"),
                       doc="bf16: the student's forward under torch.autocast (for GPUs; "
                       "on a CPU it emulates the numerics, slowly)")
    max_bad_steps: int = _f(10, lo=1, hi=1_000_000,
                            doc="non-finite losses in a row before the run stops")


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(100, lo=1, hi=10_000_000)
    num_eval: int = _f(5, lo=1, hi=1000)
    epochs: int = _f(1000, lo=1, hi=1_000_000)
    batch: int = _f(256, lo=1, hi=1_000_000)
    momentum: float = _f(0.9, lo=0.0, hi=0.999)
    weight_decay: float = _f(5e-4, lo=0.0, hi=1.0)
    augment: bool = _f(True)
    baseline: bool = _f(True, doc="also score random real images at the same ipc")
    models: tuple[str, ...] = _f((), doc="architectures that judge the synthetic set besides the "
                       "distillation network (mct_ray.zoo: convnet, resnet18, vgg11, alexnet, "
                       "mlp, ...; or 'my_pkg.module:function'), each with eval.num_eval "
                       "networks; the random-real baseline is scored on each too")
    models_at: str = _f("every", choices=("every", "best"),
                        doc="every: each evaluation point (metrics.parquet rows per model); "
                        "best: only the best set, at the end of the run (cheaper)")


@dataclass(frozen=True)
class RunConfig:
    out: str = _f("", doc="output folder or URI; empty: runs/<recipe>-<timestamp>")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    num_threads: int = _f(0, lo=0, hi=1024, doc="torch threads; 0 leaves torch's default")
    progress: bool = _f(True)
    kernels: str = _f("auto", choices=("auto", "fast", "builtin", "generic"),
                      doc="the ConvNet's ops: fast (hand-written double backward, tuned on "
                      "CPU), builtin (F.conv2d/group_norm/avg_pool2d: cuDNN's on a GPU), "
                      "generic (torch.func.functional_call over zoo's convnet module, the "
                      "path every other network takes); auto: fast on CPU, builtin elsewhere")
    data_on_device: bool = _f(True, doc="keep the data set on the GPU when it takes under "
                              "half of its free memory")
    tf32: bool = _f(False, doc="TF32 matmuls and convolutions on NVIDIA GPUs")
    checkpoint_every: int = _f(0, lo=0, hi=10_000_000, doc="also every this many iterations "
                               "(0: only at evaluations and by checkpoint_minutes)")
    checkpoint_minutes: float = _f(5.0, lo=0.0, hi=10_000.0, doc="also when this much time "
                                   "passed since the last (0: never by time): what a lost node "
                                   "or a kill costs at most")
    tensorboard: bool = _f(True, doc="event files under <out>/tb: loss, step size, accuracy, "
                              "synthetic images")


@dataclass(frozen=True)
class RayConfig:
    """Resources per Ray worker and fault tolerance (ignored by `--local`)."""

    expert_num_cpus: float = _f(1.0, lo=0.0, hi=1024, doc="CPUs per expert worker")
    expert_num_gpus: float = _f(0.0, lo=0.0, hi=64, doc="GPUs per expert (fractions share)")
    max_expert_workers: int = _f(0, lo=0, hi=100_000, doc="experts in flight; 0: no limit")
    expert_retries: int = _f(3, lo=0, hi=1000, doc="re-runs of an expert whose worker or node died")
    distill_num_cpus: float = _f(1.0, lo=0.0, hi=1024)
    distill_num_gpus: float = _f(0.0, lo=0.0, hi=64)
    distill_restarts: int = _f(3, lo=0, hi=1000, doc="restarts of a crashed distillation actor "
                               "(or gang)")
    distill_workers: int = _f(1, lo=1, hi=4096, doc="workers (devices) one distillation is "
                              "split over, by rows of each minibatch, on Ray Train")
    distill_placement: str = _f("PACK", choices=("PACK", "SPREAD"),
                                doc="how the gang's workers are placed on the nodes")
    eval_num_cpus: float = _f(1.0, lo=0.0, hi=1024, doc="CPUs per evaluation task")
    eval_num_gpus: float = _f(0.0, lo=0.0, hi=64)
    eval_retries: int = _f(3, lo=0, hi=1000)
    start_wait_s: float = _f(60.0, lo=0.1, hi=86_400, doc="work not started after this long "
                             "is logged (then again each interval); an error once no node "
                             "can take it")
    num_cpus: int = _f(0, lo=0, hi=100_000, doc="CPUs of a Ray started for one job; 0: all")
    object_store_mb: int = _f(0, lo=0, hi=10_000_000, doc="its object store; 0: Ray's default")


@dataclass(frozen=True)
class Config:
    recipe: str = _f("digits")
    seed: int = _f(0, lo=0, hi=2**31 - 1)
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def needs_full(self) -> bool:
        """Whether the distillation reads full (MTT) trajectories rather than convex ones."""
        return METHODS[self.distill.method].reads_full

    @property
    def other_models(self) -> tuple[str, ...]:
        """eval.models but the distillation network, which is always scored (by its own
        path, the one the run distils with) and picks the best set."""
        return tuple(m for m in self.eval.models if m != self.net.name)

    @property
    def expert_training(self) -> ExpertConfig:
        """How this run trains experts: full trajectories kept when its method reads them."""
        return dataclasses.replace(self.expert,
                                   keep_full=self.expert.keep_full or self.needs_full)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **overrides: Any) -> "Config":
        """A validated copy with dotted-key overrides, e.g. replace(**{"distill.ipc": 10})."""
        return from_dict(_merge(self.to_dict(), _nest(overrides)))


# ---------------------------------------------------------------------------------------
# Building and validation.

def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}': '{part}' is not a section")
        node[parts[-1]] = value
    return out


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'distill': {'ipc': 1}} or {'distill.ipc': 1} -> {'distill.ipc': 1} (`_nest` undone)."""
    out = {}
    for key, v in values.items():
        full = f"{prefix}{key}"
        out.update(flatten(v, full + ".") if isinstance(v, dict) else {full: v})
    return out


def stored_form(values: dict) -> dict[str, Any]:
    """A config (as a dict) read as JSON would store it (tuples as lists), flattened to
    dotted keys: the form every comparison of configs reads."""
    return flatten(json.loads(json.dumps(values)))


def first_difference(a: dict, b: dict, skip: Callable[[str], bool] = lambda key: False
                     ) -> tuple[str, Any, Any] | None:
    """The first dotted key, in sorted order, whose value differs between two configs given
    as dicts (both read as JSON would store them: tuples as lists), leaving out the keys
    `skip` accepts: (key, its value in a, in b), or None when they agree."""
    fa, fb = stored_form(a), stored_form(b)
    for key in sorted(fa.keys() | fb.keys()):
        if not skip(key) and fa.get(key) != fb.get(key):
            return key, fa.get(key), fb.get(key)
    return None


# What an expert depends on: two configs that agree on these train the same expert i. How
# many experts a folder holds and whether every epoch is kept too change no expert.
EXPERT_KEYS = ("seed", "data.", "net.", "augment.", "expert.")
EXPERT_FREE = ("expert.num_experts", "expert.keep_full")


def shapes_experts(key: str, count: bool = False) -> bool:
    """Whether a dotted config key is one the experts depend on (with `count`, or says how
    many there are)."""
    return (key.startswith(EXPERT_KEYS) and not key.startswith(EXPERT_FREE)) or (
        count and key == "expert.num_experts")


def experts_key(cfg: Config, count: bool = False) -> str:
    """The values its experts depend on (with `count`, and their number) as one string:
    configs with equal keys train the same experts."""
    return json.dumps({k: v for k, v in stored_form(cfg.to_dict()).items()
                       if shapes_experts(k, count)}, sort_keys=True)


def experts_difference(a: dict, b: dict, count: bool = False) -> tuple[str, Any, Any] | None:
    """`first_difference` in what the experts depend on (with `count`, or their number)."""
    return first_difference(a, b, lambda key: not shapes_experts(key, count))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(key: str, value: Any, typ: Any, meta: dict) -> Any:
    """Check one value against its declared type and bounds; return it normalised."""
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 and nan as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    elif typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    elif typ is tuple or get_origin(typ) is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        value = tuple(value)
        item = get_args(typ)[0] if get_args(typ) else None
        if item is str and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key '{key}' must be a list of names, got {list(value)!r}")
        if item is float:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in value):
                raise ConfigError(f"config key '{key}' must be a list of numbers, got "
                                  f"{list(value)!r}")
            value = tuple(float(v) for v in value)
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"config key '{key}' must be one of {allowed}; got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"config key '{key}' must be in [{lo}, {hi}], got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        key = prefix + unknown[0]
        allowed = ", ".join(sorted(names))
        raise ConfigError(f"unknown config key '{key}' (allowed here: {allowed})")
    kwargs = {}
    for name, f in names.items():
        if name not in values:
            continue
        key, typ, value = prefix + name, hints[name], values[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; set '{key}.<name>=...'")
            kwargs[name] = _build(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ, dict(f.metadata))
    return cls(**kwargs)


def _check_cross(cfg: Config) -> None:
    """Constraints that involve more than one key."""
    d, e = cfg.distill, cfg.expert
    zoo.check_name(cfg.net.name, "net.name")
    for name in cfg.eval.models:
        zoo.check_name(name, "eval.models")
    if not METHODS[d.method].continuous:
        for key, v in (("distill.max_start_epoch", d.max_start_epoch),
                       ("distill.expert_epochs", d.expert_epochs)):
            if v != int(v):
                raise ConfigError(f"config key '{key}' must be a whole number for method mtt "
                                  f"(MTT samples stored epochs), got {v}")
        # MTT's start epoch is drawn from 0 .. max_start_epoch - 1 (numpy's randint).
        if d.max_start_epoch < 1:
            raise ConfigError("config key 'distill.max_start_epoch' must be at least 1 for "
                              f"method mtt (starts are 0 .. max_start_epoch - 1), got "
                              f"{d.max_start_epoch}")
    if d.start_window:
        check_start_window(d)
    if d.init_filter != "none" and d.init_indices:
        raise ConfigError("config keys 'distill.init_filter' and 'distill.init_indices' both "
                          "choose the starting images: set one")
    check_expert_epochs(d, e.epochs, "expert.epochs")
    if d.expert_epochs <= 0:
        raise ConfigError("config key 'distill.expert_epochs' must be above 0")
    anchors = e.anchors
    if any(not isinstance(a, int) or isinstance(a, bool) for a in anchors) or \
            list(anchors) != sorted(set(anchors)) or any(a <= 0 or a >= e.epochs for a in anchors):
        raise ConfigError(f"config key 'expert.anchors' must be increasing whole epochs strictly "
                          f"between 0 and expert.epochs ({e.epochs}), got {list(anchors)}")
    if e.smooth_anchors and not anchors:
        raise ConfigError("config key 'expert.smooth_anchors' needs interior anchors "
                          "(expert.anchors), as the authors' compression script smooths them")


def check_start_window(d: DistillConfig) -> None:
    w = d.start_window
    if len(w) != 3 or not 0 <= w[0] < w[1] <= d.max_start_epoch or w[2] < 1 \
            or w[2] != int(w[2]) or \
            (not METHODS[d.method].continuous and any(v != int(v) for v in w)):
        raise ConfigError("config key 'distill.start_window' must be [min, initial max, "
                          "iterations] with 0 <= min < initial max <= distill.max_start_epoch "
                          f"({d.max_start_epoch:g}) and iterations a whole number >= 1 (whole "
                          f"epochs for method mtt), got {list(w)}")


def start_bounds(d: DistillConfig, iteration: int) -> tuple[float, float]:
    """[low, high) of the start epochs at `iteration`: DATM's window, whose upper bound
    grows by whole epochs from the initial max to max_start_epoch (their int() of the
    linear growth), or [0, max_start_epoch) throughout."""
    if not d.start_window:
        return 0.0, d.max_start_epoch
    low, first, iterations = d.start_window
    grown = int((d.max_start_epoch - first) * iteration / iterations)
    return low, min(first + grown, d.max_start_epoch)


def check_expert_epochs(d: DistillConfig, epochs: int, where: str) -> None:
    """Whether experts of `epochs` epochs hold every segment the distillation samples: MCT
    starts below max_start_epoch (its target is clamped to the end), MTT's last start is
    max_start_epoch - 1 and its target expert_epochs later. `where` names the epochs' source."""
    if d.max_start_epoch >= epochs:
        raise ConfigError(f"config key 'distill.max_start_epoch' ({d.max_start_epoch:g}) must "
                          f"be below the experts' epochs ({epochs}, {where})")
    if not METHODS[d.method].continuous and d.max_start_epoch - 1 + d.expert_epochs > epochs:
        raise ConfigError("config keys 'distill.max_start_epoch' - 1 + 'distill.expert_epochs' "
                          f"({d.max_start_epoch - 1 + d.expert_epochs:g}) must not exceed the "
                          f"experts' epochs ({epochs}, {where}) for method mtt")


def from_dict(values: dict) -> Config:
    cfg = _build(Config, values, "")
    _check_cross(cfg)
    return cfg


def parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (1, 1e-5, true, [6, 25], cifar10)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key=value (e.g. distill.ipc=10)")
        out[key.strip()] = parse_value(text)
    return out


def recipe_names() -> list[str]:
    folder = resources.files("mct_ray") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def is_config_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml", ".json"))


def _recipe_dict(name: str, seen: tuple = ()) -> dict:
    """A named recipe, or a YAML/JSON config file (a recipe of your own, or a run's
    config.json), with its `base` recipe merged underneath."""
    if name in seen:
        raise ConfigError(f"recipe '{name}' names itself as a base")
    if is_config_file(name):
        try:
            with open(name, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"config file '{name}' cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{name}' is not UTF-8 text (byte {exc.start})"
                              ) from None
    elif name in recipe_names():
        text = (resources.files("mct_ray") / "recipes" / f"{name}.yaml").read_text()
    else:
        raise ConfigError(f"unknown recipe '{name}' (known: {', '.join(recipe_names())}; "
                          "or give a .yaml/.json config file)")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{name}' is not valid YAML: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{name}' must hold a mapping of sections")
    values.pop("recipe", None)
    base = values.pop("base", None)
    if base:
        values = _merge(_recipe_dict(base, seen + (name,)), values)
    return values


def _method_preset(values: dict, over: dict) -> dict:
    """The recipe's `by_method` section for the method the run will use."""
    by_method = values.pop("by_method", None) or {}
    methods = DistillConfig.__dataclass_fields__["method"].metadata["choices"]
    if not isinstance(by_method, dict) or any(m not in methods for m in by_method):
        raise ConfigError(f"recipe key 'by_method' must map a method ({', '.join(methods)}) "
                          f"to config sections, got {by_method!r}")
    method = next((d["method"] for d in (over.get("distill"), values.get("distill"))
                   if isinstance(d, dict) and "method" in d), DistillConfig.method)
    preset = by_method.get(method) or {}
    if not isinstance(preset, dict):
        raise ConfigError(f"recipe key 'by_method.{method}' must hold config sections")
    return preset


def load_config(recipe: str = "digits", overrides: dict[str, Any] | list[str] | None = None,
                ) -> Config:
    """The entrypoints' one way to get a Config: recipe <- its preset for the run's method
    <- overrides, validated and frozen."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    over = _nest(dict(overrides or {}))
    values = _recipe_dict(recipe)
    values = _merge(_merge(values, _method_preset(values, over)), over)
    values["recipe"] = recipe
    return from_dict(values)


def config_from_json(text: str) -> Config:
    """Rebuild a Config from the config.json written beside an artifact."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config.json must hold a mapping of sections, got "
                          f"{type(values).__name__}")
    return from_dict(values)
