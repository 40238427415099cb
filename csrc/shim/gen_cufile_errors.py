"""Writes cufile_errors.inc (CUfileOpError's codes and names) from a cufile.h:

    python csrc/shim/gen_cufile_errors.py path/to/cufile.h > csrc/shim/cufile_errors.inc

The header lists them as CUFILE_OP(CUFILEOP_BASE_ERR + n, NAME, text) entries;
tests/test_cufile_errors.py checks the table against a header where one is installed."""

from __future__ import annotations

import re
import sys

ENTRY = re.compile(
    r"CUFILE_OP\(\s*(?:CUFILEOP_BASE_ERR\s*\+\s*)?(\d+)\s*,\s*(CU_FILE_[A-Z0-9_]+)\s*,"
)
BASE = re.compile(r"#define\s+CUFILEOP_BASE_ERR\s+(\d+)")


def entries(header: str) -> list[tuple[int, str]]:
    """(code, name) of every CUfileOpError in the text of cufile.h."""
    base = int(BASE.search(header).group(1))  # type: ignore[union-attr]
    out = []
    for m in ENTRY.finditer(header):
        relative = "CUFILEOP_BASE_ERR" in m.group(0)
        out.append((int(m.group(1)) + (base if relative else 0), m.group(2)))
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        table = entries(f.read())
    print("// CUfileOpError codes and names, generated from cufile.h by gen_cufile_errors.py.")
    for code, name in table:
        print(f"TF_CUFILE_ERROR({code}, {name})")


if __name__ == "__main__":
    main()
