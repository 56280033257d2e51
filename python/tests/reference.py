"""NumPy references the device's answers are compared with."""

from __future__ import annotations

import numpy as np


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def as_stored(values32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in the array form a `dtype` sequence takes."""
    if dtype == "f32":
        return values32.astype(np.float32)
    if dtype == "f16":
        return values32.astype(np.float16)
    return to_bf16_bits(values32)


def as_f32(stored: np.ndarray, dtype: str) -> np.ndarray:
    return from_bf16_bits(stored) if dtype == "bf16" else stored.astype(np.float32)


def coarse(rng: np.random.Generator, shape, scale: float = 0.25) -> np.ndarray:
    """Small multiples of `scale`: exact in every dtype, and dot products of
    them are exact in float32, so scores compare bit for bit and ties are real."""
    return (rng.integers(-4, 5, size=shape) * scale).astype(np.float32)


def exact_topk(keys32: np.ndarray, queries32: np.ndarray, k: int, aggregation: str = "max"):
    """Indices and scores of the exact Top-K: the group's scores combined,
    best first, equal scores by lower index."""
    scores = queries32.astype(np.float64) @ keys32.astype(np.float64).T
    combined = scores.max(axis=0) if aggregation == "max" else scores.mean(axis=0)
    order = np.lexsort((np.arange(len(combined)), -combined))[:k]
    return order.astype(np.uint32), combined[order]


def attention(queries32: np.ndarray, keys32: np.ndarray, values32: np.ndarray) -> np.ndarray:
    """Softmax attention, scale 1/sqrt(d), in float64: [G, d]."""
    d = queries32.shape[-1]
    logits = queries32.astype(np.float64) @ keys32.astype(np.float64).T / np.sqrt(d)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights @ values32.astype(np.float64)
