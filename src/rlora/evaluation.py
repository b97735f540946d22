"""Evaluation: generate for the eval prompts with each setting, score, and report means.

The same for every method. `Trainer.evaluate` runs it at its eval interval, logs the record and
keeps the best checkpoint; `rlora.evaluate` runs it on a checkpoint. It reads the run's step
and nothing else of the trainer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from rich.table import Table

from rlora.algo import nan_moments
from rlora.distributed import Processes
from rlora.rollout.prompts import Prompt
from rlora.rollout.episodes import environment_rewards, with_environment_rewards
from rlora.rollout.rewards import RewardFunctions, ScoreBatch, collate_metadata, validate_scores
from rlora.rollout.sampler import Sampler
from rlora.tracking import console, eval_table


@dataclass
class Evaluation:
    """The eval prompts and what scores their outputs."""

    sampler: Sampler
    reward_fn: RewardFunctions | None
    metric_fn: Callable | None
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    method_config: Any  # gen_kwargs, eval_gen_kwargs, chunk_size
    dist: Processes
    trainer_state: Any  # the transformers.TrainerState reward functions get

    @torch.no_grad()
    def __call__(self, step: int) -> tuple[dict[str, Any], list[Table]]:
        """Generate for the eval prompts with `gen_kwargs` (and each `eval_gen_kwargs` variant);
        the reward's and `metric_fn`'s means, the same on every process, and tables of samples
        (main process). Processes share the prompts; the main process scores them all."""
        policy = self.sampler.policy
        was_training = policy.training
        policy.eval()
        method = self.method_config
        variants = {"": method.gen_kwargs, **{f"{name}/": {**method.gen_kwargs, **kwargs}
                                              for name, kwargs in method.eval_gen_kwargs.items()}}
        stats: dict[str, Any] = {}
        tables = []
        for prefix, gen_kwargs in variants.items():
            batch, scores, by_source = self.samples(gen_kwargs)
            if self.dist.is_main:
                stats.update(self.score(batch, scores, prefix, by_source))
                if not prefix:
                    tables.append(eval_table(batch.prompt_texts, batch.outputs, scores, step))
        policy.train(was_training)
        return self.dist.broadcast(stats), tables

    def score(self, batch: ScoreBatch, scores: list[float], prefix: str,
              by_source: list[dict[str, float]] | None = None) -> dict[str, Any]:
        """The reward (functions, added to the reward adapter's `scores` in place) and the metrics
        of one variant's samples, named with `prefix`. Episodes come scored where they ran
        (`by_source`: each sample's value per source, already in `scores`)."""
        stats: dict[str, Any] = {}
        chunk = self.method_config.chunk_size
        by_function: dict[str, list[torch.Tensor]] = {}
        if by_source is not None:
            for name in by_source[0] if by_source else ():
                by_function[name] = [torch.tensor([row[name] for row in by_source])]
        for start in range(0, len(batch) if self.reward_fn is not None and by_source is None else 0, chunk):
            total, values = self.reward_fn(batch[start:start + chunk], self.sampler.tokenizer, self.trainer_state)
            for i, value in enumerate((total.sum(1) if total.dim() == 2 else total).tolist(), start):
                scores[i] += value
            for name, v in values.items():
                by_function.setdefault(name, []).append(v)
        for name, values in by_function.items() if len(by_function) > 1 or "environment" in by_function else ():
            stats[f"reward/{prefix}{name}/mean"] = float(nan_moments(torch.cat(values))["mean"])
        judged = [s for s in scores if not math.isnan(s)]  # a sample no function judged has no reward (NaN)
        stats[f"reward/{prefix}mean"] = sum(judged) / len(judged) if judged else math.nan
        logged = self.reward_fn.drain_logs()[0] if self.reward_fn is not None else {}
        stats.update({f"{prefix}{name}": value for name, value in logged.items()})
        if self.metric_fn is not None:
            samples = [p + o for p, o in zip(batch.prompt_texts, batch.outputs)]
            metrics = self.metric_fn(samples=samples, prompts=batch.prompts, outputs=batch.outputs,
                                     **collate_metadata(batch.metadata))
            for name, values in metrics.items():
                values = validate_scores(values, [1] * len(samples), what=f"metric_fn[{name!r}]")
                stats[f"metrics/{prefix}{name}"] = values.mean().item()
        return stats

    def samples(self, gen_kwargs: dict) -> tuple[ScoreBatch, list[float], list[dict[str, float]] | None]:
        """The samples of one pass over the eval prompts and their reward-adapter scores (0
        without one), each process generating (and scoring with the reward adapter) every
        world-th prompt; gathered in the eval prompts' order. Episodes are scored here, where
        their environments are (their values per source are the third item; else None)."""
        chunk, world, rank = self.method_config.chunk_size, self.dist.world, self.dist.rank
        mine = list(range(rank, len(self.prompt_ids), world))
        rows = []
        for start in range(0, len(mine), chunk):
            index = mine[start:start + chunk]
            rollouts = self.sampler.generate(index, gen_kwargs, self.prompt_ids, self.prompts)
            batch = ScoreBatch.of(rollouts, [self.prompts[i].metadata for i in index])
            adapter_scores = self.sampler.reward_adapter_scores(rollouts)
            adapter_scores = [0.0] * len(index) if adapter_scores is None else adapter_scores.tolist()
            by_source: list = [None] * len(index)
            if rollouts.episodes is not None:
                total, values = (None, {}) if self.reward_fn is None else \
                    self.reward_fn(batch, self.sampler.tokenizer, self.trainer_state)
                total, values = with_environment_rewards(total, values, environment_rewards(rollouts))
                total = torch.zeros(len(index)) if total is None else total
                adapter_scores = [a + t for a, t in zip(adapter_scores, total.tolist())]
                by_source = [{name: float(v[k]) for name, v in values.items()} for k in range(len(index))]
                batch = dataclasses.replace(batch, environments=None)  # the instances stay on this process
            rows += zip(index, (batch[k:k + 1] for k in range(len(batch))), adapter_scores, by_source)
        rows = sorted(self.dist.gather(rows), key=lambda row: row[0])
        by_source = [r[3] for r in rows]
        return (ScoreBatch.concat([r[1] for r in rows]), [r[2] for r in rows],
                None if any(s is None for s in by_source) else by_source)


def show(tables: list[Table], step: int, stats: dict[str, Any]) -> None:
    """Print an evaluation's tables and means."""
    for table in tables:
        console.print(table)
    console.print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
