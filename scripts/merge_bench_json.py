"""Merge pytest-benchmark JSON files of one device into one (for make_benchmarks / compare).

    python scripts/merge_bench_json.py OUT.json IN1.json IN2.json ...
"""
from __future__ import annotations

import json
import sys


def merge(paths: list[str]) -> dict:
    runs = [json.load(open(p)) for p in paths]
    gpus = {r.get("machine_info", {}).get("gpu_name") for r in runs}
    if len(gpus) > 1:
        raise SystemExit(f"refusing to merge runs from different GPUs: {sorted(map(str, gpus))}")
    merged = dict(runs[0])
    merged["benchmarks"] = [b for r in runs for b in r.get("benchmarks", [])]
    return merged


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    with open(sys.argv[1], "w") as f:
        json.dump(merge(sys.argv[2:]), f, indent=1)
