#!/usr/bin/env python3
"""Data for the guest suite, and the host-side check of what the guest got.

  guest_data.py make WORK SEED    writes keys.npy, values.npy, query.npy (f32)
  guest_data.py check SERIAL WORK [--topk-only]
                                  compares the guest's RESULT lines with NumPy

The guest loads keys/values ([layers=1, kv_heads=2, tokens, head_dim]) into
the device through VFIO, runs a Top-K for a GQA group of queries on KV head
1 and a gather of its best tokens, and prints the answers; NumPy computes
the same from the same files here. Prints 'N passed, M failed', exits 1 on
any failure.
"""
import io
import json
import sys

import numpy as np

TOKENS, HEAD_DIM, GROUP, K, HEAD = 3000, 64, 4, 32, 1


def make(work, seed):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((1, 2, TOKENS, HEAD_DIM), dtype=np.float32)
    values = rng.standard_normal((1, 2, TOKENS, HEAD_DIM), dtype=np.float32)
    query = rng.standard_normal((GROUP, HEAD_DIM), dtype=np.float32)
    np.save(f"{work}/keys.npy", keys)
    np.save(f"{work}/values.npy", values)
    np.save(f"{work}/query.npy", query)


def results(serial):
    """RESULT lines: name -> payload (JSON, or hex bytes of a file)."""
    out = {}
    for line in open(serial, errors="replace"):
        if line.startswith("RESULT "):
            _, name, payload = line.rstrip("\n").split(" ", 2)
            out[name] = payload
    return out


def check(serial, work, topk_only=False):
    keys = np.load(f"{work}/keys.npy")[0, HEAD]
    values = np.load(f"{work}/values.npy")[0, HEAD]
    query = np.load(f"{work}/query.npy")
    got = results(serial)
    passed, failed = 0, 0

    def verdict(name, ok, detail=""):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name} {detail}")

    scores = (query.astype(np.float64) @ keys.astype(np.float64).T).max(axis=0)
    order = np.lexsort((np.arange(TOKENS), -scores))[:K]

    def check_topk(name):
        top = json.loads(got.get(name, "{}") or "{}")
        indices = top.get("indices", [])
        verdict(f"{name}-count", len(indices) == K, f"{len(indices)} of {K}")
        verdict(f"{name}-tokens", top.get("tokens") == TOKENS, str(top.get("tokens")))
        # Exact up to float rounding: every returned token's score matches
        # NumPy's, and the set differs only where scores tie within rounding.
        if indices:
            mine = np.array(top["scores"], dtype=np.float64)
            verdict(f"{name}-scores", np.allclose(mine, scores[indices], rtol=1e-5, atol=1e-4))
            kth = scores[order[-1]]
            missing = [i for i in order if i not in set(indices)]
            verdict(f"{name}-set", all(abs(scores[i] - kth) < 1e-4 for i in missing), str(missing))
        return indices

    indices = check_topk("topk")
    if not topk_only:
        # The sequence loaded before the device restarted, asked after it.
        check_topk("topk-after-restart")
    for name, rows in (() if topk_only else (("gather-keys", keys), ("gather-values", values))):
        raw = bytes.fromhex(got.get(name, "").replace(" ", ""))
        try:
            array = np.load(io.BytesIO(raw))
        except Exception as e:  # a missing or garbled dump
            verdict(name, False, repr(e))
            continue
        verdict(name, np.array_equal(array, rows[indices[: len(array)]]) and len(array) == 4)
    print(f"{passed} passed, {failed} failed")
    return failed == 0


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(0 if check(sys.argv[2], sys.argv[3], "--topk-only" in sys.argv) else 1)
