"""The shell every command runs in (`run`, `experts`, `distill`, `eval` and `grid`), in two
steps around the command's own checks:

    output(out, local)            Ray's address checked (unless local), the output location
                                  proved writable and free of a live writer; nothing written
    session(store, command, ...)  Ray joined or started (unless local), the command's room
                                  checked, the lock taken: the first write. On leaving, the
                                  lock is released and a Ray started here shut down; a project
                                  error raised on a worker comes back as itself.

A command that fails its own checks between the two has written nothing, the cluster's
included. With `local`, nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from mct_ray.config import RayConfig
from mct_ray.runfolder import RunLock
from mct_ray.storage import Storage


def output(out: str, local: bool) -> Storage:
    """The command's output location, checked; nothing is written."""
    if not local:
        if not os.environ.get("RAY_ADDRESS"):
            # A Ray started for one command serves only this machine: keep it on loopback.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from mct_ray.runtime.cluster import check_address

        check_address()
    store = Storage.open(out, check=True)
    RunLock.check_free(store)
    return store


@contextlib.contextmanager
def session(store: Storage, command: str, ray_cfg: RayConfig | None,
            check_room: Callable[[bool], None] = lambda own_ray: None) -> Iterator[RunLock]:
    """Ray (unless `ray_cfg` is None: this process alone), then `check_room(own_ray)` (True
    when this command started the Ray, which cannot grow), then the lock on `store`."""
    if ray_cfg is None:
        lock = RunLock.acquire(store, command)
        try:
            yield lock
        finally:
            lock.release()
        return
    import ray

    from mct_ray.runtime.cluster import connect, disconnect, unwrap

    started_ray, lock = False, None
    try:
        started_ray = connect(ray_cfg)
        check_room(started_ray)
        lock = RunLock.acquire(store, command)
        yield lock
    except ray.exceptions.RayTaskError as exc:
        raise unwrap(exc) from None
    finally:
        if lock is not None:
            lock.release()
        disconnect(started_ray)
