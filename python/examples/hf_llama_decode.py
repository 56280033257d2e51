#!/usr/bin/env python3
"""A Hugging Face Llama decoding with its attention served by a cxl-pnm device.

A small Llama is built from a config (random weights, nothing downloaded),
a random prompt is prefilled, and tokens are generated greedily three ways:

- reference: transformers' own eager attention over the whole cache;
- cxl-pnm with k covering every token: the decode steps' attention comes
  from cxl_pnm.hf.PnmAttention (hot window in host memory, the rest in the
  device, Top-K rows gathered back). This must give the reference's tokens;
- cxl-pnm with each smaller k of --ks: Top-K attention proper.

For each it reports the generated tokens against the reference (identical,
or the first step that differs), and, teacher-forced on the reference's
tokens so every step sees the same context, the logits' relative error and
how often the argmax agrees. Exit status 1 if the exact run differs.

    python examples/hf_llama_decode.py                  # embedded device
    python examples/hf_llama_decode.py --device /dev/shm/cxl-pnm0 --json
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import numpy as np
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

import cxl_pnm
from cxl_pnm.hf import PnmAttention


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.q_heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        # Wider than the default 0.02: a randomly initialised model's
        # attention is otherwise nearly uniform, which no trained model's is.
        initializer_range=args.init_range,
        attn_implementation="eager",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).eval()


# transformers 5 renamed the cache argument `past_key_values` to `cache`.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@torch.no_grad()
def decode(model, prompt: torch.Tensor, steps: int, forced: torch.Tensor | None):
    """Greedy decoding (or teacher-forced on `forced`): tokens and the logits of each step."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt, use_cache=True, **{CACHE_ARG: cache})
    logits = [out.logits[0, -1].float().clone()]
    tokens = []
    for step in range(steps):
        token = int(logits[-1].argmax()) if forced is None else int(forced[step])
        tokens.append(int(logits[-1].argmax()))
        out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{CACHE_ARG: cache})
        logits.append(out.logits[0, -1].float().clone())
    return tokens, torch.stack(logits[:-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="a running pnm-device's region (default: embedded)")
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--hot-window", type=int, default=32)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--evict-batch", type=int, default=16, help="tokens per eviction")
    parser.add_argument("--ks", default="64,16", help="smaller k values to compare")
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--init-range", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON report")
    args = parser.parse_args()

    model = build_model(args)
    generator = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_tokens), generator=generator)
    context = args.prompt_tokens + args.new_tokens

    start = time.perf_counter()
    ref_tokens, ref_logits = decode(model, prompt, args.new_tokens, None)
    ref_seconds = time.perf_counter() - start

    device = cxl_pnm.Device(args.device) if args.device else cxl_pnm.Device.embedded("256MiB")
    attention = PnmAttention(
        device,
        hot_window=args.hot_window,
        k=1,
        sinks=args.sinks,
        dtype=args.dtype,
        evict_batch=args.evict_batch,
    )
    AttentionInterface.register("cxl_pnm", attention)
    model.set_attn_implementation("cxl_pnm")

    runs = []
    for k in [context] + [int(k) for k in args.ks.split(",") if k]:
        attention.k = k
        attention.reset()
        start = time.perf_counter()
        tokens, logits = decode(model, prompt, args.new_tokens, None)
        seconds = time.perf_counter() - start
        calls, link = attention.decode_calls, attention.link_bytes
        evicted = max(s.evicted for s in attention.stores.values())
        attention.reset()
        _, forced_logits = decode(model, prompt, args.new_tokens, torch.tensor(ref_tokens))
        attention.reset()
        differ = [i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b]
        first = differ[0] if differ else None
        same_until = first if first is not None else len(tokens)
        err = (forced_logits - ref_logits).norm(dim=1) / ref_logits.norm(dim=1)
        runs.append(
            {
                "k": k,
                "exact": k >= context,
                "tokens_identical": first is None,
                "first_divergence": first,
                "max_abs_logit_diff_before_divergence": float(
                    (logits[:same_until] - ref_logits[:same_until]).abs().max()
                )
                if same_until
                else 0.0,
                "teacher_forced_logits_rel_error_mean": float(err.mean()),
                "teacher_forced_logits_rel_error_max": float(err.max()),
                "teacher_forced_argmax_agreement": float(
                    (forced_logits.argmax(dim=1) == ref_logits.argmax(dim=1)).float().mean()
                ),
                "evicted_tokens_at_end": int(evicted),
                "device_attention_calls": calls,
                "link_bytes_per_call": link / max(calls, 1),
                "seconds": seconds,
            }
        )

    report = {
        "model": {
            "layers": args.layers,
            "q_heads": args.q_heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.hidden // args.q_heads,
            "vocab": args.vocab,
            "weights": f"random (seed {args.seed}, initializer_range {args.init_range})",
        },
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "hot_window": args.hot_window,
        "sinks": args.sinks,
        "kv_dtype": args.dtype,
        "device": args.device or "embedded",
        "reference_seconds": ref_seconds,
        "runs": runs,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"Llama ({args.layers} layers, {args.q_heads} query / {args.kv_heads} KV heads, "
            f"head_dim {args.hidden // args.q_heads}, random weights): {args.prompt_tokens}-token "
            f"prompt, {args.new_tokens} greedy tokens; hot window {args.hot_window} + "
            f"{args.sinks} sinks in host memory, the rest on the {report['device']} device ({args.dtype})"
        )
        print(
            f"{'k':>6} {'tokens vs full attention':>26} {'logits rel err (forced)':>24} "
            f"{'argmax agree':>13} {'link B/call':>12}"
        )
        for r in runs:
            same = (
                "identical"
                if r["tokens_identical"]
                else f"differ from step {r['first_divergence']}"
            )
            label = f"{r['k']}" + (" (all)" if r["exact"] else "")
            print(
                f"{label:>6} {same:>26} "
                f"{r['teacher_forced_logits_rel_error_mean']:>12.2e} (max {r['teacher_forced_logits_rel_error_max']:.1e}) "
                f"{r['teacher_forced_argmax_agreement']:>12.1%} {r['link_bytes_per_call']:>12.0f}"
            )
    exact = runs[0]
    return 0 if exact["tokens_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
