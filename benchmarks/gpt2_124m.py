"""Benchmark: PPO + LoRA on the GPT-2-124M shape, rlora against TRL 0.11.4, time and peak RSS.

Random weights (vocab 50 257), batch 16, prompts of 16 tokens + 32 new tokens, minibatch 8,
4 PPO epochs, LoRA r=8 on c_attn; 2 PPO steps after one warm-up step. Each configuration runs in
its own process, whose peak RSS comes from `wait4`:
  - inference: plain generation with the bare model (the memory baseline);
  - rlora: PPO with LoRA (reference = the adapter disabled);
  - rlora all roles: the same plus a critic adapter and a reward adapter (+ score head) on the
    same base, the reward adapter's score added to the reward (issue 8: one copy of the base);
  - rlora, glibc MALLOC_MMAP_THRESHOLD_=1 MiB: the same as rlora, with freed tensors returned to
    the system at once instead of staying in malloc's heap (less RSS, slower: page faults);
  - rlora, bf16 sampler: the same as rlora with `model.generation_dtype: bfloat16` (rollouts drawn
    on a merged bf16 copy; scoring and the update in float32);
  - rlora, bf16 base: `model.dtype: bfloat16` (the frozen base in bf16, attention on float32
    inputs on CPU; adapter and value head float32), sampled with the adapter merged in;
  - rlora full: full fine-tuning with a frozen reference copy;
  - TRL 0.11.4: PPOTrainer with a peft model (reference = adapter disabled), from .peers/venv-trl011.

    .venv/bin/python benchmarks/gpt2_124m.py [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, record  # noqa: E402

PEER_VENV = os.path.join(ROOT, ".peers", "venv-trl011", "bin", "python")
BATCH, PROMPT, NEW, MINIBATCH, EPOCHS, STEPS = 16, 16, 32, 8, 4, 2


def word_tokenizer(vocab_size: int):
    """A tokenizer over `vocab_size` synthetic words `w0 w1 ...` (no download); 0 pad, 1 eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def prompts(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(2, 50257)}" for _ in range(PROMPT)) for _ in range(n)]


def reward_fn(samples, prompts, outputs, tokenizer, **_):
    return [float(len(o.split())) / NEW for o in outputs]


def save_model(directory: str) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(pad_token_id=0, eos_token_id=1, bos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(directory)
    word_tokenizer(config.vocab_size).save_pretrained(directory)


def save_reward_adapter_for(model_dir: str, directory: str) -> None:
    """A random reward adapter (LoRA r=8 on c_attn, non-zero) and score head on the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora.models.score_head import ScoreHead
    from rlora.reward_model import save_reward_adapter

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, fan_in_fan_out=True, init_lora_weights=False,
                                            task_type="CAUSAL_LM"))
    save_reward_adapter(model, ScoreHead(base.config.hidden_size), AutoTokenizer.from_pretrained(model_dir),
                        directory, {})


def worker(kind: str, model_dir: str, out: str) -> None:
    import torch

    torch.set_num_threads(2)
    if kind == "inference":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(prompts(BATCH), return_tensors="pt").input_ids
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                           min_new_tokens=NEW, do_sample=True, top_k=0, pad_token_id=0)
        json.dump({}, open(out, "w"))
        return
    import rlora

    model = {"model_path": model_dir}
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "fan_in_fan_out": True}
    if kind in ("rlora", "rlora-roles", "rlora-mmap", "rlora-bf16-sampler", "rlora-bf16"):
        model["peft_config"] = lora
    if kind == "rlora-bf16-sampler":
        model["generation_dtype"] = "bfloat16"
    if kind == "rlora-bf16":
        model["dtype"] = "bfloat16"
    if kind == "rlora-roles":
        model["value_adapter"] = lora
        model["reward_adapter"] = os.path.join(os.path.dirname(model_dir), "reward-adapter")
    config = {"train": {"seq_length": PROMPT + NEW + 1, "batch_size": BATCH, "minibatch_size": MINIBATCH,
                        "total_steps": (STEPS + 1) * EPOCHS, "eval_interval": 10**6, "checkpoint_interval": 10**6,
                        "run_dir": os.path.dirname(out) + f"/{kind}-run", "save_best": False},
              "model": model,
              "method": {"num_rollouts": BATCH, "chunk_size": BATCH, "ppo_epochs": EPOCHS, "init_kl_coef": 0.05,
                         "merge_adapter_for_generation": kind == "rlora-bf16",
                         "gen_kwargs": {"max_new_tokens": NEW, "min_new_tokens": NEW, "top_k": 0, "top_p": 1.0,
                                        "do_sample": True}},
              "optimizer": {"name": "adamw", "kwargs": {"lr": 1e-5}}}
    trainer = rlora.train(reward_fn, prompts(BATCH), config=config, verbose=False)
    from rlora.tracking import phase_seconds

    phases = phase_seconds(trainer.history)[1:]  # the first is warm-up
    json.dump({"generate_s": sum(r["rollout"] for r in phases) / len(phases),
               "update_s": sum(r["rollout_pass"] + r["update"] for r in phases) / len(phases)},
              open(out, "w"))


TRL_WORKER = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[3])
from gpt2_124m import prompts, reward_fn, BATCH, NEW, MINIBATCH, EPOCHS, STEPS
from peft import LoraConfig
from transformers import PreTrainedTokenizerFast
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
torch.set_num_threads(2)
model_dir, out = sys.argv[1], sys.argv[2]
tok = PreTrainedTokenizerFast(tokenizer_file=model_dir + "/tokenizer.json", pad_token="<pad>", eos_token="<eos>")
model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, peft_config=LoraConfig(
    r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", fan_in_fan_out=True))
cfg = PPOConfig(learning_rate=1e-5, batch_size=BATCH, mini_batch_size=MINIBATCH, ppo_epochs=EPOCHS,
                init_kl_coef=0.05, adap_kl_ctrl=False, log_with=None)
trainer = PPOTrainer(cfg, model, ref_model=None, tokenizer=tok)
queries = [torch.tensor(tok(p).input_ids) for p in prompts(BATCH)]
gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, top_k=0.0, top_p=1.0, do_sample=True, pad_token_id=0)
times = []
for step in range(STEPS + 1):
    t0 = time.time()
    responses = trainer.generate(queries, return_prompt=False, batch_size=BATCH, **gen)
    t1 = time.time()
    texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
    scores = [torch.tensor(s) for s in reward_fn(texts, None, texts, tok)]
    trainer.step(queries, responses, scores)
    times.append((t1 - t0, time.time() - t1))
times = times[1:]
json.dump({"generate_s": sum(t[0] for t in times) / len(times), "update_s": sum(t[1] for t in times) / len(times)},
          open(out, "w"))
'''


MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # glibc's own setting, read at process start


def measure(cmd: list[str], out: str, env: dict | None = None) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read()[-2000:]}")
    return {**json.load(open(out)), "rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-peer", action="store_true", help="skip TRL 0.11.4")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    here = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "gpt2-124m")
        save_model(model_dir)
        save_reward_adapter_for(model_dir, os.path.join(tmp, "reward-adapter"))
        results = {}
        for kind in ("inference", "rlora", "rlora-bf16-sampler", "rlora-bf16", "rlora-mmap", "rlora-roles",
                     "rlora-full"):
            out = os.path.join(tmp, f"{kind}.json")
            results[kind] = measure([sys.executable, here, "--worker", kind, model_dir, out], out,
                                    MMAP_ENV if kind == "rlora-mmap" else None)
        if not args.no_peer and os.path.exists(PEER_VENV):
            script = os.path.join(tmp, "trl_worker.py")
            open(script, "w").write(TRL_WORKER)
            out = os.path.join(tmp, "trl.json")
            results["trl"] = measure([PEER_VENV, script, model_dir, out, os.path.dirname(here)], out)
    base = results["inference"]["rss_mib"]
    names = {"inference": "plain inference (generation only)", "rlora": "rlora PPO + LoRA",
             "rlora-bf16-sampler": "rlora PPO + LoRA, bf16 sampler (`model.generation_dtype`)",
             "rlora-bf16": "rlora PPO + LoRA, bf16 base (`model.dtype`), merged sampler",
             "rlora-mmap": "rlora PPO + LoRA, `MALLOC_MMAP_THRESHOLD_=1048576`",
             "rlora-roles": "rlora PPO + LoRA, critic and reward adapters on the same base",
             "rlora-full": "rlora full fine-tuning + reference copy", "trl": "TRL 0.11.4 PPO + LoRA"}
    rows = ["| configuration | generation s / step | update s / step | peak RSS MiB | RSS / inference |",
            "|---|---|---|---|---|"]
    for kind, r in results.items():
        gen = f"{r['generate_s']:.2f}" if "generate_s" in r else "-"
        upd = f"{r['update_s']:.2f}" if "update_s" in r else "-"
        rows.append(f"| {names[kind]} | {gen} | {upd} | {r['rss_mib']:.0f} | {r['rss_mib'] / base:.2f} |")
    if "trl" in results:
        ours, trl = results["rlora"], results["trl"]
        sampler, bf16 = results["rlora-bf16-sampler"], results["rlora-bf16"]
        trl_s = trl['generate_s'] + trl['update_s']
        ours_s, sampler_s = ours['generate_s'] + ours['update_s'], sampler['generate_s'] + sampler['update_s']
        bf16_s = bf16['generate_s'] + bf16['update_s']
        rows += ["", f"rlora / TRL 0.11.4 seconds per step, same run: **{ours_s / trl_s:.2f}**"
                 f" (with the bf16 sampler: {sampler_s / trl_s:.2f}; bf16 base: {bf16_s / trl_s:.2f}); "
                 f"rlora LoRA / rlora full-fine-tuning peak RSS: {ours['rss_mib'] / results['rlora-full']['rss_mib']:.2f}."]
    roles, ours = results["rlora-roles"], results["rlora"]
    rows += ["", f"All four roles on one base / policy-only LoRA, same run: peak RSS "
             f"**{roles['rss_mib'] / ours['rss_mib']:.2f}** (+{roles['rss_mib'] - ours['rss_mib']:.0f} MiB), "
             f"seconds per step {(roles['generate_s'] + roles['update_s']) / (ours['generate_s'] + ours['update_s']):.2f}."]
    table = "\n".join(rows)
    print(table)
    record("gpt2_124m", "GPT-2-124M shape: PPO + LoRA step time and peak RSS",
           f"CPU, 2 threads; batch {BATCH}, prompt {PROMPT} + {NEW} new tokens, minibatch {MINIBATCH}, "
           f"{EPOCHS} PPO epochs; mean of {STEPS} steps after a warm-up step", table)


if __name__ == "__main__":
    main()
