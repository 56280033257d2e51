"""The Hugging Face example: greedy tokens with exact Top-K equal full attention's."""

from __future__ import annotations

import importlib.util
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
