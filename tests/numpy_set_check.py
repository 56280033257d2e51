#!/usr/bin/env python3
"""Checks a device set through `pnmctl set` against NumPy: K and V made
here (coarse values for many exact ties, or fine ones), loaded sharded
across the devices, then every Top-K compared with NumPy's exact answer
over the whole sequence (ties to the lower index, as one device holding
everything answers) and gathered rows compared bit for bit.

Usage: numpy_set_check.py PNMCTL REGION[,REGION...] WORKDIR SEED   ('N passed, M failed')
"""
import json
import os
import subprocess
import sys

import numpy as np

PNMCTL, REGIONS, WORK, SEED = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(SEED)
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    if not ok:
        print(f"FAIL {name} {detail}")


def ctl(*args):
    p = subprocess.run([PNMCTL, "--json", "set", "--devices", REGIONS, *args],
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def save(name, array):
    path = os.path.join(WORK, name)
    np.save(path, array)
    return path


def exact_topk(keys32, q32, k, aggregation):
    """Exact Top-K in float64: max (or mean) over the group, ties to the lower index."""
    per_query = q32.astype(np.float64) @ keys32.astype(np.float64).T
    scores = per_query.max(axis=0) if aggregation == "max" else per_query.mean(axis=0)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k], scores


def run_case(dtype, layers, heads, tokens, head_dim, coarse):
    def make():
        if coarse:
            return (rng.integers(-2, 3, (layers, heads, tokens, head_dim)) * 0.5).astype(dtype)
        return rng.standard_normal((layers, heads, tokens, head_dim)).astype(dtype)
    k_arr, v_arr = make(), make()
    label = f"{dtype} {'coarse' if coarse else 'fine'} {tokens} tokens"
    code, out, err = ctl("load", "--keys", save("k.npy", k_arr), "--values", save("v.npy", v_arr))
    check(f"{label}: load", code == 0, err)
    if code != 0:
        return
    loaded = json.loads(out)
    ids = ",".join(str(s["id"]) for s in loaded["shards"])
    check(f"{label}: every token stored", loaded["tokens"] == tokens)
    held = [s["tokens"] for s in loaded["shards"]]
    check(f"{label}: shards balanced within a page", max(held) - min(held) <= loaded["striping"]["stripe"], held)
    keys32 = k_arr.astype(np.float32)
    for group in (1, 4):
        for aggregation in ("max", "mean"):
            if coarse:
                q = (rng.integers(-2, 3, (group, head_dim)) * 0.5).astype(np.float32)
            else:
                q = rng.standard_normal((group, head_dim)).astype(np.float32)
            layer, head = int(rng.integers(layers)), int(rng.integers(heads))
            for k in (1, 37, 300, tokens + 5):
                name = f"{label} G={group} {aggregation} k={k}"
                code, out, err = ctl("topk", "--seq", ids, "--layer", str(layer), "--head", str(head),
                                     "--query", save("q.npy", q), "-k", str(k), "--aggregation", aggregation)
                check(f"{name}: runs", code == 0, err)
                if code != 0:
                    continue
                got = json.loads(out)
                want, scores = exact_topk(keys32[layer, head], q, k, aggregation)
                idx = np.array(got["indices"], dtype=np.int64)
                check(f"{name}: count", len(idx) == min(k, tokens))
                check(f"{name}: every token scored", got["tokens_scored"] == tokens)
                if coarse:
                    # Sums of halves are exact in f32 and f64: the order, ties
                    # included, must be NumPy's exactly.
                    check(f"{name}: same order as numpy, ties to the lower index",
                          np.array_equal(idx, want), (idx[:8], want[:8]))
                else:
                    kth = scores[want[-1]]
                    missing = [i for i in want if i not in set(idx.tolist()) and abs(scores[i] - kth) > 1e-4]
                    check(f"{name}: same tokens as numpy (up to near-ties at the k-th)", not missing, missing[:5])
                    check(f"{name}: scores", np.allclose(np.array(got["scores"]), scores[idx], rtol=1e-4, atol=1e-4))
    layer, head = layers - 1, heads - 1
    chosen = rng.permutation(tokens)[:50].tolist()
    ko, vo = os.path.join(WORK, "gk.npy"), os.path.join(WORK, "gv.npy")
    code, _, err = ctl("gather", "--seq", ids, "--layer", str(layer), "--head", str(head),
                       "--indices", ",".join(map(str, chosen)), "--out-keys", ko, "--out-values", vo)
    check(f"{label}: gather runs", code == 0, err)
    if code == 0:
        check(f"{label}: gathered K, in request order", np.array_equal(np.load(ko), k_arr[layer, head, chosen]))
        check(f"{label}: gathered V", np.array_equal(np.load(vo), v_arr[layer, head, chosen]))
    code, _, err = ctl("free", "--seq", ids)
    check(f"{label}: free", code == 0, err)


def main():
    for dtype, coarse in (("float32", True), ("float16", True), ("float16", False), ("float32", False)):
        run_case(dtype, 2, 2, int(rng.integers(1500, 6000)), 128, coarse)
    # A request naming too few shards fails cleanly.
    code, _, err = ctl("show", "--seq", "1")
    check("too few shard ids: a clean error", code != 0 and "shard ids" in err, err)
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    sys.exit(0 if passed == len(results) else 1)


main()
