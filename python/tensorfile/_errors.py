"""The exceptions tensorfile raises for bad files; the engine maps its errors to these."""

from __future__ import annotations


class FormatError(ValueError):
    """The bytes are not a valid file: malformed, hostile, truncated or damaged."""


class ChecksumError(FormatError):
    """A checksum does not match: the file was damaged after it was written."""
