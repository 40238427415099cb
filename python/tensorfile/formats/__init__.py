"""The file formats tensorfile reads, and the one table that tells them apart by their
first bytes (never by the file name). Each format parses bytes into a `Layout`."""

from __future__ import annotations

from . import native, safetensors, torchzip

# (name, test of the first PREAMBLE_NBYTES bytes), in the order they are tried.
SNIFFERS = (
    ("tensorfile", native.looks_like),
    ("torch.save", torchzip.looks_like),
    ("safetensors", safetensors.looks_like),
)
# Protocol 2-5 pickles: legacy (pre-1.6) torch.save files and plain pickles.
_PICKLE_PREFIXES = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def sniff(head: bytes) -> str:
    """The format whose first bytes `head` holds: "tensorfile", "torch.save",
    "safetensors", "pickle" or "unknown"."""
    for name, looks_like in SNIFFERS:
        if looks_like(head):
            return name
    if head[:2] in _PICKLE_PREFIXES:
        return "pickle"
    return "unknown"
