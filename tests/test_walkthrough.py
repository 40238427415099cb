"""The reference save/load walkthrough, with tensorfile in place of torch.save/torch.load:
a tensor, a list, a dict, then a model's parameters restored into a fresh clone; and the
same steps with numpy arrays."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tensorfile
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # The walkthrough uses bare relative file names; run it in a scratch directory.
    monkeypatch.chdir(tmp_path)


def test_version_and_exports():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version and tensorfile.__version__ == version.group(1)
    documented = {"save", "load", "open", "TensorFile", "FormatError", "ChecksumError"}
    assert documented | {"__version__"} <= set(tensorfile.__all__)
    assert issubclass(tensorfile.FormatError, ValueError)
    assert issubclass(tensorfile.ChecksumError, tensorfile.FormatError)


def test_open_reads_what_save_wrote():
    x = torch.arange(6.0).reshape(2, 3)
    tensorfile.save({"x": x, "step": 3}, "ckpt.tf", metadata={"run": "a"})
    with tensorfile.open("ckpt.tf") as f:
        assert type(f) is tensorfile.TensorFile
        assert f.keys() == ["x"] and f.metadata() == {"run": "a"}
        assert torch.equal(f.get("x"), x)
        assert f.load()["step"] == 3


def test_bad_and_damaged_files_raise_the_documented_errors():
    Path("junk.tf").write_bytes(b"\x00" * 64)
    with pytest.raises(tensorfile.FormatError, match=r"junk\.tf"):
        tensorfile.load("junk.tf")
    tensorfile.save({"b": torch.full((4096,), 7, dtype=torch.uint8)}, "b.tf")
    raw = bytearray(Path("b.tf").read_bytes())
    at = raw.index(b"\x07" * 4096) + 100
    raw[at] = 8  # one flipped byte in the tensor's storage
    Path("b.tf").write_bytes(bytes(raw))
    with pytest.raises(tensorfile.ChecksumError, match=r"b\.tf"):
        tensorfile.load("b.tf")
    damaged = tensorfile.load("b.tf", verify=False)["b"]  # the bytes as they are on disk
    assert int(damaged[100]) == 8 and int((damaged == 7).sum()) == 4095


# --------------------------------------------------------------------------- torch


def test_tensor():
    x = torch.arange(4)
    tensorfile.save(x, "x-file")
    x2 = tensorfile.load("x-file")
    assert type(x2) is torch.Tensor
    assert x2.dtype == torch.int64
    assert torch.equal(x2, x)


def test_list_of_tensors():
    x = torch.arange(4)
    y = torch.zeros(4)
    tensorfile.save([x, y], "x-files")
    x2, y2 = tensorfile.load("x-files")
    assert torch.equal(x2, x) and x2.dtype == x.dtype
    assert torch.equal(y2, y) and y2.dtype == y.dtype


def test_dict_of_tensors():
    x = torch.arange(4)
    y = torch.zeros(4)
    mydict = {"x": x, "y": y}
    tensorfile.save(mydict, "mydict")
    mydict2 = tensorfile.load("mydict")
    assert list(mydict2) == ["x", "y"]
    assert torch.equal(mydict2["x"], x)
    assert torch.equal(mydict2["y"], y)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(20, 256)
        self.output = nn.Linear(256, 10)

    def forward(self, x):
        return self.output(torch.relu(self.hidden(x)))


def test_mlp_parameters():
    torch.manual_seed(0)
    net = MLP()
    X = torch.randn(size=(2, 20))
    Y = net(X)
    tensorfile.save(net.state_dict(), "mlp.params")

    torch.manual_seed(1)  # the clone starts from different weights
    clone = MLP()
    assert not torch.equal(clone.hidden.weight, net.hidden.weight)
    result = clone.load_state_dict(tensorfile.load("mlp.params"))
    assert not result.missing_keys and not result.unexpected_keys
    clone.eval()
    Y_clone = clone(X)
    assert Y_clone.shape == (2, 10)
    assert bool((Y_clone == Y).all())


def test_sequential_mlp_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))
    X = torch.randn(2, 20)
    tensorfile.save(net.state_dict(), "mlp.params")
    clone = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))
    clone.load_state_dict(tensorfile.load("mlp.params"))
    with torch.no_grad():
        assert bool((clone(X) == net(X)).all())


# --------------------------------------------------------------------------- numpy


def test_numpy_array():
    x = np.arange(4)
    tensorfile.save(x, "x-file")
    x2 = tensorfile.load("x-file")
    assert type(x2) is np.ndarray and x2.dtype == x.dtype
    np.testing.assert_array_equal(x2, x)


def test_numpy_list():
    x = np.arange(4)
    y = np.zeros(4)
    tensorfile.save([x, y], "x-files")
    x2, y2 = tensorfile.load("x-files")
    assert x2.dtype == x.dtype and y2.dtype == y.dtype
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_numpy_dict():
    x = np.arange(4)
    y = np.zeros(4)
    tensorfile.save({"x": x, "y": y}, "mydict")
    mydict2 = tensorfile.load("mydict")
    assert list(mydict2) == ["x", "y"]
    np.testing.assert_array_equal(mydict2["x"], x)
    np.testing.assert_array_equal(mydict2["y"], y)


def _np_mlp(params, X):
    h = np.maximum(X @ params["hidden.weight"].T + params["hidden.bias"], 0)
    return h @ params["output.weight"].T + params["output.bias"]


def test_numpy_mlp_parameters():
    rng = np.random.default_rng(0)
    params = {
        "hidden.weight": rng.standard_normal((256, 20), dtype=np.float32),
        "hidden.bias": rng.standard_normal(256, dtype=np.float32),
        "output.weight": rng.standard_normal((10, 256), dtype=np.float32),
        "output.bias": rng.standard_normal(10, dtype=np.float32),
    }
    X = rng.standard_normal((2, 20), dtype=np.float32)
    Y = _np_mlp(params, X)
    tensorfile.save(params, "mlp.params")

    clone = {k: np.zeros_like(v) for k, v in params.items()}
    loaded = tensorfile.load("mlp.params")
    assert list(loaded) == list(params)
    for k, v in loaded.items():
        assert v.dtype == clone[k].dtype and v.shape == clone[k].shape
        clone[k][...] = v
    Y_clone = _np_mlp(clone, X)
    assert Y_clone.shape == (2, 10)
    assert bool((Y_clone == Y).all())
