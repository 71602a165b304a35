"""A run folder as a guarded record: one writer at a time, and nothing of an existing run
replaced unless the command says so (--resume continues it, --overwrite replaces it).

The lock is a `.lock` file (object: `s3://`, `gs://`) naming its holder. On a file system it
is created exclusively; on an object store, where a PUT cannot be made conditional through
pyarrow, the writer puts its token and reads it back after a pause, so of two writers
starting together only one keeps it. A lock whose holder ran on this host and is gone is
taken over; any other is reported with its holder, and removing it is left to the user.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from mct_ray import layout
from mct_ray.config import Config, experts_difference, first_difference
from mct_ray.errors import ConfigError, FormatError, MctRayError, StorageError
from mct_ray.storage import Storage

log = logging.getLogger(__name__)

OBJECT_STORE_SETTLE_S = 1.0
# On --resume these may differ from the stored config: they do not change the result.
RESUME_FREE = ("run.", "ray.", "distill.iterations", "recipe")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunLock:
    store: Storage
    token: str

    @classmethod
    def acquire(cls, store: Storage, command: str) -> "RunLock":
        token = uuid.uuid4().hex
        holder = {"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                  "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = json.dumps(holder).encode()
        for _ in range(2):  # a second try after removing a dead holder's lock
            if store.is_local:
                os.makedirs(store.root, exist_ok=True)
                try:
                    fd = os.open(store.path(layout.LOCK), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    cls._refuse_or_clear(store)
                    continue
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return cls(store, token)
            if store.exists(layout.LOCK):
                cls._refuse_or_clear(store)
                continue
            store.write_bytes(layout.LOCK, data)
            time.sleep(OBJECT_STORE_SETTLE_S)
            if cls._holder(store).get("token") != token:
                cls._refuse_or_clear(store, clear=False)
            return cls(store, token)
        cls._refuse_or_clear(store, clear=False)
        raise AssertionError("unreachable")

    @classmethod
    def check_free(cls, store: Storage) -> None:
        """Refuse now if a live writer holds the folder (read only: the checks that follow
        must not change the output location; `acquire` takes the lock after them)."""
        if store.exists(layout.LOCK):
            cls._refuse_or_clear(store, clear=False, alive_only=True)

    @staticmethod
    def _holder(store: Storage) -> dict:
        try:
            holder = json.loads(store.read_bytes(layout.LOCK))
            return holder if isinstance(holder, dict) else {}
        except (ValueError, MctRayError, OSError):  # DataError: removed meanwhile
            return {}  # unreadable or gone meanwhile: treated as held by someone unknown

    @classmethod
    def _refuse_or_clear(cls, store: Storage, clear: bool = True, alive_only: bool = False
                         ) -> None:
        h = cls._holder(store)
        same_host = h.get("host") == socket.gethostname()
        stopped = same_host and isinstance(h.get("pid"), int) and not _alive(h["pid"])
        if alive_only and stopped:
            return
        if clear and stopped:
            log.warning("%s: taking over the lock of a stopped run (pid %s, %s)", store.uri,
                        h["pid"], h.get("command"))
            store.delete(layout.LOCK)
            return
        who = (f"'mct-ray {h.get('command', '?')}' (pid {h.get('pid', '?')} on "
               f"{h.get('host', '?')}, since {h.get('since', '?')})") if h else "another writer"
        raise StorageError(f"{store.uri} is in use by {who}; wait for it to finish, or delete "
                           f"{store.uri_of(layout.LOCK)} if that run is gone")

    def release(self) -> None:
        if self._holder(self.store).get("token") == self.token:
            self.store.delete(layout.LOCK)


def _first_difference(stored: dict, given: dict, experts_only: bool) -> str | None:
    """What differs where it matters: everything but RESUME_FREE, or (`experts_only`) what
    the experts depend on (a resume that trains missing experts may ask for more of them, or
    for full trajectories too)."""
    diff = experts_difference(stored, given) if experts_only else \
        first_difference(stored, given, lambda key: key.startswith(RESUME_FREE))
    return diff and f"{diff[0]} = {diff[1]!r} there, {diff[2]!r} now"


def guard(store: Storage, cfg: Config, phases: tuple[str, ...], resume: bool,
          overwrite: bool, experts_here: bool) -> None:
    """Refuse, before any work, to mix this command into an existing run by mistake.

    Without --resume or --overwrite a folder whose distillation started (for `distill` and
    `run`) or that holds experts (for `experts` and `run`) is refused. With --resume, the
    stored config must agree with this one (except run.*, ray.*, distill.iterations) where
    it matters: everything once a distillation state exists, the expert sections otherwise.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    started = [n for n in layout.DISTILL_OUTPUTS if store.exists(n)] \
        if "distill" in phases else []
    experts = bool(store.list(layout.EXPERTS, ".safetensors")) \
        if "experts" in phases and experts_here else False
    if not resume and not overwrite and (started or experts):
        what = f"a run ({started[0]})" if started else "experts"
        raise ConfigError(f"{store.uri} already holds {what}; continue it with --resume, "
                          "replace it with --overwrite, or choose another --out")
    if resume and store.exists(layout.CONFIG) and (started or experts):
        stored = store.read_json(layout.CONFIG)
        if not isinstance(stored, dict):
            raise FormatError(f"{store.uri_of(layout.CONFIG)} is not a run's config (a JSON "
                              f"mapping of sections, got {type(stored).__name__}); "
                              "replace the run with --overwrite or choose another --out")
        diff = _first_difference(stored, cfg.to_dict(), not store.exists(layout.STATE))
        if diff:
            raise ConfigError(f"--resume: the config differs from {store.uri_of(layout.CONFIG)} "
                              f"({diff}); resume with --config {store.uri_of(layout.CONFIG)}, "
                              "or choose another --out")


def clear(store: Storage, phases: tuple[str, ...], experts_here: bool) -> None:
    """--overwrite: remove what this command's phases would write (after the checks)."""
    names = [*layout.DISTILL_OUTPUTS, layout.EVAL] if "distill" in phases else []
    if "experts" in phases and experts_here:
        names += store.list(layout.EXPERTS, ".safetensors")
    for name in names:
        store.delete(name)
    if "distill" in phases:
        for name in store.list(layout.TENSORBOARD):
            store.delete(name)
