"""Reward functions as users write them: rlora's (trlx's) signature, TRL's, several with weights."""

from __future__ import annotations

import math
import re

import pytest
import torch

from rlora.rollout.reward_fns import RewardFunctions, ScoreBatch, is_trl_style

CHAT = [{"role": "user", "content": "think, then answer"}]


def batch(chat: bool = True) -> ScoreBatch:
    outputs = ["<think>a</think><answer>4</answer>", "no format here", "<think>b</think><answer>5</answer>"]
    prompts = [CHAT] * 3 if chat else ["p0", "p1", "p2"]
    texts = ["<rendered>"] * 3 if chat else prompts
    return ScoreBatch(prompts, texts, outputs, [[5, 6], [7], [8, 9, 2]], [{"answer": "4"}, {"answer": "4"},
                                                                          {"answer": "4"}])


# The two examples of TRL's GRPOTrainer documentation ("Using a custom reward function"),
# reproduced as they are to check that such functions run unchanged.
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def test_trl_documentation_examples_give_their_values_by_hand():
    chat = batch(chat=True)
    total, values = RewardFunctions(format_reward_func)(chat, tokenizer=None)
    assert total.tolist() == [1.0, 0.0, 1.0] and list(values) == ["format_reward_func"]
    assert values["format_reward_func"].tolist() == [1.0, 0.0, 1.0]
    plain = batch(chat=False)
    total, _ = RewardFunctions(reward_len)(plain, tokenizer=None)
    assert total.tolist() == [-abs(20 - len(o)) for o in plain.outputs]  # standard prompts: completions are text


def test_trl_style_gets_prompts_completions_ids_and_columns_rlora_style_gets_samples():
    seen = {}

    def trl(prompts, completions, completion_ids, answer, **kwargs):
        seen["trl"] = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                           extra=sorted(kwargs))
        return [0.0] * len(prompts)

    def mine(samples, prompts, outputs, tokenizer, **metadata):
        seen["rlora"] = dict(samples=samples, prompts=prompts, outputs=outputs, tokenizer=tokenizer, **metadata)
        return [0.0] * len(samples)

    assert is_trl_style(trl) and not is_trl_style(mine) and not is_trl_style(lambda samples, **kw: kw)
    b = batch()
    RewardFunctions([trl, mine])(b, tokenizer="TOK")
    assert seen["trl"] == {"prompts": [CHAT] * 3, "completions": [[{"role": "assistant", "content": o}]
                                                                   for o in b.outputs],
                           "completion_ids": [[5, 6], [7], [8, 9, 2]], "answer": ["4"] * 3, "extra": []}
    assert seen["rlora"] == {"samples": ["<rendered>" + o for o in b.outputs], "prompts": [CHAT] * 3,
                             "outputs": b.outputs, "tokenizer": "TOK", "answer": ["4"] * 3}


def test_several_functions_sum_with_weights_and_none_counts_zero():
    def correct(completions, answer, **kwargs):
        return [1.0 if f"<answer>{a}</answer>" in c[0]["content"] else 0.0 for c, a in zip(completions, answer)]

    def only_formatted(completions, **kwargs):  # judges formatted completions only
        return [None if "<think>" not in c[0]["content"] else 0.5 for c in completions]

    fns = RewardFunctions([correct, only_formatted], weights=[2.0, -1.0])
    total, values = fns(batch(), tokenizer=None)
    assert total.tolist() == [2.0 - 0.5, 0.0, -0.5]
    assert values["correct"].tolist() == [1.0, 0.0, 0.0]
    assert values["only_formatted"][0] == 0.5 and math.isnan(values["only_formatted"][1])
    assert fns.names == ["correct", "only_formatted"]


def test_same_named_functions_get_distinct_names():
    assert RewardFunctions([reward_len, reward_len]).names == ["reward_len_0", "reward_len_1"]


def test_wrong_number_of_weights_names_the_functions():
    with pytest.raises(ValueError, match=r"task.reward_weights has 3 weights for 2 reward functions "
                                         r"\(reward_len, format_reward_func\); give one weight per function"):
        RewardFunctions([reward_len, format_reward_func], weights=[1, 2, 3])


def test_a_raising_function_is_named_with_the_batch():
    def broken(completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match=r"reward function 'broken' raised KeyError: 'answer' while scoring a "
                                           r"batch of 3 samples \(first outputs: '<think>a</think>"):
        RewardFunctions([reward_len, broken])(batch(), tokenizer=None)
    with pytest.raises(RuntimeError, match=r"^reward_fn raised KeyError"):
        RewardFunctions(broken)(batch(), tokenizer=None)


def test_bad_values_name_the_function_and_sample():
    def nan_at_1(completions, **kwargs):
        return [0.0, float("nan"), 0.0]

    with pytest.raises(ValueError, match=r"reward function 'nan_at_1' returned nan for sample 1"):
        RewardFunctions([reward_len, nan_at_1])(batch(), tokenizer=None)


def test_per_token_rewards_need_a_single_function():
    def dense(samples, **_):
        return [[0.1, 0.2], [0.3], [0.0, 0.0, 1.0]]

    total, _ = RewardFunctions(dense)(batch(), tokenizer=None)
    assert torch.allclose(total, torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="per-token rewards need a single reward function"):
        RewardFunctions([dense, reward_len])(batch(), tokenizer=None)


def test_rlora_signature_keeps_working_with_metadata():
    def reward_fn(samples, prompts, outputs, tokenizer, **metadata):
        return [len(s) for s in samples]

    b = batch(chat=False)
    total, _ = RewardFunctions(reward_fn)(b, tokenizer="TOK")
    assert total.tolist() == [float(len(p + o)) for p, o in zip(b.prompts, b.outputs)]


def test_a_run_with_several_functions_logs_and_plots_each(tiny_model_dir, tmp_path):
    import json
    import os

    import rlora
    from rlora.tiny import tiny_ppo_config

    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def has_a(samples, prompts, outputs, **_):
        return [1.0 if "a" in o else None for o in outputs]

    config = tiny_ppo_config(tiny_model_dir("gpt2"), str(tmp_path), task={"reward_weights": [0.1, 1.0]})
    trainer = rlora.train([length, has_a], ["hello", "abc", "xyz", "the "], config=config, verbose=False)
    phases = [r for r in trainer.history if "rewards/length/mean" in r]
    assert phases and all({"rewards/length/std", "rewards/has_a/mean", "rewards/has_a/std"} <= set(r) for r in phases)
    assert all(r["rewards/has_a/mean"] == 1.0 or math.isnan(r["rewards/has_a/mean"]) for r in phases)
    evals = [r for r in trainer.history if r.get("eval")]
    assert all("reward/length/mean" in r and "reward/has_a/mean" in r for r in evals)
    assert os.path.isfile(os.path.join(str(tmp_path), "reward_functions.png"))
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        assert any("rewards/has_a/mean" in json.loads(line) for line in f)


def test_weights_of_the_wrong_length_fail_before_any_model_loads(tiny_model_dir, tmp_path):
    import rlora
    from rlora.tiny import tiny_ppo_config

    config = tiny_ppo_config(tiny_model_dir("gpt2"), str(tmp_path / "run"), task={"reward_weights": [1.0]})
    with pytest.raises(ValueError, match=r"task.reward_weights has 1 weights for 2 reward functions"):
        rlora.build_trainer([reward_len, format_reward_func], ["ab"], config=config, verbose=False)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_a_config_names_several_functions_and_their_weights(tiny_model_dir, tmp_path):
    import rlora
    from rlora.tiny import tiny_ppo_config

    (tmp_path / "rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [-float(len(c)) for c in completions]\n\n"
        "def has_s(samples, prompts, outputs, tokenizer, **_):\n    return [float('s' in o) for o in outputs]\n")
    files = [f"{tmp_path / 'rewards.py'}:short", f"{tmp_path / 'rewards.py'}:has_s"]
    config = tiny_ppo_config(tiny_model_dir("gpt2"), str(tmp_path / "run"),
                             task={"reward_fn": files, "reward_weights": [0.5, 2.0], "prompts": ["ab", "cd"]})
    trainer = rlora.build_trainer(config=config, verbose=False)
    assert trainer.reward_fn.names == ["short", "has_s"] and trainer.reward_fn.weights == [0.5, 2.0]
    total, _ = trainer.reward_fn(ScoreBatch(["p"], ["p"], ["sss"], [[3, 3, 3]], [{}]), trainer.tokenizer)
    assert total.tolist() == [0.5 * -3 + 2.0]
