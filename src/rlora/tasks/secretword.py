"""A two-turn agent task: only what the environment says can earn the reward.

Each episode is a conversation with `SecretWord`, an environment (`rlora.environments`). The
opening, the same for all episodes of a record, asks the model to ask for a secret word. After
the model's first turn, whatever it says, the environment answers "The secret word is 'falcon'.
Reply with the secret word only." with a word it draws for that episode from a list (for the
held-out records, a word fixed by the record, so every evaluation sees the same words). After
the second turn the episode ends, and `get_reward()` scores that reply: 1.0 when its answer
(`answer_word`) is the secret word, `PARTIAL` when the word is only somewhere in it ("The secret
word is falcon."), 0 otherwise. The word is not in the opening, so no single-turn policy earns
more than chance; the training and held-out openings differ, and so do their word lists.

What the policy could hack, and what stops it: the first turn is not scored, so the model cannot
be paid for guessing; repeating the environment's whole message contains the word and earns the
partial credit only, a quarter of an exact answer; one fixed word is right once in
`len(TRAIN_WORDS)` episodes.

How far GRPO (the default) and PPO take the base SmolLM2-135M-Instruct on the held-out records is
in the README ("Agents: multi-turn episodes with an environment").

    rlora demo --task secretword                # GRPO on SmolLM2-135M-Instruct, prints before -> after
    python -m rlora.tasks.secretword --method ppo
    python -m rlora.tasks.secretword --steps 8 optimizer.kwargs.lr=5e-4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from collections.abc import Sequence
from typing import Any

from rlora.tasks.presets import GRPO_METHOD, METHODS, phase_steps, unknown_method

SYSTEM = "You are a helpful assistant. Keep your replies short."
TRAIN_OPENINGS = (
    "I know a secret word. Ask me for it in one short question.",
    "There is a secret word. Ask me what it is, in one short question.",
    "I am keeping a secret word. Ask me for it, briefly.",
    "Ask me for my secret word in a few words.",
    "I have a secret word for you. Ask me for it in one short sentence.",
    "You need a secret word from me. Ask for it in one short question.",
    "Before we go on, ask me for the secret word. Keep it short.",
    "I will tell you a secret word if you ask. Ask me now, briefly.",
)
HELD_OUT_OPENINGS = (
    "I have a secret word. Please ask me what it is, in one short question.",
    "Ask me which secret word I chose. Be brief.",
    "There is a word only I know. Ask me for it in a few words.",
    "Start by asking me for the secret word, in one short sentence.",
)
TRAIN_WORDS = tuple(
    "falcon river copper lantern maple thunder velvet harbor pepper marble canyon orchid glacier meadow "
    "saddle walnut comet ember violet anchor basket cobalt dagger feather garnet hollow island jasper "
    "kettle ladder mirror nectar oyster pebble quartz ribbon".split())
HELD_OUT_WORDS = ("tiger", "silver", "castle", "autumn", "rocket", "pillow")
PARTIAL = 0.25  # the reward of a reply that contains the secret word but is not only it
REVEAL = "The secret word is '{}'. Reply with the secret word only."

_WORD = re.compile(r"[a-z]+")


def answer_word(text: str) -> str | None:
    """The one word `text` answers with, lowercase, or None when it is not a one-word answer.

    Around the word: whitespace, quotes, `*` emphasis, and final `.` or `!` are allowed
    ("'Falcon'." -> "falcon"); anything else (a sentence, two words) is not an answer.
    """
    word = text.strip().strip("\"'*`.!").strip().lower()
    return word if _WORD.fullmatch(word) else None


def score(reply: str, secret: str) -> float:
    """1.0 when `reply` answers with `secret` alone, `PARTIAL` when `secret` is a word in it, else 0."""
    if answer_word(reply) == secret:
        return 1.0
    return PARTIAL if secret in _WORD.findall(reply.lower()) else 0.0


class SecretWord:
    """The environment of one episode: it says the secret word after the first turn and scores the second."""

    def reset(self, split: str = "train", word: str | None = None, **row) -> None:
        """A fresh episode; `word` (held-out records) fixes the secret, else it is drawn from the
        split's list. Returns None: the episode opens with the record's own prompt."""
        words = {"train": TRAIN_WORDS, "held_out": HELD_OUT_WORDS}.get(split)
        if words is None:
            raise ValueError(f"split {split!r} is neither 'train' nor 'held_out'; give each record one of them")
        self.secret = word or random.choice(words)
        self.replies: list[str] = []
        return None

    def step(self, reply: str) -> str | None:
        self.replies.append(reply)
        return REVEAL.format(self.secret) if len(self.replies) == 1 else None

    def get_reward(self) -> float:
        return score(self.replies[1], self.secret) if len(self.replies) > 1 else 0.0


def opening(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def split() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) records: each training opening once (the environment draws the word);
    each held-out opening with each held-out word, 24 in all."""
    train = [{"prompt": opening(text), "split": "train"} for text in TRAIN_OPENINGS]
    held_out = [{"prompt": opening(text), "split": "held_out", "word": word}
                for text in HELD_OUT_OPENINGS for word in HELD_OUT_WORDS]
    return train, held_out


# ---------------------------------------------------------------------------------------------
# Config and run
# ---------------------------------------------------------------------------------------------


ROLLOUTS = 16  # episodes per phase, either method (GRPO: 2 openings x 8)
PHASES = 12  # the demo's default budget, in rollout phases
EVAL_PHASES = 6  # phases between held-out evaluations (and one at the start and the end)


def method_settings(method: str) -> dict[str, Any]:
    """What GRPO and PPO do differently on this task; `make_config` shares the rest.

    - grpo: 2 openings x 8 episodes a phase; one on-policy optimizer step over all 16
      (`rlora.tasks.presets.GRPO_METHOD`); AdamW at 1e-3, oneword's setting.
    - ppo: one epoch of two batches of 8 a phase, AdamW at 5e-4, a fixed KL coefficient of 0.01,
      the value head on the policy's trunk. The value loss's gradient reaches the policy's adapter
      through that shared trunk, so it is weighted 0.1 (`vf_coef`); with 0.5 at 1e-3 PPO did not
      learn the task (README, "Agents").
    Returns `batch_size`, `minibatch_size`, `lr` and the `method` section's keys.
    """
    if method == "grpo":
        return {"batch_size": ROLLOUTS, "minibatch_size": 16, "lr": 1e-3, "method": dict(GRPO_METHOD)}
    if method == "ppo":
        return {"batch_size": 8, "minibatch_size": 8, "lr": 5e-4,
                "method": {"ppo_epochs": 1, "init_kl_coef": 0.01, "target": None, "gamma": 1.0, "lam": 0.95,
                           "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "scale_reward": "ignored",
                           "cliprange_reward": 10.0}}
    raise unknown_method(method)


def steps_per_phase(method: str) -> int:
    """Optimizer steps a phase takes with `method` (GRPO 1, PPO 2)."""
    return phase_steps(method_settings(method), ROLLOUTS)


def make_config(model_path: str, total_steps: int | None = None, run_dir: str | None = None, seed: int = 0,
                eval_interval: int | None = None, method: str = "grpo") -> dict:
    """GRPO or PPO (`method`, see `method_settings`) + LoRA (r=8 on every linear layer) for
    SmolLM2-135M-Instruct on this task: episodes of at most 2 turns of at most 16 new tokens each,
    at temperature 0.7; `total_steps` counts optimizer steps (default: `PHASES` phases),
    `eval_interval` too (default: every `EVAL_PHASES`)."""
    settings, per_phase = method_settings(method), steps_per_phase(method)
    return {
        "train": {"seq_length": 128, "batch_size": settings["batch_size"],
                  "minibatch_size": settings["minibatch_size"],
                  "total_steps": PHASES * per_phase if total_steps is None else total_steps,
                  "eval_interval": EVAL_PHASES * per_phase if eval_interval is None else eval_interval,
                  "checkpoint_interval": 10**9, "run_dir": run_dir, "seed": seed, "save_best": False},
        "model": {"model_path": model_path,
                  "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                                  "lora_dropout": 0.0, "target_modules": "all-linear"}},
        "tokenizer": {"tokenizer_path": model_path},
        "optimizer": {"name": "adamw", "kwargs": {"lr": settings["lr"], "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 1e-6}},
        "scheduler": {"name": "constant", "kwargs": {}},
        "method": {"num_rollouts": ROLLOUTS, "chunk_size": ROLLOUTS, "max_turns": 2,
                   "gen_kwargs": {"max_new_tokens": 16, "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                                  "do_sample": True}, **settings["method"]},
    }


def run(total_steps: int | None = None, run_dir: str | None = None, model_path: str | None = None, seed: int = 0,
        eval_interval: int | None = None, overrides: Sequence[str] = (), verbose: bool = True,
        method: str = "grpo") -> dict[str, Any]:
    """Train on the task with `method` ("grpo" or "ppo") and return (and write to
    `run_dir/summary.json`) the held-out reward before and after, with timings.
    `model_path` defaults to SmolLM2-135M-Instruct (`rlora.fetch`)."""
    import rlora
    from rlora.fetch import fetch
    from rlora.tracking import group_signals, mean_phase_seconds

    t0 = time.perf_counter()
    method_settings(method)  # an unknown method fails before the fetch
    model_path = model_path or fetch("smollm2-135m-instruct")
    run_dir = run_dir or os.path.join("runs", f"secretword-{method}-" + time.strftime("%Y%m%d-%H%M%S"))
    train_prompts, held_out = split()
    trainer = rlora.train(prompts=train_prompts, eval_prompts=held_out, environment=SecretWord,
                          config=make_config(model_path, total_steps, run_dir, seed, eval_interval, method),
                          overrides=list(overrides), verbose=verbose)
    evals = [r for r in trainer.history if r.get("eval")]
    phases = [r for r in trainer.history if "phase" in r]
    summary = {
        "method": method,
        "held_out_reward": [evals[0]["reward/environment/mean"], evals[-1]["reward/environment/mean"]],
        "curve": [(r["step"], round(r["reward/environment/mean"], 4)) for r in evals],
        "train_reward": [round(r["rewards/environment/mean"], 4) for r in phases],
        "turns_mean": [round(float(r["episodes/turns_mean"]), 3) for r in phases],
        "held_out_records": len(held_out), "optimizer_steps": trainer.step, "rollout_phases": trainer.phase,
        "s_per_phase": sum(mean_phase_seconds(trainer.history).values()),
        "s_per_phase_parts": mean_phase_seconds(trainer.history),
        "wall_seconds": time.perf_counter() - t0, "run_dir": trainer.run_dir, **group_signals(trainer.history),
    }
    with open(os.path.join(trainer.run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=float)
    if verbose:
        print(f"{method}: held-out reward {summary['held_out_reward'][0]:.3f} -> {summary['held_out_reward'][1]:.3f} "
              f"({len(held_out)} episodes, 1 = the secret word alone, {PARTIAL} = within a sentence); "
              f"{trainer.phase} phases / {trainer.step} steps, {summary['s_per_phase']:.1f} s per phase, "
              f"{summary['wall_seconds']:.0f} s in all; {trainer.run_dir}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlora.tasks.secretword", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="grpo", help="grpo (default) or ppo")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps (default {PHASES} phases: grpo {PHASES}, ppo {2 * PHASES})")
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct, fetched)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-interval", type=int, default=None,
                        help=f"optimizer steps (default: every {EVAL_PHASES} phases)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optimizer.kwargs.lr=1e-3")
    args = parser.parse_args(argv)
    run(args.steps, args.run_dir, args.model, args.seed, args.eval_interval, args.overrides, method=args.method)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
