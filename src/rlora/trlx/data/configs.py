"""trlx's config classes (`trlx.data.configs`) on rlora's sections.

`TRLConfig` is an `rlora.Config` (so `rlora.train` takes one as it is) with trlx's classmethods:
`load_yaml`, `from_dict`, `update` (trlx's sweep format) and `evolve`. The section classes are
rlora's; only `TrainConfig` is a subclass, for trlx's own defaults (`tracker="wandb"`,
`project_name="trlx"`). Every class is constructible keyword by keyword as trlx's dataclasses are.

What differs from trlx on purpose:
- unknown keys are an error at every depth, with a suggestion (trlx dropped nested typos in
  `update` and silently ignored a top-level key without a dot);
- `update` and `evolve` never change the config they start from (trlx's `update` merged into
  the base config's own section dicts);
- keys may be added to dict fields (`method.gen_kwargs.temperature` when the base has none),
  which trlx's `update` dropped.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from rlora.config.parse import config_to_dict, fix_yaml_floats, from_dict
from rlora.config.sections import (
    Config,
    ModelConfig,
    OptimizerConfig,
    PPOConfig,
    SchedulerConfig,
    TokenizerConfig,
)
from rlora.config.sections import TrainConfig as _RloraTrainConfig

# trlx <= 0.4 named the rollout collector; rlora's trainer collects PPO rollouts itself
_ORCHESTRATORS = ("PPOOrchestrator",)


@dataclass
class TrainConfig(_RloraTrainConfig):
    """rlora's `TrainConfig` with trlx's defaults for the tracker and its project."""

    tracker: str | None = "wandb"
    """Metrics tracker: None, "tensorboard" or "wandb" (trlx's default; offline without an API key)."""
    project_name: str = "trlx"
    """Tracker project name."""


@dataclass
class TRLConfig(Config):
    """trlx's top-level config: rlora's sections plus trlx's constructors."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop, logging and checkpointing, with trlx's tracker defaults (the other sections
    are rlora's, as `Config` declares them)."""

    @classmethod
    def from_dict(cls, config: dict) -> TRLConfig:
        """A config from nested dicts, as a trlx YAML holds them; every key is checked."""
        return from_dict(cls, _trlx_dict(config))

    @classmethod
    def load_yaml(cls, yml_fp: str | os.PathLike) -> TRLConfig:
        """A config from a trlx YAML file."""
        with open(yml_fp, encoding="utf-8") as f:
            data = fix_yaml_floats(yaml.safe_load(f))
        return cls.from_dict(data if data is not None else {})

    @classmethod
    def update(cls, baseconfig: Config | dict, config: dict) -> TRLConfig:
        """`baseconfig` (a config or its dict) with the hyperparameters `config` applied: trlx's
        sweep format, where a key is dotted (`"method.gamma": 0.99`) or a section name holding a
        dict (`"train": {"seed": 3}`). Dicts merge into dicts; anything else replaces the value."""
        base = config_to_dict(baseconfig) if isinstance(baseconfig, Config) else copy.deepcopy(baseconfig)
        if not isinstance(base, dict):
            raise TypeError(f"TRLConfig.update: baseconfig is a {type(baseconfig).__name__}; give a TRLConfig "
                            "or the dict of one (config.to_dict())")
        if not isinstance(config, dict):
            raise TypeError(f"TRLConfig.update: the hyperparameters are a {type(config).__name__}; give a dict "
                            'such as {"method.gamma": 0.99} (json.loads of a sweep\'s JSON string)')
        for name, value in config.items():
            parts = str(name).split(".")
            if len(parts) == 1 and not isinstance(value, dict):
                raise ValueError(f"hyperparameter {name!r}={value!r} names no section; give its dotted path, "
                                 f"e.g. 'train.{name}' or 'method.{name}'")
            nested: Any = value
            for part in reversed(parts):
                nested = {part: nested}
            base = _merge(base, nested)
        return cls.from_dict(base)

    def to_dict(self) -> dict:
        """Plain YAML-ready data, as trlx's `TRLConfig.to_dict` (`rlora.config.config_to_dict`)."""
        return config_to_dict(self)

    def evolve(self, **kwargs: Any) -> TRLConfig:
        """A copy with nested updates, e.g. `config.evolve(method=dict(gamma=0.99))`."""
        return type(self).from_dict(_merge(self.to_dict(), kwargs))

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=4)


def _merge(base: dict, update: dict) -> dict:
    """`base` with `update` merged in: a dict into a dict key by key, anything else replacing."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _trlx_dict(config: Any) -> Any:
    """trlx's own spellings turned into rlora's: `train.orchestrator` (trlx <= 0.4) checked and
    left out, `method.scale_reward: false` read as "ignored" (trlx scaled only for "running"/"ref")."""
    if not isinstance(config, dict):
        return config  # from_dict names the type error
    config = copy.deepcopy(config)
    train, method = config.get("train"), config.get("method")
    if isinstance(train, dict) and "orchestrator" in train:
        orchestrator = train.pop("orchestrator")
        if orchestrator not in _ORCHESTRATORS:
            raise ValueError(f"train.orchestrator={orchestrator!r} is invalid: rlora's trainer collects PPO rollouts "
                             f"itself; use 'PPOOrchestrator' or leave the key out")
    if isinstance(method, dict) and method.get("scale_reward") is False:
        method["scale_reward"] = "ignored"
    return config


__all__ = ["TRLConfig", "TrainConfig", "ModelConfig", "TokenizerConfig", "OptimizerConfig", "SchedulerConfig",
           "PPOConfig"]
