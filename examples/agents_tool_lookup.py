"""A tool task: the reward is only reachable through a tool call.

Each episode asks SmolLM2-135M-Instruct for a person's access code. The environment (`Directory`)
draws a fresh 4-digit code for that person per episode, so it cannot be guessed or memorised; its
one tool, `lookup(name)`, returns it. The model sees the tool's schema in its system message
(`tokenizer.chat_template: hermes`), calls it by writing `<tool_call>{"name": "lookup",
"arguments": {"name": "Ada"}}</tool_call>`, reads the `<tool_response>` and should reply with the
code: `get_reward()` is 1.0 when its last reply holds the code, 0.2 for a tool call that ran
(shaping towards the tool), else 0.

A 135M model writes no well-formed tool call from the schema alone (0 in 64 training episodes, in
the README's "Agents: multi-turn episodes with an environment"), so GRPO has nothing to learn from.
This stays an example, not a demo, for that reason.

    python examples/agents_tool_lookup.py [--steps 4] [--episodes 16]
"""

from __future__ import annotations

import argparse
import random
import re
import time

import rlora
from rlora.fetch import fetch

NAMES = ("Ada", "Boris", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jonas", "Kira", "Lena")
HELD_OUT = NAMES[-4:]  # never asked about in training
ASK = "What is the access code of {}? Call the lookup tool to find it, then reply with the code only."
TOOL_CREDIT = 0.2  # the reward of an episode that called the tool but did not report the code


class Directory:
    """One episode's directory: a fresh code for the asked person; the tool that reveals it."""

    def reset(self, name: str, **row) -> None:
        self.name, self.code = name, f"{random.randrange(10**4):04d}"
        self.looked_up, self.replies = False, []

    def lookup(self, name: str) -> str:
        """Look up a person's access code in the directory.

        Args:
            name: The person's first name.
        """
        if name.strip().lower() != self.name.lower():
            return f"no entry for {name!r}"
        self.looked_up = True
        return self.code

    def step(self, reply: str) -> None:
        self.replies.append(reply)

    def get_reward(self) -> float:
        if self.replies and self.code in re.findall(r"\d+", self.replies[-1]) and self.looked_up:
            return 1.0
        return TOOL_CREDIT if self.looked_up else 0.0


def records(names) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": ASK.format(n)}], "name": n} for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps (one phase each)")
    parser.add_argument("--episodes", type=int, default=16, help="episodes per phase (8 per question)")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    model = fetch("smollm2-135m-instruct")
    config = {
        "train": {"seq_length": 320, "batch_size": args.episodes, "minibatch_size": args.episodes,
                  "total_steps": args.steps, "eval_interval": 10**6, "checkpoint_interval": 10**9,
                  "run_dir": args.run_dir, "seed": 0, "save_best": False},
        "model": {"model_path": model, "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8,
                                                       "lora_alpha": 16, "lora_dropout": 0.0,
                                                       "target_modules": "all-linear"}},
        "tokenizer": {"tokenizer_path": model, "chat_template": "hermes"},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8}},
        "method": {"name": "GRPOConfig", "num_generations": 8, "ppo_epochs": 1, "loss_type": "dapo", "beta": 0.0,
                   "num_rollouts": args.episodes, "chunk_size": args.episodes, "max_turns": 3,
                   "max_tool_calling_iterations": 2,
                   "gen_kwargs": {"max_new_tokens": 32, "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                                  "do_sample": True}},
    }
    t0 = time.perf_counter()
    trainer = rlora.train(prompts=records(NAMES[:-4]), eval_prompts=records(HELD_OUT) * 2, environment=Directory,
                          config=config, verbose=False)
    phases = [r for r in trainer.history if "phase" in r]
    evals = [r for r in trainer.history if r.get("eval")]
    for r in phases:
        print(f"phase {r['phase']}: reward {r['rewards/environment/mean']:.3f}, tool calls per episode "
              f"{r['tools/call_frequency']:.2f} (failed {r['tools/failure_frequency']:.2f}), turns "
              f"{r['episodes/turns_mean']:.2f}, {r['time/rollout']:.0f} s rollout")
    print(f"held-out reward {evals[0]['reward/environment/mean']:.3f} -> {evals[-1]['reward/environment/mean']:.3f}; "
          f"{time.perf_counter() - t0:.0f} s in all; {trainer.run_dir}")


if __name__ == "__main__":
    main()
