"""CheckpointManager on an object-store prefix (s3://bucket/run) against a real S3 API on
127.0.0.1: commits, retention, delete, last-good load, the writer's lock, leftovers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import tensorfile
from s3server import S3Bucket
from tensorfile import _remote

torch = pytest.importorskip("torch")

MiB = 1 << 20


def _obj(step: int) -> dict[str, Any]:
    return {"step": step, "w": torch.full((16,), float(step)), "tag": f"s{step}"}


def _run_keys(s3: S3Bucket, prefix: str = "run/") -> list[str]:
    return [k[len(prefix) :] for k in s3.keys() if k.startswith(prefix)]


def _data_names(s3: S3Bucket) -> list[str]:
    return [k for k in _run_keys(s3) if k.endswith(".tf")]


def test_save_steps_load_and_path_round_trip(s3: S3Bucket) -> None:
    with tensorfile.CheckpointManager(s3.url("run")) as mgr:
        assert mgr.steps() == [] and mgr.latest() is None
        for step in (100, 200, 300):
            assert (
                mgr.save(step, _obj(step), metrics={"loss": step / 1000}, metadata={"r": "a"})
                is None
            )
        assert mgr.steps() == [100, 200, 300]
        assert mgr.latest() == 300
        got = mgr.load()
        assert got["step"] == 300 and got["tag"] == "s300"
        assert torch.equal(got["w"], torch.full((16,), 300.0))
        assert mgr.load(200)["step"] == 200
        assert mgr.metrics(100) == {"loss": 0.1}
        assert mgr.metadata(100) == {"r": "a"}
        url = mgr.path(200)
        assert url.startswith(s3.url("run/step-00000200.")) and url.endswith(".tf")
        # The data object is an ordinary tensorfile, its record a JSON object beside it.
        assert torch.equal(tensorfile.load(url)["w"], torch.full((16,), 200.0))
        with tensorfile.open(url) as f:
            assert f.metadata() == {"r": "a"}
        blob = _remote.get_bytes(url)
        rec = json.loads(_remote.get_bytes(s3.url("run/step-00000200.json")))
        assert rec["data"] == url.rsplit("/", 1)[1] and rec["nbytes"] == len(blob)
        assert rec["storages"] is None  # object-store saves are full saves
        assert mgr.incremental is False
    keys = _run_keys(s3)
    assert sorted(k for k in keys if k.endswith(".json")) == [
        "step-00000100.json",
        "step-00000200.json",
        "step-00000300.json",
    ]
    assert len(_data_names(s3)) == 3
    assert ".tensorfile-manager.lock" not in keys  # released by close()
    # A new manager (a reader too) sees the same run.
    reader = tensorfile.CheckpointManager(s3.url("run/"), read_only=True)
    assert reader.steps() == [100, 200, 300]
    assert reader.load()["step"] == 300


def test_a_run_prefix_does_not_see_a_sibling_prefix(s3: S3Bucket) -> None:
    with tensorfile.CheckpointManager(s3.url("run")) as a:
        a.save(1, _obj(1))
    with tensorfile.CheckpointManager(s3.url("run2")) as b:
        assert b.steps() == []
        b.save(2, _obj(2))
    with tensorfile.CheckpointManager(s3.url("run")) as a:
        assert a.steps() == [1]  # run2's data is not a leftover of run


def test_retention_keep_last_removes_records_and_data(s3: S3Bucket) -> None:
    with tensorfile.CheckpointManager(s3.url("run"), keep_last=2, keep_every=10) as mgr:
        for step in range(1, 13):
            mgr.save(step, _obj(step))
        assert mgr.steps() == [10, 11, 12]
    data = _data_names(s3)
    assert sorted(n.split(".")[0] for n in data) == [
        "step-00000010",
        "step-00000011",
        "step-00000012",
    ]
    assert sorted(k for k in _run_keys(s3) if k.endswith(".json")) == [
        "step-00000010.json",
        "step-00000011.json",
        "step-00000012.json",
    ]


def test_resaving_a_step_replaces_its_data(s3: S3Bucket) -> None:
    with tensorfile.CheckpointManager(s3.url("run")) as mgr:
        mgr.save(5, _obj(5))
        first = mgr.path(5)
        mgr.save(5, {**_obj(5), "tag": "again"})
        assert mgr.path(5) != first
        assert mgr.load(5)["tag"] == "again"
    assert len(_data_names(s3)) == 1


def test_delete_removes_record_and_data(s3: S3Bucket) -> None:
    with tensorfile.CheckpointManager(s3.url("run")) as mgr:
        mgr.save(1, _obj(1))
        mgr.save(2, _obj(2))
        mgr.delete(2)
        assert mgr.steps() == [1] and mgr.latest() == 1
        with pytest.raises(FileNotFoundError, match="no checkpoint of step 2 to delete"):
            mgr.delete(2)
    (data,) = _data_names(s3)
    assert data.startswith("step-00000001.")
    assert sorted(_run_keys(s3)) == sorted(["step-00000001.json", data])


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_load_skips_a_damaged_data_object_with_a_warning(s3: S3Bucket, damage: str) -> None:
    with tensorfile.CheckpointManager(s3.url("run")) as mgr:
        mgr.save(1, _obj(1))
        mgr.save(2, _obj(2))
        url = mgr.path(2)
        blob = _remote.get_bytes(url)
        if damage == "truncated":
            _remote.put_bytes(url, blob[: len(blob) // 2])
            reason = "holds .* bytes, the commit recorded"
        else:
            # Same size, one byte of the storage flipped: found by the checksum.
            at = blob.index(torch.full((16,), 2.0).numpy().tobytes())
            bad = bytearray(blob)
            bad[at] ^= 0xFF
            _remote.put_bytes(url, bytes(bad))
            reason = "checksum"
        with pytest.warns(RuntimeWarning, match=rf"step 2 in s3://.*{reason}.*loaded step 1"):
            got = mgr.load()
        assert got["step"] == 1
        with pytest.raises(tensorfile.FormatError):
            mgr.load(2)
        if damage == "truncated":
            assert mgr.steps() == [1]


def test_a_record_is_what_commits_data(s3: S3Bucket) -> None:
    # Data without a record is never listed nor loaded, whatever it holds.
    with tensorfile.CheckpointManager(s3.url("run")) as mgr:
        mgr.save(1, _obj(1))
        blob = _remote.get_bytes(mgr.path(1))
    _remote.put_bytes(s3.url("run/step-00000009.0123abcd.tf"), blob)
    reader = tensorfile.CheckpointManager(s3.url("run"), read_only=True)
    assert reader.steps() == [1] and reader.latest() == 1
    assert "step-00000009.0123abcd.tf" in _run_keys(s3)  # a reader removes nothing


def test_a_writer_removes_leftovers_orphans_and_incomplete_uploads(s3: S3Bucket) -> None:
    with tensorfile.CheckpointManager(s3.url("run")) as mgr:
        mgr.save(1, _obj(1))
        kept = mgr.path(1).rsplit("/", 1)[1]
    orphan = "step-00000002.0123abcd.tf"
    _remote.put_bytes(s3.url(f"run/{orphan}"), b"half a save")
    other = "step-00000003.89abcdef.tf"  # not this run's: under another prefix
    _remote.put_bytes(s3.url(f"elsewhere/{other}"), b"x")
    up = s3.client.create_multipart_upload(Bucket=s3.name, Key="run/step-00000004.4567cdef.tf")
    s3.client.upload_part(
        Bucket=s3.name,
        Key="run/step-00000004.4567cdef.tf",
        UploadId=up["UploadId"],
        PartNumber=1,
        Body=b"\0" * (5 * MiB),
    )
    s3.client.create_multipart_upload(Bucket=s3.name, Key="elsewhere/x.tf")
    # moto dates every upload 2010-11-10, before this process started: a killed saver's.
    reader = tensorfile.CheckpointManager(s3.url("run"), read_only=True)
    assert orphan in _run_keys(s3) and len(s3.incomplete_uploads()) == 2
    assert reader.steps() == [1]
    tensorfile.CheckpointManager(s3.url("run")).close()
    assert sorted(_run_keys(s3)) == sorted(["step-00000001.json", kept])
    assert [u["Key"] for u in s3.incomplete_uploads()] == ["elsewhere/x.tf"]
    assert f"elsewhere/{other}" in s3.keys()


def test_an_upload_begun_after_this_process_started_is_not_a_leftover(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    # moto dates uploads 2010-11-10: a process started before that owns them.
    started = dt.datetime(2009, 1, 1, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(_remote, "_process_start", lambda: started)
    s3.client.create_multipart_upload(Bucket=s3.name, Key="run/step-00000004.4567cdef.tf")
    tensorfile.CheckpointManager(s3.url("run")).close()
    assert [u["Key"] for u in s3.incomplete_uploads()] == ["run/step-00000004.4567cdef.tf"]


def test_a_second_writer_is_refused_naming_the_holder(s3: S3Bucket) -> None:
    import os
    import socket

    first = tensorfile.CheckpointManager(s3.url("run"))
    try:
        with pytest.raises(
            BlockingIOError, match=rf"pid {os.getpid()} on {socket.gethostname()}"
        ) as e:
            tensorfile.CheckpointManager(s3.url("run"))
        assert "s3://" in str(e.value) and ".tensorfile-manager.lock" in str(e.value)
        # Readers are not writers.
        assert tensorfile.CheckpointManager(s3.url("run"), read_only=True).steps() == []
        first.save(1, _obj(1))
    finally:
        first.close()
    with tensorfile.CheckpointManager(s3.url("run")) as again:
        assert again.steps() == [1]


def test_an_object_store_run_refuses_what_it_cannot_do(s3: S3Bucket) -> None:
    with pytest.raises(ValueError, match="format='dcp' is not supported on object stores"):
        tensorfile.CheckpointManager(s3.url("run"), format="dcp")
    with pytest.raises(ValueError, match="not the bucket itself"):
        tensorfile.CheckpointManager(s3.url(""))
    assert _run_keys(s3) == []


def test_block_false_saves_commit_in_order_and_snapshot_at_once(s3: S3Bucket) -> None:
    with tensorfile.CheckpointManager(s3.url("run"), keep_last=2) as mgr:
        state = _obj(0)
        futures = []
        for step in range(1, 5):
            state["w"].fill_(float(step))
            state["step"] = step
            futures.append(mgr.save(step, state, block=False))
            state["w"].fill_(-1.0)  # after save returns: not in the checkpoint
        assert [f.result() for f in futures] == [None] * 4
        mgr.wait()
        assert mgr.steps() == [3, 4] and mgr.latest() == 4
        for step in (3, 4):
            got = tensorfile.load(mgr.path(step))
            assert got["step"] == step
            assert torch.equal(got["w"], torch.full((16,), float(step)))
    assert len(_data_names(s3)) == 2


def test_a_failed_block_false_save_is_raised_and_commits_nothing(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tensorfile.CheckpointManager(s3.url("run")) as mgr:
        mgr.save(1, _obj(1))

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise PermissionError(13, "s3://bucket/run: access denied")

        with monkeypatch.context() as m:
            m.setattr(_remote, "upload", refuse)
            fut = mgr.save(2, _obj(2), block=False)
            assert fut is not None
            with pytest.raises(PermissionError, match="access denied"):
                fut.result()
            with pytest.raises(PermissionError, match="access denied"):
                mgr.wait()
        assert mgr.steps() == [1]
    assert sorted(k for k in _run_keys(s3) if k.endswith(".json")) == ["step-00000001.json"]
    assert [n.split(".")[0] for n in _data_names(s3)] == ["step-00000001"]


def test_storage_options_are_for_urls_only(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="storage_options is for object-store URLs"):
        tensorfile.CheckpointManager(tmp_path / "run", storage_options={"region": "x"})


def test_storage_options_reach_the_store(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the environment's endpoint the run is reached through storage_options.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"endpoint_url": s3.endpoint}
    with tensorfile.CheckpointManager(s3.url("run"), storage_options=options) as mgr:
        mgr.save(1, _obj(1))
        assert mgr.load()["step"] == 1
    assert "step-00000001.json" in _run_keys(s3)


def test_without_botocore_a_writer_warns_that_uploads_are_left(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.client.create_multipart_upload(Bucket=s3.name, Key="run/step-00000004.4567cdef.tf")

    def no_botocore(*args: Any, **kwargs: Any) -> list[str]:
        raise ImportError("listing incomplete multipart uploads needs botocore")

    monkeypatch.setattr(_remote, "abort_incomplete_uploads", no_botocore)
    with pytest.warns(RuntimeWarning, match=r"needs botocore.*under s3://.*/run of killed"):
        mgr = tensorfile.CheckpointManager(s3.url("run"))
    mgr.save(1, _obj(1))
    mgr.close()
    assert len(s3.incomplete_uploads()) == 1


def test_damaged_and_oversized_records_are_reported_not_trusted(s3: S3Bucket) -> None:
    with tensorfile.CheckpointManager(s3.url("run")) as mgr:
        mgr.save(1, _obj(1))
    _remote.put_bytes(s3.url("run/step-00000003.json"), b"{not json")
    _remote.put_bytes(s3.url("run/step-00000004.json"), b" " * ((16 << 20) + 1))
    reader = tensorfile.CheckpointManager(s3.url("run"), read_only=True)
    assert reader.steps() == [1]
    with pytest.warns(RuntimeWarning) as caught:
        assert reader.load()["step"] == 1
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2
    assert "step 3 in s3://" in said[0] and "not valid JSON" in said[0]
    assert "step 4 in s3://" in said[1] and "over the 16777216-byte limit" in said[1]
    with pytest.raises(tensorfile.FormatError, match="step 3 is damaged"):
        reader.load(3)


def test_a_killed_writers_lock_blocks_until_deleted_and_is_never_taken_over(
    s3: S3Bucket,
) -> None:
    lock = s3.url("run/.tensorfile-manager.lock")
    _remote.put_bytes(lock, b"pid 4242 on elsewhere since 2026-01-01T00:00:00+00:00 token 0\n")
    with pytest.raises(
        BlockingIOError, match=r"pid 4242 on elsewhere.*delete s3://.*/run/\.tensorfile"
    ):
        tensorfile.CheckpointManager(s3.url("run"))
    assert b"pid 4242" in _remote.get_bytes(lock)  # the refused manager left it alone
    _remote.delete(lock)
    mgr = tensorfile.CheckpointManager(s3.url("run"))
    ours = _remote.get_bytes(lock)
    assert b"pid 4242" not in ours
    # A lock replaced under a manager (deleted by hand, taken by another) is not its own
    # to delete at close().
    _remote.put_bytes(lock, b"pid 7 on another\n")
    mgr.close()
    assert _remote.get_bytes(lock) == b"pid 7 on another\n"
