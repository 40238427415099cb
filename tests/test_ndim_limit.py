"""The format holds at most 64 dimensions per tensor: what save and convert would write
beyond that the reader refuses, so both refuse it first, naming the tensor."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import tensorfile  # noqa: E402
from tensorfile.formats import native  # noqa: E402


def test_save_refuses_more_dimensions_than_the_format_holds(tmp_path):
    path = tmp_path / "deep.tf"
    tensorfile.save({"ok": torch.zeros([1] * native.MAX_NDIM)}, path)
    assert tensorfile.load(path)["ok"].dim() == native.MAX_NDIM
    with pytest.raises(
        TypeError, match=r"key path 'x\.y': it has 71 dimensions; the format holds at most 64"
    ):
        tensorfile.save({"x": {"y": torch.zeros([1] * 71)}}, path)
    # the refused save left the earlier file whole
    assert tensorfile.load(path)["ok"].dim() == native.MAX_NDIM


def test_convert_refuses_a_safetensors_tensor_with_too_many_dimensions(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = tmp_path / "deep.safetensors"
    safetensors_torch.save_file({"t": torch.zeros([1] * 100)}, str(src))
    dst = tmp_path / "out.tf"
    p = subprocess.run(
        [sys.executable, "-m", "tensorfile", "convert", str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1, p
    assert "tensor 0 has 100 dimensions" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(dst)
