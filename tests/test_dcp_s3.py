"""tensorfile.dcp with an object store: StorageWriter/StorageReader("s3://bucket/prefix")
against the local S3 server (tests/s3server.py)."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import _dcp_worker
import pytest
import tensorfile
import tensorfile.dcp as tdcp
import torch
import torch.distributed.checkpoint as dcp
from s3server import S3Bucket, S3Proxy
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
MiB = 1 << 20


def _sample() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(64, 40, generator=g),
            "bf": torch.randn(33, generator=g).to(torch.bfloat16),
            "big": torch.randn(1024, 1024, generator=g),  # 4 MiB: block checksums
            "mask": torch.arange(10) % 3 == 0,
            "empty": torch.zeros(0, 5),
        },
        "opt": {"step": 7, "groups": [{"lr": 0.1, "name": "adam"}], "blob": b"\x00\x01"},
    }


def _zeros_like(sd: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {k: torch.zeros_like(v) for k, v in sd["model"].items()},
        "opt": {"step": 0, "groups": [{"lr": 0.0, "name": ""}], "blob": b""},
    }


def _assert_same(want: dict[str, Any], got: dict[str, Any]) -> None:
    for k, t in want["model"].items():
        assert got["model"][k].dtype == t.dtype and torch.equal(got["model"][k], t), k
    assert got["opt"] == want["opt"]


def _data_keys(s3: S3Bucket, prefix: str) -> list[str]:
    return [k for k in s3.keys() if k.startswith(prefix + "/__") and k.endswith(".tf")]


def _flip(s3: S3Bucket, key: str, at: int) -> None:
    raw = bytearray(s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read())
    raw[at] ^= 0x01
    s3.client.put_object(Bucket=s3.name, Key=key, Body=bytes(raw))


def _storage_offset(s3: S3Bucket, key: str, tensor: str) -> int:
    raw = s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read()
    with tensorfile.open(io.BytesIO(raw)) as f:
        reader = f._reader
        i = reader.key_index()[tensor]
        s = reader.layout.tensors[i][1]
        return int(reader.layout.storage_offsets[s])


@single_process
def test_round_trip_through_dcp_save_and_load(s3: S3Bucket) -> None:
    sd = _sample()
    url = s3.url("run/step1")
    dcp.save(sd, storage_writer=tdcp.StorageWriter(url, num_threads=2), no_dist=True)
    keys = s3.keys()
    (data,) = _data_keys(s3, "run/step1")
    assert keys == sorted([data, "run/step1/tensorfile-dcp.json"])
    doc = json.loads(s3.client.get_object(Bucket=s3.name, Key=keys[-1])["Body"].read())
    assert doc["storage_meta"]["checkpoint_id"] == url
    size = s3.client.head_object(Bucket=s3.name, Key=data)["ContentLength"]
    assert doc["files"] == [[data.rsplit("/", 1)[1], size]]
    assert s3.incomplete_uploads() == []
    # The data object is an ordinary tensorfile.
    raw = s3.client.get_object(Bucket=s3.name, Key=data)["Body"].read()
    flat = tensorfile.load(io.BytesIO(raw))
    assert torch.equal(flat["model.big@0,0"], sd["model"]["big"])
    out = _zeros_like(sd)
    dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    _assert_same(sd, out)


@single_process
def test_local_and_remote_data_files_are_the_same_bytes(s3: S3Bucket, tmp_path: Path) -> None:
    sd = _sample()
    tdcp.state_dict_to_dcp(sd, tmp_path / "ck")
    tdcp.state_dict_to_dcp(sd, s3.url("ck"))
    (local,) = [p for p in (tmp_path / "ck").iterdir() if p.suffix == ".tf"]
    (remote,) = _data_keys(s3, "ck")
    assert s3.client.get_object(Bucket=s3.name, Key=remote)["Body"].read() == local.read_bytes()


class _Collect:
    def __init__(self, dests: dict[str, torch.Tensor]) -> None:
        self.dests = dests
        self.committed: list[str] = []

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.dests[req.dest_index.fqn]

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        self.committed.append(req.dest_index.fqn)


def _slice_plan(fqn: str, ndim: int, start: list[int], lengths: list[int]) -> LoadPlan:
    return LoadPlan(
        [
            ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(fqn),
                dest_offsets=torch.Size([0] * ndim),
                storage_index=MetadataIndex(fqn, [0] * ndim),
                storage_offsets=torch.Size(start),
                lengths=torch.Size(lengths),
            )
        ]
    )


def _read_slice(url: str, start: list[int], lengths: list[int]) -> torch.Tensor:
    reader = tdcp.StorageReader(url)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    dest = torch.zeros(lengths)
    planner = _Collect({"big": dest})
    reader.read_data(_slice_plan("big", 2, start, lengths), planner).wait()  # type: ignore[arg-type]
    assert planner.committed == ["big"]
    return dest


@single_process
def test_resharded_read_fetches_only_the_slice(s3: S3Bucket, s3_proxy: S3Proxy) -> None:
    big = torch.randn(2048, 1024)  # 8 MiB: one chunk, eight checksum blocks
    url = s3.url("big")
    tdcp.state_dict_to_dcp({"big": big}, url)
    s3_proxy.requests.clear()
    got = _read_slice(url, [300, 0], [600, 1024])  # rows 300..900: 2.3 MiB
    assert torch.equal(got, big[300:900])
    want = 600 * 1024 * 4
    served = s3_proxy.served("GET")
    # The slice, at most its two edge blocks more, the commit record and the header.
    assert want <= served <= want + 2 * MiB + 64 * 1024, served
    s3_proxy.requests.clear()
    got = _read_slice(url, [100, 512], [50, 256])  # strided: the covering rows
    assert torch.equal(got, big[100:150, 512:768])
    assert s3_proxy.served("GET") <= 50 * 1024 * 4 + 2 * MiB + 64 * 1024


@single_process
def test_load_into_a_different_chunking(s3: S3Bucket) -> None:
    # Saved as one chunk; loaded whole, and as a column slice (strided in the object).
    big = torch.randn(1000, 600)
    url = s3.url("rows")
    tdcp.state_dict_to_dcp({"big": big}, url)
    out = {"big": torch.zeros(1000, 600)}
    dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    assert torch.equal(out["big"], big)
    cols = _read_slice(url, [0, 300], [1000, 300])
    assert torch.equal(cols, big[:, 300:])


@single_process
def test_flipped_byte_in_a_data_object_is_a_checksum_error(s3: S3Bucket) -> None:
    sd = {"w": torch.randn(100, 100), "big": torch.randn(1024, 1024)}
    url = s3.url("ck")
    tdcp.state_dict_to_dcp(sd, url)
    (key,) = _data_keys(s3, "ck")
    _flip(s3, key, _storage_offset(s3, key, "w@0,0") + 1000)
    out = {"w": torch.zeros(100, 100), "big": torch.zeros(1024, 1024)}
    with pytest.raises(CheckpointException, match="checksum mismatch") as info:
        dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    assert key in str(info.value)
    reader = tdcp.StorageReader(url)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    dest = torch.zeros(100, 100)
    plan = LoadPlan(
        [
            ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex("w"),
                dest_offsets=torch.Size([0, 0]),
                storage_index=MetadataIndex("w", [0, 0]),
                storage_offsets=torch.Size([0, 0]),
                lengths=torch.Size([100, 100]),
            )
        ]
    )
    with pytest.raises(tensorfile.ChecksumError, match=r"s3://.*'w@0,0' checksum mismatch"):
        reader.read_data(plan, _Collect({"w": dest})).wait()  # type: ignore[arg-type]
    # A flipped byte inside a block of the large tensor, read through a slice.
    _flip(s3, key, _storage_offset(s3, key, "big@0,0") + 700 * 4096 + 3)
    assert torch.equal(_read_slice(url, [0, 0], [200, 1024]), sd["big"][:200])
    with pytest.raises(tensorfile.ChecksumError, match="'big@0,0' checksum mismatch"):
        _read_slice(url, [600, 0], [200, 1024])
    # verify=False reads it anyway.
    dcp.load(out, storage_reader=tdcp.StorageReader(url, verify=False), no_dist=True)


@single_process
def test_missing_or_damaged_commit_is_reported_as_locally(s3: S3Bucket) -> None:
    with pytest.raises(tdcp.IncompleteCheckpointError, match="no checkpoint here"):
        tdcp.StorageReader(s3.url("nothing")).read_metadata()
    url = s3.url("ck")
    tdcp.state_dict_to_dcp({"w": torch.randn(4)}, url)
    s3.client.delete_object(Bucket=s3.name, Key="ck/tensorfile-dcp.json")
    with pytest.raises(
        tdcp.IncompleteCheckpointError,
        match=r"checkpoint incomplete: its save did not commit \(tensorfile-dcp.json is missing",
    ):
        tdcp.StorageReader(url).read_metadata()
    with pytest.raises(CheckpointException, match="its save did not commit"):
        dcp.load({"w": torch.zeros(4)}, storage_reader=tdcp.StorageReader(url), no_dist=True)
    # A data object the commit lists is gone, or shorter than recorded.
    tdcp.state_dict_to_dcp({"w": torch.randn(4)}, url)
    (key,) = _data_keys(s3, "ck")
    raw = s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read()
    s3.client.put_object(Bucket=s3.name, Key=key, Body=raw[:-10])
    with pytest.raises(tdcp.IncompleteCheckpointError, match=r"checkpoint damaged: .* holds"):
        tdcp.StorageReader(url).read_metadata()
    s3.client.delete_object(Bucket=s3.name, Key=key)
    with pytest.raises(tdcp.IncompleteCheckpointError, match=r"checkpoint damaged: .* is missing"):
        tdcp.StorageReader(url).read_metadata()


@single_process
def test_overwrite_replaces_the_old_objects_after_the_commit(s3: S3Bucket) -> None:
    url = s3.url("ck")
    tdcp.state_dict_to_dcp({"w": torch.full((4,), 1.0)}, url)
    (old,) = _data_keys(s3, "ck")
    tdcp.state_dict_to_dcp({"w": torch.full((4,), 2.0)}, url)
    (new,) = _data_keys(s3, "ck")
    assert new != old
    out = {"w": torch.zeros(4)}
    dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    assert torch.equal(out["w"], torch.full((4,), 2.0))
    with pytest.raises(CheckpointException, match="already holds a checkpoint"):
        tdcp.state_dict_to_dcp({"w": torch.randn(4)}, url, overwrite=False)
    assert _data_keys(s3, "ck") == [new]


@single_process
def test_a_save_that_does_not_commit_leaves_the_old_checkpoint(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = s3.url("ck")
    tdcp.state_dict_to_dcp({"w": torch.full((4,), 1.0)}, url)
    from tensorfile.dcp import _objects

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("injected: the commit PUT failed")

    with monkeypatch.context() as m:
        m.setattr(_objects, "commit", fail)
        with pytest.raises(CheckpointException, match="injected"):
            tdcp.state_dict_to_dcp({"w": torch.full((4,), 2.0)}, url)
    assert len(_data_keys(s3, "ck")) == 2  # the new data object, never committed
    out = {"w": torch.zeros(4)}
    dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    assert torch.equal(out["w"], torch.full((4,), 1.0))


@single_process
def test_large_rank_file_goes_up_in_parts_and_a_failed_part_commits_nothing(
    s3: S3Bucket, s3_proxy: S3Proxy
) -> None:
    url = s3.url("ck")
    small = {"w": torch.full((4,), 1.0)}
    tdcp.state_dict_to_dcp(small, url)
    big = {"w": torch.full((4,), 2.0), "big": torch.randn(20 * MiB // 4)}  # over one part
    tag = "partNumber=2&"
    s3_proxy.fail = lambda method, path: 400 if method == "PUT" and tag in path + "&" else None
    with pytest.raises(CheckpointException, match="InjectedFault"):
        tdcp.state_dict_to_dcp(big, url)
    assert s3.incomplete_uploads() == []
    out = {"w": torch.zeros(4)}
    dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    assert torch.equal(out["w"], small["w"])  # the old checkpoint, whole
    s3_proxy.fail = lambda method, path: None
    tdcp.state_dict_to_dcp(big, url)
    (key,) = _data_keys(s3, "ck")
    assert s3.client.head_object(Bucket=s3.name, Key=key)["ETag"].strip('"').endswith("-2")
    out = {"w": torch.zeros(4), "big": torch.zeros_like(big["big"])}
    dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    assert torch.equal(out["w"], big["w"]) and torch.equal(out["big"], big["big"])


def test_unknown_scheme_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"foo://b/ck: unsupported URL scheme 'foo'"):
        tdcp.StorageWriter("foo://b/ck")
    with pytest.raises(ValueError, match=r"unsupported URL scheme 'foo'"):
        tdcp.StorageReader("foo://b/ck")
    with pytest.raises(ValueError, match="read-only"):
        tdcp.StorageWriter("https://example.com/ck")
    w = tdcp.StorageWriter("s3://b/ck")
    with pytest.raises(ValueError, match="unsupported URL scheme 'nope'"):
        w.reset("nope://b/x")


def test_file_url_is_a_local_directory(tmp_path: Path) -> None:
    w = tdcp.StorageWriter(f"file://{tmp_path}/ck")
    assert w.target is None and w.path == f"{tmp_path}/ck"


@pytest.mark.slow
def test_two_gloo_ranks_save_and_load(s3: S3Bucket, tmp_path: Path, monkeypatch: Any) -> None:
    url = s3.url("dist")
    monkeypatch.setenv("TENSORFILE_TEST_DCP_URL", url)
    ctx = mp.get_context("spawn")  # the children take this environment (the AWS settings)
    procs = [
        ctx.Process(target=_dcp_worker.run, args=("s3", r, 2, str(tmp_path))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error-*.txt")))
    assert codes == [0, 0], f"exit codes {codes}\n{errors}"
    assert len(_data_keys(s3, "dist")) == 2
    # One process reads the two ranks' row chunks back as whole tensors.
    full = _dcp_worker.full_state(5)
    out = {"model": {k: torch.zeros_like(v) for k, v in full["model"].items()}}
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    for k, v in full["model"].items():
        assert torch.equal(out["model"][k], v), k
    assert os.environ["TENSORFILE_TEST_DCP_URL"] == url


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@single_process
def test_cuda_tensors_save_and_load_through_host_memory(s3: S3Bucket) -> None:
    sd = {"w": torch.randn(300, 70, device="cuda"), "big": torch.randn(1024, 1024, device="cuda")}
    url = s3.url("gpu")
    dcp.save(sd, storage_writer=tdcp.StorageWriter(url), no_dist=True)
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    dcp.load(out, storage_reader=tdcp.StorageReader(url), no_dist=True)
    for k, v in sd.items():
        assert out[k].device.type == "cuda" and torch.equal(out[k], v), k
    rows = {"big": torch.zeros(200, 1024, device="cuda")}
    reader = tdcp.StorageReader(url)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    planner = _Collect(rows)
    reader.read_data(_slice_plan("big", 2, [100, 0], [200, 1024]), planner).wait()  # type: ignore[arg-type]
    assert torch.equal(rows["big"], sd["big"][100:300])
