"""Joining a Ray cluster (RAY_ADDRESS) or starting one for a single job."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import ray

from mct_ray.config import RayConfig
from mct_ray.errors import MctRayError

log = logging.getLogger(__name__)


class ClusterError(MctRayError):
    """The Ray cluster named by RAY_ADDRESS cannot be reached (exit code 2)."""


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray
# Client server) answers with a SETTINGS frame of its own; anything else does not.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an address that is not a Ray cluster for many minutes (and ignores
    SIGTERM meanwhile); a TCP connection and an HTTP/2 handshake tell in seconds whether a
    gRPC server, as Ray's are, listens there."""
    if address == "auto":
        return  # Ray finds the local cluster's address file, and says so if there is none
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or address.startswith(("http://", "https://")):
        raise ClusterError(f"RAY_ADDRESS='{address}' is not host:port, ray://host:port or "
                           "auto (the dashboard's http:// address is for `ray job submit`)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            s.sendall(_H2_PREFACE)
            reply = s.recv(16)
    except socket.timeout:
        reply = None
    except OSError as exc:
        raise ClusterError(f"RAY_ADDRESS='{address}': no Ray cluster answers there "
                           f"({exc.strerror or exc})") from None
    if not reply or len(reply) < 4 or reply[3] != _SETTINGS:
        http = reply and reply.lstrip().lower().startswith((b"http/", b"<!doctype", b"<html"))
        what = "an HTTP server" if http else "a server that does not answer as Ray"
        raise ClusterError(f"RAY_ADDRESS='{address}': {what} listens there, not a Ray "
                           "cluster (the GCS address is host:6379, Ray Client ray://host:10001)")


def unwrap(exc: ray.exceptions.RayTaskError) -> Exception:
    """A project error raised on a worker, as itself (its one-line message, its exit code)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MctRayError) else exc


def check_address() -> None:
    """Fail in seconds, before anything is written, when RAY_ADDRESS names no cluster."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and not ray.is_initialized():
        _check_reachable(address)


def connect(cfg: RayConfig) -> bool:
    """Connect this driver to Ray; True when this call started it (the caller shuts it down).

    With RAY_ADDRESS set, join that cluster; without, start a Ray for this job alone. A Ray
    already initialised in this process (tests, notebooks) is used as it is. ray.init
    replaces the process's SIGTERM handler with a bare sys.exit; the caller's is put back
    before anything is said (a SIGTERM after the line below meets it), so SIGTERM ends a
    command on Ray as it does without (exit 143, one line); one that meets Ray's handler
    during ray.init is handed to the caller's too.
    """
    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        said = _init(cfg)
    except SystemExit as exc:
        if main and exc.code == signal.SIGTERM and callable(previous):
            signal.signal(signal.SIGTERM, previous)
            previous(signal.SIGTERM, None)  # the caller's handler: it raises or returns
        raise
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    log.info("%s", said)
    return True


def _init(cfg: RayConfig) -> str:
    """ray.init, joining RAY_ADDRESS or starting a Ray of this job's own; what to say."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"RAY_ADDRESS='{address}': {str(exc).splitlines()[0]}") from None
        return f"joined the Ray cluster at {address}"
    kwargs = {"include_dashboard": False}
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    if cfg.object_store_mb:
        kwargs["object_store_memory"] = cfg.object_store_mb * 2**20
    # address="local": always a new Ray of this job's own, never one already running on the
    # machine (a plain ray.init() would join that, someone else's, without saying so).
    ray.init(address="local", **kwargs)
    return f"started a local Ray for this job ({ray.cluster_resources().get('CPU')} CPUs)"


def disconnect(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()
