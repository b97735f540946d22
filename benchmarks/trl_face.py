"""Benchmark: one TRL 1.16 GRPO script, run by TRL 1.16 and by `rlora.trl` (the import changed).

The script (`SCRIPT` below, written to the work directory and run as it is by both) trains a LoRA
adapter on SmolLM2-135M-Instruct with `GRPOTrainer` on rlora's one-word task ("Name a fruit.
Answer in one word.": a correctness and a format reward, weights 1 and 0.25), 4 prompts x 8
completions of at most 8 tokens a step, 1 iteration, beta 0, lr 1e-3 constant, fp32, and saves the
adapter with `save_model`. Each trainer runs in its own process (TRL in `.peers/venv-modern`):
seconds per step from the script's own clock, peak RSS from the OS, the reward at the same steps
from `on_log`. Then both saved adapters are loaded with plain transformers + peft and answer the
task's 50 held-out questions greedily: the held-out accuracy of each.

    python benchmarks/trl_face.py --steps 10
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

# The TRL script both trainers run; `--face trl|rlora` picks the import, nothing else differs.
SCRIPT = r'''
import argparse, json, os, re, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("--face", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--steps", type=int, required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--threads", type=int, default=2)
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

data = json.load(open(args.data))
WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")

def answer(text):
    word = text.strip().strip("\"'*`").strip()
    if word[-1:] in (".", "!"):
        word = word[:-1]
    word = word.strip("\"'*`").lower()
    return word if WORD.fullmatch(word) else None

def in_category(completions, members, **kwargs):
    out = []
    for c, m in zip(completions, members):
        w = answer(c[0]["content"])
        out.append(float(w is not None and (w in m or w[:-1] in m or w[:-2] in m)))
    return out

def one_word(completions, **kwargs):
    return [float(answer(c[0]["content"]) is not None) for c in completions]

train = datasets.Dataset.from_list(data["train"])
config = GRPOConfig(output_dir=os.path.join(args.out, "run"), report_to="none", save_strategy="no", use_cpu=True,
                    bf16=False, seed=0, logging_steps=1, max_steps=args.steps, learning_rate=1e-3,
                    lr_scheduler_type="constant", per_device_train_batch_size=32, gradient_accumulation_steps=1,
                    num_generations=8, num_iterations=1, max_completion_length=8, temperature=1.0, top_p=1.0,
                    top_k=0, beta=0.0, reward_weights=[1.0, 0.25], disable_tqdm=True)
lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
log = []

class Clock(TrainerCallback):
    def on_step_end(self, a, state, control, **kw):
        log.append({"step": state.global_step, "t": time.perf_counter()})
    def on_log(self, a, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            log.append({"step": state.global_step, "reward": logs["reward"],
                        "correct": logs.get("rewards/in_category/mean")})

trainer = GRPOTrainer(model=args.model, reward_funcs=[in_category, one_word], args=config, train_dataset=train,
                      peft_config=lora, callbacks=[Clock()])
start = time.perf_counter()
trainer.train()
trainer.save_model(os.path.join(args.out, "adapter"))
json.dump({"start": start, "log": log}, open(os.path.join(args.out, "log.json"), "w"))
'''


def task_data(path: str) -> None:
    """The one-word task's prompts, each with its category's accepted answers (the script runs
    without rlora in TRL's venv)."""
    from rlora.tasks.oneword import CATEGORIES, split

    train, held_out = split()

    def rows(items):
        return [{"prompt": r["prompt"], "members": sorted(CATEGORIES[r["category"]][1]), "category": r["category"]}
                for r in items]

    with open(path, "w") as f:
        json.dump({"train": rows(train), "held_out": rows(held_out)}, f)


def held_out_accuracy(model_dir: str, adapter: str | None, data: str) -> float:
    """The greedy held-out accuracy of the base plus `adapter` (peft's format), with plain
    transformers + peft: the share of one-word answers naming a member of the asked category."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora.tasks.oneword import in_category

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    rows = json.load(open(data))["held_out"]
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    outputs = []
    for start in range(0, len(texts), 25):
        batch = tokenizer(texts[start:start + 25], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return sum(in_category(outputs, [r["category"] for r in rows])) / len(rows)


def summarize(name: str, out: str, rss: float) -> dict:
    log = json.load(open(os.path.join(out, "log.json")))
    ticks = [log["start"]] + [e["t"] for e in log["log"] if "t" in e]
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    rewards = {e["step"]: e["reward"] for e in log["log"] if "reward" in e}
    return {"name": name, "s_per_step": statistics.median(steps[1:] or steps), "rss": rss, "rewards": rewards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="the model directory (default: rlora fetch smollm2-135m-instruct)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    require_peer("venv-modern", "benchmarks/trl_face.py")
    from rlora.fetch import fetch

    model = args.model or fetch("smollm2-135m-instruct")
    work = tempfile.mkdtemp(prefix="rlora-trl-face-")
    script, data = os.path.join(work, "grpo_script.py"), os.path.join(work, "oneword.json")
    with open(script, "w") as f:
        f.write(SCRIPT)
    task_data(data)
    results = []
    for face, python in (("trl", peer_python("venv-modern")), ("rlora", sys.executable)):
        out = os.path.join(work, face)
        rss = run_measured([python, script, "--face", face, "--model", model, "--data", data, "--steps",
                            str(args.steps), "--out", out, "--threads", str(args.threads)])
        results.append(summarize(face, out, rss))
        results[-1]["held_out"] = held_out_accuracy(model, os.path.join(out, "adapter"), data)
    base = held_out_accuracy(model, None, data)
    trl, ours = results
    shown = [s for s in dict.fromkeys((1, args.steps // 2, args.steps)) if s in trl["rewards"] and s in ours["rewards"]]
    lines = ["| trainer | s / step (median of steps 2..N) | peak RSS MiB | reward at steps " +
             ", ".join(map(str, shown)) + " | held-out accuracy (base " + f"{base:.2f}) |", "|---|---|---|---|---|"]
    for r in results:
        label = "TRL 1.16 GRPOTrainer" if r["name"] == "trl" else "rlora.trl GRPOTrainer (import changed)"
        lines.append(f"| {label} | {r['s_per_step']:.2f} | {r['rss']:.0f} | " +
                     ", ".join(f"{r['rewards'][s]:.3f}" for s in shown) + f" | {r['held_out']:.2f} |")
    ratio = ours["s_per_step"] / trl["s_per_step"]
    lines.append(f"\nrlora.trl takes {ratio:.2f}x TRL 1.16's seconds per step and {ours['rss'] / trl['rss']:.2f}x its "
                 "peak RSS, from the same script.")
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_record:
        record("trl-face", "A TRL 1.16 GRPO script under TRL and under rlora.trl",
               f"CPU, {args.threads} threads each; SmolLM2-135M-Instruct, the one-word task, 4 prompts x 8 "
               f"completions of at most 8 tokens, LoRA r=8 all-linear, lr 1e-3, {args.steps} steps; held-out: 50 "
               "questions, greedy, plain transformers + peft on each saved adapter", markdown)


if __name__ == "__main__":
    main()
