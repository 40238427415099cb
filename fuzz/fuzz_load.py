"""Coverage-guided fuzzing (atheris) of tensorfile.load over arbitrary bytes.

Every input must either load or raise tensorfile.FormatError; anything else (another
exception, a crash, a hang, a memory blow-up) is a finding. Run:

    python fuzz/fuzz_load.py NEW_CORPUS_DIR fuzz/corpus -max_total_time=60 -rss_limit_mb=2048

New inputs go to the first directory; fuzz/corpus holds the checked-in seeds and every
input that ever crashed (add it there as a regression file).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import atheris
import tensorfile
from tensorfile import FormatError
from tensorfile.formats import layout_difference, native

_DIR = tempfile.mkdtemp(prefix="tensorfile-fuzz-")
_PATH = os.path.join(_DIR, "input.tf")


def _fix_up(data: bytes) -> bytes:
    """Rewrites the preamble's file size and header checksum to match the bytes, so that
    mutations get past the checksum and reach the header validator."""
    if len(data) < native.PREAMBLE_NBYTES:
        return data
    magic, major, minor, _crc, hlen, _flen = native.PREAMBLE.unpack_from(data)
    header = data[native.PREAMBLE_NBYTES : native.PREAMBLE_NBYTES + hlen]
    draft = native.PREAMBLE.pack(magic, major, minor, 0, hlen, len(data))
    pre = native.PREAMBLE.pack(
        magic, major, minor, native.header_crc(draft, header), hlen, len(data)
    )
    return pre + data[native.PREAMBLE_NBYTES :]


def _same_as_reference(data: bytes) -> None:
    """The engine's header decoder may decline anything, but what it accepts the
    reference validator must accept too, with the same Layout."""
    try:
        pre = native.parse_preamble(data[: native.PREAMBLE_NBYTES], len(data), "input")
    except FormatError:
        return
    header = data[native.PREAMBLE_NBYTES : native.PREAMBLE_NBYTES + pre.header_nbytes]
    if len(header) != pre.header_nbytes:
        return
    fast = native.decode_fast(header, pre)
    if fast is None:
        return
    try:
        ref = native.parse_header_reference(header, pre, "input")
    except FormatError as e:
        raise AssertionError(f"the engine accepted a header the reference refuses: {e}") from None
    field = layout_difference(fast, ref)
    if field is not None:
        raise AssertionError(f"the engine and the reference disagree on {field}")


def test_one_input(raw: bytes) -> None:
    # The first byte picks the mode: odd values fix the preamble up (see _fix_up).
    if not raw:
        return
    data = _fix_up(raw[1:]) if raw[0] & 1 else raw[1:]
    _same_as_reference(data)
    with open(_PATH, "wb") as f:
        f.write(data)
    for source in (_PATH, io.BytesIO(data)):
        try:
            tensorfile.load(source, num_threads=2)
        except FormatError:
            pass
    try:
        with tensorfile.open(_PATH) as r:
            for key in r.keys()[:4]:
                try:
                    r.get(key)
                except (FormatError, KeyError):
                    pass
    except FormatError:
        pass


def main() -> None:
    # Instrument the Python code loaded so far (tensorfile's own included) for coverage
    # feedback; instrument_all patches code objects in place, so every reference sees it.
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
