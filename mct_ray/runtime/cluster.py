"""Joining a Ray cluster (RAY_ADDRESS) or starting one for a single job."""

from __future__ import annotations

import logging
import os
import socket

import ray

from mct_ray.config import RayConfig
from mct_ray.errors import MctRayError

log = logging.getLogger(__name__)


class ClusterError(MctRayError):
    """The Ray cluster named by RAY_ADDRESS cannot be reached (exit code 2)."""


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable GCS for minutes; a TCP probe fails in seconds instead."""
    if address == "auto":
        return  # Ray finds the local cluster's address file, and says so if there is none
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"RAY_ADDRESS='{address}' is not host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(f"RAY_ADDRESS='{address}': no Ray cluster answers there "
                           f"({exc.strerror or exc})") from None


def check_address() -> None:
    """Fail in seconds, before anything is written, when RAY_ADDRESS names no cluster."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and not ray.is_initialized():
        _check_reachable(address)


def connect(cfg: RayConfig) -> bool:
    """Connect this driver to Ray; True when this call started it (the caller shuts it down).

    With RAY_ADDRESS set, join that cluster; without, start a Ray for this job alone. A Ray
    already initialised in this process (tests, notebooks) is used as it is.
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"RAY_ADDRESS='{address}': {str(exc).splitlines()[0]}") from None
        log.info("joined the Ray cluster at %s", address)
        return True
    kwargs = {"include_dashboard": False}
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    if cfg.object_store_mb:
        kwargs["object_store_memory"] = cfg.object_store_mb * 2**20
    ray.init(**kwargs)
    log.info("started a local Ray for this job (%s CPUs)", ray.cluster_resources().get("CPU"))
    return True


def disconnect(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()
