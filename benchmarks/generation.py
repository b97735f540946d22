"""Benchmark: generation with a LoRA adapter, merged and unmerged, against the bare base model.

GPT-2-124M shape (random weights, vocab 50 257), batch 16, prompt 16 + 32 new tokens, greedy;
r=8 on c_attn and r=64 on every linear layer. Merging is rlora's exact merge (base weights
restored from a copy afterwards). Each figure is the best of 3 in one run.

    .venv/bin/python benchmarks/generation.py
"""

from __future__ import annotations

import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_of, record  # noqa: E402

from rlora.models import Policy  # noqa: E402

ADAPTERS = {"r=8 c_attn": dict(r=8, lora_alpha=32, target_modules=["c_attn"]),
            "r=64 all linear": dict(r=64, lora_alpha=128, target_modules=["c_attn", "c_proj", "c_fc"])}


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = GPT2Config()  # 124M shape
    ids = torch.randint(0, config.vocab_size, (16, 16))
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    base = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        bare = best_of(lambda: base.generate(input_ids=ids, attention_mask=mask, **kwargs))
    rows = [f"| bare base model | {bare:.2f} | 1.00 |"]
    for name, lora in ADAPTERS.items():
        policy = Policy(get_peft_model(GPT2LMHeadModel(config).eval(), LoraConfig(task_type="CAUSAL_LM",
                                                                                 init_lora_weights=False, **lora)),
                        "adapter").eval()
        for merged in (False, True):
            t = best_of(lambda: policy.generate(ids, mask, merged=merged, **kwargs))
            rows.append(f"| {name}, {'merged' if merged else 'unmerged'} | {t:.2f} | {t / bare:.2f} |")
    table = "\n".join(["| generation | seconds | / bare base |", "|---|---|---|", *rows])
    print(table)
    record("generation", "Generation with the adapter, merged and unmerged", "CPU, 2 threads, best of 3", table)


if __name__ == "__main__":
    main()
