"""Benchmark: one GRPO step on SmolLM2-135M-Instruct, rlora against TRL 1.16's GRPOTrainer + peft.

The task and settings of `../shared/peers/peerD_trl116_grpo_smollm2.py` (its prompts, taken from
it), TRL 1.16's `GRPOConfig` defaults for what it leaves unset:
- a step: 4 chat prompts "Write one sentence about <topic>." x 8 completions of at most 16 new
  tokens, plain sampling (temperature 1, top_k 0, top_p 1); reward = VADER's compound score of
  the completion, as a TRL-style reward function;
- 1 iteration, 1 optimizer step over the 32 (on-policy: ratio 1, no old-log-prob pass);
  loss_type "dapo", scale_rewards "group", epsilon 0.2, beta 0 (no reference pass);
- LoRA r=8 alpha=32 dropout 0 on all linear layers; AdamW 3e-4, betas (0.9, 0.999), eps 1e-8,
  no weight decay, constant rate, gradients clipped to norm 1 (TRL's default); fp32.
Each trainer runs in its own process (peak RSS from `wait4`); rlora once in fp32, once with
`model.generation_dtype: bfloat16` (fp32 training, rollouts sampled on a bf16 copy), with
`train.mixed_precision: bf16` (bf16 autocast, fp32 weights), with `model.dtype: bfloat16` (bf16
weights; attention on float32 inputs, `model.attention_dtype`'s CPU default; the float32 adapters
computing in bf16 under autocast, `model.adapter_compute_dtype`'s default) and with bf16 weights
sampled with the adapter merged in (`method.merge_adapter_for_generation`), that also with the
adapters computing in float32 (`adapter_compute_dtype: float32`, peft's upcast); and in float32 with
`train.float32_matmul_precision: medium` (torch's setting: matmuls on bf16-rounded inputs with
float32 accumulation, as TF32 is on GPUs). rlora's held-out metric: the mean reward of greedy completions of 8 prompts on topics
the training prompts never draw, before the first step and after the last (not timed). Seconds
per step are the median of steps 2..N (step 1 warms up); `--floor` adds the step's FLOPs
(torch's FlopCounterMode, one rlora step) over this machine's matmul rate at the update's shapes,
in fp32 and in bf16 (the bf16 rows' floor: AMX-BF16 runs bf16 matmuls several times faster).

    .venv/bin/python benchmarks/smollm2_grpo.py --steps 10 --floor                        # into BENCHMARKS.md
    .venv/bin/python benchmarks/smollm2_grpo.py --steps 2 --threads 1 --no-record  # a smoke run

The model is `rlora fetch smollm2-135m-instruct`'s directory, for both; the peer needs
`../shared/peers/` and `.peers/venv-modern` with vaderSentiment (see `../shared/peers/README.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PEERS, peer_benchmark_parser, peer_command, record, require_peer  # noqa: E402
from common import run_measured  # noqa: E402

COMPLETIONS, GENERATIONS, MAX_NEW = 32, 8, 16  # per step: 4 prompts x 8, 16 new tokens
# Held out: peerD's prompt on topics it never draws; their greedy completions' mean reward is the
# held-out metric, before the first step and after the last
HELD_OUT = [[{"role": "user", "content": f"Write one sentence about {topic}."}]
            for topic in ("the ocean", "a song", "my garden", "the bus", "breakfast", "the weekend", "a museum",
                          "my cat")]


def peer_prompts(seed: int, n: int) -> list:
    """peerD's chat prompts: `n` random topics drawn with `seed`."""
    sys.path.insert(0, PEERS)
    from peerD_trl116_grpo_smollm2 import prompts

    return prompts(seed, n)


def sentiment(prompts, completions, **_) -> list[float]:
    """peerD's reward, TRL's convention: VADER's compound score of each completion's text."""
    from rlora.tasks.sentiment import compound

    return compound([c[0]["content"] for c in completions])


def grpo_config(args: argparse.Namespace, steps: int) -> dict:
    """rlora's config with peerD's settings (see the module docstring)."""
    lora = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0,
            "target_modules": "all-linear"}
    return {
        "train": {"seq_length": 64 + MAX_NEW, "batch_size": COMPLETIONS, "minibatch_size": COMPLETIONS,
                  "total_steps": steps, "epochs": 10**6, "eval_interval": steps, "checkpoint_interval": 10**9,
                  "save_best": False, "run_dir": args.out, "seed": args.seed, "num_threads": args.threads,
                  "max_grad_norm": 1.0,  # TRL's default, which peerD keeps
                  "mixed_precision": "bf16" if args.dtype == "bf16-autocast" else "no",
                  "float32_matmul_precision": "medium" if args.dtype == "float32-medium" else None},
        "model": {"model_path": args.model, "peft_config": lora,
                  "dtype": "bfloat16" if args.dtype.startswith("bf16-weights") else "float32",
                  "generation_dtype": "bfloat16" if args.dtype == "bf16-sampler" else None,
                  "adapter_compute_dtype": "float32" if args.dtype.endswith("-fp32-adapters") else "model"},
        "tokenizer": {"tokenizer_path": args.model},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        "scheduler": {"name": "constant", "kwargs": {}},
        "method": {"name": "GRPOConfig", "num_rollouts": COMPLETIONS, "num_generations": GENERATIONS,
                   "chunk_size": COMPLETIONS, "ppo_epochs": 1, "loss_type": "dapo", "scale_rewards": "group",
                   "epsilon": 0.2, "epsilon_high": None, "importance_sampling_level": "token", "beta": 0.0,
                   "mask_truncated_completions": False,
                   "merge_adapter_for_generation": args.dtype.startswith("bf16-weights-merged"),
                   "gen_kwargs": {"max_new_tokens": MAX_NEW, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                  "do_sample": True},
                   "eval_gen_kwargs": {"greedy": {"do_sample": False}}},
    }


def build(args: argparse.Namespace, steps: int):
    import rlora

    prompts = peer_prompts(args.seed, 4 * steps)
    return rlora.build_trainer(sentiment, prompts=prompts, eval_prompts=HELD_OUT, config=grpo_config(args, steps),
                               verbose=False)


def rlora_worker(args: argparse.Namespace) -> None:
    """In the measured process: `--steps` GRPO steps; each step's seconds (generation and scoring,
    update) and mean reward as JSON."""
    trainer = build(args, args.steps).learn()
    from rlora.tracking import phase_seconds

    seconds = phase_seconds(trainer.history)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"rollout_s": [r["rollout"] for r in seconds],
                   "update_s": [r["rollout_pass"] + r["update"] for r in seconds],
                   "reward": [r["reward"] for r in trainer.history if "phase" in r],
                   "held_out": [r["reward/greedy/mean"] for r in trainer.history if r.get("eval")]}, f)


def floor_worker(args: argparse.Namespace) -> None:
    """FLOPs of one rlora GRPO step (generation, scoring, update) and the matmul rate at the
    update's shapes, as JSON."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from compute_floor import matmul_rate

    trainer = build(args, 1)
    with FlopCounterMode(display=False) as counter:
        trainer.evaluate()  # the baseline learn() would run, on the one eval prompt
    eval_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        trainer.learn()  # one step, then a final evaluation like the first
    config = trainer.policy.base_model.config
    prompt = sum(map(len, trainer.prompt_ids)) // len(trainer.prompt_ids)
    rows = COMPLETIONS * MAX_NEW + COMPLETIONS // GENERATIONS * prompt  # completion tokens + each prompt once
    shape = (rows, config.hidden_size, config.intermediate_size)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"flops": counter.get_total_flops() - eval_flops, "shape": shape,
                   "rate": matmul_rate(*shape), "rate_bf16": matmul_rate(*shape, dtype=torch.bfloat16),
                   "threads": torch.get_num_threads()}, f)


def run_rlora(args: argparse.Namespace, model: str, workdir: str, dtype: str) -> dict:
    out = os.path.join(workdir, f"rlora-{dtype}")
    rss = run_measured([sys.executable, os.path.abspath(__file__), "--worker", "rlora", "--out", out, "--model", model,
                        "--dtype", dtype, "--steps", str(args.steps), "--seed", str(args.seed),
                        "--threads", str(args.threads)])
    data = json.load(open(os.path.join(out, "bench.json")))
    step_s = [a + b for a, b in zip(data["rollout_s"], data["update_s"])]
    row = summarize(dtype, f"rlora GRPO + LoRA, {dtype}", step_s, data["reward"], rss,
                    parts=(data["rollout_s"], data["update_s"]))
    return {**row, "held_out": (data["held_out"][0], data["held_out"][-1])}


def run_peer(args: argparse.Namespace, model: str, workdir: str) -> dict:
    log = os.path.join(workdir, "peerD.jsonl")
    rss = run_measured(peer_command("venv-modern", "peerD_trl116_grpo_smollm2.py", [
        "--model", model, "--steps", str(args.steps), "--seed", str(args.seed), "--log", log], args.threads, workdir))
    steps = [json.loads(line) for line in open(log)]
    steps = [r for r in steps if "reward" in r]
    t = [r["t"] for r in steps]  # wall seconds since the script began: step k takes t[k] - t[k-1]
    step_s = [t[0]] + [b - a for a, b in zip(t, t[1:])]  # the first also holds the trainer's setup
    return summarize("peer", "TRL 1.16 GRPOTrainer + peft, float32", step_s, [r["reward"] for r in steps], rss)


def run_floor(args: argparse.Namespace, model: str, workdir: str) -> dict:
    out = os.path.join(workdir, "floor")
    run_measured([sys.executable, os.path.abspath(__file__), "--worker", "floor", "--out", out, "--model", model,
                  "--dtype", "float32", "--seed", str(args.seed), "--threads", str(args.threads)])
    return json.load(open(os.path.join(out, "bench.json")))


def summarize(key: str, name: str, step_s: list[float], reward: list[float], rss: float, parts=None) -> dict:
    """Median seconds of steps 2..N (of all, with one step), the reward of step 1 and the mean of the last 3."""
    def median(values):
        return statistics.median(values[1:] or values)

    return {"key": key, "name": name, "steps": len(step_s), "s_per_step": median(step_s),
            "parts": None if parts is None else tuple(median(p) for p in parts),
            "reward": (reward[0], sum(reward[-3:]) / len(reward[-3:])), "rss_mib": rss}


def table(rows: list[dict], floor: dict | None) -> str:
    lines = ["| trainer | steps | s / step (median of 2..N) | generate + score s | update s | "
             "reward step 1 -> last 3 | held-out greedy reward before -> after | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gen, update = ("-", "-") if r["parts"] is None else (f"{r['parts'][0]:.2f}", f"{r['parts'][1]:.2f}")
        held = f"{r['held_out'][0]:.3f} -> {r['held_out'][1]:.3f}" if r.get("held_out") else "-"
        lines.append(f"| {r['name']} | {r['steps']} | {r['s_per_step']:.2f} | {gen} | {update} | "
                     f"{r['reward'][0]:.3f} -> {r['reward'][1]:.3f} | {held} | {r['rss_mib']:.0f} |")
    if floor is not None:
        floor_s = floor["flops"] / floor["rate"]
        for key, precision in (("rate", "fp32"), ("rate_bf16", "bf16")):
            lines.append(f"| floor: {floor['flops'] / 1e9:.1f} GFLOP / {floor[key] / 1e9:.1f} GFLOP/s "
                         f"({' x '.join(map(str, floor['shape']))} {precision} matmul) | 1 | "
                         f"{floor['flops'] / floor[key]:.2f} | - | - | - | - | - |")
    by_key = {r["key"]: r for r in rows}
    fp32, bf16, peer = by_key.get("float32"), by_key.get("bf16-autocast"), by_key.get("peer")
    sampler, merged = by_key.get("bf16-sampler"), by_key.get("bf16-weights-merged")
    notes = []
    if fp32 and peer:
        notes.append(f"rlora fp32 / TRL 1.16 seconds per step, same run: **{fp32['s_per_step'] / peer['s_per_step']:.2f}**"
                     f"; peak RSS ratio {fp32['rss_mib'] / peer['rss_mib']:.2f}")
    if fp32 and bf16:
        notes.append(f"rlora bf16 autocast / fp32 seconds per step: {bf16['s_per_step'] / fp32['s_per_step']:.2f}")
    if bf16 and peer:
        notes.append(f"rlora bf16 autocast / TRL 1.16 fp32: **{bf16['s_per_step'] / peer['s_per_step']:.2f}**")

    def against_peer_and_fp32(row: dict, name: str, fp32_name: str = "") -> str:
        return (f"{name} / TRL 1.16 fp32: **{row['s_per_step'] / peer['s_per_step']:.2f}**; {fp32_name}/ fp32 "
                f"rlora: {row['s_per_step'] / fp32['s_per_step']:.2f}")

    if sampler and peer:
        notes.append(against_peer_and_fp32(sampler, "rlora fp32 with the bf16 sampler", "bf16 sampler "))
    medium = by_key.get("float32-medium")
    if medium and peer:
        notes.append(against_peer_and_fp32(medium, "rlora fp32 with bf16 matmul precision"))
    if merged and peer:
        notes.append(against_peer_and_fp32(merged, "rlora bf16 weights, merged sampler"))
    peft_way = by_key.get("bf16-weights-merged-fp32-adapters")
    if merged and peft_way:
        notes.append(f"bf16 weights, merged sampler: adapters computing in bf16 (the default) / in float32 "
                     f"(`model.adapter_compute_dtype: float32`), update seconds: "
                     f"**{merged['parts'][1] / peft_way['parts'][1]:.2f}**")
    if fp32 and floor is not None:
        floor_s = floor["flops"] / floor["rate"]
        notes.append(f"rlora fp32 / fp32 floor: {fp32['s_per_step'] / floor_s:.1f}"
                     + (f", with the bf16 sampler {sampler['s_per_step'] / floor_s:.1f}" if sampler else ""))
        if merged:
            notes.append(f"rlora bf16 weights, merged sampler / bf16 floor: "
                         f"{merged['s_per_step'] / (floor['flops'] / floor['rate_bf16']):.1f} "
                         f"(/ fp32 floor: {merged['s_per_step'] / floor_s:.1f})")
    return "\n".join(lines + ([""] + ["; ".join(notes) + "."] if notes else []))


def main() -> None:
    parser = peer_benchmark_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps (generation batches) of each trainer")
    parser.add_argument("--seed", type=int, default=1, help="peerD's default")
    parser.add_argument("--model", default=None, help="the model directory (default: rlora fetch smollm2-135m-instruct)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the six reduced-precision rows")
    parser.add_argument("--floor", action="store_true", help="add the compute-floor row")
    parser.add_argument("--worker", choices=["rlora", "floor"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return {"rlora": rlora_worker, "floor": floor_worker}[args.worker](args)
    if not os.path.isdir(PEERS):
        sys.exit(f"the prompts are peerD's: this benchmark needs {PEERS}; see ../shared/peers/README.md")
    if not args.no_peer:
        require_peer("venv-modern", "the TRL 1.16 peer")
    if args.model is None:
        from rlora.fetch import fetch

        args.model = fetch("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run_rlora(args, args.model, workdir, "float32")]
        rows += [] if args.no_peer else [run_peer(args, args.model, workdir)]
        rows += [] if args.no_bf16 else [run_rlora(args, args.model, workdir, dtype)
                                          for dtype in ("float32-medium", "bf16-sampler", "bf16-autocast",
                                                        "bf16-weights", "bf16-weights-merged",
                                                        "bf16-weights-merged-fp32-adapters")]
        floor = run_floor(args, args.model, workdir) if args.floor else None
    markdown = table(rows, floor)
    print(markdown)
    if not args.no_record:
        record("smollm2_grpo", "SmolLM2-135M-Instruct: a GRPO step vs TRL 1.16",
               f"CPU, {args.threads} threads each; 4 chat prompts x 8 completions of at most 16 tokens, VADER reward, "
               "LoRA r=8 all-linear, beta 0, 1 iteration; seconds per step: median of steps 2..N", markdown)


if __name__ == "__main__":
    main()
