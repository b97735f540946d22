"""Benchmark: GRPO + LoRA on randomwalks, rlora against TRL 1.16's GRPOTrainer + peft in the same run.

Each trainer runs in its own process (its peak RSS is read from `wait4`) on the same SFT model
(`.peers/randomwalks-model`), with the settings of `../shared/peers/peerC_trl116_grpo.py` and
TRL 1.16's `GRPOConfig` defaults for what it leaves unset:
- a phase (the peer's "step"): 16 start letters x 8 completions = 128, at most 9 new tokens,
  plain sampling (temperature 1, top_k 0, top_p 1);
- 4 iterations (rlora's `ppo_epochs`, TRL's `num_iterations`) x 2 batches of 64 = 8 optimizer steps;
- loss_type "dapo", scale_rewards "group", epsilon 0.2 (epsilon_high = epsilon), token-level
  ratio, beta 0 (no reference pass), truncated completions kept in the loss;
- LoRA r=8 alpha=32 dropout 0.1 on GPT-2's c_attn; AdamW 3e-4, betas (0.9, 0.95), eps 1e-8,
  weight decay 1e-6, constant rate, no gradient clipping.
Evaluation (20 start letters x 8 sampled walks, and greedy) every `--eval-every` phases is
excluded from the times of both.

    .venv/bin/python benchmarks/randomwalks_grpo.py --phases 100                      # into BENCHMARKS.md
    .venv/bin/python benchmarks/randomwalks_grpo.py --phases 2 --threads 1 --no-record  # a smoke run

The peer needs `../shared/peers/` and `.peers/venv-modern` (see `../shared/peers/README.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import peer_benchmark_parser, peer_command, peer_model, record, require_peer  # noqa: E402
from common import run_measured  # noqa: E402
from randomwalks import summarize  # noqa: E402

STEPS_PER_PHASE = 8  # 4 iterations x 128 / 64
EVAL_SAMPLES_PER_PROMPT = 8  # as the peer's rw_eval


def grpo_config(args: argparse.Namespace) -> dict:
    """rlora's config with peerC's settings (see the module docstring)."""
    lora = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1,
            "fan_in_fan_out": True}  # peft's default target for GPT-2: c_attn (Conv1D)
    return {
        "train": {"seq_length": 10, "batch_size": 64, "minibatch_size": 64, "epochs": 10**6,
                  "total_steps": args.phases * STEPS_PER_PHASE, "eval_interval": args.eval_every * STEPS_PER_PHASE,
                  "checkpoint_interval": 10**9, "save_best": False, "run_dir": args.out, "seed": args.seed,
                  "num_threads": args.threads},
        "model": {"model_path": args.model, "peft_config": lora},
        "tokenizer": {"tokenizer_path": args.model},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-6}},
        "scheduler": {"name": "constant", "kwargs": {}},
        "method": {"name": "GRPOConfig", "num_rollouts": 128, "num_generations": 8, "chunk_size": 128,
                   "ppo_epochs": 4, "loss_type": "dapo", "scale_rewards": "group", "epsilon": 0.2,
                   "epsilon_high": None, "importance_sampling_level": "token", "beta": 0.0,
                   "mask_truncated_completions": False,
                   "gen_kwargs": {"max_new_tokens": 9, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "do_sample": True},
                   "eval_gen_kwargs": {"greedy": {"do_sample": False}}},
    }


def rlora_worker(args: argparse.Namespace) -> None:
    """In the measured process: the GRPO run, then its phase times (less the evaluations that ran
    inside a phase's update loop) and its evals as JSON."""
    import rlora
    from rlora.tasks.randomwalks import make_task
    from rlora.tracking import phase_seconds

    task = make_task()
    eval_prompts = [p for p in task.prompts for _ in range(EVAL_SAMPLES_PER_PROMPT)]
    trainer = rlora.build_trainer(task.reward_fn, prompts=task.prompts, eval_prompts=eval_prompts,
                                  metric_fn=task.metric_fn, config=grpo_config(args), verbose=False)
    trainer.learn()
    phases = phase_seconds(trainer.history)  # step times: the evaluations inside a phase are not in them
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"rollout_s": [r["rollout"] for r in phases],
                   "update_s": [r["rollout_pass"] + r["update"] for r in phases],
                   "evals": [{"phase": r["step"] // STEPS_PER_PHASE, "sampled": r["metrics/optimality"],
                              "greedy": r["metrics/greedy/optimality"]} for r in trainer.history if r.get("eval")]}, f)


def run_rlora(args: argparse.Namespace, workdir: str) -> dict:
    out = os.path.join(workdir, "rlora")
    rss = run_measured([sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--model", peer_model(),
                        "--phases", str(args.phases), "--eval-every", str(args.eval_every), "--seed", str(args.seed),
                        "--threads", str(args.threads)])
    data = json.load(open(os.path.join(out, "bench.json")))
    return summarize("rlora GRPO + LoRA", data["rollout_s"], data["update_s"], data["evals"], rss)


def run_peer(args: argparse.Namespace, workdir: str) -> dict:
    log = os.path.join(workdir, "peerC.jsonl")
    rss = run_measured(peer_command("venv-modern", "peerC_trl116_grpo.py", [
        "--model", peer_model(), "--steps", str(args.phases), "--max_seconds", "1e9", "--beta", "0.0",
        "--eval_every", str(args.eval_every), "--seed", str(args.seed), "--log", log], args.threads, workdir))
    records = [json.loads(line) for line in open(log)]
    so_far = [0.0] + [r["train_s_so_far"] for r in records if "train_s_so_far" in r]  # training s, evals excluded
    step_s = [b - a for a, b in zip(so_far, so_far[1:])]
    evals = [{"phase": r["step"], "sampled": r["eval_optimality"], "greedy": r["eval_greedy"]}
             for r in records if "eval_optimality" in r]
    return summarize("TRL 1.16 GRPOTrainer + peft", step_s, [0.0] * len(step_s), evals, rss)  # whole steps only


def table(rows: list[dict]) -> str:
    def reach(pair):
        phase, seconds = pair
        return "not reached" if phase is None else f"{phase} ({seconds:.1f} s)"

    lines = ["| trainer | phases | s / phase | phases (train s) to 0.9 | to 0.95 | sampled start -> end | "
             "greedy start -> end | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['phases']} | {r['s_per_phase']:.3f} | {reach(r['reach_0.9'])} | "
              f"{reach(r['reach_0.95'])} | {r['start'][0]:.3f} -> {r['end'][0]:.3f} | "
              f"{r['start'][1]:.3f} -> {r['end'][1]:.3f} | {r['rss_mib']:.0f} |" for r in rows]
    ours = rows[0]
    lines += ["", f"rlora per phase: rollouts {ours['rollout_s']:.3f} s + old log-probs and update {ours['update_s']:.3f} s"
                  " (the peer logs whole steps only)."]
    if len(rows) == 2:
        peer = rows[1]
        lines[-1] += (f" rlora / TRL 1.16 seconds per phase, same run: **{ours['s_per_phase'] / peer['s_per_phase']:.2f}**"
                      f" (goal <= 0.5); peak RSS ratio {ours['rss_mib'] / peer['rss_mib']:.2f}.")
    return "\n".join(lines)


def main() -> None:
    parser = peer_benchmark_parser(__doc__)
    parser.add_argument("--phases", type=int, default=100, help="rollout phases (the peer's steps)")
    parser.add_argument("--eval-every", type=int, default=5, help="phases between evaluations")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return rlora_worker(args)
    if not args.no_peer:
        require_peer("venv-modern", "the TRL 1.16 peer")
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run_rlora(args, workdir)] + ([] if args.no_peer else [run_peer(args, workdir)])
    markdown = table(rows)
    print(markdown)
    if not args.no_record:
        record("randomwalks_grpo", "randomwalks: GRPO + LoRA vs TRL 1.16",
               f"CPU, {args.threads} threads each; end = mean of the last 3 evals; one phase = 16 prompts x 8 "
               "completions + 4 iterations x 2 batches of 64 = 8 optimizer steps; times exclude evaluation", markdown)


if __name__ == "__main__":
    main()
