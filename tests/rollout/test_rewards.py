"""Reward functions as users write them: rlora's (trlx's) signature, TRL's, several with weights."""

from __future__ import annotations

import asyncio
import math
import re
import warnings

import pytest
import torch
from transformers import TrainerState

from rlora.rollout.rewards import RewardFunctions, ScoreBatch, calling_convention, check_reward_given

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

    assert calling_convention(trl) == "trl" and calling_convention(mine) == "rlora"
    assert calling_convention(lambda samples, **kw: kw) == "rlora"  # trlx's usual form keeps rlora's keywords
    b = batch()
    RewardFunctions([trl, mine])(b, tokenizer="TOK")
    assert seen["trl"] == {"prompts": [CHAT] * 3, "completions": [[{"role": "assistant", "content": o}]
                                                                   for o in b.outputs],
                           "completion_ids": [[5, 6], [7], [8, 9, 2]], "answer": ["4"] * 3,
                           "extra": ["log_extra", "log_metric", "trainer_state"]}  # what TRL 1.16 passes besides
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


# TRL 1.16 calls every custom reward function with the same keywords, whatever it names:
# prompts, completions, completion_ids, trainer_state, log_extra, log_metric and the dataset's
# columns; `async def` functions are awaited together; scores may be bools.
def by_token_count(completion_ids, **kwargs):  # TRL's documentation, "Reward longer completions"
    return [float(len(ids)) for ids in completion_ids]


def only_kwargs(**kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in kwargs["completions"]]


def test_a_function_naming_completion_ids_only_gets_trls_keywords():
    assert calling_convention(by_token_count) == "trl"
    total, values = RewardFunctions(by_token_count)(batch(), tokenizer=None)
    assert total.tolist() == [2.0, 1.0, 3.0] and list(values) == ["by_token_count"]


def test_a_kwargs_only_function_gets_trls_keywords_and_rloras():
    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["prompts"])

    assert calling_convention(only_kwargs) == "both"
    b = batch()
    total, _ = RewardFunctions(only_kwargs)(b, tokenizer="TOK")
    assert total.tolist() == [float(len(o)) for o in b.outputs]
    RewardFunctions(record)(b, tokenizer="TOK")
    assert sorted(seen) == ["answer", "completion_ids", "completions", "log_extra", "log_metric", "outputs",
                            "prompts", "samples", "tokenizer", "trainer_state"]
    assert seen["samples"] == ["<rendered>" + o for o in b.outputs] and seen["tokenizer"] == "TOK"


def test_an_rlora_function_may_ask_for_completion_ids():
    def sampled(samples, outputs, completion_ids, **metadata):
        return [[1.0] * len(ids) for ids in completion_ids]

    assert calling_convention(sampled) == "rlora"
    total, _ = RewardFunctions(sampled)(batch(), tokenizer=None)
    assert total.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


def test_a_function_without_kwargs_gets_only_the_keywords_it_names():
    def trl_strict(completions, answer):
        return [float(c[0]["content"].endswith(f"{a}</answer>")) for c, a in zip(completions, answer)]

    def rlora_strict(samples, outputs):
        return [float(len(o)) for o in outputs]

    total, _ = RewardFunctions([trl_strict, rlora_strict], weights=[100, 1])(batch(), tokenizer=None)
    assert total.tolist() == [134.0, 14.0, 34.0]


@pytest.mark.parametrize(("column", "fn"), [("outputs", lambda samples, **kw: [0.0] * 3),
                                            ("trainer_state", lambda completions, **kw: [0.0] * 3)],
                         ids=["rlora", "trl"])
def test_metadata_named_like_an_argument_is_refused(column, fn):
    b = batch()
    b.metadata = [{column: 1}] * 3
    with pytest.raises(ValueError, match=f"prompt metadata '{column}' has the name of an argument that reward_fn "
                                         "receives; rename that key"):
        RewardFunctions(fn)(b, tokenizer=None)


def test_a_column_named_like_an_rlora_argument_reaches_a_kwargs_only_function():
    b = batch()
    b.metadata = [{"outputs": "column"}] * 3  # TRL passes the column; rlora's `outputs` gives way
    assert RewardFunctions(lambda **kw: [float(o == "column") for o in kw["outputs"]])(b, None)[0].tolist() == [1.0] * 3


def test_naming_parameters_of_both_forms_is_refused_up_front():
    def mixed(samples, completions, **kwargs):
        return [0.0] * len(samples)

    with pytest.raises(TypeError, match=r"reward function 'mixed' names samples \(rlora's and trlx's form\) and "
                                        r"completions \(TRL's\); name the parameters of one form"):
        RewardFunctions(mixed)


def test_bool_scores_count_one_and_zero():
    def long_enough(completions, **kwargs):
        return [len(c[0]["content"]) > 20 for c in completions]

    total, values = RewardFunctions([long_enough, by_token_count])(batch(), tokenizer=None)
    assert values["long_enough"].tolist() == [1.0, 0.0, 1.0] and total.tolist() == [3.0, 1.0, 4.0]


def test_trainer_state_reaches_trl_functions_step_0_when_none_is_given():
    def by_step(completions, trainer_state, **kwargs):
        assert isinstance(trainer_state, TrainerState)
        return [trainer_state.global_step / max(1, trainer_state.max_steps)] * len(completions)

    fns = RewardFunctions(by_step)
    assert fns(batch(), tokenizer=None)[0].tolist() == [0.0] * 3
    state = TrainerState(global_step=3, max_steps=4)
    assert fns(batch(), None, trainer_state=state)[0].tolist() == [0.75] * 3


def test_log_metric_and_log_extra_are_collected_until_drained():
    def accuracy(completions, answer, log_extra=None, log_metric=None, **kwargs):
        rewards = [float(f"<answer>{a}</answer>" in c[0]["content"]) for c, a in zip(completions, answer)]
        log_extra("golden_answer", list(answer))
        log_metric("accuracy", sum(rewards) / len(rewards))
        return rewards

    fns = RewardFunctions(accuracy)
    fns(batch(), tokenizer=None)
    fns(batch(), tokenizer=None)
    metrics, columns = fns.drain_logs()
    assert metrics == {"accuracy": pytest.approx(1 / 3)} and columns == {"golden_answer": ["4"] * 6}
    assert fns.drain_logs() == ({}, {})


async def slow_length(completions, **kwargs):  # TRL's documentation, "Asynchronous reward functions"
    await asyncio.sleep(0.01)
    return [float(len(c[0]["content"])) for c in completions]


class AsyncJudge:
    async def __call__(self, prompts, completions, **kwargs):
        return [1.0 if "<answer>" in c[0]["content"] else 0.0 for c in completions]


def test_async_functions_are_awaited_in_order_of_the_list():
    b = batch()
    total, values = RewardFunctions([slow_length, by_token_count, AsyncJudge()], weights=[1, 10, 100])(b, None)
    assert list(values) == ["slow_length", "by_token_count", "AsyncJudge"]
    assert values["AsyncJudge"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == [len(b.outputs[0]) + 20 + 100, len(b.outputs[1]) + 10, len(b.outputs[2]) + 30 + 100]


def test_several_async_functions_run_concurrently():
    both_started = asyncio.Barrier(2)  # each waits for the other: run one after the other, they time out

    async def first(completions, **kwargs):
        await asyncio.wait_for(both_started.wait(), timeout=10)
        return [1.0] * len(completions)

    async def second(completions, **kwargs):
        await asyncio.wait_for(both_started.wait(), timeout=10)
        return [2.0] * len(completions)

    total, _ = RewardFunctions([first, second])(batch(), tokenizer=None)
    assert total.tolist() == [3.0] * 3


def test_async_functions_work_when_the_caller_runs_an_event_loop():
    async def notebook_cell():  # Jupyter runs cells inside a running loop
        return RewardFunctions(slow_length)(batch(), tokenizer=None)

    total, _ = asyncio.run(notebook_cell())
    assert total.tolist() == [float(len(o)) for o in batch().outputs]


def test_an_async_function_that_raises_is_named():
    async def broken(completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match=r"reward function 'broken' raised KeyError: 'answer' while scoring"):
        RewardFunctions([slow_length, broken])(batch(), tokenizer=None)


def test_samples_no_function_judges_warn_naming_the_functions():
    def math_only(completions, **kwargs):
        return [None, 1.0, None]

    def code_only(completions, **kwargs):
        return [None, None, 0.5]

    with pytest.warns(UserWarning, match=r"every reward function \(math_only, code_only\) returned None for 1 of 3 "
                                         r"samples \(the first: sample 0, output '<think>a</think>.*'\); they have "
                                         r"no reward"):
        total, _ = RewardFunctions([math_only, code_only])(batch(), tokenizer=None)
    assert math.isnan(total[0]) and total[1:].tolist() == [1.0, 0.5]  # judged by none: NaN, as TRL's
    with pytest.warns(UserWarning, match=r"^reward_fn returned None for 3 of 3 samples"):
        total, _ = RewardFunctions(lambda completions, **kw: [None] * 3)(batch(), tokenizer=None)
    assert torch.isnan(total).all()


def test_no_warning_while_some_function_judges_every_sample():
    def half(completions, **kwargs):
        return [None, 1.0, None]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RewardFunctions([half, by_token_count])(batch(), tokenizer=None)


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


def test_a_trlx_dense_reward_over_the_retokenized_output_trains(gpt2_bpe_model_dir, tmp_path, monkeypatch):
    import rlora
    from rlora.tiny import tiny_ppo_config

    returned = []  # what the function returned for each sample

    def dense_reward_fn(samples, prompts, outputs, tokenizer, **kwargs):  # trlx's example, sentiment fixed
        tok_scores = []
        for response in outputs:
            toks = tokenizer(response).input_ids
            tok_score = [0] * len(toks)
            tok_score[len(tok_score) // 2] = 0.25
            tok_score[-1] = 0.5
            tok_scores.append(tok_score)
        returned.extend(tok_scores)
        return tok_scores

    scored = []  # (sampled ids, output, per-token reward row) of every scored sample
    call = RewardFunctions.__call__

    def recording(self, batch, tokenizer, *args, **kwargs):
        total, values = call(self, batch, tokenizer, *args, **kwargs)
        scored.extend(zip(batch.completion_ids, batch.outputs, total.tolist()))
        return total, values

    monkeypatch.setattr(RewardFunctions, "__call__", recording)
    config = tiny_ppo_config(gpt2_bpe_model_dir("gpt2"), str(tmp_path), train={"total_steps": 2},
                             method={"gen_kwargs": {"max_new_tokens": 12, "top_k": 0, "do_sample": True}})
    trainer = rlora.train(dense_reward_fn, ["The movie was", "I think", "Hello"] * 3, config=config, verbose=False)
    assert trainer.step == 2 and all(math.isfinite(r["loss"]) for r in trainer.history if "loss" in r)
    tok = trainer.tokenizer
    assert any(len(tok(output).input_ids) != len(ids) for ids, output, _ in scored)  # trlx's form was met
    assert len(scored) == len(returned)
    for (ids, output, row), tok_score in zip(scored, returned):
        text_end = len(ids) - 1 - (ids[-1] == tok.eos_token_id)  # the token completing the output's text
        assert row[text_end] >= 0.5 and sum(row) == sum(tok_score) and not any(row[len(ids):])


def test_trl_reward_forms_train_a_group_method(tiny_model_dir, tmp_path):
    import rlora
    from rlora.tiny import tiny_group_config

    steps = []

    def with_state(completions, trainer_state, **kwargs):
        steps.append(trainer_state.global_step)
        return [0.0] * len(completions)

    async def has_s(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return ["s" in c for c in completions]  # bools

    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 4})
    fns = [by_token_count, only_kwargs, has_s, with_state]
    trainer = rlora.train(fns, ["hello", "abc", "xyz", "the "], config=config, verbose=False)
    assert trainer.step == 4 and steps and all(isinstance(s, int) for s in steps)
    phase = [r for r in trainer.history if "phase" in r][0]
    assert all(f"rewards/{name}/mean" in phase for name in ("by_token_count", "only_kwargs", "has_s", "with_state"))
    assert 0.0 <= phase["rewards/has_s/mean"] <= 1.0 and phase["rewards/by_token_count/mean"] >= 1.0


def test_a_run_without_any_reward_is_refused_before_the_model_loads(tmp_path):
    import rlora

    check_reward_given(None, has_reward_adapter=True)  # the reward adapter scores alone
    check_reward_given(reward_len, has_reward_adapter=False)
    with pytest.raises(ValueError, match=r"^no reward: pass reward_fn=.*set model.reward_adapter"):
        rlora.build_trainer(config={"model": {"model_path": str(tmp_path / "no-model-here")}})
