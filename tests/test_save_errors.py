"""Refusals at save time: a TypeError naming the key path of what cannot be saved, and a
failed save never damages the target nor leaves a temporary file behind."""

from __future__ import annotations

import collections
import errno
import io
import os
import warnings

import numpy as np
import pytest
import tensorfile
import torch
from tensorfile import _engine


class Custom:
    pass


Point = collections.namedtuple("Point", "x y")


class MyTensor(torch.Tensor):
    pass


def _cycle():
    a = [1]
    a.append(a)
    return a


def _quiet(make):
    """Builds an object whose constructor warns (beta or deprecated torch features)."""

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make()

    return build


def _quantized():
    return torch.quantize_per_tensor(torch.randn(4), scale=0.1, zero_point=0, dtype=torch.quint8)


UNSUPPORTED = {
    "set": lambda: {1, 2},
    "frozenset": lambda: frozenset({1}),
    "lambda": lambda: lambda x: x,
    "function": lambda: print,
    "custom-class": Custom,
    "class-object": lambda: Custom,
    "namedtuple": lambda: Point(1, 2),
    "dict-subclass": lambda: collections.defaultdict(list),
    "sparse-tensor": lambda: torch.eye(3).to_sparse(),
    "sparse-csr-tensor": _quiet(lambda: torch.eye(3).to_sparse_csr()),
    "meta-tensor": lambda: torch.empty(3, device="meta"),
    "quantized-tensor": _quiet(_quantized),
    "self-containing-list": _cycle,
    "tensor-subclass": lambda: torch.ones(2).as_subclass(MyTensor),
    "object-array": lambda: np.array([1, "a"], dtype=object),
    "string-array": lambda: np.array(["ab", "c"]),
    "big-endian-array": lambda: np.arange(3, dtype=">i4"),
    "structured-array": lambda: np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]),
    "datetime-array": lambda: np.array(["2020-01-01"], dtype="datetime64[D]"),
    "numpy-str-scalar": lambda: np.str_("x"),
    "module": lambda: torch.nn.Linear(2, 2),
    "generator": lambda: (i for i in range(3)),
    "range": lambda: range(3),
    "ellipsis": lambda: ...,
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_object_names_its_key_path(tmp_path, name):
    bad = UNSUPPORTED[name]()
    obj = {
        "model": {"layers": [torch.ones(1), torch.ones(2), {"ok": 1}, bad]},
        "other": torch.zeros(3),
    }
    path = tmp_path / "bad.tf"
    with pytest.raises(TypeError) as e:
        tensorfile.save(obj, path)
    assert "model.layers.3" in str(e.value)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_key_path_at_root_and_in_tuples(tmp_path):
    with pytest.raises(TypeError, match="<root>"):
        tensorfile.save({1, 2}, tmp_path / "a.tf")
    with pytest.raises(TypeError, match=r"x\.1\.0"):
        tensorfile.save({"x": (1, [{3}])}, tmp_path / "a.tf")
    with pytest.raises(TypeError, match=r"state\.5\.buf"):
        tensorfile.save({"state": {5: {"buf": object()}}}, tmp_path / "a.tf")


def test_cycle_through_a_dict(tmp_path):
    d: dict = {"a": {}}
    d["a"]["back"] = d
    with pytest.raises(TypeError, match=r"a\.back"):
        tensorfile.save(d, tmp_path / "a.tf")


def test_shared_but_acyclic_containers_are_fine(tmp_path):
    inner = [torch.ones(2)]
    obj = {"a": inner, "b": inner, "c": (inner, inner)}
    tensorfile.save(obj, tmp_path / "a.tf")
    out = tensorfile.load(tmp_path / "a.tf")
    assert out["a"][0] is out["b"][0] is out["c"][1][0]


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(torch.ones(1), id="tensor"),
        pytest.param(Custom(), id="custom"),
        pytest.param(frozenset({1}), id="frozenset"),
    ],
)
def test_unsupported_dict_keys(tmp_path, key):
    with pytest.raises(TypeError, match=r"model"):
        tensorfile.save({"model": {key: 1}}, tmp_path / "a.tf")


def test_too_deep(tmp_path):
    obj = 1
    for _ in range(250):
        obj = [obj]
    with pytest.raises(TypeError, match="nested"):
        tensorfile.save(obj, tmp_path / "a.tf")
    assert os.listdir(tmp_path) == []


def test_dtype_of_unsupported_numpy_scalar(tmp_path):
    with pytest.raises(TypeError, match=r"v\.0"):
        tensorfile.save({"v": [np.longdouble(1)]}, tmp_path / "a.tf")


def test_save_to_a_directory_or_missing_directory(tmp_path):
    with pytest.raises(IsADirectoryError):
        tensorfile.save(torch.ones(1), tmp_path)
    with pytest.raises(FileNotFoundError):
        tensorfile.save(torch.ones(1), tmp_path / "no" / "such.tf")


def test_save_to_a_non_file(tmp_path):
    with pytest.raises(TypeError):
        tensorfile.save(torch.ones(1), 12345.5)


# --------------------------------------------------------------------------- the target survives


def _old_file(tmp_path):
    path = tmp_path / "ckpt.tf"
    tensorfile.save({"version": 1, "w": torch.arange(10.0)}, path)
    return path, path.read_bytes()


@pytest.mark.parametrize(
    "name", ["set", "sparse-tensor", "self-containing-list", "tensor-subclass"]
)
def test_failed_save_keeps_existing_file(tmp_path, name):
    path, before = _old_file(tmp_path)
    with pytest.raises(TypeError):
        tensorfile.save({"version": 2, "bad": UNSUPPORTED[name]()}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.tf"]
    assert tensorfile.load(path)["version"] == 1


def test_bad_metadata_keeps_existing_file(tmp_path):
    path, before = _old_file(tmp_path)
    with pytest.raises(TypeError):
        tensorfile.save({"version": 2}, path, metadata={"a": 1})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.tf"]


@pytest.fixture
def write_fault():
    """Arms the engine's write fault hook; always disarms it."""

    def arm(countdown, error_number):
        _engine._inject_write_fault(countdown, error_number)

    try:
        yield arm
    finally:
        _engine._inject_write_fault(0, 0)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
def test_write_error_keeps_existing_file(tmp_path, write_fault, err):
    path, before = _old_file(tmp_path)
    big = {"version": 2, "big": torch.randn(512 * 1024)}  # 2 MiB
    write_fault(1, err)
    with pytest.raises(OSError) as e:
        tensorfile.save(big, path)
    assert e.value.errno == err
    assert str(path) in str(e.value)
    assert "intact" in str(e.value)
    assert path.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tftmp")]
    assert os.listdir(tmp_path) == ["ckpt.tf"]
    # disarmed: the next save works
    _engine._inject_write_fault(0, 0)
    tensorfile.save(big, path)
    assert tensorfile.load(path)["version"] == 2


def test_write_error_without_existing_file(tmp_path, write_fault):
    path = tmp_path / "new.tf"
    write_fault(1, errno.ENOSPC)
    with pytest.raises(OSError) as e:
        tensorfile.save({"big": torch.randn(512 * 1024)}, path)
    assert e.value.errno == errno.ENOSPC
    assert str(path) in str(e.value)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_write_error_in_a_later_region(tmp_path, write_fault, monkeypatch):
    # Many regions and small tasks: the fault hits the middle of the data phase.
    monkeypatch.setenv("TENSORFILE_TASK_NBYTES", "65536")
    path, before = _old_file(tmp_path)
    obj = {f"t{i}": torch.randn(100_000) for i in range(6)}
    write_fault(7, errno.ENOSPC)
    with pytest.raises(OSError, match="intact"):
        tensorfile.save(obj, path, num_threads=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.tf"]


def test_interrupted_save_keeps_existing_file(tmp_path, monkeypatch):
    # Any exception between creating the temporary file and the rename (here a
    # KeyboardInterrupt during fsync) removes the temporary file and keeps the target.
    path, before = _old_file(tmp_path)

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tensorfile.save({"version": 2, "w": torch.ones(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.tf"]


def test_stream_save_of_unsupported_object_writes_nothing():
    buf = io.BytesIO()
    with pytest.raises(TypeError, match=r"a\.b"):
        tensorfile.save({"a": {"b": {1}}}, buf)
    assert buf.getvalue() == b""


def test_save_through_a_symlink_replaces_the_target(tmp_path):
    real = tmp_path / "real.tf"
    link = tmp_path / "link.tf"
    tensorfile.save(torch.zeros(2), real)
    link.symlink_to(real)
    tensorfile.save(torch.ones(2), link)
    assert link.is_symlink()
    assert torch.equal(tensorfile.load(real), torch.ones(2))


def test_clean_removes_only_stale_temporaries(tmp_path):
    import socket

    host = socket.gethostname().replace(".", "_")[:32]
    # pid 2**22 + 1 is above Linux's pid_max limit: that writer cannot be alive
    stale = tmp_path / f".ckpt.tf.{host}.{2**22 + 1}.abcd1234.tftmp"
    live = tmp_path / f".ckpt.tf.{host}.{os.getpid()}.abcd1234.tftmp"
    other_host = tmp_path / f".ckpt.tf.otherhost.{2**22 + 1}.abcd1234.tftmp"
    unrelated = tmp_path / "notes.txt"
    for p in (stale, live, other_host, unrelated):
        p.write_bytes(b"x")
    removed = tensorfile.clean(tmp_path)
    assert removed == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, other_host, unrelated)
    )
