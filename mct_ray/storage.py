"""The one owner of a run's on-disk layout, on local paths or URIs (through pyarrow.fs).

    <root>/config.json                 resolved config
    <root>/experts/expert-NNNNN.safetensors        convex trajectory (MCT)
    <root>/experts/expert-NNNNN.full.safetensors   every epoch (MTT), when kept
    <root>/synthetic.safetensors       best synthetic set so far (by evaluation)
    <root>/last.safetensors            latest synthetic set that passed a finite update
    <root>/state.safetensors           distillation state for resume
    <root>/metrics.parquet, summary.json, synthetic.png, curve.png

Writes are atomic: a temporary name, then a rename (object stores replace whole objects).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mct_ray.errors import DataError

CONFIG = "config.json"
SYNTHETIC = "synthetic.safetensors"
LAST = "last.safetensors"
STATE = "state.safetensors"
METRICS = "metrics.parquet"
SUMMARY = "summary.json"
GRID_PNG = "synthetic.png"
CURVE_PNG = "curve.png"
EXPERTS = "experts"


def expert_name(expert_id: int, full: bool = False) -> str:
    return f"{EXPERTS}/expert-{expert_id:05d}{'.full' if full else ''}.safetensors"


@dataclass
class Storage:
    """A run folder on any pyarrow filesystem."""

    fs: pafs.FileSystem
    root: str  # path inside fs
    uri: str  # what the user gave

    @classmethod
    def open(cls, uri: str) -> "Storage":
        try:
            if "://" in uri:
                fs, root = pafs.FileSystem.from_uri(uri)
            else:
                fs, root = pafs.LocalFileSystem(), os.path.abspath(uri)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"storage '{uri}' cannot be opened: {exc}") from None
        return cls(fs, root.rstrip("/"), uri)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri_of(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.path(name)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, target)
        else:  # an object store PUT replaces the object whole
            with self.fs.open_output_stream(target) as out:
                out.write(data)

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        except (FileNotFoundError, OSError) as exc:
            if not self.exists(name):
                raise DataError(f"{self.uri_of(name)} not found") from None
            raise DataError(f"{self.uri_of(name)} cannot be read: {exc}") from None

    def list(self, folder: str, suffix: str = "") -> list[str]:
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        names = [f"{folder}/{i.base_name}" for i in self.fs.get_file_info(selector)
                 if i.type == pafs.FileType.File and i.base_name.endswith(suffix)]
        return sorted(names)

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.uri_of(name)} is not valid JSON: {exc}") from None

    def write_table(self, name: str, rows: list[dict]) -> None:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        self.write_bytes(name, sink.getvalue())

    def read_table(self, name: str) -> list[dict]:
        return pq.read_table(io.BytesIO(self.read_bytes(name))).to_pylist()

    def size(self, name: str) -> int:
        return self.fs.get_file_info(self.path(name)).size
