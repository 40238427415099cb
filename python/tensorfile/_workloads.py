"""The demo's payload under its former module name; tensorfile.benchmarks.workloads and tensorfile.benchmarks.rawio are its home."""

from __future__ import annotations

from .benchmarks.rawio import make_durable
from .benchmarks.workloads import build, payload_nbytes, transformer_shapes

__all__ = ["build", "make_durable", "payload_nbytes", "transformer_shapes"]
