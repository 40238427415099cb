"""tensorfile.async_save: snapshot, return at once, write in the background, pool reuse."""

from __future__ import annotations

import collections
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorfile
import tensorfile._async as tfa
import tensorfile._io
import torch
from _util import assert_same


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_caller_may_mutate_right_after_return(tmp_path: Path) -> None:
    w = torch.randn(512, 512)
    obj = {"w": w, "b": torch.arange(10), "step": 3}
    want = {"w": w.clone(), "b": obj["b"].clone(), "step": 3}
    fut = tensorfile.async_save(obj, tmp_path / "x.tf")
    w.fill_(7.0)  # keep training: the saved file must not see this
    obj["b"].zero_()
    obj["step"] = 4
    assert fut.result(timeout=60) is None
    assert fut.path == str(tmp_path / "x.tf")
    assert_same(want, tensorfile.load(tmp_path / "x.tf"))


def test_structure_sharing_and_flags_survive(tmp_path: Path) -> None:
    base = torch.arange(100, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(3, 4))
    g = torch.randn(5, requires_grad=True)
    obj = collections.OrderedDict(
        base=base,
        view=base[10:20],
        strided=base.view(10, 10).t(),
        p=p,
        g=g,
        half=torch.randn(7).half(),
        empty=torch.empty(0, 3),
        arr=np.arange(12, dtype=np.int32).reshape(3, 4),
        nested={1: [torch.tensor(True), (2.5, "s", None)]},
        size=torch.Size([2, 3]),
    )
    tensorfile.async_save(obj, tmp_path / "x.tf", durable=False).result(timeout=60)
    back = tensorfile.load(tmp_path / "x.tf")
    assert_same(obj, back)
    assert back["view"].untyped_storage().data_ptr() == back["base"].untyped_storage().data_ptr()
    assert type(back["p"]) is torch.nn.Parameter and back["g"].requires_grad


def test_bad_objects_raise_at_once_and_io_errors_from_result(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"key path 'a\.1'"):
        tensorfile.async_save(
            {"a": [torch.zeros(1), torch.zeros(2).to_sparse()]}, tmp_path / "x.tf"
        )
    with pytest.raises(TypeError, match="must be a path"):
        tensorfile.async_save({"a": torch.zeros(1)}, io.BytesIO())  # type: ignore[arg-type]
    fut = tensorfile.async_save({"a": torch.zeros(1)}, tmp_path / "missing" / "x.tf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fut.result(timeout=60)
    assert isinstance(fut.exception(), FileNotFoundError)


def test_a_second_save_to_the_same_path_waits_for_the_first(
    tmp_path: Path, monkeypatch: Any
) -> None:
    events: list[str] = []
    real = tensorfile._io.save

    def slow_save(obj: Any, f: Any, **kwargs: Any) -> None:
        events.append(f"start {obj['v']}")
        if obj["v"] == 1:
            time.sleep(0.5)
        real(obj, f, **kwargs)
        events.append(f"end {obj['v']}")

    monkeypatch.setattr(tensorfile._io, "save", slow_save)
    t = torch.zeros(1000)
    first = tensorfile.async_save({"v": 1, "t": t}, tmp_path / "x.tf")
    t.fill_(2)
    second = tensorfile.async_save({"v": 2, "t": t}, tmp_path / "x.tf")
    other = tensorfile.async_save({"v": 3, "t": t}, tmp_path / "y.tf")  # another path: no wait
    second.result(timeout=60)
    other.result(timeout=60)
    assert first.done()
    assert events.index("end 1") < events.index("start 2")
    assert events.index("start 3") < events.index("end 1")
    got = tensorfile.load(tmp_path / "x.tf")
    assert got["v"] == 2 and bool((got["t"] == 2).all())


def test_ten_saves_in_a_row_reuse_the_pool(tmp_path: Path) -> None:
    tfa.clear_pool()
    before_allocs = tfa._pool.allocations
    obj = {f"layer{i}": torch.randn(1 << 20) for i in range(16)}  # 64 MiB
    rss = []
    for _ in range(10):
        for t in obj.values():
            t.add_(1)
        tensorfile.async_save(obj, tmp_path / "ckpt.tf", durable=False).result(timeout=120)
        rss.append(_rss())
    back = tensorfile.load(tmp_path / "ckpt.tf")
    assert all(torch.equal(back[k], obj[k]) for k in obj)
    assert tfa._pool.allocations - before_allocs == 1  # one buffer, lent ten times
    growth = rss[-1] - rss[1]
    assert growth < 16 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 8 saves: {rss}"
    tfa.clear_pool()
    assert tfa._pool.idle_nbytes() == 0


def test_concurrent_saves_use_separate_buffers(tmp_path: Path) -> None:
    tensors = [torch.full((1 << 18,), float(i)) for i in range(4)]
    futs = []
    threads = [
        threading.Thread(
            target=lambda i=i: futs.append(
                tensorfile.async_save({"t": tensors[i]}, tmp_path / f"{i}.tf")
            )
        )
        for i in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for f in futs:
        f.result(timeout=60)
    for i in range(4):
        assert bool((tensorfile.load(tmp_path / f"{i}.tf")["t"] == i).all())


def test_snapshot_keeps_the_storages_apart(tmp_path):
    """Each original storage is a storage of its own in the file, so reading one tensor
    back reads only its bytes, and sharing is kept exactly where it was."""
    big = torch.randn(1000)
    obj = {"a": big, "a_view": big[10:20], "b": torch.ones(3), "c": torch.arange(5)}
    path = tmp_path / "apart.tf"
    tensorfile.async_save(obj, path).result()
    with tensorfile.open(path) as f:
        lay = f._reader.layout
        assert len(lay.storage_kind) == 3
        assert sorted(int(n) for n in lay.storage_nbytes) == [12, 40, 4000]
    got = tensorfile.load(path)
    assert got["a_view"].untyped_storage().data_ptr() == got["a"].untyped_storage().data_ptr()
    assert got["b"].untyped_storage().data_ptr() != got["a"].untyped_storage().data_ptr()
    assert torch.equal(got["a_view"], big[10:20])


def test_saved_from_records_the_original_device(tmp_path):
    """What async_save does for snapshots of CUDA tensors, checked on the CPU: the file
    records the device the tensor came from, and map_location brings it to the CPU."""
    from tensorfile import _io

    t = torch.arange(4.0)
    path = tmp_path / "dev.tf"
    _io.save(
        {"t": t, "u": torch.ones(1)},
        str(path),
        durable=True,
        num_threads=None,
        metadata=None,
        saved_from={id(t): "cuda:1"},
    )
    with tensorfile.open(path) as f:
        assert f._reader.layout.storage_device == ["cuda:1", "cpu"]
    assert torch.equal(tensorfile.load(path, map_location="cpu")["t"], t)
