"""The optimizer and learning-rate schedule of a run, and where it writes."""

from __future__ import annotations

import os
import time

import torch

from rlora.config import Config


def build_optimizer(config: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by `optimizer.name` over the trainable parameters only."""
    kwargs = dict(config.optimizer.kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    name = config.optimizer.name
    classes = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"optimizer.name={name!r} is not one of {sorted(classes)}")
    return classes[name](params, **kwargs)


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule named by `scheduler.name`, stepped once per optimizer step."""
    name, kwargs = config.scheduler.name, dict(config.scheduler.kwargs)
    if name == "cosine_annealing":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **kwargs)
    if name == "linear":
        kwargs.setdefault("total_iters", config.train.total_steps)
        return torch.optim.lr_scheduler.LinearLR(optimizer, **kwargs)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if name == "transformers":
        from transformers import get_scheduler

        return get_scheduler(kwargs.pop("type", "linear"), optimizer, num_training_steps=config.train.total_steps,
                             **kwargs)
    raise ValueError(f"scheduler.name={name!r} is not one of ['constant', 'cosine_annealing', 'linear', 'transformers']")


def default_run_dir(config: Config) -> str:
    if config.train.run_dir:
        return config.train.run_dir
    return os.path.join(config.train.logging_dir or "runs", time.strftime("%Y%m%d-%H%M%S"))
