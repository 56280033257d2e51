#!/usr/bin/env python3
"""What the Python binding costs over the Rust driver, measured in one run.

- topk_gather: k rows (default 2048) of a GQA group's Top-K at N tokens
  (default 32K, f16, head_dim 128), called from Python (answer as NumPy
  arrays) against the driver's topk_gather called from Rust in a loop (answer
  in vectors), alternated A/B in rounds on the same sequence;
- append: the same K and V arrays appended from Python against the driver's
  kv_append called from Rust with the same buffers, alternated, each into a
  fresh sequence;
- the machine's memory read bandwidth, measured in the same run, as the
  roofline the append bandwidth is compared with.

Prints one JSON report. Run with an installed cxl_pnm (pip install ./python).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import cxl_pnm
from cxl_pnm import _native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("-k", type=int, default=2048)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="A/B rounds")
    parser.add_argument("--reps", type=int, default=10, help="calls per side per round")
    parser.add_argument("--append-heads", type=int, default=8, help="KV heads of the append test")
    parser.add_argument("--append-rounds", type=int, default=5)
    args = parser.parse_args()

    roofline = cxl_pnm.memory_read_gbps()
    d, t = args.head_dim, args.tokens
    append_bytes = 2 * args.append_heads * t * d * 2
    device = cxl_pnm.Device.embedded(max(1 << 30, 4 * append_bytes))
    rng = np.random.default_rng(0)

    # topk_gather: one (layer, head) stream of t tokens.
    keys = rng.standard_normal((1, 1, t, d)).astype(np.float16)
    values = rng.standard_normal((1, 1, t, d)).astype(np.float16)
    seq = device.kv_create(1, 1, d, "f16")
    seq.append(keys, values)
    queries = rng.standard_normal((args.group, d)).astype(np.float32)
    top = seq.topk_gather(0, 0, queries, args.k)
    assert top.keys.shape == (min(args.k, t), d)
    _native._bench_rust_topk_gather(seq, 0, 0, queries, args.k, args.reps)  # warm both paths
    python_s, rust_s = [], []
    for _ in range(args.rounds):
        rust_s += _native._bench_rust_topk_gather(seq, 0, 0, queries, args.k, args.reps)
        for _ in range(args.reps):
            start = time.perf_counter()
            top = seq.topk_gather(0, 0, queries, args.k)
            python_s.append(time.perf_counter() - start)
    seq.free()

    # append: [1, heads, t, d] f16 K and V, fresh sequences, alternated.
    keys = rng.standard_normal((1, args.append_heads, t, d)).astype(np.float16)
    values = rng.standard_normal((1, args.append_heads, t, d)).astype(np.float16)
    py_append, rust_append = [], []
    for _ in range(args.append_rounds):
        for side in ("rust", "python"):
            target = device.kv_create(1, args.append_heads, d, "f16")
            if side == "rust":
                rust_append.append(_native._bench_rust_append(target, keys, values))
            else:
                start = time.perf_counter()
                target.append(keys, values)
                py_append.append(time.perf_counter() - start)
            assert target.tokens == t
            target.free()

    med = statistics.median
    report = {
        "memory_read_gbps": roofline,
        "topk_gather": {
            "tokens": t,
            "k": args.k,
            "group": args.group,
            "head_dim": d,
            "dtype": "f16",
            "calls_per_side": len(python_s),
            "rust_median_ms": med(rust_s) * 1e3,
            "python_median_ms": med(python_s) * 1e3,
            "rust_p10_ms": sorted(rust_s)[len(rust_s) // 10] * 1e3,
            "python_p10_ms": sorted(python_s)[len(python_s) // 10] * 1e3,
            "python_over_rust": med(python_s) / med(rust_s),
            # The keys the device scans per call, against the roofline.
            "scan_gb_per_s_python": t * d * 2 / med(python_s) / 1e9,
        },
        "append": {
            "bytes": append_bytes,
            "rounds": args.append_rounds,
            "rust_gb_per_s": append_bytes / med(rust_append) / 1e9,
            "python_gb_per_s": append_bytes / med(py_append) / 1e9,
            "python_over_rust_time": med(py_append) / med(rust_append),
            "rust_of_roofline": append_bytes / med(rust_append) / 1e9 / roofline,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
