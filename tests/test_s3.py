"""Storage against a real S3-protocol server on loopback (moto in server mode, a subprocess).

The server enforces IAM: a read-write user, a read-only user, and unknown or wrong keys are
refused, as AWS would. Every failure mode must surface fast as a one-line StorageError.
gs:// is only parsed and probed against a closed port: no GCS server runs here.
"""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.fs as pafs
import pytest
import torch

from mct_ray import formats, layout, storage
from mct_ray.errors import DataError, StorageError
from mct_ray.nets import NetSpec
from mct_ray.storage import Storage, parent_and_name
from mct_ray.synthetic import SyntheticSet
from mct_ray.trajectory import ConvexTrajectory, FullTrajectory

pytestmark = pytest.mark.system

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

BUCKET = "mct-runs"
RW_POLICY = {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
# What AWS needs for reading: HeadObject and GetObject are both authorised by s3:GetObject.
# moto 5.2.6 checks HEAD on a key as "s3:HeadObject" (the API operation's name, not an IAM
# action), so `s3:Get*` alone made the read-only user's reads fail there (pyarrow sends a
# HeadObject before every read); the extra name grants nothing more on AWS.
RO_POLICY = {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Resource": "*",
                            "Action": ["s3:Get*", "s3:List*", "s3:HeadBucket",
                                       "s3:HeadObject"]}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    def __init__(self, port: int, rw: tuple[str, str], ro: tuple[str, str]):
        self.port, self.rw, self.ro = port, rw, ro
        self.url = f"http://127.0.0.1:{port}"
        self.host = f"127.0.0.1:{port}"

    def client(self, creds: tuple[str, str] | None = None):
        key, secret = creds or self.rw
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def keys(self, prefix: str = "") -> list[str]:
        """Object keys, without the empty 'folder/' markers pyarrow keeps after a delete."""
        listing = self.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for o in listing.get("Contents", []) if not o["Key"].endswith("/"))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # a hang guard; it starts in seconds
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start (see {log.name})")
                time.sleep(0.2)
        # Users and bucket while the server accepts anything; then turn IAM checks on.
        setup = dict(endpoint_url=url, region_name="us-east-1",
                     aws_access_key_id="setup", aws_secret_access_key="setup")
        iam = boto3.client("iam", **setup)
        creds = {}
        for user, policy in (("rw", RW_POLICY), ("ro", RO_POLICY)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=user,
                                PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            creds[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        urllib.request.urlopen(urllib.request.Request(
            f"{url}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"}), timeout=5).read()
        yield Moto(port, creds["rw"], creds["ro"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _use_creds(monkeypatch, creds: tuple[str, str]) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds[1])


@pytest.fixture
def aws_env(monkeypatch, moto_server, tmp_path):
    """A clean AWS environment holding the read-write user's keys, and no endpoint."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    _use_creds(monkeypatch, moto_server.rw)
    return moto_server


def _uri(server: Moto, prefix: str, host: str | None = None) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={host or server.host}&scheme=http"


def _spec() -> NetSpec:
    return NetSpec("convnet", 1, 8, 10, 4, 1, "instancenorm")


def _trajectories(spec: NetSpec) -> tuple[ConvexTrajectory, FullTrajectory]:
    gen = torch.Generator().manual_seed(0)
    num_tensors, epochs = len(spec.param_shapes()), 4
    beta = torch.sort(torch.rand(num_tensors, epochs + 1, generator=gen), dim=1).values
    beta[:, 0], beta[:, -1] = 0.0, 1.0
    convex = ConvexTrajectory(spec, (0, 2, epochs),
                              torch.randn(3, spec.num_params, generator=gen), beta,
                              {"seed": 3})
    full = FullTrajectory(spec, torch.randn(epochs + 1, spec.num_params, generator=gen))
    return convex, full


# ---------------------------------------------------------------------------------------
# Round trips.

def test_artifacts_round_trip_through_s3(aws_env):
    store = Storage.open(_uri(aws_env, "run1"), check=True)
    assert store.kind == "s3" and isinstance(store.fs, pafs.S3FileSystem)
    spec = _spec()
    convex, full = _trajectories(spec)
    store.write_bytes(layout.expert_name(0), formats.save_trajectory(convex))
    store.write_bytes(layout.expert_name(0, full=True), formats.save_trajectory(full))
    images, labels = torch.randn(10, 1, 8, 8), torch.arange(10)
    store.write_bytes(layout.SYNTHETIC,
                      formats.save_synthetic(SyntheticSet(images, labels, 0.01, {"iteration": 5}),
                                             spec))
    rows = [{"iteration": i, "loss": 1.0 / (i + 1), "method": "mct"} for i in range(3)]
    store.write_table(layout.METRICS, rows)
    store.write_json(layout.CONFIG, {"distill": {"ipc": 10}})

    # The objects are on the server, seen by an independent client (not a local folder).
    assert aws_env.keys("run1/") == sorted(f"run1/{n}" for n in (
        layout.expert_name(0), layout.expert_name(0, full=True), layout.SYNTHETIC,
        layout.METRICS, layout.CONFIG))

    again = Storage.open(_uri(aws_env, "run1"))
    back = formats.load_trajectory(again.read_bytes(layout.expert_name(0)), "e0", spec)
    assert torch.equal(back.anchors, convex.anchors) and torch.equal(back.beta, convex.beta)
    back_full = formats.load_trajectory(
        again.read_bytes(layout.expert_name(0, full=True)), "e0f", spec)
    assert torch.equal(back_full.checkpoints, full.checkpoints)
    syn = formats.load_synthetic(again.read_bytes(layout.SYNTHETIC), "s", spec)
    assert torch.equal(syn.images, images) and torch.equal(syn.labels, labels)
    assert syn.step_size == 0.01 and syn.info == {"iteration": 5}
    assert again.read_table(layout.METRICS) == rows
    assert again.read_json(layout.CONFIG) == {"distill": {"ipc": 10}}
    assert again.list(layout.EXPERTS, ".safetensors") == [
        layout.expert_name(0, full=True), layout.expert_name(0)]
    assert again.size(layout.CONFIG) == len(aws_env.client().get_object(
        Bucket=BUCKET, Key=f"run1/{layout.CONFIG}")["Body"].read())
    with pytest.raises(DataError, match=r"run1/missing\.json\?endpoint_override=.* not found"):
        again.read_json("missing.json")
    # No probe object is left behind by the check.
    assert not [k for k in aws_env.keys() if "write-check" in k]


def test_one_writer_at_a_time_on_an_object_store(aws_env, monkeypatch):
    from mct_ray import runfolder

    monkeypatch.setattr(runfolder, "OBJECT_STORE_SETTLE_S", 0.05)
    store = Storage.open(_uri(aws_env, "locked"), check=True)
    lock = runfolder.RunLock.acquire(store, "run")
    monkeypatch.setattr(runfolder.socket, "gethostname", lambda: "another-host")
    with pytest.raises(StorageError, match=r"is in use by 'mct-ray run' \(pid \d+ on "):
        runfolder.RunLock.acquire(Storage.open(_uri(aws_env, "locked")), "distill")
    lock.release()
    assert not store.exists(layout.LOCK)
    runfolder.RunLock.acquire(store, "distill").release()


def test_endpoint_from_aws_endpoint_url(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env.url)
    store = Storage.open(f"s3://{BUCKET}/run-env", check=True)
    assert store.endpoint == aws_env.url
    store.write_json("summary.json", {"ok": True})
    assert aws_env.keys("run-env/") == ["run-env/summary.json"]
    assert Storage.open(f"s3://{BUCKET}/run-env").read_json("summary.json") == {"ok": True}
    # The service-specific variable wins, as in the AWS SDKs; the URI wins over both.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", aws_env.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    assert Storage.open(f"s3://{BUCKET}/x").endpoint == aws_env.url
    dead = f"127.0.0.1:{_free_port()}"
    assert Storage.open(_uri(aws_env, "x", host=dead)).endpoint == f"http://{dead}"


def test_child_storage_shares_the_endpoint(aws_env):
    tb = Storage.open(_uri(aws_env, "run2")).child("tb")
    tb.write_bytes("events.out", b"x")
    assert aws_env.keys("run2/") == ["run2/tb/events.out"]
    assert tb.uri == f"s3://{BUCKET}/run2/tb?endpoint_override={aws_env.host}&scheme=http"


# ---------------------------------------------------------------------------------------
# Failing fast, with one line that names the URI and the problem.

def _fails_fast(uri: str, match: str, within_s: float = 15.0) -> StorageError:
    """`within_s` is a margin of 3x or more over the configured timeouts, not a speed target
    (bench/fail_fast.py measures the seconds)."""
    start = time.monotonic()
    with pytest.raises(StorageError, match=match) as info:
        Storage.open(uri, check=True)
    elapsed = time.monotonic() - start
    assert elapsed < within_s, f"took {elapsed:.1f} s"
    message = str(info.value)
    assert "\n" not in message and message.startswith(uri.split("?")[0][:20])
    assert info.value.exit_code == 2
    return info.value


def test_unreachable_endpoint_fails_fast(aws_env):
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there
    err = _fails_fast(_uri(aws_env, "run", host=dead), rf"cannot reach http://{dead}")
    assert "connect" in str(err).lower()


def test_silent_endpoint_fails_within_the_probe_timeouts(aws_env, monkeypatch):
    # A server that accepts connections and never answers: only timeouts end the wait.
    monkeypatch.setattr(storage, "PROBE_TIMEOUTS", storage._Timeouts(1.0, 1.0, 2))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        _fails_fast(_uri(aws_env, "run", host=host), rf"cannot reach http://{host}.*Timeout",
                    within_s=12.0)  # 2 attempts of 1 + 1 s: 4 s
    # The shipped probe settings bound a dead endpoint to seconds, not minutes.
    probe = storage.PROBE_TIMEOUTS
    assert probe.attempts * (probe.connect_s + probe.request_s) <= 20


def test_missing_bucket_fails_fast_and_writes_nothing(aws_env):
    before = [b["Name"] for b in aws_env.client().list_buckets()["Buckets"]]
    uri = f"s3://no-such-bucket/run?endpoint_override={aws_env.host}&scheme=http"
    _fails_fast(uri, r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1")
    assert [b["Name"] for b in aws_env.client().list_buckets()["Buckets"]] == before


@pytest.mark.parametrize("creds", ["wrong-secret", "unknown-key"])
def test_bad_credentials_fail_fast(aws_env, monkeypatch, creds):
    key = aws_env.rw[0] if creds == "wrong-secret" else "AKIAIOSFODNN7EXAMPLE"
    _use_creds(monkeypatch, (key, "not-the-secret"))
    _fails_fast(_uri(aws_env, "run-bad"), r"access denied by http://127\.0\.0\.1")
    assert aws_env.keys("run-bad/") == []


def test_read_only_credentials_fail_the_write_check(aws_env, monkeypatch):
    Storage.open(_uri(aws_env, "shared")).write_json("config.json", {"a": 1})
    _use_creds(monkeypatch, aws_env.ro)
    reader = Storage.open(_uri(aws_env, "shared"))
    assert reader.read_json("config.json") == {"a": 1}  # reading is allowed
    _fails_fast(_uri(aws_env, "shared"), r"access denied")
    assert aws_env.keys("shared/") == ["shared/config.json"]


def test_io_errors_after_open_are_storage_errors(aws_env, monkeypatch):
    dead = f"127.0.0.1:{_free_port()}"
    store = Storage.open(_uri(aws_env, "run", host=dead))  # shipped I/O retry settings
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"s3://mct-runs/run/a\.json.*cannot reach"):
        store.write_json("a.json", {})
    assert time.monotonic() - start < 20  # refused at once; a margin for a loaded machine
    monkeypatch.setattr(storage, "IO_TIMEOUTS", storage._Timeouts(1.0, 1.0, 1))
    store = Storage.open(_uri(aws_env, "run", host=dead))
    for call in (lambda: store.read_bytes("a.json"), lambda: store.exists("a.json"),
                 lambda: store.list("experts"), lambda: store.size("a.json")):
        with pytest.raises(StorageError, match=r"s3://mct-runs/run.*cannot reach"):
            call()


def test_pickled_storage_keeps_its_endpoint_and_timeouts(aws_env, monkeypatch):
    # Ray pickles a Storage to ship it to workers; pyarrow's own S3 pickle loses the retry
    # and timeout settings (a stalled request would then wait the SDK default, 3 s a try).
    copy = pickle.loads(pickle.dumps(Storage.open(_uri(aws_env, "run-pk"))))
    copy.write_json("summary.json", {"ok": 1})
    assert aws_env.keys("run-pk/") == ["run-pk/summary.json"]
    monkeypatch.setattr(storage, "IO_TIMEOUTS", storage._Timeouts(0.5, 0.5, 1))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = Storage.open(_uri(aws_env, "run", host=f"127.0.0.1:{silent.getsockname()[1]}"))
        copy = pickle.loads(pickle.dumps(store))
        start = time.monotonic()
        with pytest.raises(StorageError, match="Timeout"):
            copy.exists("a.json")
        # 0.5 s kept (5x margin); the SDK's defaults, had they come back, take 3 s a try.
        assert time.monotonic() - start < 2.5


# ---------------------------------------------------------------------------------------
# URI handling (no server needed).

def test_bad_uris_are_rejected_in_one_line(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    cases = {
        "s3://AKIA:secret@bucket/run": "credentials do not belong in the URI",
        "s3:///run": "no bucket",
        "s3://b/run?endpoint=127.0.0.1:9": r"unknown query parameter\(s\) \['endpoint'\]",
        "s3://b/run?endpoint_override=h:9&scheme=ftp": "scheme must be http or https",
    }
    for uri, match in cases.items():
        with pytest.raises(StorageError, match=match) as info:
            Storage.open(uri)
        assert "secret" not in str(info.value)


def test_query_survives_child_names_and_parent_split():
    uri = "s3://b/run/synthetic.safetensors?endpoint_override=h:9000&scheme=http"
    assert parent_and_name(uri) == ("s3://b/run?endpoint_override=h:9000&scheme=http",
                                    "synthetic.safetensors")
    assert parent_and_name("/tmp/run/last.safetensors") == ("/tmp/run", "last.safetensors")
    store = Storage.open("s3://b/run?endpoint_override=h:9000&scheme=http")
    assert store.root == "b/run" and store.path("x") == "b/run/x"
    assert store.uri_of("experts/e.st") == (
        "s3://b/run/experts/e.st?endpoint_override=h:9000&scheme=http")
    with pytest.raises(StorageError, match="does not name a file"):
        parent_and_name("s3://bucket")


def test_gs_uris_parse(monkeypatch):
    # No GCS server is available here: parsing, and a fast failure against a closed port.
    store = Storage.open("gs://my-bucket/runs/cifar10")
    assert store.kind == "gs" and isinstance(store.fs, pafs.GcsFileSystem)
    assert store.root == "my-bucket/runs/cifar10"
    assert store.uri_of("config.json") == "gs://my-bucket/runs/cifar10/config.json"
    monkeypatch.setattr(storage, "PROBE_TIMEOUTS", storage._Timeouts(1.0, 1.0, 2))
    dead = f"127.0.0.1:{_free_port()}"
    # Without Google credentials the client stops before any request; with them, at the port.
    with pytest.raises(StorageError,
                       match=rf"gs://b/run.*(no Google credentials|cannot reach http://{dead})"):
        Storage.open(f"gs://b/run?endpoint_override={dead}&scheme=http", check=True)


def test_local_check_rejects_a_file_root_and_creates_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        Storage.open(str(tmp_path / "f"), check=True)
    with pytest.raises(StorageError, match="lies under a file, not a folder"):
        Storage.open(str(tmp_path / "f" / "run"), check=True)
    store = Storage.open(str(tmp_path / "new" / "run"), check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe left no trace
    assert store.is_local and store.kind == "local"
    store.write_bytes("a.json", b"{}")  # the first write makes the folders
    assert (tmp_path / "new" / "run" / "a.json").read_bytes() == b"{}"


def test_tensorboard_events_reach_s3(aws_env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mct_ray.tensorboard import TensorBoardLog

    with TensorBoardLog(Storage.open(_uri(aws_env, "run-tb"), check=True)) as log:
        for it in range(3):
            log.scalar("distill/loss", 2.0 - it, it)
        log.image_grid("synthetic", torch.rand(4, 3, 8, 8), 2, nrow=2)
    (key,) = aws_env.keys("run-tb/tb/")
    local = tmp_path / "tb"
    local.mkdir()
    (local / key.rsplit("/", 1)[1]).write_bytes(
        aws_env.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    acc = EventAccumulator(str(local))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("distill/loss")] == [(0, 2), (1, 1), (2, 0)]
    assert [e.step for e in acc.Images("synthetic")] == [2]
