"""transformers' `TrainerCallback`s fed from rlora's run: each event of the loop (a step's record,
an evaluation, a checkpoint, the start and the end) becomes the callback calls transformers'
`Trainer` would make, with TRL's `args`, a `TrainerState` (`global_step`, `max_steps`, `epoch`,
`log_history`) and a `TrainerControl` whose requests (stop, save, evaluate, log) are carried out.
Logs are TRL's: every `logging_steps` steps (or each epoch, or never, as `logging_strategy`
says), the means of the window's step and phase metrics under TRL's names.
"""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerControl

# rlora's step / phase record names that TRL logs under another name
RENAMED = {"time/step": "step_time"}
# what a TRL log holds of rlora's records: TRL's names, per-function rewards, completion and tool statistics
# (and rlora's episode statistics)
KEPT = ("loss", "grad_norm", "learning_rate", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
        "clip_ratio/", "completions/", "rewards/", "step_time", "tools/", "episodes/")


def trl_log(records: list[dict[str, Any]]) -> dict[str, float]:
    """The means of TRL's metrics over `records` (the steps and phases of a logging window)."""
    sums: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.items():
            key = RENAMED.get(key, key)
            if isinstance(value, (int, float)) and any(key == k or (k.endswith("/") and key.startswith(k))
                                                       for k in KEPT):
                sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sums.items()}


def absolute_steps(steps: float | None, max_steps: int) -> int | None:
    """transformers' `*_steps`: a value below 1 is that fraction of the run's steps."""
    if steps is None:
        return None
    return max(1, math.ceil(steps * max_steps)) if steps < 1 else int(steps)


class CallbackBridge:
    """An observer of rlora's `Trainer` (its `observers` list) that calls `callbacks` with the
    arguments transformers passes, and does what their `TrainerControl` asks."""

    def __init__(self, callbacks: list, args: Any, trainer: Any, steps_per_epoch: int, extra: dict):
        self.callbacks, self.args, self.trainer = list(callbacks), args, trainer
        self.state, self.control = trainer.trainer_state, TrainerControl()
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.extra = extra  # model, processing_class, optimizer, lr_scheduler: what transformers passes
        state, total = self.state, trainer.total_steps
        state.logging_steps = absolute_steps(args.logging_steps, total)
        state.save_steps = absolute_steps(args.save_steps, total)
        state.eval_steps = absolute_steps(args.eval_steps or args.logging_steps, total)
        state.num_train_epochs = math.ceil(total / self.steps_per_epoch)
        self.strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        self.window: list[dict[str, Any]] = []  # records since the last log
        self.losses: list[float] = []
        self.started = time.perf_counter()
        self.call("on_init_end")

    def __call__(self, event: str, **data: Any) -> None:
        getattr(self, f"on_{event}")(**data)

    def call(self, name: str, **kwargs: Any) -> None:
        """`name` on every callback, then what the control asks: stop (after this step), save,
        evaluate, log now; each request is cleared once done, as transformers does."""
        for callback in self.callbacks:
            result = getattr(callback, name)(self.args, self.state, self.control, **self.extra, **kwargs)
            if isinstance(result, TrainerControl):
                self.control = result
        control = self.control
        if control.should_training_stop:
            self.trainer.stop_requested = True
        if name == "on_step_end":
            if control.should_log:
                control.should_log = False
                self.log(trl_log(self.window))
                self.window = []
            if control.should_evaluate:
                control.should_evaluate = False
                self.trainer.evaluate()
            if control.should_save:
                control.should_save = False
                self.trainer.save()

    def on_train_begin(self) -> None:
        self.started = time.perf_counter()
        self.state.max_steps = self.trainer.total_steps
        self.call("on_train_begin")
        self.call("on_epoch_begin")

    def on_step_begin(self) -> None:
        self.call("on_step_begin")

    def on_phase(self, record: dict[str, Any]) -> None:
        self.window.append(record)  # its rollouts' statistics: logged with the window's steps

    def on_step(self, record: dict[str, Any]) -> None:
        state = self.state
        state.global_step, state.epoch = record["step"], record["step"] / self.steps_per_epoch
        self.window.append(record)
        self.losses.append(record.get("loss", 0.0))
        self.call("on_pre_optimizer_step")
        self.call("on_optimizer_step")
        epoch_ended = state.global_step % self.steps_per_epoch == 0
        if self.strategy == "steps" and state.global_step % state.logging_steps == 0 or \
                self.strategy == "epoch" and epoch_ended:
            self.control.should_log = True
        self.call("on_step_end")
        if epoch_ended:
            self.call("on_epoch_end")
            if state.global_step < self.trainer.total_steps:
                self.call("on_epoch_begin")

    def log(self, logs: dict[str, float]) -> None:
        logs = {**logs, "epoch": round(self.state.epoch or 0.0, 4)}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.call("on_log", logs=logs)

    def on_evaluate(self, record: dict[str, Any]) -> None:
        metrics = eval_metrics(record)
        self.state.log_history.append({**metrics, "epoch": round(self.state.epoch or 0.0, 4),
                                       "step": self.state.global_step})
        self.call("on_evaluate", metrics=metrics)

    def on_save(self, path: str) -> None:
        self.call("on_save")

    def on_train_end(self) -> None:
        runtime = time.perf_counter() - self.started
        self.log({"train_runtime": runtime, "train_loss": sum(self.losses) / max(1, len(self.losses)),
                  "train_steps_per_second": len(self.losses) / max(runtime, 1e-9)})
        self.call("on_train_end")


def eval_metrics(record: dict[str, Any]) -> dict[str, float]:
    """An rlora eval record as TRL names its metrics: `eval_` and the name (`eval_reward` for the
    mean reward, `eval_rewards/<name>/mean` per function)."""
    out = {}
    for key, value in record.items():
        if key in ("step", "eval") or not isinstance(value, (int, float)):
            continue
        if key == "reward/mean":
            out["eval_reward"] = value
        elif key.startswith("reward/") and key.endswith("/mean"):
            out[f"eval_rewards/{key[len('reward/'):]}"] = value
        else:
            out[f"eval_{key}"] = value
    return out
