"""Every file entry point against a real S3 API on 127.0.0.1 (moto's server): save, load,
open, async_save, save_safetensors, in-place loads and the command line, with URLs."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorfile
import torch
from s3server import S3Bucket, S3Proxy
from tensorfile import ChecksumError, FormatError
from tensorfile.cli import main as cli_main

MiB = 1 << 20


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return bool(a == b) and type(a) is type(b)


def _objects() -> dict[str, Any]:
    base = torch.arange(12.0).reshape(3, 4)
    return {
        "tensor": torch.randn(1000),
        "state_dict": {"w": torch.randn(600, 700), "b": torch.zeros(700, dtype=torch.bfloat16)},
        "shared": {"a": base, "view": base[1:], "t": base.t()},
        "mixed": [torch.ones(3, dtype=torch.int8), np.arange(5, dtype=np.float16), 3, "s", None],
        "empty": {"e": torch.empty(0, 3), "scalar": torch.tensor(2.5)},
        "plain": {"step": 10, "lr": 1e-3, "name": "run", "t": (1, 2)},
    }


@pytest.mark.parametrize("kind", sorted(_objects()))
def test_round_trip(s3: S3Bucket, kind: str) -> None:
    obj = _objects()[kind]
    url = s3.url(f"ckpt/{kind}.tf")
    tensorfile.save(obj, url)
    got = tensorfile.load(url)
    assert _same(obj, got)
    if kind == "shared":
        assert got["view"].untyped_storage().data_ptr() == got["a"].untyped_storage().data_ptr()
    assert s3.incomplete_uploads() == []


def test_a_large_object_goes_up_in_parts_and_back(s3: S3Bucket, monkeypatch: Any) -> None:
    monkeypatch.setenv("TENSORFILE_REMOTE_PART_NBYTES", str(5 * MiB))
    obj = {f"w{i}": torch.randn(MiB // 4 + i) for i in range(24)}  # 24 MiB
    url = s3.url("big.tf")
    tensorfile.save(obj, url)
    head = s3.client.head_object(Bucket=s3.name, Key="big.tf")
    assert "-" in head["ETag"]  # a multipart upload's ETag
    assert _same(obj, tensorfile.load(url))


def test_unknown_scheme_is_an_error_and_s3_colon_is_a_path(
    tmp_path: Path, monkeypatch: Any
) -> None:
    with pytest.raises(ValueError, match="unsupported URL scheme 'foo'"):
        tensorfile.save({"x": torch.ones(1)}, "foo://bucket/x.tf")
    with pytest.raises(ValueError, match="unsupported URL scheme 'foo'"):
        tensorfile.load("foo://bucket/x.tf")
    monkeypatch.chdir(tmp_path)
    tensorfile.save({"x": torch.ones(1)}, "s3:x.tf")  # no "//": a local file
    assert (tmp_path / "s3:x.tf").is_file()


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    tensorfile.save({"x": torch.ones(2)}, f"file://{tmp_path}/a.tf")
    assert torch.equal(tensorfile.load(tmp_path / "a.tf")["x"], torch.ones(2))


def test_lazy_get_fetches_only_its_bytes(s3: S3Bucket, s3_proxy: S3Proxy) -> None:
    obj = {f"t{i}": torch.full((2 * MiB // 4,), float(i)) for i in range(8)}  # 8 x 2 MiB
    url = s3.url("lazy.tf")
    tensorfile.save(obj, url)
    s3_proxy.requests.clear()
    with tensorfile.open(url) as f:
        header_bytes = s3_proxy.served("GET")
        assert header_bytes <= MiB  # one GET of the first MiB brought the header
        assert f.keys() == list(obj)
        got = f.get("t5")
    assert torch.equal(got, obj["t5"])
    assert s3_proxy.served("GET") - header_bytes == 2 * MiB
    assert [r.method for r in s3_proxy.requests if r.method != "GET"] == []


def test_torch_save_and_safetensors_objects_are_read(s3: S3Bucket) -> None:
    from safetensors.torch import save as st_save

    sd = {"w": torch.randn(300, 40), "b": torch.arange(40)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    s3.client.put_object(Bucket=s3.name, Key="m.pt", Body=buf.getvalue())
    s3.client.put_object(Bucket=s3.name, Key="m.safetensors", Body=st_save(sd))
    for key in ("m.pt", "m.safetensors"):
        assert _same(sd, tensorfile.load(s3.url(key)))
        with tensorfile.open(s3.url(key)) as f:
            assert torch.equal(f.get("b"), sd["b"])


def test_save_safetensors_async_save_and_in_place_loads(s3: S3Bucket) -> None:
    from safetensors.torch import load as st_load

    sd = {"w": torch.randn(500, 300), "b": torch.randn(300)}
    tensorfile.save_safetensors(sd, s3.url("x.safetensors"))
    blob = s3.client.get_object(Bucket=s3.name, Key="x.safetensors")["Body"].read()
    assert _same(sd, st_load(blob))
    before = sd["w"].clone()
    fut = tensorfile.async_save(sd, s3.url("async.tf"))
    sd["w"].add_(1)  # the snapshot was taken: this change is not saved
    fut.result()
    got = tensorfile.load(s3.url("async.tf"))
    assert torch.equal(got["w"], before)
    dest = {"w": torch.empty(500, 300), "b": torch.empty(300)}
    ptr = dest["w"].data_ptr()
    out = tensorfile.load(s3.url("async.tf"), into=dest)
    assert out["w"] is dest["w"] and dest["w"].data_ptr() == ptr
    assert torch.equal(dest["w"], before)


def test_a_flipped_byte_is_a_checksum_error(s3: S3Bucket) -> None:
    url = s3.url("x.tf")
    tensorfile.save({"w": torch.randn(10_000)}, url)
    blob = bytearray(s3.client.get_object(Bucket=s3.name, Key="x.tf")["Body"].read())
    blob[-100] ^= 0x01
    s3.client.put_object(Bucket=s3.name, Key="x.tf", Body=bytes(blob))
    with pytest.raises(ChecksumError, match="s3://"):
        tensorfile.load(url)
    assert tensorfile.load(url, verify=False)["w"].shape == (10_000,)


def test_a_truncated_object_is_a_format_error(s3: S3Bucket) -> None:
    tensorfile.save({"w": torch.randn(10_000)}, s3.url("x.tf"))
    blob = s3.client.get_object(Bucket=s3.name, Key="x.tf")["Body"].read()
    s3.client.put_object(Bucket=s3.name, Key="x.tf", Body=blob[:-10])
    with pytest.raises(FormatError, match=r"s3://.*x\.tf"):
        tensorfile.load(s3.url("x.tf"))


def test_missing_bucket_and_key_are_named(s3: S3Bucket) -> None:
    with pytest.raises(FileNotFoundError, match=rf"s3://{s3.name}/nope\.tf"):
        tensorfile.load(s3.url("nope.tf"))
    with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket-here/x\.tf"):
        tensorfile.load("s3://no-such-bucket-here/x.tf")


def test_storage_options_override_the_environment(s3: S3Bucket, monkeypatch: Any) -> None:
    tensorfile.save({"x": torch.ones(3)}, s3.url("o.tf"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    opts = {"endpoint_url": s3.endpoint}
    assert torch.equal(tensorfile.load(s3.url("o.tf"), storage_options=opts)["x"], torch.ones(3))
    tensorfile.save({"y": torch.zeros(2)}, s3.url("p.tf"), storage_options=opts)
    with tensorfile.open(s3.url("p.tf"), storage_options=opts) as f:
        assert f.keys() == ["y"]


def test_a_server_that_stops_mid_load_names_the_url(
    s3: S3Bucket, s3_proxy: S3Proxy, monkeypatch: Any
) -> None:
    url = s3.url("x.tf")
    tensorfile.save({"w": torch.randn(MiB)}, url)  # 4 MiB: past the first GET
    f = tensorfile.open(url)
    # The server goes away: new connections are refused, and the one kept alive answers
    # only errors.
    s3_proxy.fail = lambda method, path: 500
    s3_proxy.stop()
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"s3://.*x\.tf"):
        f.get("w")
    print(f"failed after {time.monotonic() - t0:.1f} s")
    f.close()


def test_the_command_line_takes_urls(s3: S3Bucket, tmp_path: Path, capsys: Any) -> None:
    sd = {"w": torch.randn(200, 30), "step": torch.tensor(3)}
    tensorfile.save(sd, s3.url("a.tf"))
    cli_main(["inspect", s3.url("a.tf")], standalone_mode=False)
    assert "w" in capsys.readouterr().out
    cli_main(["verify", s3.url("a.tf")], standalone_mode=False)
    assert "ok" in capsys.readouterr().out
    cli_main(["convert", s3.url("a.tf"), str(tmp_path / "b.safetensors")], standalone_mode=False)
    cli_main(["convert", str(tmp_path / "b.safetensors"), s3.url("c.tf")], standalone_mode=False)
    assert _same(sd, tensorfile.load(s3.url("c.tf")))
    cli_main(["diff", s3.url("a.tf"), s3.url("c.tf")], standalone_mode=False)
    assert "identical" in capsys.readouterr().out.lower()
    blob = bytearray(s3.client.get_object(Bucket=s3.name, Key="c.tf")["Body"].read())
    blob[-4] ^= 1
    s3.client.put_object(Bucket=s3.name, Key="c.tf", Body=bytes(blob))
    with pytest.raises(SystemExit) as e:
        cli_main(["verify", s3.url("c.tf")])
    assert e.value.code != 0
    assert "FAIL" in capsys.readouterr().out


_SAVER = textwrap.dedent(
    """
    import os, sys, torch, tensorfile
    url, flag = sys.argv[1], sys.argv[2]
    os.environ["TENSORFILE_REMOTE_PART_NBYTES"] = str(5 << 20)
    os.environ["TENSORFILE_REMOTE_CONCURRENCY"] = "1"
    import tensorfile._remote as r
    real = r.upload
    def slow(*a, **k):
        pieces = a[1]
        def gen():
            for i, p in enumerate(pieces):
                if i == 3:
                    open(flag, "w").close()  # parts are going up: kill me now
                    import time; time.sleep(60)
                yield p
        return real(a[0], gen(), **k)
    r.upload = slow
    tensorfile.save({"w": torch.full((16 << 20,), 2.0)}, url)
    """
)


def test_a_killed_save_leaves_the_old_object_and_no_upload(s3: S3Bucket, tmp_path: Path) -> None:
    url = s3.url("run/x.tf")
    tensorfile.save({"w": torch.full((16 << 20,), 1.0)}, url)  # 64 MiB, the old object
    flag = tmp_path / "uploading"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", _SAVER, url, str(flag)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the saver never started its upload"
        time.sleep(0.5)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert s3.incomplete_uploads(), "the killed saver should have left its upload behind"
    assert torch.equal(tensorfile.load(url)["w"], torch.full((16 << 20,), 1.0))
    tensorfile.save({"w": torch.full((16 << 20,), 3.0)}, url)  # cleans up first
    assert s3.incomplete_uploads() == []
    assert torch.equal(tensorfile.load(url)["w"], torch.full((16 << 20,), 3.0))


def test_a_tensor_changed_during_an_upload_aborts_it(s3: S3Bucket, monkeypatch: Any) -> None:
    from tensorfile import _io

    url = s3.url("race.tf")
    tensorfile.save({"w": torch.zeros(1000)}, url)
    w = torch.ones(1000)
    real = _io._upload

    def racing(target: Any, pieces: Any, total: int, opts: Any) -> None:
        def gen() -> Any:
            for i, p in enumerate(pieces):
                if i == 0:
                    w.add_(1)  # another thread writes after the checksums were taken
                yield p

        real(target, gen(), total, opts)

    monkeypatch.setattr(_io, "_upload", racing)
    with pytest.raises(RuntimeError, match="changed while it was being saved"):
        tensorfile.save({"w": w}, url)
    monkeypatch.setattr(_io, "_upload", real)
    assert torch.equal(tensorfile.load(url)["w"], torch.zeros(1000))  # the old object
    assert s3.incomplete_uploads() == []
