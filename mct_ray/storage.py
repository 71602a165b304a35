"""Storage roots on local paths or URIs (through pyarrow.fs): atomic reads and writes of a
run folder's files, whose names `mct_ray.layout` owns.

Writes are atomic: a temporary name, then a rename (object stores replace whole objects).

Roots are local paths, `file://`, `s3://bucket/prefix` or `gs://bucket/prefix`. An S3 URI may
name its server in the query, as pyarrow does: `s3://b/run?endpoint_override=host:9000&
scheme=http&region=us-east-1`; without it, the standard `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` variables apply (MinIO, moto, Ceph...). Credentials never go in the URI
(it is logged and written beside artifacts): they come from the SDKs' usual chains
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, instance roles, IRSA; Google ADC).

Object stores are given short timeouts and few retries so that a wrong endpoint, a missing
bucket or bad credentials surface in seconds as a one-line StorageError; `check_writable()`
(or `Storage.open(uri, check=True)`) proves a root usable before a job writes anything.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

try:  # pyarrow imports pandas, when installed, at the first table it writes (0.3-0.6 s):
    import pandas  # noqa: F401  at import, not at the first evaluation inside the loop
except ImportError:  # (tests/test_runtime.py caught that pause under load)
    pass

from mct_ray.errors import DataError, StorageError

# ---------------------------------------------------------------------------------------
# Object-store clients. Two profiles: ordinary I/O retries transient faults a little; the
# start-of-job probe gives up almost at once. `request_timeout` is a stall limit (no byte for
# that long), not a cap on transfer time, so large uploads are unaffected.

@dataclass(frozen=True)
class _Timeouts:
    connect_s: float
    request_s: float
    attempts: int  # S3: total attempts per request; GCS: derived retry time limit


IO_TIMEOUTS = _Timeouts(connect_s=5.0, request_s=20.0, attempts=3)
PROBE_TIMEOUTS = _Timeouts(connect_s=3.0, request_s=5.0, attempts=2)

S3_QUERY = ("endpoint_override", "scheme", "region")
GCS_QUERY = ("endpoint_override", "scheme", "project_id")


def _split_endpoint(value: str, default_scheme: str) -> tuple[str, str]:
    """'http://host:9000' or 'host:9000' -> (scheme, 'host:9000')."""
    if "://" in value:
        parts = urlsplit(value)
        return parts.scheme, parts.netloc
    return default_scheme, value.rstrip("/")


def _s3_options(uri: str, bucket: str, query: dict[str, str]) -> dict[str, Any]:
    env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {}
    if "endpoint_override" in query:
        scheme, host = _split_endpoint(query["endpoint_override"], "https")
        options.update(endpoint_override=host, scheme=query.get("scheme", scheme))
    elif env:
        scheme, host = _split_endpoint(env, "https")
        options.update(endpoint_override=host, scheme=query.get("scheme", scheme))
    elif "scheme" in query:
        options["scheme"] = query["scheme"]
    if options.get("scheme", "https") not in ("http", "https"):
        raise StorageError(f"{uri}: scheme must be http or https, not {options['scheme']!r}")
    region = (query.get("region") or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION"))
    if region is None and "endpoint_override" not in options:
        try:  # as pyarrow's from_uri does: ask AWS where the bucket lives
            region = pafs.resolve_s3_region(bucket)
        except (OSError, pa.ArrowException):
            region = None  # the SDK default; check_writable reports what is wrong
    options["region"] = region or "us-east-1"
    return options


def _make_fs(kind: str, options: dict[str, Any], timeouts: _Timeouts) -> pafs.FileSystem:
    if kind == "s3":
        return pafs.S3FileSystem(
            **options, connect_timeout=timeouts.connect_s, request_timeout=timeouts.request_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=timeouts.attempts))
    if kind == "gs":
        limit = datetime.timedelta(seconds=timeouts.request_s * (timeouts.attempts - 1) or 1)
        return pafs.GcsFileSystem(**options, retry_time_limit=limit)
    raise AssertionError(kind)


CREDENTIAL_HINTS = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or the VM's service account",
}


def _describe(exc: BaseException, endpoint: str, kind: str) -> str:
    """One line saying what went wrong with an object-store request."""
    text = str(exc)
    hint = CREDENTIAL_HINTS.get(kind, "the credentials")
    if "OAuth2 access token" in text:  # GCS: no credentials found before any request
        return f"no Google credentials could be obtained (check {hint})"
    if re.search(r"ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH|INVALID_ACCESS_KEY_ID|"
                 r"PERMISSION_DENIED|UNAUTHENTICATED|Forbidden|\b40[13]\b", text):
        return f"access denied by {endpoint} (check {hint}, and the bucket policy)"
    if "NO_SUCH_BUCKET" in text:
        return f"the bucket does not exist at {endpoint}"
    if re.search(r"NETWORK_CONNECTION|CURL error|curlCode|UNAVAILABLE", text):
        detail = re.search(r"curlCode: \d+, ([^;]+)|CURL error \[\d+\]=([^ ]+(?: [^ ]+){0,4})",
                           text)
        why = next((g for g in detail.groups() if g), "") if detail else ""
        return f"cannot reach {endpoint}" + (f" ({why.strip()})" if why else "")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return re.sub(r"\s*\(Request ID: [^)]*\)", "", first)


# ---------------------------------------------------------------------------------------

def parent_and_name(uri: str) -> tuple[str, str]:
    """'s3://b/run/synthetic.safetensors?endpoint_override=h' ->
    ('s3://b/run?endpoint_override=h', 'synthetic.safetensors'); local paths alike."""
    base, sep, query = uri.partition("?")
    folder, _, name = base.rstrip("/").rpartition("/")
    if not name or not folder or folder.endswith(":/"):
        raise StorageError(f"{uri}: does not name a file inside a folder")
    return folder + sep + query, name


@dataclass
class Storage:
    """A run folder on any pyarrow filesystem."""

    fs: pafs.FileSystem
    root: str  # path inside fs ('bucket/prefix' for object stores)
    uri: str  # what the user gave
    kind: str = "local"  # local | s3 | gs | other (another pyarrow scheme)
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # object-store client

    @classmethod
    def open(cls, uri: str, check: bool = False) -> "Storage":
        """Open a root folder; with `check`, also prove it writable (see check_writable)."""
        store = cls._open(uri)
        if check:
            store.check_writable()
        return store

    @classmethod
    def _open(cls, uri: str) -> "Storage":
        if "://" not in uri:
            return cls(pafs.LocalFileSystem(), os.path.abspath(uri).rstrip("/") or "/", uri)
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in ("s3", "gs", "gcs"):
            try:
                fs, root = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
                raise StorageError(f"storage '{uri}' cannot be opened: {exc}") from None
            kind = "local" if isinstance(fs, pafs.LocalFileSystem) else "other"
            return cls(fs, root.rstrip("/") or "/", uri, kind)
        if "@" in parts.netloc:
            shown = f"{scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"
            raise StorageError(f"storage '{shown}': credentials do not belong in the URI; "
                               "set them in the environment or a profile")
        bucket = parts.netloc
        if not bucket:
            raise StorageError(f"storage '{uri}': no bucket (expected {scheme}://bucket/prefix)")
        kind = "s3" if scheme == "s3" else "gs"
        allowed = S3_QUERY if kind == "s3" else GCS_QUERY
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - set(allowed))
        if unknown:
            raise StorageError(f"storage '{uri}': unknown query parameter(s) {unknown} "
                               f"(allowed: {', '.join(allowed)})")
        if kind == "s3":
            options = _s3_options(uri, bucket, query)
        else:
            options = dict(query)
            if "endpoint_override" in options:
                scheme_, host = _split_endpoint(options["endpoint_override"], "https")
                options.update(endpoint_override=host, scheme=query.get("scheme", scheme_))
        root = f"{bucket}{parts.path}".rstrip("/")
        try:
            fs = _make_fs(kind, options, IO_TIMEOUTS)
        except (pa.ArrowException, OSError, TypeError, ValueError) as exc:
            raise StorageError(f"storage '{uri}' cannot be opened: {exc}") from None
        return cls(fs, root, uri, kind, options)

    # Pickling (Ray ships Storage objects to workers): pyarrow's S3 pickle drops the retry
    # and timeout settings, so object-store clients are rebuilt from their options.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.kind in ("s3", "gs"):
            state["fs"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.fs is None:
            self.fs = _make_fs(self.kind, self.options, IO_TIMEOUTS)

    # -- naming ---------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri_of(self, name: str) -> str:
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{name}{sep}{query}"

    def child(self, folder: str) -> "Storage":
        """The sub-folder `folder` as a Storage of its own (same filesystem and client)."""
        return Storage(self.fs, self.path(folder.strip("/")), self.uri_of(folder.strip("/")),
                       self.kind, self.options)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def endpoint(self) -> str:
        """Where requests go, for messages."""
        if "endpoint_override" in self.options:
            return f"{self.options.get('scheme', 'https')}://{self.options['endpoint_override']}"
        if self.kind == "s3":
            return f"AWS S3 ({self.options.get('region', 'default region')})"
        return "Google Cloud Storage" if self.kind == "gs" else self.uri

    def _fail(self, name: str | None, exc: BaseException) -> StorageError:
        where = self.uri_of(name) if name else self.uri
        if self.is_local:
            return StorageError(f"{where}: {exc.strerror or exc}" if isinstance(exc, OSError)
                                else f"{where}: {exc}")
        return StorageError(f"{where}: {_describe(exc, self.endpoint, self.kind)}")

    # -- fail-fast check ------------------------------------------------------------------

    def check_writable(self) -> None:
        """Prove, in seconds, that this root can be written: the endpoint answers, the bucket
        exists, the credentials are accepted, and a probe object can be put and deleted.
        Raises StorageError naming the URI and the problem. Call it at job start."""
        if self.kind not in ("s3", "gs"):
            self._check_file_system()
            return
        fs = _make_fs(self.kind, self.options, PROBE_TIMEOUTS)
        bucket = self.root.split("/", 1)[0]
        try:
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{self.uri}: bucket '{bucket}' does not exist at "
                                   f"{self.endpoint}")
            if self.root != bucket and fs.get_file_info(self.root).type == pafs.FileType.File:
                raise StorageError(f"{self.uri}: is a file, not a folder")
            probe = self.path(f".mct-ray-write-check-{uuid.uuid4().hex[:12]}")
            with fs.open_output_stream(probe) as out:
                out.write(b"ok\n")
            fs.delete_file(probe)
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise self._fail(None, exc) from None

    def _check_file_system(self) -> None:
        """The probe goes into the root, or into its nearest existing parent when the root
        does not exist yet: a check creates no folder (a command that fails its checks
        leaves the output location as it found it)."""
        try:
            folder = self.root
            while self.fs.get_file_info(folder).type == pafs.FileType.NotFound \
                    and _parent(folder) not in ("", folder):
                folder = _parent(folder)
            if self.fs.get_file_info(folder).type == pafs.FileType.File:
                raise StorageError(f"{self.uri}: {'is' if folder == self.root else 'lies under'} "
                                   "a file, not a folder")
            probe = f"{folder.rstrip('/')}/.mct-ray-write-check-{uuid.uuid4().hex[:12]}"
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok\n")
            self.fs.delete_file(probe)
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"{self.uri}: not writable "
                               f"({getattr(exc, 'strerror', None) or exc})") from None

    # -- bytes ----------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound
        except (OSError, pa.ArrowException) as exc:
            raise self._fail(name, exc) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.path(name)
        try:
            if self.kind not in ("s3", "gs"):  # a file system: temp name, then rename
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                with self.fs.open_output_stream(tmp) as out:
                    out.write(data)
                self.fs.move(tmp, target)
            else:  # an object store PUT replaces the object whole; no folders to create
                with self.fs.open_output_stream(target) as out:
                    out.write(data)
        except (OSError, pa.ArrowException) as exc:
            raise self._fail(name, exc) from None

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        except FileNotFoundError:
            raise DataError(f"{self.uri_of(name)} not found") from None
        except (OSError, pa.ArrowException) as exc:
            if not self.exists(name):
                raise DataError(f"{self.uri_of(name)} not found") from None
            raise self._fail(name, exc) from None

    def delete(self, name: str) -> None:
        """Remove one file; a missing file is not an error."""
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException) as exc:
            raise self._fail(name, exc) from None

    def list(self, folder: str, suffix: str = "") -> list[str]:
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except (OSError, pa.ArrowException) as exc:
            raise self._fail(folder, exc) from None
        names = [f"{folder}/{i.base_name}" for i in infos
                 if i.type == pafs.FileType.File and i.base_name.endswith(suffix)]
        return sorted(names)

    def size(self, name: str) -> int:
        try:
            return self.fs.get_file_info(self.path(name)).size
        except (OSError, pa.ArrowException) as exc:
            raise self._fail(name, exc) from None

    # -- typed helpers --------------------------------------------------------------------

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except ValueError as exc:  # bad JSON, or bytes that are not UTF-8
            raise DataError(f"{self.uri_of(name)} is not valid JSON: {exc}") from None

    def write_table(self, name: str, rows: list[dict]) -> None:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        self.write_bytes(name, sink.getvalue())

    def read_table(self, name: str) -> list[dict]:
        return pq.read_table(io.BytesIO(self.read_bytes(name))).to_pylist()


def _parent(path: str) -> str:
    """The folder holding `path` ("/" for a top-level absolute path, "" for none)."""
    head = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""
    return head or ("/" if path.startswith("/") else "")
