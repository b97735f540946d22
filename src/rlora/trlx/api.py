"""`trlx.train` on rlora: trlx 0.7's signature and its online (PPO) semantics.

`train` turns a trlx config into the rlora config it means (`as_rlora_config`), then calls
`rlora.train`. What it translates:
- `model_path` replaces `config.model.model_path` (the tokenizer keeps `tokenizer.tokenizer_path`);
- no config: `default_ppo_config()`, as trlx picks for a `reward_fn`;
- trlx's sizes are per process, rlora's global: under `WORLD_SIZE = n > 1` the rollout,
  chunk, batch and minibatch sizes are multiplied by n, so a trlx config means the same run;
- `gen_kwargs.max_length` / `min_length` (transformers' total length, prompt included) become
  `max_new_tokens` / `min_new_tokens` through the longest prompt (`new_token_lengths`);
- `train.tracker="wandb"` (trlx's default) without wandb installed logs to `metrics.jsonl`
  only, with a warning; with wandb and no API key rlora's tracker runs it offline;
- `method.scale_reward=False` is "ignored", as trlx read it.
The offline arguments (`dataset`, `samples`, `rewards`: trlx's ILQL and SFT) are refused.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings
from typing import Any, Callable

from rlora.config import Config
from rlora.trlx.data.configs import TRLConfig
from rlora.trlx.data.default_configs import default_ppo_config

_OFFLINE = ("dataset", "samples", "rewards")


def train(model_path: str | None = None, reward_fn: Callable | None = None, dataset: Any = None,
          samples: list | None = None, rewards: list | None = None, prompts: list | None = None,
          eval_prompts: list | None = None, metric_fn: Callable | None = None,
          config: TRLConfig | Config | dict | str | None = None, stop_sequences: list[str] | None = []):  # noqa: B006
    """Fine-tune with PPO as `trlx.train(reward_fn=..., prompts=..., config=...)` does; returns the trainer.

    `reward_fn(samples, prompts, outputs, tokenizer, **metadata)` and `metric_fn(samples, prompts,
    outputs, **metadata)` are called exactly as trlx calls them; dict prompts carry metadata.
    `config` is a `TRLConfig`, an `rlora.Config`, a dict or a YAML path; it is not modified.
    """
    given = [name for name, value in zip(_OFFLINE, (dataset, samples, rewards)) if value is not None]
    if given:
        raise ValueError(
            f"trlx.train({', '.join(f'{name}=...' for name in given)}): offline training from fixed samples (trlx's "
            "ILQL and SFT trainers) is not implemented by rlora. Train online instead: pass reward_fn=... and "
            "prompts=... (PPO). For supervised fine-tuning on texts use `rlora sft` (rlora.sft.sft); for a reward "
            "model from preference pairs use `rlora rm`, then model.reward_adapter")
    if config is None:
        if reward_fn is None:
            raise ValueError("trlx.train: give reward_fn=... (and prompts=...) for online PPO; without a config or "
                             "a reward_fn trlx would pick its SFT trainer, which rlora does not implement")
        warnings.warn("trlx.train: no config given; using default_ppo_config() as trlx does. Pass config=... "
                      "(rlora.trlx.data.default_configs) to choose the model and sizes", stacklevel=2)
        config = default_ppo_config()
    config = as_rlora_config(config, model_path)
    prompts = prompts or None  # trlx: `prompts or [bos] * batch_size`
    _resolve_total_lengths(config, prompts, eval_prompts)

    from rlora.api import train as rlora_train

    return rlora_train(reward_fn=reward_fn, prompts=prompts, eval_prompts=eval_prompts, metric_fn=metric_fn,
                       config=config, stop_sequences=list(stop_sequences or []))


def as_rlora_config(config: TRLConfig | Config | dict | str | os.PathLike, model_path: str | None = None) -> Config:
    """The rlora `Config` a trlx config means, for one call of `train` (the argument is not modified).

    Everything but `gen_kwargs.max_length` / `min_length`, which need the prompts, is translated;
    the result is validated by `train`."""
    if isinstance(config, Config):
        config = copy.deepcopy(config)
    elif isinstance(config, dict):
        config = TRLConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        config = TRLConfig.load_yaml(config)
    else:
        raise TypeError(f"trlx.train: config is a {type(config).__name__}; give a TRLConfig "
                        "(rlora.trlx.data.default_configs), an rlora.Config, a dict or a YAML path")
    if model_path:
        config.model.model_path = model_path
    method, train_ = config.method, config.train
    if method.scale_reward is False:
        method.scale_reward = "ignored"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # trlx's sizes are each process's; rlora's are global (chunk_size is each process's in both)
        method.num_rollouts *= world
        train_.batch_size *= world
        if train_.minibatch_size is not None:
            train_.minibatch_size *= world
    if train_.tracker == "wandb" and not _wandb_installed():
        warnings.warn("train.tracker='wandb' (trlx's default) but wandb is not installed: metrics go to "
                      "run_dir/metrics.jsonl only. `pip install wandb` to log there too, or set "
                      "train.tracker=None to silence this", stacklevel=3)
        train_.tracker = None
    for key in ("gen_kwargs", "gen_experience_kwargs"):
        kwargs = getattr(method, key)
        if isinstance(kwargs, dict):
            sweeps = [name for name, value in kwargs.items() if isinstance(value, list)]
            if sweeps:
                raise ValueError(f"method.{key}.{sweeps[0]}={kwargs[sweeps[0]]!r}: trlx's evaluation sweep over a "
                                 f"list of values is not supported; give one value, and one named variant per "
                                 f"value in method.eval_gen_kwargs, e.g. {{t05: {{{sweeps[0]}: ...}}}}")
    return config


def _wandb_installed() -> bool:
    return sys.modules.get("wandb") is not None or importlib.util.find_spec("wandb") is not None


def new_token_lengths(gen_kwargs: dict, longest_prompt: int, key: str = "method.gen_kwargs") -> dict:
    """`gen_kwargs` with transformers' total lengths (prompt + response) turned into new-token counts.

    trlx passed `max_length` / `min_length` to `generate`, where they count the left-padded
    prompt: a response's budget was `max_length` minus the longest prompt *of its batch*, so it
    depended on which prompts were batched together. rlora gives every response the budget of a
    batch holding the longest prompt: `max_new_tokens = max_length - longest_prompt` (every
    prompt + response fits in `max_length`, as in trlx), `min_new_tokens = min_length -
    longest_prompt` (dropped when not positive). Given alongside `max_new_tokens`, `max_length`
    is dropped with a warning, as `generate` ignores it then.
    """
    kwargs = dict(gen_kwargs)
    for total, new, least in (("max_length", "max_new_tokens", 1), ("min_length", "min_new_tokens", 0)):
        if total not in kwargs:
            continue
        value = kwargs.pop(total)
        if new in kwargs:
            warnings.warn(f"{key}: {total}={value!r} dropped because {new}={kwargs[new]!r} is set (generate "
                          f"ignores {total} then, too)", stacklevel=3)
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{key}.{total}={value!r} must be an integer count of tokens; or set {key}.{new}")
        count = value - longest_prompt
        if count < least:
            if total == "max_length":
                raise ValueError(f"{key}.max_length={value} (prompt + response tokens) leaves no room for a response "
                                 f"after the longest prompt ({longest_prompt} tokens); raise it, or set "
                                 f"{key}.max_new_tokens")
            continue  # every prompt is already min_length long
        kwargs[new] = count
    return kwargs


def _resolve_total_lengths(config: Config, prompts: list | None, eval_prompts: list | None) -> None:
    """Apply `new_token_lengths` to `gen_kwargs` and `gen_experience_kwargs` with the longest
    of the prompts as rlora will tokenize them (the tokenizer is loaded only when needed)."""
    keys = [key for key in ("gen_kwargs", "gen_experience_kwargs")
            if {"max_length", "min_length"} & set(getattr(config.method, key) or {})]
    if not keys:
        return
    from rlora.models import load_tokenizer
    from rlora.rollout.prompts import normalize_prompts, tokenize_prompts

    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path, config.model.trust_remote_code)
    items = list(prompts) if prompts is not None else [tokenizer.bos_token or tokenizer.eos_token]
    items += list(eval_prompts or [])
    ids = tokenize_prompts(normalize_prompts(items, "prompts"), tokenizer, 1 << 30,
                           add_special_tokens=config.tokenizer.add_special_tokens)
    longest = max(len(x) for x in ids)
    for key in keys:
        setattr(config.method, key, new_token_lengths(getattr(config.method, key), longest, f"method.{key}"))


__all__ = ["train", "as_rlora_config", "new_token_lengths"]
