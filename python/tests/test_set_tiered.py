"""Device sets and tiered KV against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import cxl_pnm
from conftest import DeviceProcess
from reference import as_f32, as_stored, attention, coarse, exact_topk


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_sharded_sequence_answers_as_one_device(dtype):
    rng = np.random.default_rng(10)
    layers, heads, tokens, d = 1, 2, 5000, 64
    k32 = coarse(rng, (layers, heads, tokens, d))
    v32 = rng.standard_normal((layers, heads, tokens, d)).astype(np.float32)
    keys, values = as_stored(k32, dtype), as_stored(v32, dtype)
    devices = cxl_pnm.DeviceSet.embedded(3, "128MiB")
    assert len(devices) == 3
    seq = devices.kv_create(layers, heads, d, dtype)
    for part in np.array_split(np.arange(tokens), 4):
        seq.append(keys[:, :, part], values[:, :, part])
    assert seq.devices == 3 and len(seq.ids) == 3 and seq.tokens == tokens
    for head, group, k in [(0, 1, 50), (1, 4, 700), (1, 2, 6000)]:
        queries = coarse(rng, (group, d))
        top = seq.topk_gather(0, head, queries, k)
        want, scores = exact_topk(as_f32(keys[0, head], dtype), queries, k)
        np.testing.assert_array_equal(top.indices, want)
        np.testing.assert_array_equal(top.scores, scores.astype(np.float32))
        np.testing.assert_array_equal(top.keys, keys[0, head][want])
        np.testing.assert_array_equal(top.values, values[0, head][want])
    with pytest.raises(cxl_pnm.InvalidRequestError):
        seq.topk(0, 0, queries, 10, budget=1000)  # page selection is per device
    # The same sequence opened again by its shard ids.
    again = devices.sequence(seq.ids)
    assert again.tokens == tokens
    seq.free()


def test_set_of_separate_processes():
    processes = [DeviceProcess(), DeviceProcess()]
    try:
        rng = np.random.default_rng(11)
        k32 = coarse(rng, (1, 1, 3000, 32))
        devices = cxl_pnm.DeviceSet.open([p.path for p in processes])
        seq = devices.kv_create(1, 1, 32, "f32")
        seq.append(k32, k32)
        queries = coarse(rng, (2, 32))
        top = seq.topk(0, 0, queries, 100)
        np.testing.assert_array_equal(top.indices, exact_topk(k32[0, 0], queries, 100)[0])
        # Each process holds part of it.
        for process, shard in zip(processes, seq.ids):
            assert 0 < process.open().sequence(shard).tokens < 3000
        del devices, seq
    finally:
        for p in processes:
            p.close()


def test_tiered_attention_is_full_attention_when_k_covers_the_evicted_tokens(device):
    rng = np.random.default_rng(12)
    heads, d, tokens, group = 2, 32, 1500, 4
    k32 = rng.standard_normal((1, heads, tokens, d)).astype(np.float32)
    v32 = rng.standard_normal((1, heads, tokens, d)).astype(np.float32)
    tiered = cxl_pnm.TieredKv(device, 1, heads, d, dtype="f32", hot_window=100, k=4096, sinks=4, evict_batch=64)
    for part in np.array_split(np.arange(tokens), 7):
        tiered.append(k32[:, :, part], v32[:, :, part])
    assert tiered.tokens == tokens and tiered.evicted > 1000 and tiered.host_tokens < 200
    queries = rng.standard_normal((heads, group, d)).astype(np.float32)
    out, link = tiered.attend_layer(0, queries)
    assert out.shape == (heads, group, d) and link > 0
    for h in range(heads):
        np.testing.assert_allclose(out[h], attention(queries[h], k32[0, h], v32[0, h]), atol=2e-5, rtol=1e-4)
    # Recall returns every row, wherever it is.
    rk, rv = tiered.recall(0, 1, 0, tokens)
    np.testing.assert_array_equal(rk, k32[0, 1])
    np.testing.assert_array_equal(rv, v32[0, 1])


def test_tiered_attention_with_small_k_is_one_softmax_over_host_and_topk_rows(device):
    rng = np.random.default_rng(13)
    d, tokens, group, k, sinks, window = 64, 3000, 2, 32, 4, 128
    k32 = rng.standard_normal((1, 1, tokens, d)).astype(np.float32)
    v32 = rng.standard_normal((1, 1, tokens, d)).astype(np.float32)
    tiered = cxl_pnm.TieredKv(device, 1, 1, d, dtype="f16", hot_window=window, k=k, sinks=sinks, evict_batch=32)
    tiered.append(k32.astype(np.float16), v32.astype(np.float16))
    queries = rng.standard_normal((group, d)).astype(np.float32)
    out, stats = tiered.attend(0, 0, queries)
    keys16 = k32[0, 0].astype(np.float16).astype(np.float32)
    values16 = v32[0, 0].astype(np.float16).astype(np.float32)
    evicted = np.arange(sinks, tokens - tiered.host_tokens + sinks)
    assert stats["evicted_tokens"] == len(evicted)
    # The device picked the exact Top-K of the evicted tokens ...
    want, _ = exact_topk(keys16[evicted], queries, k)
    np.testing.assert_array_equal(stats["selected"], evicted[want])
    # ... and the output is one softmax over the host tokens and those rows.
    host = np.concatenate([np.arange(sinks), np.arange(evicted[-1] + 1, tokens)])
    used = np.concatenate([host, stats["selected"].astype(np.int64)])
    np.testing.assert_allclose(out, attention(queries, keys16[used], values16[used]), atol=2e-5, rtol=1e-4)
    for bad in (np.zeros((1, 0, d), np.float32), np.zeros((1, 2, d + 1), np.float32), np.zeros((2, 2, d), np.float32)):
        with pytest.raises(cxl_pnm.InvalidRequestError):
            tiered.attend_layer(0, bad)
    with pytest.raises(cxl_pnm.InvalidRequestError):
        tiered.attend(0, 0, np.zeros((0, d), np.float32))
    tiered.free()
    with pytest.raises(cxl_pnm.InvalidRequestError):
        tiered.attend(0, 0, queries)
