"""Benchmark: a multi-turn episode's turns continued from the KV cache, or the whole conversation
run again each turn.

SmolLM2-135M-Instruct (`rlora fetch`), LoRA r=8 on every linear layer, the Hermes template
(`rlora.tools.HERMES_TOOL_TEMPLATE`). A chunk of episodes of `--turns` turns: after each reply the
environment (`Briefing`) says a long message (a paragraph of context, then a one-word question),
so the conversation grows by that message and the reply each turn. Greedy replies of at most
`--new-tokens` tokens. The same `EpisodeRunner` with `keep_cache=True` (the trainer's) and
`keep_cache=False` (each turn prefills the whole conversation again), in one process, alternating,
median of the repeats; also whether the two ran the same turns and sampled the same tokens.

    .venv/bin/python benchmarks/episodes.py [--episodes 16] [--turns 4] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record  # noqa: E402

from rlora.config import ModelConfig, TokenizerConfig  # noqa: E402
from rlora.environments import Agent  # noqa: E402
from rlora.fetch import fetch  # noqa: E402
from rlora.models import build_policy, load_tokenizer  # noqa: E402
from rlora.rollout.episodes import EpisodeRunner  # noqa: E402
from rlora.rollout.prompts import normalize_prompts  # noqa: E402

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
CONTEXT = ("Here is a short report from the field station. The morning was cold and clear, the wind came from "
           "the north, and the river was higher than it was last week. Two boats went out before sunrise and "
           "came back at noon with their nets full. The road to the village is open again after the storm.")
QUESTIONS = ("Which way did the wind blow? Answer in one word.", "Was the morning warm or cold? Answer in one word.",
             "Is the road open or closed? Answer in one word.", "When did the boats come back? Answer in one word.")
OPENINGS = ("I will read you reports. Answer each question in one word. Ready?",
            "Listen to these reports and answer in one word each. Ready?")


class Briefing:
    """Says the report and a question after every reply; the episode ends at `method.max_turns`."""

    def reset(self, **row) -> None:
        self.turn = 0

    def step(self, reply: str) -> str:
        self.turn += 1
        return f"{CONTEXT}\n\n{QUESTIONS[self.turn % len(QUESTIONS)]}"


def run_once(runner: EpisodeRunner, policy, prompts, n: int, gen: dict) -> tuple[float, list]:
    """One chunk of `n` episodes; returns the seconds and each episode's response tokens."""
    t0 = time.perf_counter()
    rollouts = runner.run(policy, prompts, [k % len(prompts) for k in range(n)], gen)
    seconds = time.perf_counter() - t0
    return seconds, rollouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16, help="episodes in the chunk")
    parser.add_argument("--turns", type=int, default=4, help="assistant turns per episode (method.max_turns)")
    parser.add_argument("--new-tokens", type=int, default=12, help="max_new_tokens of each turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks of each way (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    path = fetch("smollm2-135m-instruct")
    tokenizer = load_tokenizer(TokenizerConfig(tokenizer_path=path, chat_template="hermes"), path)
    policy = build_policy(ModelConfig(model_path=path, peft_config=LORA), tokenizer, value_head=False).eval()
    prompts = normalize_prompts([[{"role": "user", "content": text}] for text in OPENINGS])
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False}
    seq_length = 2048
    ways = {"KV-cache continuation": True, "re-prefill each turn": False}
    runners = {name: EpisodeRunner(Agent(Briefing, max_turns=args.turns), tokenizer, seq_length, keep_cache=keep)
               for name, keep in ways.items()}

    first = {name: run_once(runner, policy, prompts, args.episodes, gen)[1] for name, runner in runners.items()}
    a, b = first.values()  # also the warm-up
    same_tokens = all(x.tolist() == y.tolist() for x, y in zip(a.response_ids, b.response_ids))
    turns = [e.turns for e in a.episodes]
    lengths = (a.query_mask.sum(1) + a.response_mask.sum(1)).tolist()
    times = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            times[name].append(run_once(runner, policy, prompts, args.episodes, gen)[0])
    medians = {name: statistics.median(t) for name, t in times.items()}
    cached, rerun = medians.values()
    n_turns = sum(turns)

    rows = ["| turns continued by | s / chunk (median) | s / episode | s / turn | / KV cache |",
            "|---|---|---|---|---|"]
    rows += [f"| {name} | {s:.2f} | {s / args.episodes:.3f} | {s / n_turns:.3f} | {s / cached:.2f} |"
             for name, s in medians.items()]
    text = "\n".join(rows) + (
        f"\n\nre-prefill / KV cache, same run: **{rerun / cached:.2f}**; {n_turns} turns in "
        f"{args.episodes} episodes (mean {n_turns / args.episodes:.2f}), conversations of "
        f"{min(lengths)}-{max(lengths)} tokens at the end; the two ways sampled the same tokens: {same_tokens}.")
    print(text)
    if not args.no_record:
        note = (f"CPU, {args.threads} thread{'s' * (args.threads > 1)}; SmolLM2-135M-Instruct, LoRA r=8 all-linear, "
                f"Hermes template; {args.episodes} episodes of up to {args.turns} turns, greedy replies of at most "
                f"{args.new_tokens} tokens, an environment message of about "
                f"{len(tokenizer(CONTEXT + QUESTIONS[0]).input_ids)} tokens after each; median of {args.repeats}")
        record("episodes", "Multi-turn episodes: KV-cache continuation vs re-prefilling the conversation each turn",
               note, text)


if __name__ == "__main__":
    main()
