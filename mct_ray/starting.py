"""The synthetic set's starting images: which real training images it starts from.

They are drawn from the run's seed (`distill.draw_init_indices`), or given by a file
(`distill.init_indices=<path or URI>`, e.g. another run's `init_indices.json`), so that two
methods, two seeds' worth of settings or two codes can start from identical images. Either
way the run records them in `<out>/init_indices.json` before its first iteration; a resumed
run, a restarted actor and every worker read them back from there.

The file is JSON (never a pickle): {"format": 1, "data": name, "num_train": N, "ipc": ipc,
"num_classes": C, "indices": [...]}, indices class-major, ipc per class.
"""

from __future__ import annotations

import json

import torch

from mct_ray import layout
from mct_ray.errors import ConfigError, FormatError
from mct_ray.rng import generator
from mct_ray.storage import Storage, parent_and_name
from mct_ray.synthetic import draw_correct_indices, draw_init_indices
from mct_ray.trajectory import unflatten

FORMAT = 1


def record(ctx, indices: torch.Tensor) -> dict:
    d = ctx.data
    return {"format": FORMAT, "data": d.name, "num_train": len(d.train_y),
            "ipc": ctx.cfg.distill.ipc, "num_classes": d.num_classes,
            "indices": [int(i) for i in indices]}


def parse(raw: bytes, where: str, ctx) -> torch.Tensor:
    """The indices of a starting-images file, checked against this run's data and ipc."""
    try:
        rec = json.loads(raw)
        indices = torch.tensor(rec["indices"], dtype=torch.long)
        fields = (rec["format"], rec["data"], rec["num_train"], rec["ipc"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise FormatError(f"{where}: not a starting-images file ({type(exc).__name__}: "
                          f"{exc})") from None
    want = record(ctx, torch.zeros(0))
    for key, value in zip(("format", "data", "num_train", "ipc"), fields):
        if value != want[key]:
            raise ConfigError(f"{where}: {key} is {value!r}, this run has {want[key]!r}")
    d, ipc = ctx.data, ctx.cfg.distill.ipc
    if indices.ndim != 1 or len(indices) != ipc * d.num_classes or \
            bool((indices < 0).any() | (indices >= len(d.train_y)).any()):
        raise FormatError(f"{where}: needs {ipc * d.num_classes} indices in "
                          f"[0, {len(d.train_y)})")
    classes = torch.arange(d.num_classes).repeat_interleave(ipc)
    if not torch.equal(d.train_y[indices].cpu(), classes) or len(set(indices.tolist())) \
            != len(indices):
        raise FormatError(f"{where}: the indices are not {ipc} distinct images per class, "
                          "class by class")
    return indices


def given(ctx) -> torch.Tensor | None:
    """The indices of `distill.init_indices`, checked (None when it is not set)."""
    path = ctx.cfg.distill.init_indices
    if not path:
        return None
    folder, name = parent_and_name(path)
    return parse(Storage.open(folder).read_bytes(name), path, ctx)


def starting_indices(ctx, store: Storage, trajectories: list) -> torch.Tensor:
    """The run's starting images: those it recorded, else the given or drawn ones (then
    recorded before anything else is written)."""
    if store.exists(layout.INIT_INDICES):
        return parse(store.read_bytes(layout.INIT_INDICES), store.uri_of(layout.INIT_INDICES),
                     ctx)
    indices = resolve(ctx, trajectories)
    store.write_json(layout.INIT_INDICES, record(ctx, indices))
    return indices


def resolve(ctx, trajectories: list) -> torch.Tensor:
    """The given indices, else those the seed draws (with distill.init_filter=correct,
    among the images the experts' final networks classify correctly, the first expert
    first)."""
    indices = given(ctx)
    if indices is not None:
        return indices
    d, ipc, gen = ctx.data, ctx.cfg.distill.ipc, generator(ctx.cfg.seed, "init")
    if ctx.cfg.distill.init_filter == "correct":
        return draw_correct_indices(d.train_y.cpu(), d.num_classes, ipc, gen,
                                    [final_network(ctx, t) for t in trajectories])
    return draw_init_indices(d.train_y.cpu(), d.num_classes, ipc, gen)


def final_network(ctx, trajectory):
    """The class an expert's network at the end of its trajectory predicts, by index into
    the training set."""
    params = unflatten(ctx.spec, trajectory.point(trajectory.num_epochs).to(ctx.device))

    def predict(indices: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = ctx.data.train_x[indices.to(ctx.data.train_x.device)].to(ctx.device)
            return ctx.net.forward(params, x).argmax(1)
    return predict
