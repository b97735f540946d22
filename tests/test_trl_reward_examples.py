"""Reward functions from TRL's GRPO documentation, as written there, trained with `rlora.train`
and `method.name: GRPOConfig` on tiny models: the quickstart's length reward on a text dataset, a
format reward on chat prompts with an accuracy reward reading the `solution` column (weighted),
and a curriculum reading `trainer_state`. Each checks that the function ran unchanged, saw what
TRL gives it, and that the reward the run trained on is the one it returned."""

from __future__ import annotations

import math
import re

import pytest
from transformers import TrainerState

import rlora
from rlora.tiny import tiny_group_config

# the character tokenizer's chat template: "<|bos|>" opens a turn, "<|end|>" closes it
TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'][0] }}:{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>a:{% endif %}")


def phases(trainer) -> list[dict]:
    return [r for r in trainer.history if "phase" in r]


def trained_on(phase: dict, calls: list[list[float]]) -> bool:
    """Whether one recorded call's mean reward is the phase's logged `reward` (every call of a
    phase scores its 16 completions at once: chunk_size 16)."""
    return any(math.isclose(sum(c) / len(c), phase["reward"], rel_tol=0, abs_tol=1e-6) for c in calls)


def test_the_quickstarts_length_reward_on_a_text_dataset(tiny_model_dir, tmp_path):
    calls = []

    # TRL's quick start: reward completions close to 20 characters
    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    def recorded(completions, **kwargs):  # the same function, its values kept
        assert all(isinstance(c, str) for c in completions)  # a standard (text) dataset: text completions
        calls.append(reward_len(completions, **kwargs))
        return calls[-1]

    recorded.__name__ = "reward_len"
    dataset = [{"prompt": p} for p in ("the cat sat", "a long day", "why is the sky", "once upon")]
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 8},
                               method={"gen_kwargs": {"max_new_tokens": 16, "top_k": 0, "do_sample": True}})
    trainer = rlora.train(recorded, dataset, config=config, verbose=False)
    assert trainer.step == 8 and len(phases(trainer)) == 2
    assert all(trained_on(phase, calls) for phase in phases(trainer))
    assert any(v != calls[0][0] for c in calls for v in c)  # lengths vary: the check above can tell runs apart


def format_reward_func(completions, **kwargs):
    """1.0 for a completion shaped `<think>...</think><answer>...</answer>`, else 0.0."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def accuracy_reward(completions, solution, log_extra=None, **kwargs):
    """TRL's `trl.rewards.accuracy_reward` in shape: 1.0 where the completion holds the solution,
    None (not judged) where the solution does not parse; checked by containment here, not by
    `math_verify`."""
    contents = [completion[0]["content"] for completion in completions]
    rewards = [None if not sol.strip() else float(sol.strip() in content) for content, sol in zip(contents, solution)]
    if log_extra:
        log_extra("golden_answer", list(solution))
    return rewards


def test_a_format_reward_and_an_accuracy_reward_on_chat_prompts_weighted(tiny_model_dir, tmp_path):
    seen, calls = [], []

    def accuracy(prompts, completions, solution, log_metric, **kwargs):
        seen.append((prompts, completions, solution))
        calls.append(accuracy_reward(completions, solution, **kwargs))
        judged = [r for r in calls[-1] if r is not None]
        log_metric("solved", sum(judged) / max(1, len(judged)))  # reaches the phase's record
        return calls[-1]

    accuracy.__name__ = "accuracy_reward"
    dataset = [{"prompt": [{"role": "user", "content": f"say {s or 'anything'}"}], "solution": s}
               for s in ("a", "e", "", "s")]  # "" does not parse: accuracy_reward returns None for it
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 8, "seq_length": 64},
                               tokenizer={"chat_template": TEMPLATE}, task={"reward_weights": [0.5, 2.0]},
                               method={"gen_kwargs": {"max_new_tokens": 16, "top_k": 0, "do_sample": True}})
    trainer = rlora.train([format_reward_func, accuracy], dataset, config=config, verbose=False)
    for prompts, completions, solution in seen:
        assert all(len(c) == 1 and c[0]["role"] == "assistant" for c in completions)
        assert all(p[0]["content"] == f"say {s or 'anything'}" for p, s in zip(prompts, solution))
    # format_reward_func gives 0 to these outputs; the reward trained on is 2.0 × accuracy, None counting 0
    weighted = [[2.0 * (r or 0.0) for r in c] for c in calls]
    assert all(trained_on(phase, weighted) for phase in phases(trainer))
    assert any(r == 1.0 for c in calls for r in c)
    assert all([r is None for r in c] == [s == "" for s in solution] for c, (_, _, solution) in zip(calls, seen))
    assert {"rewards/format_reward_func/mean", "rewards/accuracy_reward/mean"} <= set(phases(trainer)[0])
    first_phase = calls[1]  # after the baseline eval's call: the phase's one chunk
    judged = [r for r in first_phase if r is not None]
    assert phases(trainer)[0]["solved"] == pytest.approx(sum(judged) / max(1, len(judged)))


def test_a_curriculum_reads_the_trainer_state(tiny_model_dir, tmp_path):
    states = []

    # trainer_state (a transformers.TrainerState) lets a reward change as training goes on
    def curriculum_len(completions, trainer_state, **kwargs):
        states.append(trainer_state)
        target = 4 if trainer_state.global_step < 4 else 8
        return [-abs(target - len(completion)) for completion in completions]

    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 8})
    trainer = rlora.train(curriculum_len, ["hello", "abc", "xyz", "the "], config=config, verbose=False)
    assert trainer.step == 8 and states and all(isinstance(s, TrainerState) for s in states)
    steps = [s.global_step for s in states]
    assert all(isinstance(s, int) and 0 <= s <= trainer.step for s in steps) and steps == sorted(steps)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [3.0, -1.0]], ids=["default", "weighted"])
def test_trl_functions_scored_by_hand_match_the_docs(weights):
    from rlora.rollout.rewards import RewardFunctions, ScoreBatch

    chat = [{"role": "user", "content": "What is the result of (1 + 2) * 4?"}]
    outputs = ["<think>The sum of 1 and 2 is 3, which we multiply by 4 to get 12.</think><answer>(1 + 2) * 4 = "
               "12</answer>", "The sum of 3 and 1 is 4, which we multiply by 2 to get 8. So (3 + 1) * 2 = 8."]
    batch = ScoreBatch([chat] * 2, ["<rendered>"] * 2, outputs, [[1], [2]], [{"solution": "12"}, {"solution": ""}])
    total, values = RewardFunctions([format_reward_func, accuracy_reward], weights)(batch, tokenizer=None)
    assert values["format_reward_func"].tolist() == [1.0, 0.0]  # the docs' expected [1.0, 0.0]
    assert values["accuracy_reward"][0] == 1.0 and math.isnan(values["accuracy_reward"][1])
    assert total.tolist() == [weights[0] + weights[1], 0.0]
