"""Benchmark: how far sampling (an HF `generate` decode step) is from this machine's memory floor.

A decode step of a batch of a few rows reads every weight of the model once and does little
arithmetic per byte, so its floor is the model's bytes over the rate this machine streams memory.
This prints: that rate (a sum over a 256 MiB float32 tensor), the floor per step for
SmolLM2-135M-Instruct in float32, the measured seconds per decode step of `generate` on 8 rows
with a LoRA adapter (r=8, all-linear) over `--tokens` new tokens, and the rate at which torch's
float32 `linear` reads each of the model's weight shapes for 8 rows (where the decode's time goes).

    .venv/bin/python benchmarks/decode_floor.py [--tokens 64] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_of, record  # noqa: E402

ROWS = 8


def stream_rate() -> float:
    """Bytes per second read by summing a 256 MiB float32 tensor, the best of several runs."""
    x = torch.randn(64 << 20)
    return x.numel() * 4 / best_of(lambda: x.sum(), repeats=5)


def linear_rate(out_features: int, in_features: int) -> float:
    """Weight bytes per second that `linear` reads for `ROWS` rows of one weight shape."""
    w, x = torch.randn(out_features, in_features), torch.randn(ROWS, in_features)
    reps = max(1, (64 << 20) // w.numel())
    return w.numel() * 4 * reps / best_of(lambda: [torch.nn.functional.linear(x, w) for _ in range(reps)], repeats=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora.fetch import fetch

    path = args.model or fetch("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    shapes = sorted({tuple(m.weight.shape) for m in base.modules() if isinstance(m, torch.nn.Linear)})  # before LoRA
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    ids = tokenizer(["Write a long story about the sea."] * ROWS, return_tensors="pt")
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        t0 = time.perf_counter()
        model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **kwargs)
        step = (time.perf_counter() - t0) / args.tokens
    rate = stream_rate()
    floor = model_bytes / rate
    lines = [f"- memory read rate (sum over 256 MiB): {rate / 1e9:.1f} GB/s",
             f"- float32 weights: {model_bytes / 2**20:.0f} MiB, so a decode step's floor is {floor * 1e3:.1f} ms",
             f"- `generate`, {ROWS} rows, LoRA r=8 all-linear, {args.tokens} new tokens: {step * 1e3:.1f} ms per "
             f"step, {step / floor:.1f}x the floor",
             f"- `linear` on {ROWS} rows reads each weight shape at:"]
    for out_features, in_features in shapes:
        lines.append(f"  - ({out_features}, {in_features}): {linear_rate(out_features, in_features) / 1e9:.1f} GB/s")
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_record:
        record("decode-floor", "Sampling against the memory floor: a decode step of SmolLM2-135M-Instruct",
               f"CPU, {args.threads} threads, fp32", markdown)


if __name__ == "__main__":
    main()
