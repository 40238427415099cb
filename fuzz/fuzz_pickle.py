"""Coverage-guided fuzzing (atheris) of the torch.save reader's unpickler, by structure.

Each input is a program that writes a pickle: opcodes chosen from every protocol, memo
indices small and huge, frames of true and false lengths, and runs of one opcode
repeated up to 50,000 times, which is how deep nesting and memo bombs are built. The
pickle becomes the data.pkl of a torch.save zip (with one 8-byte storage record) that
tensorfile.load and tensorfile.open must either read or refuse with FormatError, in
time and memory in proportion to its size. Inputs whose first byte is odd are a raw
data.pkl instead, for mutations below the structure. Run:

    python fuzz/fuzz_pickle.py NEW_CORPUS_DIR fuzz/corpus -max_total_time=60 -rss_limit_mb=2048

fuzz/corpus holds the seeds and every input that ever failed (`pickle-*` files are this
target's; the two targets replay each other's files too).
"""

from __future__ import annotations

import io
import struct
import sys
import zipfile

import atheris
import tensorfile
from tensorfile import FormatError

_MAX_REPEAT = 50_000
_MAX_PICKLE = 256 << 10  # a program stops adding opcodes past this many bytes (instrumented
# Python runs some fifty times slower, and -timeout applies to it)


def _u(s: bytes) -> bytes:
    return b"X" + struct.pack("<I", len(s)) + s


# Pieces a program is made of: fixed opcodes, and those whose argument it chooses.
_FIXED = [
    b"(", b".", b"0", b"1", b"2", b"N", b"\x88", b"\x89", b")", b"]", b"}", b"\x8f",
    b"t", b"\x85", b"\x86", b"\x87", b"l", b"d", b"a", b"e", b"s", b"u", b"\x90", b"\x91",
    b"R", b"b", b"\x81", b"\x92", b"\x93", b"\x94", b"Q", b"o",
]  # fmt: skip
_GLOBALS = [
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ctorch._tensor\n_rebuild_from_type_v2\n",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nDoubleStorage\n",
    b"ctorch\nTensor\n",
    b"ctorch\nSize\n",
    b"ctorch\ndevice\n",
    b"ccollections\nOrderedDict\n",
    b"ccollections\nCounter\n",
    b"c__builtin__\nset\n",
    b"c__builtin__\nbytearray\n",
    b"c__builtin__\ncomplex\n",
    b"c_codecs\nencode\n",
    b"cos\nsystem\n",
]
_STRINGS = [b"storage", b"0", b"cpu", b"cuda:0", b"mps", b"conj", b"neg", b"latin1", b"w"]


def _piece(fdp: atheris.FuzzedDataProvider) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 15)
    if kind <= 4:
        return _FIXED[fdp.ConsumeIntInRange(0, len(_FIXED) - 1)]
    if kind == 5:
        return _GLOBALS[fdp.ConsumeIntInRange(0, len(_GLOBALS) - 1)]
    if kind == 6:
        return _u(_STRINGS[fdp.ConsumeIntInRange(0, len(_STRINGS) - 1)])
    if kind == 7:  # small ints, offsets, sizes
        return b"K" + bytes([fdp.ConsumeIntInRange(0, 255)])
    if kind == 8:  # big ints: LONG1 of up to 9 bytes, or BININT
        n = fdp.ConsumeIntInRange(0, 9)
        return b"\x8a" + bytes([n]) + fdp.ConsumeBytes(n).ljust(n, b"\xff")
    if kind == 9:  # memo writes: small, near 2^29, or anything
        index = [fdp.ConsumeIntInRange(0, 8), 2**29, fdp.ConsumeIntInRange(0, 2**32 - 1)][
            fdp.ConsumeIntInRange(0, 2)
        ]
        if index < 256 and fdp.ConsumeBool():
            return b"q" + bytes([index])
        return b"r" + struct.pack("<I", index)
    if kind == 10:  # memo reads
        index = fdp.ConsumeIntInRange(0, 8) if fdp.ConsumeBool() else 2**29
        return b"j" + struct.pack("<I", index)
    if kind == 11:  # text PUT/GET with decimal indices, some of them huge
        digits = str(fdp.ConsumeIntInRange(0, 10**6) * 10 ** fdp.ConsumeIntInRange(0, 30))
        return (b"p" if fdp.ConsumeBool() else b"g") + digits.encode() + b"\n"
    if kind == 12:  # FRAME of a true or false length
        return b"\x95" + struct.pack("<Q", fdp.ConsumeIntInRange(0, 2**20))
    if kind == 13:  # bytes and strings of chosen lengths
        n = fdp.ConsumeIntInRange(0, 64)
        body = fdp.ConsumeBytes(n).ljust(n, b"x")
        return [b"C" + bytes([n]) + body, b"\x8c" + bytes([n]) + body, _u(body)][
            fdp.ConsumeIntInRange(0, 2)
        ]
    if kind == 14:  # a float, a protocol header, a persistent id
        return [b"G" + fdp.ConsumeBytes(8).ljust(8, b"\0"), b"\x80\x02", b"\x80\x05"][
            fdp.ConsumeIntInRange(0, 2)
        ]
    return b""


def _program(fdp: atheris.FuzzedDataProvider) -> bytes:
    """The pickle an input describes: pieces, some repeated many times."""
    out = bytearray(b"\x80\x02")
    while fdp.remaining_bytes() and len(out) < _MAX_PICKLE:
        piece = _piece(fdp)
        if fdp.ConsumeIntInRange(0, 7) == 0:  # a run: nesting, chains, bombs
            piece *= fdp.ConsumeIntInRange(1, _MAX_REPEAT)
        out += piece[: _MAX_PICKLE - len(out)]
    return bytes(out + b".")


def torch_zip(pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", struct.pack("<2f", 1.0, 2.0))
    return buf.getvalue()


def test_one_input(raw: bytes) -> None:
    if not raw:
        return
    if raw[0] & 1:
        pkl = raw[1:]
    else:
        pkl = _program(atheris.FuzzedDataProvider(raw[1:]))
    data = torch_zip(pkl)
    # map_location="cpu": a storage the pickle places on a GPU is no finding here
    try:
        tensorfile.load(io.BytesIO(data), map_location="cpu")
    except FormatError:
        pass
    try:
        with tensorfile.open(io.BytesIO(data)) as r:
            for key in r.keys()[:4]:
                try:
                    r.get(key, map_location="cpu")
                except (FormatError, KeyError):
                    pass
    except FormatError:
        pass


def main() -> None:
    # instrument the Python code loaded so far (tensorfile's own included), as fuzz_load does
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
