"""Metrics: `metrics.jsonl` always, TensorBoard or W&B when asked, PNG plots, eval tables, and
readers of a run's history (seconds per phase, a group method's per-phase signals)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rich.console import Console
from rich.table import Table

PLOTS = {  # file name -> the history keys drawn in it (PPO's and the group methods')
    "reward.png": ("rollout_scores/mean", "reward", "reward/mean"),
    "kl.png": ("policy/sqrt_kl", "kl_ctl_value", "kl"),
    "losses.png": ("losses/policy_loss", "losses/value_loss", "loss"),
    "lengths.png": ("response_length/mean", "completions/mean_length"),
    "groups.png": ("frac_reward_zero_std", "completions/clipped_ratio", "clip_ratio/region_mean"),
}


class Tracker:
    """Writes each record to `run_dir/metrics.jsonl` and to the optional tracker."""

    def __init__(self, run_dir: str, tracker: str | None = None, config: dict | None = None,
                 project_name: str = "rlora", entity_name: str | None = None, group_name: str | None = None,
                 tags: list[str] | None = None, enabled: bool = True, history: list[dict] | None = None,
                 run_name: str | None = None):
        """`history`: a resumed run's records; `metrics.jsonl` is rewritten to hold exactly them, so
        records a killed run wrote after its last checkpoint do not stay."""
        self.run_dir, self.enabled = run_dir, enabled
        self._file = self._tb = self._wandb = None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        if history is not None:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(record) + "\n" for record in history)
            os.replace(path + ".tmp", path)
        self._file = open(path, "a", encoding="utf-8")
        if tracker == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("train.tracker='tensorboard' needs the tensorboard package: "
                                  "pip install 'rlora[tensorboard]'") from err
            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        elif tracker == "wandb":
            try:
                import wandb
            except ImportError as err:
                raise ImportError("train.tracker='wandb' needs wandb: pip install 'rlora[wandb]'") from err
            if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
                os.environ["WANDB_MODE"] = "offline"  # no key, no network: log locally, sync later
            self._wandb = wandb.init(project=project_name, entity=entity_name, group=group_name, tags=tags,
                                     config=config, dir=run_dir, name=run_name)

    def log(self, record: dict[str, Any]) -> None:
        """One record: a dict with a `step` key and float statistics."""
        if not self.enabled:
            return
        if self._file is None:  # a record after close() (an evaluation after training): metrics.jsonl only
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None


def log_rollouts(directory: str | None, phase: int, step: int, rollouts, scores) -> None:
    """With `train.rollout_logging_dir`: one JSON line per sample of the phase, in `phase_N.jsonl`."""
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"phase_{phase}.jsonl"), "w", encoding="utf-8") as f:
        for prompt, output, score in zip(rollouts.prompts, rollouts.outputs, scores.tolist()):
            f.write(json.dumps({"step": step, "prompt": prompt, "output": output, "score": score}) + "\n")


def phase_seconds(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Seconds of each rollout phase of `history`: generation and scoring (`rollout`), the no-grad
    rollout pass (`rollout_pass`) and its optimizer steps (`update`, the `time/step` of the steps
    logged after the phase's record and before the next one's; evaluations and checkpoints are
    not in it)."""
    phases: list[dict[str, float]] = []
    for record in history:
        if "phase" in record:
            phases.append({"phase": record["phase"], "rollout": record["time/rollout"],
                           "rollout_pass": record["time/rollout_pass"], "update": 0.0})
        elif phases and "time/step" in record:
            phases[-1]["update"] += record["time/step"]
    return phases


def mean_phase_seconds(history: list[dict[str, Any]]) -> dict[str, float]:
    """`phase_seconds` averaged over the phases of `history`."""
    phases = phase_seconds(history)
    return {name: sum(p[name] for p in phases) / max(1, len(phases)) for name in ("rollout", "rollout_pass", "update")}


def group_signals(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """A group method's per-phase rollout `reward` and `frac_reward_zero_std` (the share of groups
    whose rewards were all equal, which teach nothing), TRL's names; {} for PPO, which logs neither."""
    phases = [r for r in history if "frac_reward_zero_std" in r]
    if not phases:
        return {}
    return {key: [round(r[key], 4) for r in phases] for key in ("reward", "frac_reward_zero_std")}


def plot_history(history: list[dict[str, Any]], run_dir: str, extra_keys: tuple[str, ...] = ()) -> list[str]:
    """PNG plots of reward, KL, losses, each reward function and the eval metrics against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_keys = sorted({k for r in history for k in r if k.startswith("metrics/")} | set(extra_keys))
    plots = dict(PLOTS, **({"metrics.png": tuple(metric_keys)} if metric_keys else {}))
    function_keys = sorted({k for r in history for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    if function_keys:  # each reward function's mean, phase by phase
        plots["reward_functions.png"] = tuple(function_keys)
    written = []
    for name, keys in plots.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))
                      and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=key)
                drawn = True
        if drawn:
            ax.set_xlabel("optimizer step")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = os.path.join(run_dir, name)
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


def eval_table(prompts: list[str], outputs: list[str], rewards: list[float] | None, step: int,
               rows: int = 6) -> Table:
    """A rich table of `rows` eval samples spread evenly over the eval set."""
    table = Table(title=f"eval samples at step {step}", show_lines=False)
    table.add_column("prompt", overflow="fold", max_width=40)
    table.add_column("output", overflow="fold", max_width=60)
    if rewards is not None:
        table.add_column("reward", justify="right")
    for i in range(0, len(prompts), max(1, len(prompts) // rows)):
        cells = [prompts[i], outputs[i]] + ([f"{rewards[i]:.3f}"] if rewards is not None else [])
        table.add_row(*cells)
    return table


console = Console(stderr=True)
