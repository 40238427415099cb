"""tensorfile against an S3 API on 127.0.0.1 (moto's server): loads and saves of one state
dict, against the raw limit of the same client and the peers, ratios from one run.

    python bench/s3.py [--size-mib 128] [--runs 5]

Every measurement runs in a fresh child process (so peak RSS is its own), the systems take
turns run by run, and medians of `--runs` are printed. The server is moto's (the only S3
server on the package index that runs here); it bounds every figure: it answers each
ranged GET by copying the object, so its throughput is the ceiling, and the ratios to the
limit measured through it are what this shows.

Load systems (the same state dict, in each format):
  limit        concurrent ranged GETs of the tensorfile object into preallocated memory,
               with obstore, TENSORFILE_REMOTE_PART_NBYTES / _CONCURRENCY as tensorfile uses
  tensorfile   tensorfile.load("s3://.../sd.tf")
  boto3+torch  torch.load(io.BytesIO(get_object(...).read()))
  s3fs+torch   torch.load(s3fs.open(...))
  boto3+safetensors  safetensors.torch.load(get_object(...).read())
  runai        runai_model_streamer.SafetensorsStreamer on the .safetensors object
Save systems:
  put-limit    one multipart upload of a buffer of the same size (obstore, same parts)
  tensorfile   tensorfile.save(sd, "s3://.../sd.tf")
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from s3_clients import start_server  # noqa: E402

BUCKET = "tf-bench"
LOADS = ["limit", "tensorfile", "boto3+torch", "s3fs+torch", "boto3+safetensors", "runai"]
SAVES = ["put-limit", "tensorfile-save"]


def _state_dict(size_mib: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    n = size_mib << 18  # float32 elements
    shapes = [n // 4, n // 4, n // 8, n // 8] + [n // 64] * 16
    return {f"layer{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def child(system: str, endpoint: str, size_mib: int) -> dict:
    """One measurement in this process: seconds, and peak RSS over the baseline."""
    import io

    import numpy as np
    import tensorfile
    import torch
    from tensorfile import _config, _remote

    base = _rss_mib()
    url = f"s3://{BUCKET}/sd.tf"
    t0 = time.perf_counter()
    if system == "limit":
        reader = _remote.RemoteReader(url)
        dst = np.empty(reader.nbytes, dtype=np.uint8)
        dst[::4096] = 0  # touched, so the timed copy pays no page faults
        t0 = time.perf_counter()
        reader.read_ranges_into(
            [(0, dst)],
            part_nbytes=_config.remote_part_nbytes(),
            concurrency=_config.remote_concurrency(),
        )
    elif system == "tensorfile":
        tensorfile.load(url)
    elif system in ("boto3+torch", "boto3+safetensors"):
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        key = "sd.pt" if system == "boto3+torch" else "sd.safetensors"
        blob = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if system == "boto3+torch":
            torch.load(io.BytesIO(blob), weights_only=True)
        else:
            from safetensors.torch import load

            load(blob)
    elif system == "s3fs+torch":
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        with fs.open(f"{BUCKET}/sd.pt", "rb", block_size=16 << 20) as f:
            torch.load(f, weights_only=True)
    elif system == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_file(f"s3://{BUCKET}/sd.safetensors")
            for _name, tensor in streamer.get_tensors():
                tensor.clone()  # the streamer reuses its buffer: keep each tensor
    elif system == "put-limit":
        src = np.ones(size_mib << 20, dtype=np.uint8)
        t0 = time.perf_counter()
        _remote.upload(
            f"s3://{BUCKET}/limit.bin",
            [src],
            part_nbytes=_config.remote_part_nbytes(),
            concurrency=_config.remote_concurrency(),
        )
    elif system == "tensorfile-save":
        sd = _state_dict(size_mib)
        base = _rss_mib()
        t0 = time.perf_counter()
        tensorfile.save(sd, f"s3://{BUCKET}/saved.tf")
    else:
        raise SystemExit(f"unknown system {system}")
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")  # (ru_maxrss would carry the forking parent's peak)
    return {"seconds": seconds, "peak_over_base_mib": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.endpoint, args.size_mib)))
        return

    import io

    import boto3
    import tensorfile
    import torch
    from safetensors.torch import save as st_save

    proc, endpoint = start_server()
    env = dict(
        os.environ,
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        sd = _state_dict(args.size_mib)
        payload = sum(t.nbytes for t in sd.values())
        tensorfile.save(sd, f"s3://{BUCKET}/sd.tf")
        buf = io.BytesIO()
        torch.save(sd, buf)
        client.put_object(Bucket=BUCKET, Key="sd.pt", Body=buf.getvalue())
        client.put_object(Bucket=BUCKET, Key="sd.safetensors", Body=st_save(sd))
        del sd, buf

        results: dict[str, list[dict]] = {s: [] for s in LOADS + SAVES}
        for run in range(args.runs):
            order = (LOADS + SAVES)[run % 8 :] + (LOADS + SAVES)[: run % 8]
            for system in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", system, "--endpoint", endpoint,
                     "--size-mib", str(args.size_mib)],
                    env=env, capture_output=True, text=True, timeout=900,
                )  # fmt: skip
                if out.returncode != 0:
                    results[system].append({"error": out.stderr.strip().splitlines()[-1:]})
                    continue
                results[system].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {run + 1}/{args.runs} done", flush=True)
    finally:
        proc.terminate()
        proc.wait()

    def median(system: str, field: str) -> float | None:
        got = [r[field] for r in results[system] if field in r]
        return statistics.median(got) if got else None

    print(
        f"\nS3 (moto server on 127.0.0.1), {payload / 2**20:.0f} MiB float32 state dict, "
        f"20 tensors; part "
        f"{int(os.environ.get('TENSORFILE_REMOTE_PART_NBYTES', 16 << 20)) >> 20} MiB, "
        f"concurrency {os.environ.get('TENSORFILE_REMOTE_CONCURRENCY', '16')}; "
        f"medians of {args.runs} interleaved runs, one child process each"
    )
    print(f"{'system':<20}{'s':>8}{'GB/s':>8}{'peak RSS MiB':>14}{'vs limit':>10}")
    for group, limit in ((LOADS, "limit"), (SAVES, "put-limit")):
        lim = median(limit, "seconds")
        for system in group:
            s = median(system, "seconds")
            if s is None:
                print(f"{system:<20}  failed: {results[system][0].get('error')}")
                continue
            rss = median(system, "peak_over_base_mib")
            ratio = lim / s if lim else float("nan")
            print(f"{system:<20}{s:>8.3f}{payload / s / 1e9:>8.3f}{rss:>14.0f}{ratio:>10.2f}")
    tf, peers = (
        median("tensorfile", "seconds"),
        [median(p, "seconds") for p in LOADS[2:] if median(p, "seconds")],
    )
    if tf and peers:
        print(f"tensorfile load vs the best peer: {min(peers) / tf:.2f}x (target >= 2)")
    lim = median("limit", "seconds")
    if tf and lim:
        print(f"tensorfile load vs the GET limit: {lim / tf:.2f} (target >= 0.8)")
    ts, pl = median("tensorfile-save", "seconds"), median("put-limit", "seconds")
    if ts and pl:
        print(f"tensorfile save vs the PUT limit: {pl / ts:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
