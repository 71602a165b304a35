"""What crosses the object store: plain dicts of numpy arrays.

Ray stores numpy arrays out of band, so a `ray.get` on another process (same node) maps the
arrays read-only from shared memory instead of copying them; torch tensors would be pickled.
A trajectory travels as its flat anchors, beta and the network's parameter layout, so a
consumer with a different architecture is caught before any use.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from mct_ray.data import ImageData
from mct_ray.errors import FormatError
from mct_ray.experts import ExpertResult
from mct_ray.nets import NetSpec
from mct_ray.synthetic import SyntheticSet
from mct_ray.trajectory import ConvexTrajectory, FullTrajectory, Trajectory


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the (possibly read-only, shared-memory) array's buffer."""
    with warnings.catch_warnings():  # never written: the core only reads trajectories
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def data_to_numpy(data: ImageData) -> dict:
    return {"name": data.name, "class_names": list(data.class_names),
            "mean": list(data.mean), "std": list(data.std),
            **{k: getattr(data, k).cpu().numpy()
               for k in ("train_x", "train_y", "test_x", "test_y")}}


def data_from_numpy(d: dict) -> ImageData:
    return ImageData(d["name"], as_tensor(d["train_x"]), as_tensor(d["train_y"]),
                     as_tensor(d["test_x"]), as_tensor(d["test_y"]), tuple(d["class_names"]),
                     tuple(d["mean"]), tuple(d["std"]))


def synthetic_to_numpy(syn: SyntheticSet) -> dict:
    return {"images": syn.images.cpu().numpy(), "labels": syn.labels.cpu().numpy(),
            "step_size": syn.step_size, "info": dict(syn.info),
            "classes": None if syn.classes is None else syn.classes.cpu().numpy()}


def synthetic_from_numpy(d: dict) -> SyntheticSet:
    classes = d.get("classes")
    return SyntheticSet(as_tensor(d["images"]), as_tensor(d["labels"]), d["step_size"],
                        d["info"], None if classes is None else as_tensor(classes))


def _layout(spec: NetSpec) -> list[list]:
    return [[name, list(shape)] for name, shape in spec.param_shapes()]


def _check_layout(d: dict, spec: NetSpec) -> None:
    if d["layout"] != _layout(spec):
        raise FormatError(f"expert {d['expert_id']} was trained for another network: "
                          f"{d['layout']} != {_layout(spec)}")


def trajectory_to_numpy(traj: Trajectory, expert_id: int, spec: NetSpec) -> dict:
    """One expert's convex (endpoints, anchors, beta) or full trajectory."""
    convex = isinstance(traj, ConvexTrajectory)
    return {"expert_id": expert_id, "init_seed": None, "test_acc": None,
            "info": dict(traj.info), "layout": _layout(spec),
            "anchor_epochs": list(traj.anchor_epochs) if convex else None,
            "anchors": traj.anchors.numpy() if convex else None,  # (num_anchors, P) float32
            "beta": traj.beta.numpy() if convex else None,  # (T, K+1) float32
            "full": None if convex else traj.checkpoints.numpy()}  # (K+1, P) float32


def expert_to_numpy(result: ExpertResult, spec: NetSpec) -> dict:
    """A freshly trained expert: its convex trajectory, and the full one when kept."""
    return {**trajectory_to_numpy(result.convex, result.expert_id, spec),
            "init_seed": result.init_seed, "test_acc": result.test_acc,
            "full": None if result.full is None else result.full.checkpoints.numpy()}


def expert_from_numpy(d: dict, spec: NetSpec) -> ExpertResult:
    convex = trajectory_from_numpy(d, spec, full=False)
    full = None if d["full"] is None else trajectory_from_numpy(d, spec, full=True)
    return ExpertResult(d["expert_id"], convex, full, d["init_seed"], d["test_acc"])


def trajectory_from_numpy(d: dict, spec: NetSpec, full: bool) -> Trajectory:
    """The convex (MCT) or full (MTT) trajectory of one expert, sharing the arrays."""
    _check_layout(d, spec)
    if full:
        if d["full"] is None:
            raise FormatError(f"expert {d['expert_id']} has no full trajectory; method mtt "
                              "needs experts trained with expert.keep_full=true")
        return FullTrajectory(spec, as_tensor(d["full"]), d["info"])
    return ConvexTrajectory(spec, tuple(d["anchor_epochs"]), as_tensor(d["anchors"]),
                            as_tensor(d["beta"]), d["info"])
