"""The one owner of the file schemas: trajectories, synthetic sets, distillation state.

Every file is safetensors (loading runs no code) whose string metadata holds the format name,
the schema version, the network description and a sha256 over the metadata and the tensor
bytes. `pack` / `unpack` are the only functions that know this envelope; the typed
save/load pairs below build on them. Readers check format, version, checksum, and (when
asked) that the network matches the one the caller expects, and raise FormatError otherwise.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mct_ray import zoo
from mct_ray.errors import FormatError
from mct_ray.nets import NetSpec
from mct_ray.synthetic import SyntheticSet
from mct_ray.trajectory import ConvexTrajectory, FullTrajectory, Trajectory, flatten

VERSION = 1
TRAJECTORY = "mct-ray-trajectory"
SYNTHETIC = "mct-ray-synthetic"
STATE = "mct-ray-distill-state"


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def pack(fmt: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """Serialise tensors with JSON-encoded metadata under a versioned, checksummed header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": fmt, "version": str(VERSION)}
    header.update({k: json.dumps(v) for k, v in meta.items()})
    header["sha256"] = _checksum(header, tensors)
    return st_save(tensors, metadata=header)


def read_header(data: bytes, name: str) -> dict[str, str]:
    """The metadata of a safetensors byte string, without loading any tensor."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else None
    except (struct.error, ValueError, UnicodeDecodeError):
        raise FormatError(f"{name}: not a safetensors file (corrupt or truncated)") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{name}: not a safetensors file (its header or metadata is not a "
                          "JSON object of strings)")
    return dict(meta)


def unpack(data: bytes, fmt: str, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `pack`; checks format, version and checksum."""
    header = read_header(data, name)
    if header.get("format") != fmt:
        raise FormatError(f"{name}: expected a {fmt} file, found format "
                          f"{header.get('format', 'none')!r}")
    if header.get("version") != str(VERSION):
        raise FormatError(f"{name}: {fmt} version {header.get('version')!r} is not supported "
                          f"(this mct-ray reads version {VERSION})")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for bad bodies
        raise FormatError(f"{name}: corrupt tensor data ({exc})") from None
    stored = header.pop("sha256", None)
    if stored != _checksum(header, tensors):
        raise FormatError(f"{name}: checksum mismatch (the file is corrupt or was modified)")
    meta = {k: json.loads(v) for k, v in header.items() if k not in ("format", "version")}
    return tensors, meta


def _check_spec(name: str, found: NetSpec, expected: NetSpec | None) -> None:
    if expected is not None and found != expected:
        diffs = ", ".join(f"{k} {a!r} != {b!r}" for k, a, b in
                          ((k, found.to_dict()[k], expected.to_dict()[k])
                           for k in found.to_dict()) if a != b)
        raise FormatError(f"{name}: network does not match the config ({diffs})")


def _spec_from(meta: dict, name: str, expected: NetSpec | None) -> NetSpec:
    """The network a file was written for, compared with the config's as plain data before
    anything of the file's is built: a file runs no code. Its factory is built only when it
    is the config's own (or a zoo network); then the stored parameter names and shapes are
    checked against what the spec builds now, so a factory whose code changed since is
    named rather than loaded into the wrong layout."""
    try:
        described = dict(meta["net"])
        stored = described.pop("parameters", None)
        described.pop("arguments", None)
        spec = NetSpec.from_dict(described)
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{name}: missing or malformed network description") from None
    types = {f: type(v) for f, v in spec.to_dict().items()}
    if types != {f: (str if f in ("name", "norm") else int) for f in types}:
        raise FormatError(f"{name}: malformed network description ({types})")
    _check_spec(name, spec, expected)
    if expected is None and spec.name not in zoo.MODELS:
        raise FormatError(f"{name}: written for the network factory '{spec.name}', which a "
                          "file alone never imports; give the config that names it (net.name)")
    if stored is not None:
        now = [[n, list(s)] for n, s in spec.param_shapes()]
        if stored != now:
            first = next((f"{a} != {b}" for a, b in zip(stored, now) if a != b),
                         f"{len(stored)} tensors != {len(now)}")
            raise FormatError(f"{name}: written for a {spec.name} with other parameters than "
                              f"{spec.name} builds now ({first})")
    return spec


# ---------------------------------------------------------------------------------------
# Trajectories.

def save_trajectory(traj: Trajectory, init_seed: int | None = None) -> bytes:
    """Serialise a trajectory. With `init_seed` (convex only), theta(0) is stored as the
    seed that regenerates it plus a checksum of its bytes, instead of the tensor itself."""
    meta: dict[str, Any] = {"net": traj.spec.describe(), "info": traj.info}
    if isinstance(traj, FullTrajectory):
        meta["kind"] = "full"
        return pack(TRAJECTORY, {"checkpoints": traj.checkpoints}, meta)
    meta.update(kind="convex", anchor_epochs=list(traj.anchor_epochs))
    tensors = {"beta": traj.beta.float()}
    if init_seed is None:
        tensors["anchors"] = traj.anchors
    else:
        regenerated = flatten(traj.spec.init_params(torch.Generator().manual_seed(init_seed)))
        if not torch.equal(regenerated, traj.anchors[0]):
            raise FormatError("theta(0) is not the network initialisation of the given seed")
        meta["init_seed"] = init_seed
        meta["init_sha256"] = hashlib.sha256(traj.anchors[0].numpy().tobytes()).hexdigest()
        tensors["anchors"] = traj.anchors[1:]
    return pack(TRAJECTORY, tensors, meta)


def load_trajectory(data: bytes, name: str, expected: NetSpec | None = None) -> Trajectory:
    tensors, meta = unpack(data, TRAJECTORY, name)
    spec = _spec_from(meta, name, expected)
    num_params, num_tensors = spec.num_params, len(spec.param_shapes())
    kind = meta.get("kind")
    try:
        if kind == "full":
            ckpt = tensors["checkpoints"]
            if ckpt.ndim != 2 or ckpt.shape[1] != num_params or ckpt.dtype != torch.float32:
                raise FormatError(f"{name}: checkpoints of shape {tuple(ckpt.shape)} do not "
                                  f"fit the network ({num_params} parameters)")
            return FullTrajectory(spec, ckpt, meta.get("info", {}))
        if kind != "convex":
            raise FormatError(f"{name}: unknown trajectory kind {kind!r}")
        epochs = tuple(int(e) for e in meta["anchor_epochs"])
        anchors, beta = tensors["anchors"], tensors["beta"]
        if "init_seed" in meta:
            anchors = torch.cat([_regenerate_init(spec, meta, name)[None], anchors])
    except KeyError as exc:
        raise FormatError(f"{name}: missing entry {exc}") from None
    if anchors.shape != (len(epochs), num_params) or beta.shape != (num_tensors, epochs[-1] + 1):
        raise FormatError(f"{name}: shapes anchors {tuple(anchors.shape)} / beta "
                          f"{tuple(beta.shape)} do not fit the network and {epochs[-1]} epochs")
    if not (torch.isfinite(anchors).all() and torch.isfinite(beta).all()):
        raise FormatError(f"{name}: non-finite values in the trajectory")
    return ConvexTrajectory(spec, epochs, anchors, beta, meta.get("info", {}))


def _regenerate_init(spec: NetSpec, meta: dict, name: str) -> torch.Tensor:
    theta0 = flatten(spec.init_params(torch.Generator().manual_seed(int(meta["init_seed"]))))
    if hashlib.sha256(theta0.numpy().tobytes()).hexdigest() != meta["init_sha256"]:
        raise FormatError(f"{name}: theta(0) regenerated from its seed does not match the "
                          "stored checksum on this platform; re-save the experts with "
                          "expert.store_init_as_seed=false")
    return theta0


# ---------------------------------------------------------------------------------------
# Synthetic sets.

def save_synthetic(syn: SyntheticSet, spec: NetSpec) -> bytes:
    """Hard labels as int64 classes; soft ones as float32 distributions beside the classes."""
    tensors = {"images": syn.images.float(), "labels": syn.labels.long()} if not syn.soft \
        else {"images": syn.images.float(), "labels": syn.labels.float(),
              "classes": syn.classes.long()}
    return pack(SYNTHETIC, tensors,
                {"net": spec.describe(), "step_size": float(syn.step_size), "info": syn.info})


def load_synthetic(data: bytes, name: str, expected: NetSpec | None = None) -> SyntheticSet:
    tensors, meta = unpack(data, SYNTHETIC, name)
    _spec_from(meta, name, expected)
    try:
        images, labels, step = tensors["images"], tensors["labels"], float(meta["step_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{name}: missing entry {exc}") from None
    if images.ndim != 4 or labels.ndim not in (1, 2) or len(labels) != len(images):
        raise FormatError(f"{name}: images {tuple(images.shape)} and labels "
                          f"{tuple(labels.shape)} do not match")
    info = meta.get("info", {})
    if not isinstance(info, dict):
        raise FormatError(f"{name}: 'info' is not an object")
    classes = _check_labels(tensors, labels, name)
    if expected is not None:
        top = labels.shape[1] if labels.ndim == 2 else \
            (int(labels.max()) + 1 if len(labels) else 0)
        if top > expected.num_classes or (labels.ndim == 2 and top < expected.num_classes):
            raise FormatError(f"{name}: labels for {top} classes, the network has "
                              f"{expected.num_classes}")
    return SyntheticSet(images, labels, step, info, classes)


def _check_labels(tensors: dict, labels: torch.Tensor, name: str) -> torch.Tensor | None:
    """Hard labels: int64 classes >= 0. Soft ones: finite float rows that each sum to 1,
    with the int64 class of each image beside them (returned)."""
    if labels.ndim == 1:
        if labels.dtype != torch.int64 or (len(labels) and int(labels.min()) < 0):
            raise FormatError(f"{name}: hard labels must be class indices (int64, >= 0)")
        return None
    classes = tensors.get("classes")
    if classes is None or classes.dtype != torch.int64 or classes.shape != (len(labels),) \
            or (len(classes) and not 0 <= int(classes.min()) <= int(classes.max())
                < labels.shape[1]):
        raise FormatError(f"{name}: soft labels need the class of each image ('classes', "
                          f"int64, {len(labels)} of them, below {labels.shape[1]})")
    if not labels.is_floating_point() or not bool(torch.isfinite(labels).all()) \
            or bool((labels < 0).any()) \
            or not torch.allclose(labels.double().sum(1), torch.ones(len(labels),
                                                                     dtype=torch.float64),
                                  atol=1e-3):
        raise FormatError(f"{name}: soft labels must be finite, non-negative and sum to 1 "
                          "per image")
    return classes


# ---------------------------------------------------------------------------------------
# Distillation state (nested dicts of tensors and JSON values, e.g. optimiser states).

def save_state(state: dict) -> bytes:
    tensors: dict[str, torch.Tensor] = {}

    def strip(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {"__dict__": [[strip(k, f"{path}.k{i}"), strip(v, f"{path}.{i}")]
                                 for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            return [strip(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    tree = strip(state, "s")
    return pack(STATE, tensors, {"tree": tree})


def load_state(data: bytes, name: str) -> dict:
    tensors, meta = unpack(data, STATE, name)

    def fill(node: Any) -> Any:
        if isinstance(node, dict) and "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if isinstance(node, dict) and "__dict__" in node:
            return {fill(k): fill(v) for k, v in node["__dict__"]}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    try:
        return fill(meta["tree"])
    except (KeyError, TypeError) as exc:
        raise FormatError(f"{name}: malformed state ({exc})") from None
