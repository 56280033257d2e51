"""A decode-step attention backend for Hugging Face transformers.

``PnmAttention`` is an attention function in the shape transformers'
``AttentionInterface`` takes, so a model switches to it by name, without a
change to its code::

    from transformers import AttentionInterface
    attention = cxl_pnm.hf.PnmAttention(cxl_pnm.Device.embedded("1GiB"),
                                        hot_window=64, k=256)
    AttentionInterface.register("cxl_pnm", attention)
    model.set_attn_implementation("cxl_pnm")

Per (layer, batch row) it keeps a ``TieredKv``: every token the model's
cache receives is appended to it (the first ``sinks`` and the newest
``hot_window`` stay in host memory; older ones are evicted to the device).
A decode step (one query position) is computed by ``TieredKv.attend_layer``:
exact attention over the host tokens plus the device's Top-``k`` rows of
the evicted tokens, under one softmax. A prefill (several query positions)
is computed exactly on the host, as an engine would: the device serves the
decode steps, whose cost is dominated by reading the whole KV.

The model's own cache still holds every token (transformers gives the
attention function the full K and V); an engine that adopts this would keep
only the hot window on the GPU. Rows with padding (an attention mask that
hides cached tokens) are not supported: batches must be unpadded.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ._native import Device, DeviceSet, TieredKv

try:
    import torch
except ImportError as e:  # pragma: no cover - the module is useless without torch
    raise ImportError("cxl_pnm.hf needs PyTorch (pip install torch transformers)") from e


class PnmAttention:
    """An attention function for transformers backed by a cxl-pnm device.

    ``devices``: a Device or DeviceSet holding the evicted tokens.
    ``hot_window``, ``sinks``: tokens kept in host memory.
    ``k``: rows the device returns per (layer, KV head) each decode step.
    ``dtype``: how the device stores K and V ("f32", "f16", "bf16").
    ``evict_batch``: tokens per eviction (0: a whole device page, 64 KiB of
    rows; smaller batches keep the host part near ``hot_window`` when pages
    hold many tokens).
    """

    def __init__(
        self,
        devices: Union[Device, DeviceSet],
        *,
        hot_window: int,
        k: int,
        sinks: int = 4,
        dtype: str = "f32",
        evict_batch: int = 0,
    ) -> None:
        self.devices = devices
        self.evict_batch = evict_batch
        self.hot_window = hot_window
        self.k = k
        self.sinks = sinks
        self.dtype = dtype
        self.stores: Dict[Tuple[int, int], TieredKv] = {}
        #: Device-served decode steps (per layer and batch row) so far.
        self.decode_calls = 0
        #: Bytes that crossed the link for them (queries, Top-K, rows).
        self.link_bytes = 0

    def reset(self) -> None:
        """Frees every tiered KV: call before a new sequence."""
        for store in self.stores.values():
            store.free()
        self.stores.clear()
        self.decode_calls = 0
        self.link_bytes = 0

    def _store(self, layer: int, row: int, heads: int, head_dim: int) -> TieredKv:
        store = self.stores.get((layer, row))
        if store is None:
            store = TieredKv(
                self.devices,
                1,
                heads,
                head_dim,
                dtype=self.dtype,
                hot_window=self.hot_window,
                k=self.k,
                sinks=self.sinks,
                evict_batch=self.evict_batch,
            )
            self.stores[(layer, row)] = store
        return store

    def _to_device_dtype(self, rows: "torch.Tensor") -> np.ndarray:
        """K or V rows as the device stores them (bf16 as its uint16 bits)."""
        rows = rows.detach().to("cpu")
        if self.dtype == "f32":
            return rows.to(torch.float32).contiguous().numpy()
        if self.dtype == "f16":
            return rows.to(torch.float16).contiguous().numpy()
        return rows.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)

    def __call__(
        self,
        module: Any,
        query: "torch.Tensor",
        key: "torch.Tensor",
        value: "torch.Tensor",
        attention_mask: Optional["torch.Tensor"],
        scaling: Optional[float] = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> Tuple["torch.Tensor", None]:
        # query [B, Hq, Lq, D]; key, value [B, Hkv, L, D]: the whole cache.
        batch, q_heads, q_len, head_dim = query.shape
        kv_heads, total = key.shape[1], key.shape[2]
        group = q_heads // kv_heads
        layer = int(getattr(module, "layer_idx", 0))
        scaling = head_dim**-0.5 if scaling is None else scaling
        out = torch.empty((batch, q_len, q_heads, head_dim), dtype=query.dtype)
        for b in range(batch):
            store = self._store(layer, b, kv_heads, head_dim)
            new = total - store.tokens
            if new < 0:
                raise RuntimeError(
                    f"layer {layer}: the model's cache holds {total} tokens, the device "
                    f"{store.tokens}: call reset() before a new sequence"
                )
            if new > 0:
                k_rows = self._to_device_dtype(key[b, :, total - new :, :]).reshape(
                    1, kv_heads, new, head_dim
                )
                v_rows = self._to_device_dtype(value[b, :, total - new :, :]).reshape(
                    1, kv_heads, new, head_dim
                )
                store.append(k_rows, v_rows)
            if q_len == 1:
                # The device's attention scales by 1/sqrt(head_dim): fold
                # the model's own scaling into the queries.
                adjust = scaling * math.sqrt(head_dim)
                q = (query[b, :, 0, :].detach().to("cpu", torch.float32) * adjust).numpy()
                o, link = store.attend_layer(0, q.reshape(kv_heads, group, head_dim))
                self.decode_calls += 1
                self.link_bytes += link
                out[b, 0] = torch.from_numpy(o.reshape(q_heads, head_dim)).to(query.dtype)
            else:
                out[b] = _exact_causal(query[b], key[b], value[b], group, scaling)
        return out.to(query.device), None


def _exact_causal(
    query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor", group: int, scaling: float
) -> "torch.Tensor":
    """Causal attention of the last Lq positions over all L: [Lq, Hq, D]."""
    q_len, total = query.shape[1], key.shape[1]
    key = key.repeat_interleave(group, dim=0)
    value = value.repeat_interleave(group, dim=0)
    logits = torch.matmul(query.float(), key.float().transpose(1, 2)) * scaling
    positions = torch.arange(total - q_len, total).unsqueeze(1)
    logits = logits.masked_fill(torch.arange(total).unsqueeze(0) > positions, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.matmul(weights, value.float()).transpose(0, 1).to(query.dtype)


__all__ = ["PnmAttention"]
