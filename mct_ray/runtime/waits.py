"""Ray work that has not started: never a silent wait.

Each task announces its start (it runs as a streaming generator whose first item is the node
it landed on), so the driver tells work that waits for room from work that runs. Work that
has waited `ray.start_wait_s` (default a minute) is logged with what it needs and what the
cluster has free, again at each such interval; work that no node alive can ever take (a
cluster shrunk by a lost node) is then an error naming it, not a hang.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import ray

from mct_ray.errors import MctRayError
from mct_ray.progress import duration

log = logging.getLogger(__name__)


class NeverStarts(MctRayError):
    """Work waits for resources that no node of the cluster has any more."""

    exit_code = 1


def shown(need: dict) -> dict:
    """A resource demand as a person reads it: only what is asked for."""
    return {k: v for k, v in need.items() if v}


def capacities() -> dict[str, dict]:
    """node id -> total resources, for the nodes alive now."""
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def fits_a_node(need: dict, held: dict[str, dict] | None = None) -> bool:
    """Whether some node alive now has `need` in all, once what `held` names is taken from
    each node (node id -> resources; work that fits none would wait forever)."""
    held = held or {}
    return any(all(total.get(k, 0.0) - held.get(node, {}).get(k, 0.0) >= v
                   for k, v in need.items() if v)
               for node, total in capacities().items())


def holdings(nodes: list[str], share: dict) -> dict[str, dict]:
    """node id -> what work holds there, for one `share` per entry of `nodes` (a gang's
    workers may share a node)."""
    out: dict[str, dict] = {}
    for node in nodes:
        out[node] = {k: out.get(node, {}).get(k, 0.0) + v for k, v in share.items()}
    return out


def copies_fitting(need: dict) -> int:
    """How many copies of `need` the nodes alive now hold in all (by their totals)."""
    asked = {k: v for k, v in need.items() if v}
    if not asked:
        return 2**31
    return sum(int(min(total.get(k, 0.0) // v for k, v in asked.items()))
               for total in capacities().values())


def shown_nodes() -> str:
    """The nodes alive, as a person reads them: CPU and GPU of each."""
    return ", ".join(f"CPU {t.get('CPU', 0):g} GPU {t.get('GPU', 0):g}"
                     for t in capacities().values())


class Waiting:
    """The start of one piece of work, watched: `poll()` (cheap; call it as often as you
    like) logs a wait of `every_s` and more, once per interval, and raises NeverStarts when
    no node alive has room for it. `held`: what the work that waits for this one holds
    itself, by node (the distillation, for its evaluations)."""

    def __init__(self, what: str, need: dict, every_s: float,
                 held: dict[str, dict] | None = None, then: str = ""):
        self.what, self.need, self.every_s = what, need, every_s
        self.held, self.then = held, then
        self.since = self.last = time.monotonic()

    def poll(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        beside = " beside the distillation" if self.held else ""
        if not fits_a_node(self.need, self.held):
            raise NeverStarts(
                f"the {self.what} can never start: no node of the Ray cluster has "
                f"{shown(self.need)}{beside} any more (a node was lost?){self.then}")
        log.warning("the %s has waited %s to start: it needs %s%s; free on the cluster now: "
                    "%s", self.what, duration(now - self.since), shown(self.need), beside,
                    {k: round(v, 2) for k, v in ray.available_resources().items()
                     if k in ("CPU", "GPU")})


def until_ready(ref: ray.ObjectRef, waiting: Waiting) -> None:
    """Waits (watched) for `ref`: an actor's `__ray_ready__`, say."""
    while not ray.wait([ref], timeout=1.0)[0]:
        waiting.poll()
    ray.get(ref)


def announced(fn: Callable, *args: Any) -> Iterator[Any]:
    """Body of a watched task: first the node it started on, then `fn(*args)`."""
    yield ray.get_runtime_context().get_node_id()
    yield fn(*args)


class Launched:
    """A task submitted as `announced` (a streaming generator), with its start watched."""

    def __init__(self, generator: ray.ObjectRefGenerator, waiting: Waiting):
        self.generator, self.waiting = generator, waiting
        self.node: str | None = None

    def _next_ready(self, timeout: float = 0) -> bool:
        return bool(ray.wait([self.generator], timeout=timeout)[0])

    def started(self, timeout: float = 0) -> bool:
        if self.node is None:
            if not self._next_ready(timeout):
                self.waiting.poll()
                return False
            self.node = ray.get(next(self.generator))  # raises the task's error, if any
        return True

    def done(self) -> bool:
        return self.started() and self._next_ready()

    def result(self) -> Any:
        """Waits (watched) for the task and returns its value."""
        while not self.started(timeout=1.0):
            pass
        return ray.get(next(self.generator))
