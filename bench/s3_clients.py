"""Raw object-store throughput of three Python S3 clients against one local S3 server.

Measures what a client can move, before tensorfile does anything with the bytes: concurrent
ranged GETs of one object into preallocated memory, and a multipart PUT of the same bytes
with parts uploaded concurrently. Clients: obstore (Rust object_store, GIL released during
transfers), boto3 (threads, get_object with Range / upload_part) and s3fs (aiobotocore,
cat_ranges / pipe). Runs are interleaved (client A, B, C, A, B, C, ...) so that drift of a
shared machine hits every client alike; medians are reported with ratios to obstore.

The server is moto's (``moto_server``, started here in its own process on 127.0.0.1), a
single Python process: its throughput bounds every figure, so the ratios say more than the
absolute numbers. Run:

    python bench/s3_clients.py [--mib 512] [--runs 5] [--parts 8,16] [--conc 4,8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from functools import partial
from typing import Callable

import numpy as np

BUCKET = "bench-bucket"
KEY = "object.bin"
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def ranges(nbytes: int, part: int) -> list[tuple[int, int]]:
    return [(o, min(part, nbytes - o)) for o in range(0, nbytes, part)]


# --- GET: concurrent ranged reads into one preallocated buffer --------------------------


def get_obstore(store, dst: np.ndarray, part: int, conc: int) -> None:
    import obstore as obs

    def one(r: tuple[int, int]) -> None:
        off, n = r
        buf = obs.get_range(store, KEY, start=off, length=n)  # GIL released during the GET
        np.copyto(dst[off : off + n], np.frombuffer(buf, dtype=np.uint8))

    with cf.ThreadPoolExecutor(conc) as ex:
        list(ex.map(one, ranges(dst.nbytes, part)))


def get_obstore_async(store, dst: np.ndarray, part: int, conc: int) -> None:
    import obstore as obs

    async def main() -> None:
        sem = asyncio.Semaphore(conc)

        async def one(off: int, n: int) -> None:
            async with sem:
                buf = await obs.get_range_async(store, KEY, start=off, length=n)
            np.copyto(dst[off : off + n], np.frombuffer(buf, dtype=np.uint8))

        await asyncio.gather(*(one(o, n) for o, n in ranges(dst.nbytes, part)))

    asyncio.run(main())


def get_boto3(client, dst: np.ndarray, part: int, conc: int) -> None:
    view = memoryview(dst)

    def one(r: tuple[int, int]) -> None:
        off, n = r
        body = client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={off}-{off + n - 1}")["Body"]
        got = 0
        while got < n:  # urllib3's readinto: no intermediate bytes object
            k = body._raw_stream.readinto(view[off + got : off + n])
            if not k:
                raise OSError("short read")
            got += k

    with cf.ThreadPoolExecutor(conc) as ex:
        list(ex.map(one, ranges(dst.nbytes, part)))


def get_s3fs(fs, dst: np.ndarray, part: int, conc: int) -> None:
    rs = ranges(dst.nbytes, part)
    path = f"{BUCKET}/{KEY}"
    for i in range(0, len(rs), conc):  # cat_ranges runs one batch concurrently
        batch = rs[i : i + conc]
        out = fs.cat_ranges([path] * len(batch), [o for o, _ in batch], [o + n for o, n in batch])
        for (o, n), b in zip(batch, out):
            dst[o : o + n] = np.frombuffer(b, dtype=np.uint8)


# --- PUT: multipart upload from existing memory -----------------------------------------


def put_obstore(store, src: np.ndarray, part: int, conc: int) -> None:
    import obstore as obs

    view = memoryview(src)
    parts = (view[o : o + n] for o, n in ranges(src.nbytes, part))
    obs.put(store, KEY + ".up", parts, chunk_size=part, max_concurrency=conc)


def put_boto3(client, src: np.ndarray, part: int, conc: int) -> None:
    view = memoryview(src)
    key = KEY + ".up"
    up = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]

    def one(i_r: tuple[int, tuple[int, int]]) -> dict[str, object]:
        i, (off, n) = i_r
        body = view[off : off + n].tobytes()  # botocore takes bytes or a file, not a view
        r = client.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=i + 1, Body=body)
        return {"ETag": r["ETag"], "PartNumber": i + 1}

    with cf.ThreadPoolExecutor(conc) as ex:
        done = list(ex.map(one, enumerate(ranges(src.nbytes, part))))
    client.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": done}
    )


def put_s3fs(fs, src: np.ndarray, part: int, conc: int) -> None:
    fs.pipe_file(f"{BUCKET}/{KEY}.up", src.tobytes(), chunksize=part, max_concurrency=conc)


def timed(fn: Callable[[], None], nbytes: int, gbps: list[float], cpu: list[float]) -> None:
    """One run: GB/s of wall time, and this process's CPU seconds per GB moved (the client's
    own cost, which the server's limit does not hide)."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    c, t = time.process_time() - c, time.perf_counter() - t
    gbps.append(nbytes / t / 1e9)
    cpu.append(c / (nbytes / 1e9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="object size for the PUTs")
    ap.add_argument(
        "--get-mib",
        type=int,
        default=0,
        help="object size for the GETs (default: --mib); moto copies the whole object on "
        "every ranged GET, so a smaller one measures more of the client",
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--parts", default="8,16", help="range / part sizes in MiB")
    ap.add_argument("--conc", default="4,8,16", help="concurrencies")
    ap.add_argument("--no-put", action="store_true")
    args = ap.parse_args()

    import boto3
    import botocore.config
    import obstore
    import s3fs
    from obstore.store import S3Store

    # SIGTERM runs the finally below too, so the server never outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc, url = start_server()
    try:
        env = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
        }
        os.environ.update(env)
        nbytes = args.mib * MiB
        conc_max = max(int(c) for c in args.conc.split(","))
        # Both checksum settings "when_required": boto3 would otherwise CRC32 every part in
        # Python, which is a choice about integrity, not a cost of the transport.
        cfg = botocore.config.Config(
            max_pool_connections=conc_max,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = boto3.client("s3", config=cfg)
        client.create_bucket(Bucket=BUCKET)
        src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        get_nbytes = (args.get_mib * MiB) or nbytes
        get_src = src[:get_nbytes]
        client.put_object(Bucket=BUCKET, Key=KEY, Body=get_src.tobytes())
        store = S3Store(BUCKET, client_options={"allow_http": True, "timeout": "300s"})
        store_unsigned = S3Store(
            BUCKET, client_options={"allow_http": True, "timeout": "300s"}, unsigned_payload=True
        )
        fs = s3fs.S3FileSystem(
            endpoint_url=url, key="bench", secret="bench", max_concurrency=conc_max
        )
        print(
            f"obstore {obstore.__version__}, boto3 {boto3.__version__}, s3fs {s3fs.__version__}"
            f"; server: moto_server (one Python process) at {url}; GET object "
            f"{get_nbytes // MiB} MiB, PUT object {args.mib} MiB, {args.runs} runs"
        )
        dst = np.empty(get_nbytes, dtype=np.uint8)
        for part_mib in (int(p) for p in args.parts.split(",")):
            part = part_mib * MiB
            for conc in (int(c) for c in args.conc.split(",")):
                gets: dict[str, Callable[[], None]] = {
                    "obstore": partial(get_obstore, store, dst, part, conc),
                    "obstore-async": partial(get_obstore_async, store, dst, part, conc),
                    "boto3": partial(get_boto3, client, dst, part, conc),
                    "s3fs": partial(get_s3fs, fs, dst, part, conc),
                }
                _report("GET", part_mib, conc, gets, get_nbytes, args.runs, dst, get_src)
                if args.no_put:
                    continue
                puts: dict[str, Callable[[], None]] = {
                    "obstore": partial(put_obstore, store, src, part, conc),
                    "obstore-unsigned": partial(put_obstore, store_unsigned, src, part, conc),
                    "boto3": partial(put_boto3, client, src, part, conc),
                    "s3fs": partial(put_s3fs, fs, src, part, conc),
                }
                _report("PUT", part_mib, conc, puts, nbytes, args.runs, None, None)
    finally:
        proc.terminate()
        proc.wait(10)


def _report(
    what: str,
    part_mib: int,
    conc: int,
    fns: dict[str, Callable[[], None]],
    nbytes: int,
    runs: int,
    dst: np.ndarray | None,
    src: np.ndarray | None,
) -> None:
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            if dst is not None:
                dst[:: 1 << 20] = 0
            timed(fn, nbytes, times[name], cpus[name])
            if dst is not None and src is not None and not np.array_equal(dst, src):
                raise AssertionError(f"{name}: bytes differ")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["obstore"]
    row = "  ".join(
        f"{k} {v:.3f} GB/s ({v / base:.2f}x, {statistics.median(cpus[k]):.1f} cpu-s/GB)"
        for k, v in med.items()
    )
    print(f"{what} part {part_mib:>2} MiB conc {conc:>2}: {row}", flush=True)


if __name__ == "__main__":
    main()
