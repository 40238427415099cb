"""The object-store byte layer (tensorfile._remote) against a real S3 API on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pytest
from s3server import MotoServer, S3Bucket, S3Proxy, boto3_client, point_env_at, require_s3
from tensorfile import _remote
from tensorfile._errors import FormatError

MiB = 1 << 20


def _pattern(nbytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


# --- URLs (no server needed) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "is_url"),
    [
        ("s3://bucket/key", True),
        ("S3://bucket/key", True),
        ("gs://b/k", True),
        ("https://host:8080/x.safetensors", True),
        ("file:///tmp/x", True),
        ("s3:", False),
        ("s3:/bucket/key", False),
        ("s3:bucket", False),
        ("dir/s3://x", False),
        ("C:\\models\\x.tf", False),
        ("relative/path.tf", False),
        ("", False),
    ],
)
def test_has_url_scheme(text: str, is_url: bool) -> None:
    assert _remote.has_url_scheme(text) is is_url


def test_pathlike_is_never_a_url(tmp_path) -> None:
    p = tmp_path / "s3:"
    assert _remote.has_url_scheme(p) is False
    assert _remote.resolve(p) is p


def test_parse_url_kinds() -> None:
    assert _remote.parse_url("s3://bkt/a/b.tf") == ("s3", "bkt", "a/b.tf", "s3://bkt/a/b.tf")
    assert _remote.parse_url("s3a://bkt/k").kind == "s3"
    assert _remote.parse_url("gs://bkt/k")[:3] == ("gs", "bkt", "k")
    assert _remote.parse_url("abfss://c@acct.dfs.core.windows.net/k")[:3] == (
        "az",
        "c@acct.dfs.core.windows.net",
        "k",
    )
    assert _remote.parse_url("http://127.0.0.1:9/d/x.st")[:3] == (
        "http",
        "http://127.0.0.1:9",
        "d/x.st",
    )
    assert _remote.parse_url("s3://bkt/run").child("ckpt-1/COMMIT").url == (
        "s3://bkt/run/ckpt-1/COMMIT"
    )


def test_unknown_scheme_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"unsupported URL scheme 'ftp'"):
        _remote.resolve("ftp://host/x.tf")
    with pytest.raises(ValueError, match="no bucket"):
        _remote.parse_url("s3:///key")


def test_file_url_is_a_local_path() -> None:
    assert _remote.resolve("file:///tmp/a%20b/x.tf") == "/tmp/a b/x.tf"
    assert _remote.resolve("file://localhost/tmp/x.tf") == "/tmp/x.tf"
    assert _remote.resolve("plain/path.tf") == "plain/path.tf"
    with pytest.raises(ValueError, match="local path"):
        _remote.resolve("file://otherhost/x")


def test_s3_config_from_shared_files(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    creds = tmp_path / "credentials"
    creds.write_text("[dev]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    conf = tmp_path / "config"
    conf.write_text(
        "[profile dev]\nregion = eu-west-3\nendpoint_url = http://127.0.0.1:1\n"
        "[default]\nregion = us-west-2\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(conf))
    monkeypatch.setenv("AWS_PROFILE", "dev")
    config, provider = _remote._s3_config({})
    assert provider is None
    assert config == {
        "access_key_id": "AK",
        "secret_access_key": "SK",
        "endpoint": "http://127.0.0.1:1",
        "region": "eu-west-3",
    }
    # The environment beats the profile; AWS_REGION beats AWS_DEFAULT_REGION; explicit
    # storage options beat both.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVAK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSK")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_REGION", "ca-central-1")
    config, _ = _remote._s3_config({"endpoint": "http://other:2"})
    assert "access_key_id" not in config  # obstore reads the environment's keys itself
    assert (config["region"], config["endpoint"]) == ("ca-central-1", "http://other:2")
    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(ValueError, match="'nosuch'"):
        _remote._s3_config({})


# --- against the server ---------------------------------------------------------------


def test_small_object_round_trip(s3: S3Bucket) -> None:
    url = s3.url("dir/commit.json")
    assert _remote.exists(url) is False
    _remote.put_bytes(url, b'{"step": 3}')
    assert _remote.exists(url) is True
    assert _remote.get_bytes(url) == b'{"step": 3}'
    assert s3.client.get_object(Bucket=s3.name, Key="dir/commit.json")["Body"].read() == (
        b'{"step": 3}'
    )
    _remote.put_bytes(s3.url("dir/sub/x"), b"x")
    _remote.put_bytes(s3.url("other"), b"yz")
    listed = _remote.list_objects(s3.url("dir"))
    assert [(o.key, o.nbytes) for o in listed] == [("dir/commit.json", 11), ("dir/sub/x", 1)]
    flat = _remote.list_objects(s3.url("dir/"), recursive=False)
    assert [o.key for o in flat] == ["dir/commit.json"]
    _remote.delete(url)
    _remote.delete(url)  # deleting a missing object is no error
    assert s3.keys() == ["dir/sub/x", "other"]


def test_ranged_reads_of_a_boto3_object(s3: S3Bucket) -> None:
    data = _pattern(3 * MiB + 12345)
    s3.client.put_object(Bucket=s3.name, Key="blob", Body=data)
    reader = _remote.RemoteReader(s3.url("blob"))
    head = bytearray(100)
    assert reader.read_into(7, head) == 100
    assert bytes(head) == data[7:107]
    assert reader.nbytes == len(data)  # learnt from that GET's Content-Range
    assert reader.read(len(data) - 10, 64) == data[-10:]  # short at the end
    assert reader.read(len(data), 8) == b""
    # Destinations of every kind, ranges out of order, split into many small parts.
    a = np.zeros(MiB + 3, dtype=np.uint8)
    b = bytearray(2 * MiB)
    c = memoryview(bytearray(5))
    reader.read_ranges_into(
        [(2 * MiB, a), (11, b), (len(data) - 5, c)], part_nbytes=256 * 1024, concurrency=4
    )
    assert a.tobytes() == data[2 * MiB : 3 * MiB + 3]
    assert bytes(b) == data[11 : 11 + 2 * MiB]
    assert bytes(c) == data[-5:]


def test_ranged_reads_fetch_only_their_bytes(s3: S3Bucket, s3_proxy: S3Proxy) -> None:
    data = _pattern(8 * MiB, seed=1)
    s3.client.put_object(Bucket=s3.name, Key="blob", Body=data)
    reader = _remote.RemoteReader(s3.url("blob"))
    x = bytearray(MiB + 1)
    y = bytearray(300_000)
    reader.read_ranges_into([(5 * MiB, x), (123, y)], part_nbytes=MiB // 2, concurrency=3)
    assert bytes(x) == data[5 * MiB : 6 * MiB + 1] and bytes(y) == data[123 : 123 + 300_000]
    gets = [r for r in s3_proxy.requests if r.method == "GET"]
    assert s3_proxy.served("GET") == len(x) + len(y)
    assert len(gets) == 3 + 1  # x in three parts of at most 512 KiB, y in one
    assert [r for r in s3_proxy.requests if r.method != "GET"] == []


def test_read_beyond_the_end_is_a_format_error(s3: S3Bucket) -> None:
    s3.client.put_object(Bucket=s3.name, Key="short", Body=b"0123456789")
    reader = _remote.RemoteReader(s3.url("short"))
    with pytest.raises(FormatError, match=r"s3://.*/short: object ends before byte 20"):
        reader.read_ranges_into([(4, bytearray(16))])


def test_upload_round_trip_from_views(s3: S3Bucket) -> None:
    data = _pattern(17 * MiB + 5, seed=2)
    arr = np.frombuffer(data, dtype=np.uint8)
    views = [memoryview(arr[: 3 * MiB]), arr[3 * MiB : 9 * MiB].view(np.float32), arr[9 * MiB :]]
    _remote.upload(s3.url("big"), views, part_nbytes=5 * MiB, concurrency=3)
    got = s3.client.get_object(Bucket=s3.name, Key="big")
    assert got["Body"].read() == data
    assert got["ETag"].strip('"').endswith("-4")  # four parts of 5 MiB, the last shorter
    assert s3.incomplete_uploads() == []
    _remote.upload(s3.url("small"), [b"abc", b"def"])  # under one part: a single PUT
    assert _remote.get_bytes(s3.url("small")) == b"abcdef"


@pytest.mark.parametrize("failing_part", [2, 4])
def test_failed_part_aborts_the_upload(s3: S3Bucket, s3_proxy: S3Proxy, failing_part: int) -> None:
    """A part the store refuses fails the save, keeps the old object and leaves no upload:
    part 2 fails while later parts are still being produced (obstore aborts), part 4 among
    the last in flight (where obstore does not, and the upload is swept)."""
    s3.client.put_object(Bucket=s3.name, Key="ckpt", Body=b"old object")
    tag = f"partNumber={failing_part}&"
    s3_proxy.fail = lambda method, path: 400 if method == "PUT" and tag in path + "&" else None
    data = _pattern(18 * MiB, seed=3)
    with pytest.raises(OSError, match=r"s3://.*/ckpt: .*InjectedFault"):
        _remote.upload(s3.url("ckpt"), [data], part_nbytes=5 * MiB, concurrency=2)
    assert any(r.status == 400 for r in s3_proxy.requests)
    assert s3.incomplete_uploads() == []
    assert s3.client.get_object(Bucket=s3.name, Key="ckpt")["Body"].read() == b"old object"


def test_cleanup_aborts_only_leftovers(s3: S3Bucket) -> None:
    """Uploads under the prefix initiated before the cut-off are aborted, others kept.
    moto dates every upload 2010-11-10T20:48:33Z, so by default (this process's start)
    they count as a killed saver's leftovers."""
    key = "run/ckpt-1/data.tf"
    up = s3.client.create_multipart_upload(Bucket=s3.name, Key=key)
    s3.client.upload_part(
        Bucket=s3.name, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 1000
    )
    s3.client.create_multipart_upload(Bucket=s3.name, Key="elsewhere/data.tf")
    s3.client.put_object(Bucket=s3.name, Key="run/ckpt-0/data.tf", Body=b"done")
    before = dt.datetime(2010, 11, 10, 20, 48, 33, tzinfo=dt.timezone.utc)
    assert _remote.abort_incomplete_uploads(s3.url("run/"), older_than=before) == []
    assert len(s3.incomplete_uploads()) == 2
    assert _remote.abort_incomplete_uploads(s3.url("run/")) == [key]
    assert [u["Key"] for u in s3.incomplete_uploads()] == ["elsewhere/data.tf"]
    assert s3.keys() == ["run/ckpt-0/data.tf"]  # completed objects untouched


def test_missing_bucket_and_key(s3: S3Bucket) -> None:
    with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket-x/k: no such bucket"):
        _remote.get_bytes("s3://no-such-bucket-x/k")
    with pytest.raises(FileNotFoundError, match=r"s3://.*/nokey: no such object"):
        _remote.RemoteReader(s3.url("nokey")).read(0, 10)
    with pytest.raises(FileNotFoundError, match=r"s3://.*/nokey"):
        _ = _remote.RemoteReader(s3.url("nokey")).nbytes


def test_bad_credentials_are_permission_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    require_s3()
    server = MotoServer({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # checks credentials
    try:
        point_env_at(monkeypatch, server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTKNOWN")
        with pytest.raises(PermissionError, match=r"s3://bkt/k: access denied: InvalidAccessKey"):
            _remote.get_bytes("s3://bkt/k")
        with pytest.raises(PermissionError, match=r"s3://bkt/k: access denied"):
            _remote.upload("s3://bkt/k", [bytes(6 * MiB)], part_nbytes=5 * MiB)
    finally:
        server.stop()


def test_stopped_server_names_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    require_s3()
    server = MotoServer()
    point_env_at(monkeypatch, server.endpoint)
    boto3_client(server.endpoint).create_bucket(Bucket="gone")
    _remote.put_bytes("s3://gone/x", b"123")
    reader = _remote.RemoteReader("s3://gone/x")
    assert reader.read(0, 3) == b"123"
    server.stop()
    with pytest.raises(OSError, match=r"s3://gone/x: .*error sending request") as info:
        reader.read_ranges_into([(0, bytearray(3))])
    assert not isinstance(info.value, FileNotFoundError)


def test_throttling_is_retried_then_named(s3: S3Bucket, s3_proxy: S3Proxy, monkeypatch) -> None:
    """storage_options override the environment: here the endpoint (the proxy, while the
    environment names the server) and the retry count."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    s3.client.put_object(Bucket=s3.name, Key="hot", Body=b"data")
    s3_proxy.fail = lambda method, path: 503 if method == "GET" else None
    options = {
        "endpoint_url": s3_proxy.endpoint,
        "retry_config": {
            "max_retries": 2,
            "backoff": {"init_backoff": dt.timedelta(milliseconds=1)},
        },
    }
    with pytest.raises(_remote.StoreThrottledError, match=r"s3://.*/hot: throttled.*SlowDown"):
        _remote.get_bytes(s3.url("hot"), storage_options=options)
    assert [r.status for r in s3_proxy.requests] == [503, 503, 503]  # two retries
    s3_proxy.fail = lambda method, path: None
    assert _remote.get_bytes(s3.url("hot"), storage_options=options) == b"data"
    assert len(s3_proxy.requests) == 4


def test_http_is_read_only() -> None:
    with pytest.raises(PermissionError, match="read-only"):
        _remote.put_bytes("https://example.invalid/x", b"1")
