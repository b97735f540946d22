"""Evaluation during training: generate for the eval prompts with each setting, score, log.

Called by the trainer (`Trainer.evaluate`) at its eval interval and by `rlora.evaluate` on a
checkpoint; the same for every method.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rlora.algo import nan_moments
from rlora.rollout.rewards import ScoreBatch, collate_metadata, validate_scores
from rlora.tracking import console, eval_table


@torch.no_grad()
def evaluate(trainer) -> dict[str, Any]:
    """Generate for `eval_prompts` with `method.gen_kwargs` (and each `eval_gen_kwargs`
    variant); log the reward and `metric_fn` means. Processes share the prompts; the main
    process scores them all."""
    was_training = trainer.policy.training
    trainer.policy.eval()
    method = trainer.config.method
    variants = {"": method.gen_kwargs, **{f"{name}/": {**method.gen_kwargs, **kwargs}
                                          for name, kwargs in method.eval_gen_kwargs.items()}}
    stats: dict[str, Any] = {}
    tables = []
    for prefix, gen_kwargs in variants.items():
        batch, scores = eval_samples(trainer, gen_kwargs)
        if not trainer.dist.is_main:
            continue
        by_function: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(batch) if trainer.reward_fn is not None else 0, method.chunk_size):
            trainer.trainer_state.global_step = trainer.step
            total, values = trainer.reward_fn(batch[start:start + method.chunk_size], trainer.tokenizer,
                                              trainer.trainer_state)
            for i, value in enumerate((total.sum(1) if total.dim() == 2 else total).tolist(), start):
                scores[i] += value
            for name, v in values.items():
                by_function.setdefault(name, []).append(v)
        for name, values in by_function.items() if len(by_function) > 1 else ():
            stats[f"reward/{prefix}{name}/mean"] = float(nan_moments(torch.cat(values))["mean"])
        stats[f"reward/{prefix}mean"] = sum(scores) / len(scores)
        stats.update({f"{prefix}{k}": v for k, v in (trainer.reward_fn.drain_logs()[0] if trainer.reward_fn else {}).items()})
        if trainer.metric_fn is not None:
            samples = [p + o for p, o in zip(batch.prompt_texts, batch.outputs)]
            metrics = trainer.metric_fn(samples=samples, prompts=batch.prompts, outputs=batch.outputs,
                                     **collate_metadata(batch.metadata))
            for name, values in metrics.items():
                values = validate_scores(values, [1] * len(samples), what=f"metric_fn[{name!r}]")
                stats[f"metrics/{prefix}{name}"] = values.mean().item()
        if not prefix:
            tables.append(eval_table(batch.prompt_texts, batch.outputs, scores, trainer.step))
    stats = trainer.dist.broadcast(stats)
    record = trainer._record(stats, eval=True)
    if trainer.config.train.save_best and trainer.step > 0 and stats["reward/mean"] > trainer.best_reward:
        trainer.best_reward = stats["reward/mean"]
        trainer.save(os.path.join(trainer.run_dir, trainer.config.train.checkpoint_dir, "best"))
    if trainer.verbose and trainer.dist.is_main:
        for table in tables:
            console.print(table)
        console.print(f"eval at step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    trainer.policy.train(was_training)
    return record

def eval_samples(trainer, gen_kwargs: dict) -> tuple[ScoreBatch, list[float]]:
    """The samples of one pass over `eval_prompts` and their reward-adapter scores (0 without
    one), each process generating (and scoring with the reward adapter) every world-th prompt;
    gathered in the eval prompts' order."""
    chunk, world, rank = trainer.config.method.chunk_size, trainer.dist.world, trainer.dist.rank
    mine = list(range(rank, len(trainer.eval_prompt_ids), world))
    rows = []
    for start in range(0, len(mine), chunk):
        index = mine[start:start + chunk]
        rollouts = trainer._generate(index, gen_kwargs, trainer.eval_prompt_ids, trainer.eval_prompts)
        batch = ScoreBatch.of(rollouts, [trainer.eval_prompts[i].metadata for i in index])
        adapter_scores = trainer._reward_adapter_scores(rollouts)
        adapter_scores = [0.0] * len(index) if adapter_scores is None else adapter_scores.tolist()
        rows += zip(index, (batch[k:k + 1] for k in range(len(batch))), adapter_scores)
    rows = sorted(trainer.dist.gather(rows), key=lambda row: row[0])
    return ScoreBatch.concat([r[1] for r in rows]), [r[2] for r in rows]
