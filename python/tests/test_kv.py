"""Sequences, Top-K and gather against NumPy, on an embedded device and a
separate pnm-device process."""

from __future__ import annotations

import numpy as np
import pytest

import cxl_pnm
from reference import as_f32, as_stored, coarse, exact_topk

DTYPES = ["f32", "f16", "bf16"]


def load(device, rng, dtype, layers=2, heads=2, tokens=3000, head_dim=64, chunks=1):
    k32 = coarse(rng, (layers, heads, tokens, head_dim))
    v32 = rng.standard_normal((layers, heads, tokens, head_dim)).astype(np.float32)
    keys, values = as_stored(k32, dtype), as_stored(v32, dtype)
    seq = device.kv_create(layers, heads, head_dim, dtype)
    for part in np.array_split(np.arange(tokens), chunks):
        seq.append(keys[:, :, part], values[:, :, part])
    return seq, keys, values


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_is_numpys_exact_topk(device, dtype):
    rng = np.random.default_rng(1)
    seq, keys, _ = load(device, rng, dtype, chunks=3)
    assert (seq.tokens, seq.layers, seq.heads, seq.head_dim, seq.dtype) == (3000, 2, 2, 64, dtype)
    for layer, head, group, k, aggregation in [
        (0, 0, 1, 10, "max"),
        (1, 1, 4, 256, "max"),
        (0, 1, 8, 100, "mean"),
        (1, 0, 2, 5000, "max"),  # k beyond the tokens: every token, ranked
    ]:
        queries = coarse(rng, (group, 64))
        top = seq.topk(layer, head, queries, k, aggregation=aggregation)
        want_idx, want_scores = exact_topk(as_f32(keys[layer, head], dtype), queries, k, aggregation)
        assert top.indices.dtype == np.uint32 and top.scores.dtype == np.float32
        np.testing.assert_array_equal(top.indices, want_idx)
        np.testing.assert_array_equal(top.scores, want_scores.astype(np.float32))
        assert (top.tokens, top.tokens_scored, top.skipped) == (3000, 3000, 0)
        assert top.keys is None and top.values is None
        assert top.device_ns > 0 and top.model_ns > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_gather_returns_the_stored_rows(device, dtype):
    rng = np.random.default_rng(2)
    seq, keys, values = load(device, rng, dtype)
    queries = coarse(rng, (4, 64))
    top = seq.topk_gather(1, 0, queries, 300)
    want_idx, _ = exact_topk(as_f32(keys[1, 0], dtype), queries, 300)
    np.testing.assert_array_equal(top.indices, want_idx)
    expected_dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[dtype]
    assert top.keys.dtype == expected_dtype and top.keys.shape == (300, 64)
    np.testing.assert_array_equal(top.keys, keys[1, 0][top.indices])
    np.testing.assert_array_equal(top.values, values[1, 0][top.indices])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_is_bit_exact_in_request_order(device, dtype):
    rng = np.random.default_rng(3)
    seq, keys, values = load(device, rng, dtype)
    indices = rng.permutation(3000)[:700]
    k, v = seq.gather(0, 1, indices.tolist())
    np.testing.assert_array_equal(k, keys[0, 1][indices])
    np.testing.assert_array_equal(v, values[0, 1][indices])


def test_page_selection_scores_fewer_keys_and_ranks_them_exactly(device):
    rng = np.random.default_rng(4)
    seq, keys, _ = load(device, rng, "f16", layers=1, heads=1, tokens=40000)
    queries = coarse(rng, (2, 64))
    top = seq.topk(0, 0, queries, 64, budget=4096)
    assert top.tokens == 40000 and 0 < top.tokens_scored < 40000
    # Whatever pages it scored, the scores are exact and ranked.
    all_scores = (queries.astype(np.float64) @ as_f32(keys[0, 0], "f16").T.astype(np.float64)).max(0)
    np.testing.assert_array_equal(top.scores, all_scores[top.indices].astype(np.float32))
    order = np.lexsort((top.indices, -top.scores.astype(np.float64)))
    np.testing.assert_array_equal(order, np.arange(len(order)))
    # A budget covering every token is the exact Top-K.
    full = seq.topk(0, 0, queries, 64, budget=40000)
    np.testing.assert_array_equal(full.indices, exact_topk(as_f32(keys[0, 0], "f16"), queries, 64)[0])


def test_float16_queries_and_uint16_f16_rows(device):
    rng = np.random.default_rng(5)
    k32 = coarse(rng, (1, 1, 500, 32))
    seq = device.kv_create(1, 1, 32, "f16")
    bits = k32.astype(np.float16).view(np.uint16)
    seq.append(bits, bits)  # f16 rows given as their bits
    queries = coarse(rng, (3, 32)).astype(np.float16)
    top = seq.topk(0, 0, queries, 20)
    np.testing.assert_array_equal(top.indices, exact_topk(k32[0, 0], queries.astype(np.float32), 20)[0])


def test_non_contiguous_input_is_accepted(device):
    rng = np.random.default_rng(6)
    full = coarse(rng, (1, 2, 64, 1000)).astype(np.float32)
    keys = full.transpose(0, 1, 3, 2)  # [1, 2, 1000, 64], not C-contiguous
    assert not keys.flags.c_contiguous
    seq = device.kv_create(1, 2, 64, "f32")
    seq.append(keys, keys)
    k, _ = seq.gather(0, 1, [0, 999])
    np.testing.assert_array_equal(k, keys[0, 1][[0, 999]])


def test_sequences_are_listed_refreshed_and_freed(device):
    rng = np.random.default_rng(7)
    seq, keys, _ = load(device, rng, "f32", tokens=100)
    other = device.sequence(seq.id)  # a second handle, as another host would open it
    seq.append(keys[:, :, :10], keys[:, :, :10])
    assert other.tokens == 100
    other.refresh()
    assert other.tokens == 110
    assert seq.id in [s.id for s in device.kv_list()]
    seq.free()
    assert seq.id not in [s.id for s in device.kv_list()]
    with pytest.raises(cxl_pnm.CommandError) as error:
        other.topk(0, 0, np.ones(64, np.float32), 1)
    assert error.value.return_code == 0x0E  # Invalid Handle


def test_device_reports(device):
    info = device.info()
    assert info["compute_units"] >= 1 and set(info["dtypes"]) == {"f32", "f16", "bf16"}
    assert "fw_revision" in device.identify()
    assert "media_status" in device.health()


@pytest.mark.parametrize("dtype", DTYPES)
def test_other_float_arrays_are_converted_once(device, dtype):
    rng = np.random.default_rng(8)
    k64 = np.asfortranarray(coarse(rng, (1, 1, 400, 32)).astype(np.float64))
    assert not k64.flags.c_contiguous
    seq = device.kv_create(1, 1, 32, dtype)
    seq.append(k64, k64)  # float64, not C-contiguous: converted to the sequence's dtype
    queries = coarse(rng, (2, 32)).astype(np.float64)
    top = seq.topk_gather(0, 0, queries, 25)
    np.testing.assert_array_equal(top.indices, exact_topk(k64[0, 0], queries, 25)[0])
    np.testing.assert_array_equal(top.keys, as_stored(k64[0, 0].astype(np.float32), dtype)[top.indices])
