"""Helpers shared by the benchmarks: where results go, and how a table is printed/saved."""

from __future__ import annotations

import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

# bench/results, or the folder MCT_RAY_BENCH_RESULTS names (bench.gpu writes to its own).
RESULTS = pathlib.Path(os.environ.get("MCT_RAY_BENCH_RESULTS")
                       or pathlib.Path(__file__).parent / "results")


def save_table(name: str, rows: list[dict], folder: pathlib.Path = RESULTS) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))
