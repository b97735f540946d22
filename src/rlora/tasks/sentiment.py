"""trlx's flagship sentiment task on a real model: continue the opening words of a movie review
so that the continuation reads positive.

trlx (`examples/ppo_sentiments.py`) rewards GPT-2-imdb's continuations of IMDB reviews with a
DistilBERT classifier from the hub. Here both come without a hub:
- the prompts are 345 review openings written for rlora (`data/review_openings.txt`: positive,
  negative and neutral, 3-8 words, many films and aspects), split once into training and
  held-out prompts by a hash of each text (`is_held_out`);
- the reward is VADER's compound score (a lexicon and rules, in [-1, 1]; the `real` extra);
- the policy is SmolLM2-135M-Instruct from `rlora fetch`, prompted with plain text.

The reward scores the continuation (the output) alone, not prompt + output: the opening is
fixed and not the policy's doing, so adding it would only shift each prompt's rewards by its
own sentiment (every continuation of "The awful dialogue" would pay less than one of "The
stunning visuals"), noise that PPO would have to average out. The metric reports both.

    python examples/sentiment.py            # or: rlora demo --task sentiment [--method grpo]
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from rlora.tasks.presets import GRPO_METHOD, phase_steps, unknown_method

DATA_FILE = "review_openings.txt"  # in the package's data/ directory
HELD_OUT_PERCENT = 15  # share of openings kept for evaluation (by hash, so adding lines moves none)
POSITIVE_THRESHOLD = 0.05  # VADER's own convention: compound >= 0.05 is positive
MODEL = "smollm2-135m-instruct"  # the model `rlora fetch` gets


# ---------------------------------------------------------------------------------------------
# Data: review openings and the fixed held-out split
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def openings() -> tuple[str, ...]:
    """Every review opening shipped with rlora, in file order."""
    text = resources.files("rlora.tasks").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def is_held_out(opening: str) -> bool:
    """Whether `opening` is an eval prompt: the first 8 bytes of its SHA-256 mod 100 are below
    `HELD_OUT_PERCENT`. A function of the text alone, so the split never changes."""
    digest = hashlib.sha256(opening.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


def prompts() -> list[str]:
    """The training prompts: the openings that are not held out."""
    return [o for o in openings() if not is_held_out(o)]


def eval_prompts() -> list[str]:
    """The held-out prompts (about 15 % of the openings), never trained on."""
    return [o for o in openings() if is_held_out(o)]


# ---------------------------------------------------------------------------------------------
# Reward and metric: VADER's compound score
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def analyzer():
    """VADER's `SentimentIntensityAnalyzer`, built once (it loads its lexicon)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ImportError("the sentiment task scores texts with VADER, and the package vaderSentiment is not "
                          "installed; install it with: pip install 'rlora[real]'") from error
    return SentimentIntensityAnalyzer()


def compound(texts: Sequence[str]) -> list[float]:
    """VADER's compound score of each text, in [-1, 1] (0.0 for an empty text)."""
    vader = analyzer()
    return [float(vader.polarity_scores(text)["compound"]) for text in texts]


def reward_fn(samples: Sequence[str], prompts: Sequence[str] = (), outputs: Sequence[str] = (), tokenizer=None,
              **_: Any) -> list[float]:
    """The compound score of each output (the continuation only; see the module docstring)."""
    return compound(outputs)


def metric_fn(samples: Sequence[str], prompts: Sequence[str] = (), outputs: Sequence[str] = (),
              **_: Any) -> dict[str, list[float]]:
    """Per sample: `compound` of the output (the reward), `positive` (1.0 where that is >=
    `POSITIVE_THRESHOLD`, else 0.0; its mean is the share of positive continuations) and
    `sample_compound`, the score of prompt + output."""
    scores = compound(outputs)
    return {"compound": scores, "positive": [float(s >= POSITIVE_THRESHOLD) for s in scores],
            "sample_compound": compound(samples)}


# ---------------------------------------------------------------------------------------------
# Config for SmolLM2-135M on a small CPU
# ---------------------------------------------------------------------------------------------


ROLLOUTS = 64  # completions per phase, either method (GRPO: 8 openings x 8)
PHASES = 12  # the demo's default budget, in rollout phases: the same completions for either method


def method_settings(method: str) -> dict[str, Any]:
    """What PPO and GRPO do differently on this task; `make_config` shares the rest.

    - ppo: 2 epochs of batches of 32 = 4 optimizer steps a phase; a fixed KL coefficient of 0.05;
      the critic on its own adapter of the policy's shape (`model.value_adapter`): with the value
      head on the policy's trunk the value loss moved the shared adapter, the KL to the base grew
      and the held-out compound barely rose (BENCHMARKS.md, one-off measurements).
    - grpo: 8 openings x 8 continuations a phase; one iteration, one optimizer step over all 64
      (microbatches of 32: whole groups for `shared_prefix`), so every step is on-policy (ratio 1)
      as TRL's defaults; loss_type dapo, beta 0 (no reference pass), epsilon 0.2; no critic.
    Returns `batch_size`, `minibatch_size`, `lr`, `value_adapter` (whether the critic gets its own
    adapter) and the `method` section's keys.
    """
    if method == "ppo":
        return {"batch_size": 32, "minibatch_size": 32, "lr": 1e-3, "value_adapter": True,
                "method": {"ppo_epochs": 2, "init_kl_coef": 0.05, "target": None, "gamma": 1.0, "lam": 0.95,
                           "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 1.0, "scale_reward": "ignored",
                           "cliprange_reward": 10.0}}
    if method == "grpo":
        return {"batch_size": ROLLOUTS, "minibatch_size": 32, "lr": 1e-3, "value_adapter": False,
                "method": dict(GRPO_METHOD)}
    raise unknown_method(method)


def steps_per_phase(method: str) -> int:
    """Optimizer steps a phase takes with `method` (PPO 4, GRPO 1); the demo's budget is
    `PHASES` phases (PPO 48 steps, GRPO 12)."""
    return phase_steps(method_settings(method), ROLLOUTS)


def make_config(model_path: str, run_dir: str | None = None, total_steps: int | None = None, seed: int = 1000,
                eval_interval: int | None = None, num_threads: int | None = None, lr: float | None = None,
                method: str = "ppo", **method_keys: Any) -> dict:
    """PPO or GRPO (`method`, see `method_settings`) + LoRA for `model_path` (tuned on
    SmolLM2-135M-Instruct, 2 CPU cores).

    - LoRA r=8, alpha=16 on every linear layer of the blocks (`all-linear`), no dropout (the
      passes run with dropout off anyway).
    - One phase: 64 completions of at most 16 new tokens, plain sampling (top_k 0, top_p 1);
      `total_steps` counts optimizer steps (default: `PHASES` phases), and
      evaluation runs every `eval_interval` steps (default: at the start and the end).
    - AdamW at `lr` (default the method's, `method_settings`; LoRA takes about 10x full
      fine-tuning's rate), constant schedule.
    - Evaluation adds a greedy variant (`metrics/greedy/...`).
    `method_keys` override keys of the method section (e.g. `init_kl_coef=0.1`).
    """
    lora = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "target_modules": "all-linear"}
    settings = method_settings(method)
    total_steps = PHASES * steps_per_phase(method) if total_steps is None else total_steps
    return {
        "train": {"seq_length": 48, "batch_size": settings["batch_size"], "minibatch_size": settings["minibatch_size"],
                  "total_steps": total_steps,
                  "eval_interval": total_steps if eval_interval is None else eval_interval,
                  "checkpoint_interval": 10**9, "run_dir": run_dir, "seed": seed, "num_threads": num_threads},
        "model": {"model_path": model_path, "peft_config": lora,
                  **({"value_adapter": dict(lora)} if settings["value_adapter"] else {})},
        "tokenizer": {"tokenizer_path": model_path},
        "optimizer": {"name": "adamw", "kwargs": {"lr": settings["lr"] if lr is None else lr, "betas": [0.9, 0.95],
                                                  "eps": 1e-8, "weight_decay": 1e-6}},
        "scheduler": {"name": "constant", "kwargs": {}},
        "method": {"num_rollouts": ROLLOUTS, "chunk_size": ROLLOUTS,
                   "gen_kwargs": {"max_new_tokens": 16, "top_k": 0, "top_p": 1.0, "do_sample": True},
                   "eval_gen_kwargs": {"greedy": {"do_sample": False}}, **settings["method"], **method_keys},
    }
