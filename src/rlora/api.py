"""`rlora.train`: the one-call entry point, as trlx's `trlx.train` (docs/design.md §2)."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
from accelerate.utils import set_seed

from rlora import zero
from rlora.config import Config, GRPOConfig, load_config
from rlora.data import load_prompts, resolve_function
from rlora.distributed import make_accelerator
from rlora.environments import Agent
from rlora.models import build_policy, load_tokenizer
from rlora.rollout.prompts import normalize_prompts
from rlora.rollout.rewards import RewardFunctions, check_reward_given
from rlora.trainer import Trainer


def set_threads(num_threads: int | None) -> int:
    """Torch intra-op threads: the configured number, else `$RLORA_NUM_THREADS`, else the cores
    shared among this machine's processes of the run."""
    if num_threads is None and os.environ.get("RLORA_NUM_THREADS"):
        num_threads = int(os.environ["RLORA_NUM_THREADS"])
    if num_threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        num_threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(num_threads)
    return num_threads


def train(reward_fn: Callable | list[Callable] | None = None, prompts: list[str | list | dict] | None = None,
          eval_prompts: list[str | dict] | None = None, metric_fn: Callable | None = None,
          config: Config | dict | str | None = None, stop_sequences: list[str] | None = None,
          overrides: list[str] | None = None, verbose: bool = True, environment: Callable | dict | None = None,
          tools: list[Callable] | None = None) -> Trainer:
    """Fine-tune `config.model` with PPO or a group method (`method.name`) so that `reward_fn` rises;
    returns the trainer.

    The arguments are those of `build_trainer`, whose docstring describes them.
    """
    return build_trainer(reward_fn, prompts, eval_prompts, metric_fn, config, stop_sequences, overrides,
                         verbose, environment, tools).learn()


def build_trainer(reward_fn: Callable | list[Callable] | None = None, prompts: list[str | list | dict] | None = None,
                  eval_prompts: list[str | dict] | None = None, metric_fn: Callable | None = None,
                  config: Config | dict | str | None = None, stop_sequences: list[str] | None = None,
                  overrides: list[str] | None = None, verbose: bool = True,
                  environment: Callable | dict | None = None, tools: list[Callable] | None = None) -> Trainer:
    """The trainer `train` runs, built but not started.

    - `reward_fn(samples, prompts, outputs, tokenizer, **metadata)` returns one float per sample
      (a terminal reward) or a list of floats per sample (per-token rewards from the first
      response token). A function with a `completions` parameter is called as TRL's
      `GRPOTrainer` calls it; a list of functions is summed with `task.reward_weights`
      (`rlora.rollout.rewards` has the details).
    - `prompts`: strings, lists of chat messages, or dicts whose "prompt" is either and whose
      other keys are metadata passed per sample to `reward_fn` and `metric_fn`. Default: the
      tokenizer's BOS, `batch_size` times.
    - `eval_prompts`: default `prompts[:batch_size]`.
    - `metric_fn(samples, prompts, outputs, **metadata)` returns `{name: [float per sample]}`.
    - `config`: an `rlora.Config`, a dict or a YAML path; `overrides` are `"a.b=value"` strings.
    - `stop_sequences`: each output is cut at the first of these strings and given an EOS.
    - `environment`: a multi-turn environment's factory (a class; `rlora.environments` says what
      it provides), one instance per episode, or a dict of them (each record names its own in an
      "environment" column); `tools`: functions the model may call. With either, each sample is
      an episode of up to `method.max_turns` assistant turns, and the reward functions see
      TRL's `completions` (the messages after the opening) and `environments`.
    Arguments left out are taken from the config's `task` section when it names them.
    """
    config = load_config(config, overrides)
    task = config.task  # what the config names, for arguments not given here
    if reward_fn is None and isinstance(task.reward_fn, list):
        reward_fn = [resolve_function(spec, f"task.reward_fn[{i}]") for i, spec in enumerate(task.reward_fn)]
    reward_fn = reward_fn or resolve_function(task.reward_fn, "task.reward_fn")
    metric_fn = metric_fn or resolve_function(task.metric_fn, "task.metric_fn")
    prompts = prompts if prompts is not None else load_prompts(task.prompts, task.prompt_field, "task.prompts")
    if eval_prompts is None:
        eval_prompts = load_prompts(task.eval_prompts, task.prompt_field, "task.eval_prompts")
    stop_sequences = stop_sequences if stop_sequences is not None else task.stop_sequences
    if reward_fn is not None:  # checked (callables, one weight each) before any model is loaded
        reward_fn = RewardFunctions(reward_fn, task.reward_weights)
    environment = environment or resolve_function(task.environment, "task.environment")
    tools = tools if tools is not None else [resolve_function(spec, f"task.tools[{i}]")
                                             for i, spec in enumerate(task.tools)]
    agent = Agent(environment, tools, config.method.max_turns, config.method.max_tool_calling_iterations) \
        if environment is not None or tools else None
    check_reward_given(reward_fn, config.model.reward_adapter is not None, environment is not None)
    set_threads(config.train.num_threads)
    if config.train.float32_matmul_precision is not None:  # process-wide, as torch's own setting is
        torch.set_float32_matmul_precision(config.train.float32_matmul_precision)
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path, config.model.trust_remote_code)
    if prompts is None:
        prompts = [tokenizer.bos_token or tokenizer.eos_token] * config.train.batch_size
    prompt_items = normalize_prompts(prompts, "prompts")
    eval_items = normalize_prompts(eval_prompts, "eval_prompts") if eval_prompts is not None \
        else prompt_items[:config.train.batch_size]
    # under a DeepSpeed launch the accelerator comes first, so that with ZeRO-3 transformers builds the
    # base's weights partitioned (DeepSpeed's zero.Init) instead of whole on every process
    accelerator = make_accelerator(mixed_precision=config.train.mixed_precision) if zero.requested() else None
    set_seed(config.train.seed)  # the adapter's and value head's initial weights depend on it
    policy = build_policy(config.model, tokenizer, value_head=not isinstance(config.method, GRPOConfig))
    return Trainer(config, policy, tokenizer, reward_fn, prompt_items, eval_items, metric_fn, stop_sequences,
                   accelerator=accelerator, verbose=verbose, agent=agent)


def evaluate(checkpoint: str, overrides: list[str] | None = None, verbose: bool = True, **kwargs) -> dict:
    """Evaluate the policy of `checkpoint` as training does (`eval_prompts`, `method.gen_kwargs`
    and each `eval_gen_kwargs` variant, reward and `metric_fn` means); returns the record.

    The checkpoint's `config.yaml` names the task; `overrides` change it (e.g. other
    `task.eval_prompts`), and `kwargs` are passed on as to `train` (e.g. `reward_fn=`). Nothing
    is written to the checkpoint or its run, and any number of processes may evaluate it.
    """
    import tempfile

    from rlora import checkpoint as checkpoints

    checkpoints.check(checkpoint)
    with tempfile.TemporaryDirectory(prefix="rlora-eval-") as run_dir:
        trainer = build_trainer(config=os.path.join(checkpoint, "config.yaml"), verbose=verbose, overrides=[
            *(overrides or []), f"train.run_dir={run_dir}", "train.tracker=null", "train.save_best=false",
            "train.resume_from_checkpoint=null"], **kwargs)
        try:
            checkpoints.load_weights(trainer.policy, checkpoint, trainer.accelerator.device)
            with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
                trainer.state.step = json.load(f)["step"]
            return trainer.evaluate()
        finally:
            trainer.tracker.close()


__all__ = ["train", "build_trainer", "evaluate", "set_threads"]
