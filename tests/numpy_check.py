#!/usr/bin/env python3
"""Checks pnmctl's KV path against NumPy: K, V and queries generated here,
loaded with `pnmctl kv load`, then `pnmctl topk` and `pnmctl gather`
compared with NumPy's exact answers; malformed requests must fail cleanly
while the device keeps serving.

Usage: numpy_check.py PNMCTL REGION WORKDIR SEED   ('N passed, M failed')
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np

PNMCTL, REGION, WORK, SEED = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(SEED)
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    if not ok:
        print(f"FAIL {name} {detail}")


def ctl(*args):
    p = subprocess.run([PNMCTL, "--device", REGION, *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def save(name, array):
    path = os.path.join(WORK, name)
    np.save(path, array)
    return path


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def save_safetensors(name, k_bits, v_bits):
    header = {
        "k": {"dtype": "BF16", "shape": list(k_bits.shape), "data_offsets": [0, k_bits.nbytes]},
        "v": {"dtype": "BF16", "shape": list(v_bits.shape), "data_offsets": [k_bits.nbytes, k_bits.nbytes + v_bits.nbytes]},
    }
    raw = json.dumps(header).encode()
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + k_bits.tobytes() + v_bits.tobytes())
    return path


def exact_topk(keys32, q32, k):
    """NumPy's exact Top-K: max over the group of q.k, ties to the lower index."""
    scores = (q32.astype(np.float64) @ keys32.astype(np.float64).T).max(axis=0)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k], scores


def check_topk(label, seq, keys32, layer, head, q, k):
    path = save(f"q-{label}.npy", q)
    code, out, err = ctl("--json", "topk", "--seq", str(seq), "--layer", str(layer), "--head", str(head), "--query", path, "-k", str(k))
    check(f"{label}: topk runs", code == 0, err)
    if code != 0:
        return None
    got = json.loads(out)
    want, scores = exact_topk(keys32[layer, head], np.atleast_2d(q).astype(np.float32), k)
    idx = np.array(got["indices"], dtype=np.int64)
    check(f"{label}: result count", len(idx) == min(k, keys32.shape[2]))
    got_scores = np.array(got["scores"], dtype=np.float64)
    check(f"{label}: scores match numpy at the returned tokens", np.allclose(got_scores, scores[idx], rtol=1e-4, atol=1e-4))
    check(f"{label}: descending", np.all(np.diff(got_scores) <= 1e-6))
    kth = scores[want[-1]]
    missing = [i for i in want if i not in set(idx.tolist()) and abs(scores[i] - kth) > 1e-4]
    check(f"{label}: same tokens as numpy (up to ties at the k-th score)", not missing, missing[:5])
    return idx


def run_case(dtype, layers, heads, tokens, head_dim):
    keys = rng.standard_normal((layers, heads, tokens, head_dim)).astype(np.float32)
    values = rng.standard_normal((layers, heads, tokens, head_dim)).astype(np.float32)
    if dtype == "bf16":
        kb, vb = to_bf16_bits(keys), to_bf16_bits(values)
        path = save_safetensors("kv.safetensors", kb, vb)
        code, out, err = ctl("--json", "kv", "load", "--safetensors", path)
        keys32 = (kb.astype(np.uint32) << 16).view(np.float32)
        stored_k, stored_v = keys32, (vb.astype(np.uint32) << 16).view(np.float32)
    else:
        k_arr, v_arr = keys.astype(dtype), values.astype(dtype)
        code, out, err = ctl("--json", "kv", "load", "--keys", save("k.npy", k_arr), "--values", save("v.npy", v_arr))
        keys32, stored_k, stored_v = k_arr.astype(np.float32), k_arr, v_arr
    check(f"{dtype}: load", code == 0, err)
    if code != 0:
        return None
    seq = json.loads(out)["id"]
    for group in (1, 4):
        for qdtype in ("float32", "float16"):
            q = rng.standard_normal((group, head_dim)).astype(qdtype)
            if group == 1:
                q = q[0]
            layer, head = int(rng.integers(layers)), int(rng.integers(heads))
            for k in (1, 64, tokens + 10):
                check_topk(f"{dtype} G={group} q={qdtype} k={k}", seq, keys32, layer, head, q, k)
    # Gather the rows of a few tokens and compare bit for bit.
    layer, head = layers - 1, heads - 1
    chosen = sorted(set(rng.integers(tokens, size=17).tolist()))
    ko, vo = os.path.join(WORK, "gk.npy"), os.path.join(WORK, "gv.npy")
    code, _, err = ctl("gather", "--seq", str(seq), "--layer", str(layer), "--head", str(head),
                       "--indices", ",".join(map(str, chosen)), "--out-keys", ko, "--out-values", vo)
    check(f"{dtype}: gather runs", code == 0, err)
    if code == 0:
        gk, gv = np.load(ko), np.load(vo)
        check(f"{dtype}: gathered K", np.array_equal(gk, np.asarray(stored_k)[layer, head, chosen]))
        check(f"{dtype}: gathered V", np.array_equal(gv, np.asarray(stored_v)[layer, head, chosen]))
    return seq, head_dim


def main():
    cases = [("float32", 2, 2, int(rng.integers(800, 3000)), 64),
             ("float16", 2, 3, int(rng.integers(800, 3000)), 128),
             ("bf16", 1, 2, int(rng.integers(800, 3000)), 96)]
    seqs = [run_case(*c) for c in cases]
    seq, head_dim = seqs[0]
    q = save("q-bad.npy", rng.standard_normal(head_dim + 1).astype(np.float32))
    good_q = save("q-good.npy", rng.standard_normal(head_dim).astype(np.float32))
    for label, args in [
        ("wrong query shape", ("topk", "--seq", str(seq), "--layer", "0", "--head", "0", "--query", q, "-k", "4")),
        ("layer out of range", ("topk", "--seq", str(seq), "--layer", "9", "--head", "0", "--query", good_q, "-k", "4")),
        ("head out of range", ("topk", "--seq", str(seq), "--layer", "0", "--head", "9", "--query", good_q, "-k", "4")),
        ("k = 0", ("topk", "--seq", str(seq), "--layer", "0", "--head", "0", "--query", good_q, "-k", "0")),
        ("k too large", ("topk", "--seq", str(seq), "--layer", "0", "--head", "0", "--query", good_q, "-k", "100000")),
        ("no such sequence", ("topk", "--seq", "999999", "--layer", "0", "--head", "0", "--query", good_q, "-k", "4")),
        ("gather beyond the sequence", ("gather", "--seq", str(seq), "--layer", "0", "--head", "0", "--indices", "99999999",
                                        "--out-keys", "/dev/null", "--out-values", "/dev/null")),
        ("keys of the wrong rank", ("kv", "load", "--keys", good_q, "--values", good_q)),
        ("free unknown sequence", ("kv", "free", "--seq", "999999")),
    ]:
        code, _, err = ctl(*args)
        check(f"{label}: nonzero exit", code != 0)
        check(f"{label}: one-line error", len(err.strip().splitlines()) == 1, err)
    code, out, _ = ctl("--json", "kv", "list")
    check("list shows every sequence", code == 0 and len(json.loads(out)) == len(seqs))
    for s, _ in seqs:
        check("free", ctl("kv", "free", "--seq", str(s))[0] == 0)
    check("device still serves", ctl("identify")[0] == 0)
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
