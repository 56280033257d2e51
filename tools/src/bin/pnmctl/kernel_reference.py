"""numpy and faiss-cpu on pnmctl bench kernel's shapes, single-threaded.

Called by `pnmctl bench kernel --reference` with the grid as JSON in argv[1];
prints JSON. Times are the best of `reps` runs, like pnmctl's own figures:
scoring every key and selecting the Top-K, keys kept in their storage type
(what a user holding an f16 KV cache would run). `numpy_ms` and `faiss_ms`
start each timed run with the caches scrubbed (a read of twice the
last-level cache), as pnmctl times its own kernel; `*_warm_ms` run back to
back, the keys left in whatever cache holds them.
"""
import json
import sys
import time

spec = json.loads(sys.argv[1])
out = {"numpy": None, "faiss": None, "cases": []}
try:
    import numpy as np
    out["numpy"] = np.__version__
except ImportError as e:
    print(json.dumps({"error": f"numpy: {e}"}))
    sys.exit(0)
try:
    import faiss
    faiss.omp_set_num_threads(1)
    out["faiss"] = faiss.__version__
except ImportError as e:
    faiss = None
    out["faiss_error"] = str(e)


def last_level_cache_bytes():
    """The largest cache cpu0 reports (sysfs), or 0 if none is readable."""
    import glob
    largest = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest


# Reading twice the last-level cache (at least 64 MiB) evicts what a run
# left in it.
scrub = np.ones(max(2 * last_level_cache_bytes(), 64 << 20) // 8, dtype=np.float64)


def best(reps, f, cold):
    f()
    times = []
    for _ in range(max(reps, 1)):
        if cold:
            scrub.sum()
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


rng = np.random.default_rng(7)
d = spec["head_dim"]
for n in spec["tokens"]:
    keys32 = rng.uniform(-1.0, 1.0, size=(n, d)).astype(np.float32)
    for dtype in spec["dtypes"]:
        if dtype == "f32":
            stored = keys32
            as_f32 = lambda: stored
        elif dtype == "f16":
            stored = keys32.astype(np.float16)
            as_f32 = lambda: stored.astype(np.float32)
        else:
            # numpy has no bfloat16: the top 16 bits of the f32 pattern.
            stored = (keys32.view(np.uint32) >> 16).astype(np.uint16)
            as_f32 = lambda: (stored.astype(np.uint32) << 16).view(np.float32)
        for g in spec["groups"]:
            queries = rng.uniform(-1.0, 1.0, size=(g, d)).astype(np.float32)
            for k in spec["ks"]:
                def numpy_topk():
                    scores = (as_f32() @ queries.T).max(axis=1)
                    top = np.argpartition(-scores, k - 1)[:k]
                    return top[np.argsort(-scores[top], kind="stable")]

                case = {
                    "tokens": n, "dtype": dtype, "group": g, "k": k,
                    "numpy_ms": best(spec["reps"], numpy_topk, cold=True),
                    "numpy_warm_ms": best(spec["reps"], numpy_topk, cold=False),
                }
                if faiss is not None:
                    try:
                        if dtype == "f32":
                            index = faiss.IndexFlatIP(d)
                        else:
                            qtype = (faiss.ScalarQuantizer.QT_fp16 if dtype == "f16"
                                     else faiss.ScalarQuantizer.QT_bf16)
                            index = faiss.IndexScalarQuantizer(d, qtype, faiss.METRIC_INNER_PRODUCT)
                        index.add(keys32)
                        # faiss answers each query of a group on its own (no
                        # GQA aggregation): G searches of k.
                        search = lambda: index.search(queries, k)
                        case["faiss_ms"] = best(spec["reps"], search, cold=True)
                        case["faiss_warm_ms"] = best(spec["reps"], search, cold=False)
                    except Exception as e:  # an index type this faiss lacks
                        case["faiss_error"] = str(e)
                out["cases"].append(case)
print(json.dumps(out))
