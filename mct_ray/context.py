"""The run context: what every phase needs, built once from the config (the data, the
network description, the augmenter, the device and the ConvNet's kernels on it); and the
launch: what one command brings to a run folder beside it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mct_ray.augment import Augmenter
from mct_ray.config import Config
from mct_ray.data import ImageData, load_data
from mct_ray.errors import DataError
from mct_ray.nets import NetSpec, Network, make_spec, resolve_kernels
from mct_ray.storage import Storage


@dataclass
class Context:
    """What every phase needs, built once from the config."""

    cfg: Config
    data: ImageData
    net: Network  # the network description on this device, with its kernels
    aug: Augmenter

    @property
    def spec(self) -> NetSpec:
        return self.net.spec

    @property
    def device(self) -> str:
        return self.net.device

    @classmethod
    def build(cls, cfg: Config) -> "Context":
        return cls.from_data(cfg, load_data(cfg.data))

    @classmethod
    def from_data(cls, cfg: Config, data: ImageData, num_cpus: float = 0) -> "Context":
        """`num_cpus`: what a Ray worker was given, its thread count unless the config sets
        one (the same count gives the same floating-point result on every path)."""
        device = setup_torch(cfg, num_cpus)
        spec = make_spec(cfg.net, data.shape, data.num_classes)
        if device != "cpu" and cfg.run.data_on_device and \
                2 * data.nbytes < torch.cuda.mem_get_info(torch.device(device))[0]:
            data = data.to(device)  # minibatches drawn and augmented there, no host copies
        return cls(cfg, data, Network(spec, device, resolve_kernels(cfg.run.kernels, device)),
                   Augmenter(cfg.augment))


def setup_torch(cfg: Config, num_cpus: float = 0) -> str:
    """Set torch's thread count and return the device to use."""
    threads = cfg.run.num_threads or int(num_cpus)
    if threads:
        torch.set_num_threads(threads)
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise DataError("run.device=cuda but no CUDA device is visible")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
        torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    return device


@dataclass(frozen=True)
class Launch:
    """One command's work on a run: the folder holding (or receiving) its experts, whether
    it continues the run its folder holds, its id (unique per command: a restarted worker
    finds its own run's checkpoint by it) and when it started (time.time())."""

    experts: Storage
    resume: bool
    run_id: str
    started: float
