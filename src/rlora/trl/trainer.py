"""TRL 1.16's `GRPOTrainer` and `RLOOTrainer` on rlora: TRL's constructor and methods over rlora's
one config and one loop (docs/design.md §10). Nothing here trains: the arguments become an
`rlora.Config`, the model a `Policy`, the datasets prompts, the reward functions rlora's, and
`train()` runs `rlora.trainer.Trainer.learn`.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable

import torch
from accelerate.utils import set_seed

from rlora.config import load_config
from rlora.environments import Agent
from rlora.models import build_policy, load_tokenizer
from rlora.models.loading import max_positions
from rlora.models.policy import POLICY
from rlora.rollout.prompts import normalize_prompts
from rlora.rollout.rewards import RewardFunctions
from rlora.trainer import Trainer
from rlora.trl.callbacks import CallbackBridge, eval_metrics
from rlora.trl.config import GRPOConfig, RLOOConfig, defaults_of
from rlora.trl.rewards import SequenceClassifierReward, is_reward_adapter
from rlora.trl.translate import epoch_steps, to_rlora


class GRPOTrainer:
    """`trl.GRPOTrainer`'s surface; the training is rlora's (`self.trainer`)."""

    config_class = GRPOConfig
    estimator = "grpo"
    method_settings: dict = {}  # rlora's method settings the trainer fixes (RLOO's aggregation)

    def __init__(self, model: Any, reward_funcs: Any = None, args: GRPOConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, reward_processing_classes: Any = None,
                 callbacks: list | None = None, optimizers: tuple = (None, None), quantization_config: Any = None,
                 peft_config: Any = None, tools: list | None = None, rollout_func: Callable | None = None,
                 environment_factory: Any = None):
        _refuse_arguments(optimizers, rollout_func)
        if args is None:
            name = model if isinstance(model, str) else str(getattr(model.config, "_name_or_path", "model"))
            args = self.config_class(f"{name.rstrip('/').split('/')[-1]}-{type(self).__name__.removesuffix('Trainer')}")
        self_prompted = train_dataset is None and environment_factory is not None \
            and not isinstance(environment_factory, dict) and (args.max_steps or 0) > 0
        if self_prompted:  # TRL's: the environment's reset() writes each prompt
            train_dataset = [{"prompt": [{"role": "user", "content": ""}]}] * max(1, args.per_device_train_batch_size)
        if train_dataset is None:
            raise ValueError("train_dataset is required: a datasets.Dataset (or a list of rows) with a 'prompt' column "
                             "(or, with one environment_factory and max_steps > 0, none: its reset() gives each prompt)")
        self.args = args
        set_seed(args.seed)  # a new adapter's initial weights depend on it, as in TRL
        model_path, self._model = (model, None) if isinstance(model, str) else (_name_of(model), model)
        self.processing_class = processing_class or load_tokenizer(
            _tokenizer_settings(), model_path, args.trust_remote_code)
        self.processing_class.padding_side = "left"
        self.processing_class.truncation_side = "left"  # a prompt over the limit keeps its end (TRL's)
        functions, reward_adapter = _reward_functions(reward_funcs, reward_processing_classes, args, args.device,
                                                      has_environment=environment_factory is not None)
        self.prompts = dataset_rows(train_dataset, "train_dataset", args.remove_unused_columns, _rows_needed(args))
        self.eval_prompts = dataset_rows(eval_dataset, "eval_dataset", args.remove_unused_columns) \
            if eval_dataset is not None and str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no" \
            else []
        data = to_rlora(args, defaults_of(args), model_path=model_path, positions=_positions(model, model_path, args),
                        prompts=len(self.prompts), estimator=self.estimator)
        data["model"].update(self._adapter_settings(peft_config, reward_adapter, args.output_dir))
        if quantization_config is not None:  # a quantized base (QLoRA), as TRL's model_init_kwargs carry it
            data["model"]["model_extra_configs"]["quantization_config"] = _quantization_dict(quantization_config, model)
        data["method"].update(self.method_settings)
        self.config = load_config(data)
        self.reward_funcs = functions
        # TRL's agents: tools and environment_factory; an episode runs until a turn calls no tool, or
        # max_tool_calling_iterations turns have (the token budget ends it too)
        self.agent = None if environment_factory is None and not tools else Agent(
            environment_factory, list(tools or []), _most_turns(args.max_tool_calling_iterations),
            args.max_tool_calling_iterations, convention="trl")
        if self.agent is not None:
            data["method"].update({"max_turns": self.agent.max_turns,
                                   "max_tool_calling_iterations": args.max_tool_calling_iterations})
            if self_prompted:  # each reset() may write its own prompt, so a group's episodes open apart
                data["method"]["shared_prefix"] = False
            self.config = load_config(data)
        self.callbacks = list(callbacks or [])
        self.trainer = self._build()

    # ------------------------------------------------------------------ TRL's methods
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> Any:
        """Train for `max_steps` (or `num_train_epochs`); `resume_from_checkpoint` True continues from
        the newest `checkpoint-N` of `output_dir`, a path from that checkpoint, exactly."""
        if kwargs:
            raise TypeError(f"train() got {sorted(kwargs)}; rlora's takes resume_from_checkpoint only")
        from transformers.trainer_utils import TrainOutput

        if resume_from_checkpoint:
            self.config.train.resume_from_checkpoint = "latest" if resume_from_checkpoint is True \
                else str(resume_from_checkpoint)
            self.trainer = self._build()
        self.trainer.learn()
        summary = self.state.log_history[-1] if self.state.log_history else {}
        return TrainOutput(self.state.global_step, summary.get("train_loss", 0.0),
                           {k: v for k, v in summary.items() if k.startswith("train_")})

    def end(self) -> None:
        """What transformers' `Trainer.end()` finishes after training: the run's trackers, closed."""
        self.trainer.tracker.close()

    def push_to_hub(self, *args, **kwargs) -> None:
        raise NotImplementedError("rlora writes to output_dir only (save_model); push the saved adapter with "
                                  "huggingface_hub's upload_folder")

    def evaluate(self, eval_dataset: Any = None, **kwargs) -> dict[str, float]:
        """The mean reward (and per function) on the eval dataset, named as TRL names it (`eval_reward`)."""
        if eval_dataset is not None or kwargs:
            raise TypeError("evaluate() runs on the trainer's eval_dataset; give it to the constructor")
        if not self.eval_prompts:
            raise ValueError("there is no eval_dataset (or eval_strategy is 'no'); give one to evaluate")
        return eval_metrics(self.trainer.evaluate())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trained adapter in peft's format (loadable with `PeftModel.from_pretrained`) and the
        tokenizer; a model trained without an adapter, whole. `rlora export` merges an adapter."""
        output_dir = output_dir or self.args.output_dir
        policy = self.trainer.policy
        if policy.is_peft:
            policy.lm.save_pretrained(output_dir, selected_adapters=[POLICY])
        else:
            policy.lm.save_pretrained(output_dir)
        self.processing_class.save_pretrained(output_dir)

    @property
    def state(self):
        """transformers' `TrainerState` of the run: `global_step`, `max_steps`, `log_history`."""
        return self.trainer.trainer_state

    @property
    def model(self):
        """The model that trains: the peft model on the one base (or the model itself)."""
        return self.trainer.policy.lm

    @property
    def accelerator(self):
        return self.trainer.accelerator

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)
        self._bridge.callbacks = self.callbacks

    # ------------------------------------------------------------------ the pieces
    @staticmethod
    def _is_main() -> bool:
        from accelerate import PartialState

        return PartialState().is_main_process

    def _build(self) -> Trainer:
        """rlora's trainer of the translated config, with the callbacks watching it."""
        config = self.config
        policy = build_policy(config.model, self.processing_class, value_head=False, model=self._model) \
            if not hasattr(self, "trainer") else self.trainer.policy
        trainer = Trainer(config, policy, self.processing_class, self.reward_funcs, normalize_prompts(self.prompts),
                          normalize_prompts(self.eval_prompts, "eval_dataset") if self.eval_prompts else [],
                          accelerator=self._accelerator(), verbose=not self.args.disable_tqdm, agent=self.agent)
        self._bridge = CallbackBridge(self.callbacks, self.args, trainer, epoch_steps(self.args, len(self.prompts)), {
            "model": policy.lm, "processing_class": self.processing_class, "optimizer": trainer.optimizer,
            "lr_scheduler": trainer.scheduler})
        trainer.observers.append(self._bridge)
        return trainer

    def _accelerator(self):
        """The run's accelerator: the CPU when `use_cpu`, as TRL's arguments say."""
        from rlora.distributed import make_accelerator

        if not hasattr(self, "_accelerator_object"):
            precision = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "no"
            self._accelerator_object = make_accelerator(cpu=self.args.use_cpu, mixed_precision=precision)
        return self._accelerator_object

    def _adapter_settings(self, peft_config: Any, reward_adapter: str | None, output_dir: str) -> dict:
        """The model section's adapter settings: the given peft config trains a new adapter; a
        PeftModel trains on, its adapter as it was the reference (TRL's); no adapter at all
        trains the whole model. A PeftModel's starting adapter is written to
        `output_dir/initial_adapter`, which the config names, so that the run's `config.yaml`
        rebuilds it (`rlora eval`, a resume from the command line)."""
        from peft import PeftModel

        settings: dict[str, Any] = {"reward_adapter": reward_adapter}
        if isinstance(self._model, PeftModel):
            if peft_config is not None:
                raise ValueError("the model is a PeftModel and peft_config is given too; merge and unload its adapter "
                                 "into the base first, or give no peft_config (its adapter then trains on)")
            initial = os.path.join(output_dir, "initial_adapter")
            if not os.path.isdir(initial) and self._is_main():
                self._model.save_pretrained(initial, selected_adapters=[self._model.active_adapter])
            settings.update(model_path=initial, reference="adapter")
        elif peft_config is not None:
            settings["peft_config"] = peft_config
        else:
            settings["num_layers_unfrozen"] = -1  # TRL trains the whole model
        return settings


class RLOOTrainer(GRPOTrainer):
    """`trl.RLOOTrainer`'s surface: GRPO's loop with the leave-one-out baseline (`advantage_estimator:
    rloo`) and the `dr_grpo` aggregation, whose on-policy gradient is TRL's RLOO's (a sum over each
    completion's tokens, a mean over completions) divided by `max_completion_length`. rlora's RLOO
    keeps the per-token ratio and, with `beta > 0`, the k3 KL in the loss; TRL's takes the ratio of
    whole-sequence probabilities and puts a k1 KL in the reward, which differ once the policy has
    moved within a generation."""

    config_class = RLOOConfig
    estimator = "rloo"
    method_settings = {"loss_type": "dr_grpo"}


def dataset_rows(dataset: Any, what: str, prompt_only: bool = False, limit: int | None = None) -> list[dict]:
    """A dataset's rows as dicts (a `datasets.Dataset`, an `IterableDataset`, or a list of rows),
    each with a `prompt`; the other columns reach the reward functions (dropped with
    `remove_unused_columns`). An iterable dataset is read as far as `limit` rows (what the run
    draws), and needs one."""
    if not hasattr(dataset, "__len__"):  # a stream
        if limit is None:
            raise ValueError(f"{what} is an iterable dataset: set max_steps, so the rows the run draws are known")
        rows = list(itertools.islice(dataset, limit))
    else:
        rows = list(dataset)
    if not rows or not all(isinstance(row, dict) and "prompt" in row for row in rows):
        raise ValueError(f"{what} needs rows with a 'prompt' column (text, or a list of chat messages); got "
                         f"{type(dataset).__name__} of {len(rows)} rows" + (f", first {rows[0]!r:.80}" if rows else ""))
    return [{"prompt": row["prompt"]} if prompt_only else dict(row) for row in rows]


def _rows_needed(args: Any) -> int | None:
    """The prompts a run of `max_steps` draws (None without max_steps): whole generations."""
    if args.max_steps <= 0:
        return None
    per_generation = args.num_iterations * args.steps_per_generation // max(1, args.gradient_accumulation_steps)
    generations = -(-args.max_steps // max(1, per_generation))
    return generations * (args.generation_batch_size // args.num_generations)


def _refuse_arguments(optimizers: tuple, rollout_func: Any) -> None:
    """The constructor's arguments rlora does not take, each refused with the reason."""
    if optimizers not in ((None, None), None):
        raise ValueError("optimizers: rlora builds AdamW and its schedule from the arguments (learning_rate, adam_*, "
                         "weight_decay, lr_scheduler_type, warmup_steps); give those instead of an optimizer")
    if rollout_func is not None:
        raise ValueError("rollout_func: rlora does not run it; rlora samples its own rollouts: give an "
                         "environment_factory or tools for agents")


def _quantization_dict(quantization_config: Any, model: Any) -> dict:
    """`quantization_config` (a `BitsAndBytesConfig` or its dict) as the plain dict the run's
    config keeps (`model.model_extra_configs.quantization_config`, YAML-safe), for a model the
    trainer loads by name."""
    if not isinstance(model, str):
        raise ValueError("quantization_config applies to a model the trainer loads by name; this one is loaded "
                         "already: load it quantized (from_pretrained(..., quantization_config=...)) or pass its name")
    data = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else quantization_config
    if not isinstance(data, dict):
        raise TypeError(f"quantization_config must be a transformers BitsAndBytesConfig or a dict, got "
                        f"{type(quantization_config).__name__}")
    return {k: getattr(v, "value", v) for k, v in data.items() if not k.startswith("_")}  # enums as their names


def _most_turns(max_tool_calling_iterations: int | None) -> int:
    """Assistant turns of an episode under TRL's rule: one more than the tool-calling turns, or as
    many as the token budget allows (no cap) when those are not limited."""
    return 1_000_000 if max_tool_calling_iterations is None else max_tool_calling_iterations + 1


def _reward_functions(reward_funcs: Any, processing_classes: Any, args: Any, device: Any,
                      has_environment: bool = False) -> tuple[RewardFunctions | None, str | None]:
    """TRL's reward functions as rlora's: callables as they are, a sequence-classification model
    (path or loaded) scored as TRL scores it, and an `rlora rm` directory as the reward adapter on
    the policy's base (one at most; its score is added to the functions'). None at all with an
    environment: its `get_reward()` is the reward, as in TRL's datasetless example."""
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs] if reward_funcs else []
    classes = processing_classes if isinstance(processing_classes, (list, tuple)) else [processing_classes] * len(funcs)
    if len(classes) != len(funcs):
        raise ValueError(f"reward_processing_classes has {len(classes)} entries for {len(funcs)} reward functions; "
                         "give one per function (None for a plain function)")
    adapters = [f for f in funcs if is_reward_adapter(f)]
    if len(adapters) > 1 or adapters and args.reward_weights is not None:
        raise ValueError("an `rlora rm` reward adapter scores on the policy's base with weight 1, one at most; give one "
                         "and no reward_weights, or use its model as a sequence classifier")
    kwargs = {**(args.model_init_kwargs or {}), "trust_remote_code": args.trust_remote_code}
    out = [SequenceClassifierReward(f, c, kwargs, device) if isinstance(f, (str, torch.nn.Module)) else f
           for f, c in zip(funcs, classes) if f not in adapters]
    if not out and not adapters and not has_environment:
        raise ValueError("reward_funcs is required: a function, a reward model, or a list of them (or an "
                         "environment_factory whose get_reward() scores each episode)")
    return (RewardFunctions(out, args.reward_weights) if out else None), (adapters[0] if adapters else None)


def _tokenizer_settings():
    from rlora.config import TokenizerConfig

    return TokenizerConfig(padding_side="left", truncation_side="left")


def _name_of(model: Any) -> str:
    """A loaded model's name or path (its config's `_name_or_path`; for a PeftModel, its base's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(base.config, "_name_or_path", "") or "model")


def _positions(model: Any, model_path: str, args: Any) -> int | None:
    """The model's maximum number of positions, which bounds prompt + completion."""
    if isinstance(model, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(os.path.expanduser(model_path), trust_remote_code=args.trust_remote_code)
    else:
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    return max_positions(config)
