"""The exceptions tensorfile raises for bad files; the engine maps its errors to these."""

from __future__ import annotations


class FormatError(ValueError):
    """The bytes are not a valid file: malformed, hostile, truncated or damaged."""


class ChecksumError(FormatError):
    """A checksum does not match: the file was damaged after it was written."""


class CudaError(RuntimeError):
    """A CUDA runtime or cuFile call failed; `call` names it and `name` is the library's
    name for the error code (e.g. "cudaErrorIllegalAddress")."""

    def __init__(self, message: str, call: str = "", name: str = "") -> None:
        super().__init__(message)
        self.call = call
        self.name = name
