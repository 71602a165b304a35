"""Progress of the long phases (experts, distillation, evaluations), on a terminal or not.

A `Progress` counts units of work (images, iterations, epochs) toward a total. With `bar`
and a terminal it is a tqdm bar; otherwise (a log file, a pipe, a Ray worker, or a loop
that runs beside others) it logs one line at most every `every_s` seconds, with the rate
and an estimate of the time left:

    expert 3: 41 % of 4 epochs (epoch 2), 1,210 images/s, about 3 min 20 s left
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from tqdm import tqdm

log = logging.getLogger(__name__)

EVERY_S = 30.0


def configure_logging() -> None:
    """INFO lines in one format, in the command's process and in every Ray worker (a
    worker's lines reach the driver's output with Ray's `(task pid=...)` prefix)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def duration(seconds: float) -> str:
    """'45 s', '3 min 20 s', '2 h 05 min': what a person reads in a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`update(n)` after each piece of work; `close()` at the end. `detail()` may add what a
    count alone does not say (the epoch, say)."""

    def __init__(self, desc: str, total: float, initial: float = 0, enabled: bool = True,
                 unit: str = "it", bar: bool = False, every_s: float | None = None,
                 detail: Callable[[], str] | None = None):
        self.desc, self.total, self.done, self.unit = desc, total, initial, unit
        self.enabled, self.detail = enabled, detail
        self.every_s = EVERY_S if every_s is None else every_s
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit) \
            if enabled and bar and sys.stderr.isatty() else None
        self.started = self.last = time.monotonic()
        self.initial = initial

    def update(self, n: float = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        """'desc: 41 % of 4 epochs (epoch 2), 1,210 images/s, about 3 min 20 s left'."""
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100 * self.done / self.total if self.total else 100.0
        extra = f" ({self.detail()})" if self.detail else ""
        eta = f"about {duration(left)} left" if left != float("inf") else "time left unknown"
        return (f"{self.desc}: {pct:.0f} % of {self.total:,.0f} {self.unit}{extra}, "
                f"{rate:,.{1 if rate < 10 else 0}f} {self.unit}/s, {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
