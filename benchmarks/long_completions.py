"""Benchmark: GRPO steps with long completions, one TRL 1.16 script run by TRL and by `rlora.trl`.

The script (`SCRIPT`, run as it is by both; only the import differs) trains a LoRA adapter (r=8,
all-linear) on SmolLM2-135M-Instruct with `GRPOTrainer`: 2 prompts x 4 completions a step, each
exactly `L` tokens (`generation_kwargs={"min_new_tokens": L}` with `max_completion_length=L`, so
both trainers sample, score and train the same number of tokens), 1 iteration, beta 0, fp32, no
gradient checkpointing (TRL's default is on; set off for both so the comparison is of the loop,
not of the memory trade, which `benchmarks/checkpointing.py` measures; `--checkpointing` turns it
on in both, which 1024 tokens need within 24 GiB). The reward asks for many
distinct words. Each trainer and length runs in its own process: seconds per step from the
script's own clock (median of the steps after the first), peak RSS from the OS.

    python benchmarks/long_completions.py --lengths 128 512 1024 --steps 3
    python benchmarks/long_completions.py --lengths 1024 --steps 2 --checkpointing --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import peer_python, record, require_peer, run_measured  # noqa: E402

SCRIPT = r'''
import argparse, json, os, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("--face", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--length", type=int, required=True)
ap.add_argument("--steps", type=int, required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--checkpointing", action="store_true")
args = ap.parse_args()
import torch
torch.set_num_threads(args.threads)
import datasets
from peft import LoraConfig
if args.face == "trl":
    from trl import GRPOConfig, GRPOTrainer
else:
    from rlora.trl import GRPOConfig, GRPOTrainer
from transformers import TrainerCallback

def many_words(completions, **kwargs):
    return [len(set(c[0]["content"].lower().split())) / 100 for c in completions]

topics = ["the sea", "a mountain", "a city at night", "an old library", "a forest", "a desert road"]
train = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"Write a long story about {t}."}]}
                                    for t in topics])
config = GRPOConfig(output_dir=os.path.join(args.out, "run"), report_to="none", save_strategy="no", use_cpu=True,
                    bf16=False, seed=0, logging_steps=1, max_steps=args.steps, learning_rate=1e-4,
                    lr_scheduler_type="constant", per_device_train_batch_size=8, gradient_accumulation_steps=1,
                    num_generations=4, num_iterations=1, max_completion_length=args.length,
                    generation_kwargs={"min_new_tokens": args.length}, temperature=1.0, top_p=1.0, top_k=0,
                    beta=0.0, gradient_checkpointing=args.checkpointing, disable_tqdm=True)
lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
ticks = []

class Clock(TrainerCallback):
    def on_step_end(self, a, state, control, **kw):
        ticks.append(time.perf_counter())

trainer = GRPOTrainer(model=args.model, reward_funcs=many_words, args=config, train_dataset=train, peft_config=lora,
                      callbacks=[Clock()])
start = time.perf_counter()
trainer.train()
json.dump({"start": start, "ticks": ticks}, open(os.path.join(args.out, "log.json"), "w"))
'''


def seconds_per_step(out: str) -> float:
    log = json.load(open(os.path.join(out, "log.json")))
    ticks = [log["start"], *log["ticks"]]
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    return statistics.median(steps[1:] or steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing on in both trainers (needed at 1024 tokens within 24 GiB)")
    parser.add_argument("--faces", nargs="+", default=["trl", "rlora"])
    parser.add_argument("--model", default=None, help="the model directory (default: rlora fetch smollm2-135m-instruct)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if "trl" in args.faces:
        require_peer("venv-modern", "benchmarks/long_completions.py")
    from rlora.fetch import fetch

    model = args.model or fetch("smollm2-135m-instruct")
    work = tempfile.mkdtemp(prefix="rlora-long-")
    script = os.path.join(work, "grpo_long.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    pythons = {"trl": peer_python("venv-modern"), "rlora": sys.executable}
    rows = {}
    for length in args.lengths:
        for face in args.faces:
            out = os.path.join(work, f"{face}-{length}")
            rss = run_measured([pythons[face], script, "--face", face, "--model", model, "--length", str(length),
                                "--steps", str(args.steps), "--out", out, "--threads", str(args.threads),
                                *(["--checkpointing"] if args.checkpointing else [])])
            rows[face, length] = (seconds_per_step(out), rss)
            print(f"{face} {length} tokens: {rows[face, length][0]:.2f} s / step, peak RSS {rss:.0f} MiB", flush=True)
    lines = ["| completion tokens | " + " | ".join(f"{f} s / step | {f} peak RSS MiB" for f in args.faces) +
             (" | rlora / TRL s | rlora / TRL RSS |" if len(args.faces) == 2 else " |"),
             "|---|" + "---|---|" * len(args.faces) + ("---|---|" if len(args.faces) == 2 else "")]
    for length in args.lengths:
        cells = " | ".join(f"{rows[f, length][0]:.2f} | {rows[f, length][1]:.0f}" for f in args.faces)
        ratio = ""
        if len(args.faces) == 2:
            (t0, m0), (t1, m1) = rows["trl", length], rows["rlora", length]
            ratio = f" | {t1 / t0:.2f} | {m1 / m0:.2f}"
        lines.append(f"| {length} | {cells}{ratio} |")
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_record:
        record("long-completions", "Long completions: a GRPO step on SmolLM2-135M-Instruct, TRL 1.16 and rlora.trl",
               f"CPU, {args.threads} threads each; 2 prompts x 4 completions of exactly L tokens, LoRA r=8 all-linear, "
               f"fp32, gradient checkpointing {'on' if args.checkpointing else 'off'}; median of steps "
               f"2..{args.steps}", markdown)


if __name__ == "__main__":
    main()
