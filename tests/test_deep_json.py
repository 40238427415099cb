"""A header nested a million deep is refused before any JSON parser sees it, whatever
the interpreter's recursion limit: no C stack overflow, a FormatError naming the file."""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import sys
sys.setrecursionlimit(10**7)  # the caller raised it: json's C parser would then overflow
import tensorfile
from tensorfile.formats import native
deep = "[" * 1_000_000 + "]" * 1_000_000
hdr = ('{"tree":' + deep + ',"tensors":[],"storages":[],"metadata":{},"crc32c":""}').encode()
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(native.make_preamble(bytearray(hdr), 32 + len(hdr)) + hdr)
for how in ("load", "open", "verify"):
    try:
        if how == "load":
            tensorfile.load(path)
        elif how == "open":
            tensorfile.open(path)
        else:
            from tensorfile import _convert
            _convert.verify(path)
    except tensorfile.FormatError as e:
        print(how, e)
"""


def test_a_million_deep_native_header_is_refused_by_name(tmp_path):
    path = tmp_path / "deep.tf"
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["load", "open", "verify"]
    for line in lines:
        assert f"{path}: invalid header: JSON nested more than 1000 deep" in line
