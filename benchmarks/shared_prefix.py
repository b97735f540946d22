"""Benchmark: the update pass of a group method with each prompt run once per group, or per row.

SmolLM2-135M-Instruct (`rlora fetch`), LoRA r=8 on every linear layer, 4 chat-templated prompts
(33-37 tokens, left-padded) x 8 completions of 8 tokens. One step = the policy's log-probs
of every response token, forward and backward of `(logprobs * weights * mask).sum()`: with
`forward_responses` (each row runs its prompt) and `forward_group_responses` (each prompt runs
once, its cache repeated for its 8 completions). Both in one process on one thread, alternating,
median of the repeats; also the largest log-prob difference between them and of the gradients.

    .venv/bin/python benchmarks/shared_prefix.py [--repeats 5] [--profile] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record  # noqa: E402

from rlora.config import ModelConfig  # noqa: E402
from rlora.fetch import fetch  # noqa: E402
from rlora.models import build_policy  # noqa: E402
from rlora.rollout.forward import forward_group_responses, forward_responses  # noqa: E402
from rlora.rollout.generation import left_pad  # noqa: E402

QUESTIONS = ["What is the capital of France?", "What colour is the sky?", "Give me one word.", "Say hello."]
GROUP, RESPONSE = 8, 8
LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
        "init_lora_weights": False}  # an adapter that acts, so the log-probs differ from the base's


def step(policy, fn, batch, weights) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward + backward; returns the log-probs and the LoRA gradients."""
    policy.zero_grad(set_to_none=True)
    scores = fn(policy, *batch)
    (scores.logprobs * weights * batch[3]).sum().backward()
    return scores.logprobs.detach(), [p.grad for p in policy.trainable_parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each way (median)")
    parser.add_argument("--profile", action="store_true", help="print where the time of each way goes")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    path = fetch("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = build_policy(ModelConfig(model_path=path, peft_config=LORA), tokenizer, value_head=False).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    query_ids, query_mask = left_pad([list(p) for p in prompts for _ in range(GROUP)], tokenizer.pad_token_id)
    b = len(query_ids)
    response_ids = torch.randint(3, len(tokenizer), (b, RESPONSE))
    response_mask = torch.ones(b, RESPONSE, dtype=torch.bool)
    weights = torch.randn(b, RESPONSE)
    batch = (query_ids, query_mask, response_ids, response_mask)
    ways = {"unshared (forward_responses)": forward_responses,
            "shared (forward_group_responses)": lambda policy, *x: forward_group_responses(policy, *x, GROUP)}

    results = {name: step(policy, fn, batch, weights) for name, fn in ways.items()}  # also the warm-up
    (lp_a, grads_a), (lp_b, grads_b) = results.values()
    lp_diff = (lp_a - lp_b).abs().max().item()
    grad_diff = max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(grads_a, grads_b))
    times = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            step(policy, fn, batch, weights)
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    unshared, shared = medians.values()

    rows = ["| pass | forward + backward s (median) | / unshared |", "|---|---|---|"]
    rows += [f"| {name} | {s:.3f} | {s / unshared:.2f} |" for name, s in medians.items()]
    lengths = sorted(len(p) for p in prompts)
    text = "\n".join(rows) + (
        f"\n\nunshared / shared, same run: **{unshared / shared:.2f}**; max abs log-prob difference "
        f"{lp_diff:.1e}, max gradient difference relative to the largest entry {grad_diff:.1e}.")
    print(text)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in ways.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(policy, fn, batch, weights)
            print(f"\n{name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if not args.no_record:
        note = (f"CPU, 1 thread; SmolLM2-135M-Instruct, LoRA r=8 all-linear; {len(prompts)} chat prompts of "
                f"{lengths[0]}-{lengths[-1]} tokens x {GROUP} completions of {RESPONSE} tokens; "
                f"median of {args.repeats}")
        record("shared_prefix", "Group update pass: each prompt once per group (shared KV cache) vs once per row",
               note, text)


if __name__ == "__main__":
    main()
