"""A save that returns leaves a file that loads, even while another thread is changing the
tensors being saved (an optimizer step racing a checkpoint thread): the checksum stored
is that of the bytes that reached the file. What the file holds is then a torn snapshot
(each element from before or after a change), as with torch.save."""

from __future__ import annotations

import threading

import pytest
import tensorfile
import torch
from tensorfile import _engine

SAVES = 4


class Mutator:
    """Adds 1 to every tensor, over and over, on another thread (torch releases the GIL
    inside the add, as in an optimizer's step), until stopped; counts the passes it
    completed."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            torch._foreach_add_(self.tensors, 1.0)
            self.passes += 1

    def __enter__(self) -> Mutator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("durable", [False, True])
def test_save_while_another_thread_modifies_the_tensors(tmp_path, durable):
    big = torch.zeros(8 << 20)  # 32 MiB of float32: written in large chunks
    small = [torch.zeros(1024) for _ in range(200)]  # 4 KiB each: gathered into one write
    paths = [tmp_path / f"ckpt{i}.tf" for i in range(SAVES)]
    with Mutator([big, *small]) as m:
        for p in paths:
            tensorfile.save({"big": big, "small": small}, p, durable=durable)
    assert m.passes > 0  # the tensors did change during the saves
    for p in paths:
        out = tensorfile.load(p)  # verifies every storage's checksum
        # A torn snapshot: every element holds a count of additions some pass had reached.
        for t in (out["big"], *out["small"]):
            assert torch.equal(t, t.round()) and 0 <= float(t.min()) <= float(t.max()) <= m.passes


def test_the_host_write_checksums_the_bytes_it_wrote(tmp_path):
    # The engine's own contract, without the package around it: each returned CRC is that
    # of the region's bytes in the file, however the memory changed meanwhile.
    big = torch.zeros(4 << 20)  # 16 MiB
    small = [torch.zeros(2048) for _ in range(64)]
    regions = [big, *small]
    offsets, cursor = [], 0
    for t in regions:
        offsets.append(cursor)
        cursor += -(-t.nbytes // 4096) * 4096
    path = tmp_path / "raw.bin"
    with Mutator(regions), open(path, "wb+") as f:
        for _ in range(SAVES):
            f.truncate(0)
            crcs = _engine.write_regions(
                fd=f.fileno(),
                ptrs=[t.data_ptr() for t in regions],
                nbytes=[t.nbytes for t in regions],
                file_offsets=offsets,
                num_threads=2,
                task_nbytes=1 << 20,
                checksum=True,
                path=str(path),
            )
            raw = path.read_bytes()
            wrong = [
                i
                for i, (o, t, c) in enumerate(zip(offsets, regions, crcs.tolist()))
                if _engine.crc32c(raw[o : o + t.nbytes]) != c
            ]
            assert wrong == [], f"regions {wrong} were written with another checksum"


def test_a_save_to_a_stream_fails_when_a_tensor_changes_during_it():
    import io

    w = torch.zeros(1 << 20)

    class Racing(io.BytesIO):
        def write(self, data):  # the header went first; the data's first chunk races
            if self.tell() > 0:
                w.add_(1)
            return super().write(data)

    with pytest.raises(RuntimeError, match="storage 0 changed while it was being written"):
        tensorfile.save({"w": w}, Racing())
