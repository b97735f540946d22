"""A toy RLHF task: people prefer texts with a larger share of the letter `a`.

The whole pipeline runs on one tiny base in about a minute on a CPU:
  1. `rlora sft` teaches a random GPT-2 to write strings of random letters after a prompt;
  2. `rlora rm` trains a reward adapter from preference pairs of such strings, the one with
     the larger share of `a` preferred (nobody tells it the rule: it finds it from the pairs);
  3. `rlora train` runs PPO whose only reward is that adapter's score, on the same base.
The measure of success is `a_fraction`, the share of `a` in the policy's outputs (about 1/8
after SFT, since the letters are uniform over `LETTERS`). Completions have random lengths, so
the reward model also sees short texts (an empty or one-letter answer is not a free win).

    python -m rlora.tasks.letters DIR      # writes DIR/base, sft.jsonl, pairs.jsonl, prompts.txt
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
from collections.abc import Sequence

LETTERS = "abcdefgh"  # what the texts are made of; `a` is the preferred one
PROMPT_LETTERS = "xyz"  # prompts are one of these, so they never count as `a`
MIN_LENGTH, MAX_LENGTH = 1, 10  # letters per completion


def _completion(rng: random.Random, letters: str = LETTERS) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH)))


def _share(text: str) -> float:
    return text.count("a") / len(text) if text else 0.0


def a_fraction(samples: Sequence[str] = (), prompts: Sequence[str] = (), outputs: Sequence[str] = (),
               **_) -> dict[str, list[float]]:
    """metric_fn: the share of `a` among each output's characters (0 for an empty output)."""
    return {"a_fraction": [_share(o) for o in outputs]}


def a_share(samples: Sequence[str] = (), prompts: Sequence[str] = (), outputs: Sequence[str] = (),
            **_) -> list[float]:
    """reward_fn: the rule the preferences follow, written by hand (to compare with the adapter)."""
    return [_share(o) for o in outputs]


def write_task(out: str, n_sft: int = 2000, n_pairs: int = 2000, n_prompts: int = 64, seed: int = 0,
               hidden: int = 64) -> dict[str, str]:
    """Write the task's files under `out` and return their paths:
    `base` (a random tiny GPT-2 + character tokenizer), `sft.jsonl` (texts), `pairs.jsonl`
    (prompt, chosen, rejected; ties left out), `prompts.txt`."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlora.tiny import char_tokenizer, tiny_config

    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in ("base", "sft.jsonl", "pairs.jsonl", "prompts.txt")}
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config("gpt2", len(tokenizer), hidden=hidden, initializer_range=0.02)
    AutoModelForCausalLM.from_config(config).save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    with open(paths["sft.jsonl"], "w", encoding="utf-8") as f:
        for _ in range(n_sft):
            f.write(json.dumps({"text": rng.choice(PROMPT_LETTERS) + _completion(rng)}) + "\n")
    with open(paths["pairs.jsonl"], "w", encoding="utf-8") as f:
        written = 0
        while written < n_pairs:
            # half the pairs over the whole alphabet: the reward model learns the rule, not that
            # unseen letters are unknown (which PPO would find and exploit)
            letters = LETTERS if rng.random() < 0.5 else string.ascii_lowercase
            prompt, one, two = rng.choice(PROMPT_LETTERS), _completion(rng, letters), _completion(rng, letters)
            if _share(one) == _share(two):
                continue
            chosen, rejected = (one, two) if _share(one) > _share(two) else (two, one)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            written += 1
    with open(paths["prompts.txt"], "w", encoding="utf-8") as f:
        f.write("\n".join(rng.choice(PROMPT_LETTERS) for _ in range(n_prompts)) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlora.tasks.letters", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write base/, sft.jsonl, pairs.jsonl and prompts.txt to")
    parser.add_argument("--pairs", type=int, default=2000, help="preference pairs (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_task(args.out, n_pairs=args.pairs, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
