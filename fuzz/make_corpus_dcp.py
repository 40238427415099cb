"""Writes the seed corpus for fuzz_dcp.py: commit records for its fixed rank files, the
stock `.metadata` of its FileSystemWriter checkpoint, and the hostile inputs that once
crashed or exhausted the reader (regression-*)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fuzz_dcp

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus-dcp")
os.makedirs(out, exist_ok=True)
base = fuzz_dcp.record()
tagged = copy.deepcopy(base)
tagged["planner_data"] = {
    "value": {"dict": [[{"tuple": [1, "a"]}, {"size": [2, 3]}], ["x", {"float": "nan"}]]}
}
flat = copy.deepcopy(base)
flat["planner_data"] = {"value": None}
flat["storage_meta"] = None
with open(os.path.join(fuzz_dcp.STOCK, ".metadata"), "rb") as f:
    stock = f.read()
md = pickle.loads(stock)  # our own file: trusted
for info in md.storage_data.values():
    info.relative_path = "../outside.distcp"
outside_path = pickle.dumps(md)
deep = '{"format":"tensorfile-dcp","planner_data":' + "[" * 100000 + "]" * 100000 + "}"
huge = copy.deepcopy(base)
huge["state_dict_metadata"]["model.w"][1:] = [[2**40], []]
index = copy.deepcopy(base)
index["planner_data"]["mappings"]["model.v"] = ["model", 10**8]
seeds = {
    "seed-record": b"\x02" + json.dumps(base).encode(),
    "seed-record-unfixed": b"\x00" + json.dumps(base).encode(),
    "seed-record-tagged-planner-data": b"\x02" + json.dumps(tagged).encode(),
    "seed-record-flat": b"\x02" + json.dumps(flat).encode(),
    "seed-stock": b"\x01" + stock,
    "seed-record-recipe": b"\x06" + bytes(range(64)),
    "seed-stock-recipe": b"\x05" + bytes(range(64, 128)),
    "regression-record-deep-json": b"\x02" + deep.encode(),
    "regression-record-size-without-chunks": b"\x02" + json.dumps(huge).encode(),
    "regression-record-planner-index": b"\x02" + json.dumps(index).encode(),
    "regression-stock-deep-tuple-key": b"\x01\x80\x04}K\x01" + b"\x85" * 100000 + b"Ns.",
    "regression-stock-memo": b"\x01\x80\x04Nr" + (2**29).to_bytes(4, "little") + b".",
    "regression-stock-outside-path": b"\x01" + outside_path,
}
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} inputs to {out}")
