"""The oneword chat task: its reward functions on hand-written completions, its prompts and split,
and (slow) PPO on SmolLM2-135M-Instruct raising the held-out success rate."""

import json
import os

import pytest

from rlora.tasks import oneword
from rlora.tasks.oneword import CATEGORIES, EXAMPLE_ANSWERS, answer_word, in_category, metric_fn, one_word, split


def chat(text):
    return [{"role": "assistant", "content": text}]


# (completion, category, in_category, one_word)
CASES = [
    ("Banana", "fruit", 1.0, 1.0),
    ("banana.", "fruit", 1.0, 1.0),
    (" Mango!\n", "fruit", 1.0, 1.0),
    ('"Kiwi"', "fruit", 1.0, 1.0),
    ("**Tiger**", "animal", 1.0, 1.0),
    ("Apples", "fruit", 1.0, 1.0),  # plural
    ("Peaches", "fruit", 1.0, 1.0),  # plural in -es
    ("Orange", "color", 1.0, 1.0),  # a real double member
    ("Jupiter", "planet", 1.0, 1.0),
    ("Carrot", "fruit", 0.0, 1.0),  # one word, wrong category
    ("Fruit", "fruit", 0.0, 1.0),  # the category's own name
    ("Steroid", "vegetable", 0.0, 1.0),
    ("Pluto", "planet", 0.0, 1.0),
    ("The fruit is banana", "fruit", 0.0, 0.0),  # right member, not one word
    ("Banana, apple", "fruit", 0.0, 0.0),  # a list
    ("apple banana cherry", "fruit", 0.0, 0.0),
    ("12", "month", 0.0, 0.0),
    ("", "fruit", 0.0, 0.0),
    ("   ", "fruit", 0.0, 0.0),
    (".", "fruit", 0.0, 0.0),
    ("Ugli(zagolyi", "fruit", 0.0, 0.0),
]
IDS = ["right", "right-period", "right-spaces-bang", "right-quoted", "right-bold", "plural", "plural-es",
       "double-member", "planet", "wrong-category", "category-name", "wrong-word", "not-a-planet", "sentence",
       "list-comma", "list-spaces", "digits", "empty", "blank", "punctuation-only", "garbage"]


@pytest.mark.parametrize("text, category, correct, single", CASES, ids=IDS)
def test_rewards_of_hand_written_chat_completions(text, category, correct, single):
    assert in_category([chat(text)], [category]) == [correct]
    assert one_word([chat(text)]) == [single]
    assert metric_fn(outputs=[text], category=[category]) == {"correct": [correct], "one_word": [single]}


def test_rewards_take_plain_text_completions_and_extra_keywords():
    completions = ["Banana", "Monday", "The dog"]
    assert in_category(completions, ["fruit", "day", "animal"], prompts=[None] * 3, completion_ids=[[1]] * 3) \
        == [1.0, 1.0, 0.0]
    assert one_word(completions, category=["fruit", "day", "animal"]) == [1.0, 1.0, 0.0]


def test_correct_implies_one_word():
    for text, category, correct, single in CASES:
        assert correct <= single, text


@pytest.mark.parametrize("completion", [None, 3, [], [{"role": "assistant"}]], ids=["none", "int", "empty", "no-content"])
def test_malformed_completion_is_a_clear_error(completion):
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        one_word([completion])


def test_unknown_category_and_count_mismatch_are_clear_errors():
    with pytest.raises(ValueError, match="unknown category 'cheese'"):
        in_category([chat("Brie")], ["cheese"])
    with pytest.raises(ValueError, match="2 completions but 1 categories"):
        in_category([chat("Brie"), chat("Kiwi")], ["fruit"])


def test_answer_word_normalises():
    assert answer_word("  'Dragon-fruit'. ") == "dragon-fruit"
    assert answer_word("New Zealand") is None


def test_example_answers_belong_to_their_own_category_only():
    for category, word in EXAMPLE_ANSWERS.items():
        assert [c for c in CATEGORIES if oneword.names_member(word.lower(), c)] == [category]


def test_split_is_fixed_disjoint_and_never_asks_the_example_category():
    train, held_out = split()
    assert (len(train), len(held_out)) == (310, 50)
    assert split() == (train, held_out)
    key = lambda p: json.dumps(p, sort_keys=True)
    assert not {key(p) for p in train} & {key(p) for p in held_out}
    assert len({key(p) for p in train + held_out}) == 360
    for p in train + held_out:
        system, example, answer, ask = p["prompt"]
        assert system == {"role": "system", "content": oneword.SYSTEM}
        assert (example["role"], answer["role"], ask["role"]) == ("user", "assistant", "user")
        assert CATEGORIES[p["category"]][0] in ask["content"]
        assert not oneword.names_member(answer["content"].lower(), p["category"])
    assert sorted({p["category"] for p in held_out}) == sorted(CATEGORIES)


def test_same_category_example_is_refused():
    with pytest.raises(ValueError, match="same category"):
        oneword.question("fruit", 0, "fruit")


def test_config_is_valid():
    import rlora

    config = rlora.load_config(oneword.make_config("some/model", total_steps=8))
    assert config.model.peft_config["target_modules"] == "all-linear"
    assert config.task.reward_weights == list(oneword.REWARD_WEIGHTS)


MARGIN = 0.2  # seen over 24 steps: 0.44 -> 0.94 (seed 0, this test), 0.30 -> 0.66 (seed 1); 50 questions are noisy


@pytest.mark.slow
def test_ppo_raises_held_out_success_on_smollm2(tmp_path):
    """24 optimizer steps (6 phases of 32 rollouts; about 3 min on one core) raise the held-out
    success rate by at least MARGIN. (The one-word rate is not asserted: with seed 1 it fell,
    0.78 -> 0.66, while correctness rose 0.30 -> 0.66.)"""
    summary = oneword.run(total_steps=24, run_dir=str(tmp_path / "run"), eval_interval=1000, verbose=False)
    before, after = summary["correct"]
    assert summary["optimizer_steps"] == 24 and summary["held_out_prompts"] == 50
    assert after >= before + MARGIN, f"held-out correct {before:.3f} -> {after:.3f}, wanted +{MARGIN}"
    assert os.path.isfile(tmp_path / "run" / "summary.json")
