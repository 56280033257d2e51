"""The Hugging Face example: greedy tokens with exact Top-K equal full attention's."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DeviceProcess

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_llama_decode.py"
HAVE_HF = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
needs_hf = pytest.mark.skipif(
    not HAVE_HF and not os.environ.get("PNM_REQUIRE_TORCH"),
    reason="torch and transformers are not installed (pip install 'cxl-pnm[hf]')",
)


def run_example(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--json", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


@needs_hf
def test_exact_topk_decodes_the_reference_tokens_and_small_k_is_reported():
    report = run_example("--prompt-tokens", "160", "--new-tokens", "24", "--ks", "32")
    exact, small = report["runs"]
    assert exact["exact"] and exact["tokens_identical"]
    assert exact["teacher_forced_logits_rel_error_max"] < 1e-4
    assert exact["teacher_forced_argmax_agreement"] == 1.0
    assert exact["evicted_tokens_at_end"] > 100  # the device really served most tokens
    assert exact["device_attention_calls"] == 24 * 4
    assert small["k"] == 32 and not small["exact"]
    assert 0 <= small["teacher_forced_argmax_agreement"] <= 1
    assert small["link_bytes_per_call"] < exact["link_bytes_per_call"]


@needs_hf
def test_example_against_a_separate_device_process():
    process = DeviceProcess()
    try:
        report = run_example("--device", str(process.path), "--prompt-tokens", "96",
                             "--new-tokens", "8", "--ks", "")
        assert report["runs"][0]["tokens_identical"]
    finally:
        process.close()


@needs_hf
def test_hook_serves_a_batch_and_gqa_layers_like_eager_attention():
    import torch
    from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

    import cxl_pnm
    from cxl_pnm.hf import PnmAttention

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
        attn_implementation="eager",
    )
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 300, (2, 80), generator=torch.Generator().manual_seed(4))
    step = torch.tensor([[7], [11]])

    # transformers 5 renamed `past_key_values` to `cache`.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def logits():
        cache = {name: DynamicCache(config=model.config)}
        with torch.no_grad():
            model(input_ids=prompt, use_cache=True, **cache)
            return model(input_ids=step, use_cache=True, **cache).logits[:, -1]

    reference = logits()
    attention = PnmAttention(cxl_pnm.Device.embedded("64MiB"), hot_window=8, k=4096, evict_batch=8, dtype="f32")
    AttentionInterface.register("cxl_pnm_test", attention)
    model.set_attn_implementation("cxl_pnm_test")
    served = logits()
    assert set(attention.stores) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # per layer and batch row
    assert all(s.evicted > 60 for s in attention.stores.values())
    assert attention.decode_calls == 4
    torch.testing.assert_close(served, reference, rtol=1e-4, atol=1e-5)
    # A second sequence without reset is refused, not silently mixed in.
    with pytest.raises(RuntimeError):
        logits()
    attention.reset()
    torch.testing.assert_close(logits(), reference, rtol=1e-4, atol=1e-5)
