"""The built-in demo: trlx's randomwalks task, SFT then PPO with LoRA on the frozen SFT model.

`rlora demo` (and `make demo`) runs it end to end on a fresh machine with no downloads:
the SFT model is built once (about 20 s on 2 cores) and cached.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from rlora.tasks.randomwalks import make_task, sft_model

EVAL_SAMPLES_PER_PROMPT = 8  # as the peer harness: 20 start letters x 8 sampled walks


def demo_config(model_dir: str, run_dir: str, total_steps: int, seed: int = 1000, eval_interval: int = 80,
                **method: Any) -> dict:
    """trlx's ppo_randomwalks settings, with LoRA (r=8, alpha=32, dropout 0.1) on the SFT model.

    One rollout phase = 128 samples and 4 PPO epochs of 2 optimizer steps (batch 64), the peers'
    "step"; `total_steps` counts optimizer steps.
    """
    return {
        "train": {"seq_length": 10, "batch_size": 64, "minibatch_size": 64, "total_steps": total_steps,
                  "epochs": 10_000, "eval_interval": eval_interval, "checkpoint_interval": 10**9, "run_dir": run_dir,
                  "seed": seed},
        "model": {"model_path": model_dir,
                  "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32,
                                  "lora_dropout": 0.1, "fan_in_fan_out": True}},  # GPT-2's Conv1D layers
        "tokenizer": {"tokenizer_path": model_dir},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 1e-6}},
        "scheduler": {"name": "constant", "kwargs": {}},
        "method": {"num_rollouts": 128, "chunk_size": 128, "ppo_epochs": 4, "init_kl_coef": 0.0, "target": None,
                   "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 1.2,
                   "scale_reward": "ignored", "cliprange_reward": 1.0,
                   "gen_kwargs": {"max_new_tokens": 9, "top_k": 0, "top_p": 1.0, "do_sample": True},
                   "eval_gen_kwargs": {"greedy": {"do_sample": False}}, **method},
    }


def run_demo(total_steps: int = 400, run_dir: str | None = None, cache_dir: str | None = None, seed: int = 1000,
             verbose: bool = True, model_dir: str | None = None, eval_interval: int = 80,
             **method: Any) -> dict[str, Any]:
    """SFT (cached; or the SFT model at `model_dir`) then PPO; returns and prints the summary,
    also written to `run_dir/summary.json`."""
    import rlora

    console = Console()
    t0 = time.perf_counter()
    task = make_task()
    def log(stats: dict) -> None:
        console.print(f"SFT epoch {stats['epoch'] + 1}: loss {stats['loss']:.3f} ({stats['seconds']:.1f} s)")

    model_dir = model_dir or str(sft_model(task, cache_dir=cache_dir, log=log if verbose else None))
    t_sft = time.perf_counter() - t0
    run_dir = run_dir or os.path.join("runs", "randomwalks-" + time.strftime("%Y%m%d-%H%M%S"))
    config = demo_config(model_dir, run_dir, total_steps, seed, eval_interval, **method)
    eval_prompts = [p for p in task.prompts for _ in range(EVAL_SAMPLES_PER_PROMPT)]
    trainer = rlora.train(task.reward_fn, prompts=task.prompts, eval_prompts=eval_prompts, metric_fn=task.metric_fn,
                          config=config, verbose=verbose)
    evals = [r for r in trainer.history if r.get("eval")]
    phases = [r for r in trainer.history if "phase" in r]
    n_train = sum(p.numel() for p in trainer.policy.trainable_parameters())
    n_all = sum(p.numel() for p in trainer.policy.parameters())
    summary = {
        "sampled_optimality": [evals[0]["metrics/optimality"], evals[-1]["metrics/optimality"]],
        "greedy_optimality": [evals[0]["metrics/greedy/optimality"], evals[-1]["metrics/greedy/optimality"]],
        "curve": [(r["step"], round(r["metrics/optimality"], 4), round(r["metrics/greedy/optimality"], 4))
                  for r in evals],
        "optimizer_steps": trainer.step, "rollout_phases": trainer.phase,
        "s_per_phase": sum(r["time/rollout"] + r["time/rollout_pass"] + r["time/update"] for r in phases)
        / max(1, len(phases)),
        "sft_seconds": t_sft, "wall_seconds": time.perf_counter() - t0,
        "trainable_params": n_train, "total_params": n_all, "run_dir": trainer.run_dir, "model_dir": model_dir,
        "checkpoint": os.path.join(trainer.run_dir, trainer.config.train.checkpoint_dir, f"step_{trainer.step}"),
    }
    with open(os.path.join(trainer.run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    if verbose:
        console.print(summary_table(summary))
    return summary


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="randomwalks: PPO + LoRA on a frozen SFT model", show_header=False)
    s, g = summary["sampled_optimality"], summary["greedy_optimality"]
    table.add_row("sampled optimality (20 prompts x 8)", f"{s[0]:.3f} -> {s[1]:.3f}")
    table.add_row("greedy optimality", f"{g[0]:.3f} -> {g[1]:.3f}")
    table.add_row("rollout phases / optimizer steps", f"{summary['rollout_phases']} / {summary['optimizer_steps']}")
    table.add_row("seconds per phase (128 rollouts, 8 steps)", f"{summary['s_per_phase']:.3f}")
    table.add_row("wall time (SFT included)", f"{summary['wall_seconds']:.1f} s ({summary['sft_seconds']:.1f} s SFT)")
    table.add_row("trainable / total parameters",
                  f"{summary['trainable_params']:,} / {summary['total_params']:,} "
                  f"({100 * summary['trainable_params'] / summary['total_params']:.1f} %)")
    table.add_row("run directory", summary["run_dir"])
    return table
