"""The sentiment task: the review openings and their fixed split, the VADER reward and metric
against VADER called directly, the missing-extra error; and (slow) PPO on the real SmolLM2."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from rlora.tasks import sentiment

vader = pytest.importorskip("vaderSentiment.vaderSentiment")
ROOT = Path(__file__).resolve().parents[2]


def direct(text: str) -> float:
    return vader.SentimentIntensityAnalyzer().polarity_scores(text)["compound"]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_openings_are_a_few_hundred_short_distinct_lines():
    openings = sentiment.openings()
    assert len(openings) >= 300
    assert len(set(openings)) == len(openings)
    assert all(3 <= len(o.split()) <= 8 for o in openings), [o for o in openings if not 3 <= len(o.split()) <= 8]
    assert all(o == o.strip() and "\n" not in o for o in openings)


def test_openings_span_positive_negative_and_neutral():
    scores = [direct(o) for o in sentiment.openings()]  # VADER: 70 positive, 54 negative, 221 neutral
    assert sum(s >= 0.05 for s in scores) >= 40
    assert sum(s <= -0.05 for s in scores) >= 40
    assert sum(-0.05 < s < 0.05 for s in scores) >= 150


def test_split_is_disjoint_complete_and_about_fifteen_percent():
    train, held_out = sentiment.prompts(), sentiment.eval_prompts()
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(sentiment.openings())
    assert 0.10 <= len(held_out) / len(sentiment.openings()) <= 0.20


def test_split_is_a_function_of_the_text_alone():
    """The same split from the texts in any order; these openings' membership never changes."""
    shuffled = sorted(sentiment.openings(), key=lambda o: o[::-1])
    assert sorted(o for o in shuffled if sentiment.is_held_out(o)) == sorted(sentiment.eval_prompts())
    for text in ("This movie was", "The lead actress", "This dreadful remake", "A tedious and pointless"):
        assert sentiment.is_held_out(text), text
    for text in ("The acting in this", "What a film this", "This film is a masterpiece", "Nothing could save"):
        assert not sentiment.is_held_out(text), text


def test_openings_file_is_package_data():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["rlora.tasks"]
    package = ROOT / "src" / "rlora" / "tasks"
    assert (package / "data" / sentiment.DATA_FILE) in {p for pattern in patterns for p in package.glob(pattern)}


# ---------------------------------------------------------------------------------------------
# Reward and metric
# ---------------------------------------------------------------------------------------------

TEXTS = [
    " a wonderful, moving film. I loved every minute!",
    " was boring, badly acted and far too long.",
    " is two hours long and was shot in Canada.",
    " not good at all",
    " GREAT!!! :)",
    "",
]
IDS = ["positive", "negative", "neutral", "negation", "caps-and-emoticon", "empty"]


@pytest.mark.parametrize("output", TEXTS, ids=IDS)
def test_reward_is_vaders_compound_of_the_output(output):
    assert sentiment.reward_fn(["The film" + output], ["The film"], [output]) == [pytest.approx(direct(output))]


def test_reward_ignores_the_prompt_and_metric_reports_both():
    outputs = [" and I loved it.", " and I loved it."]
    prompts = ["The awful dialogue", "The stunning visuals"]
    samples = [p + o for p, o in zip(prompts, outputs)]
    rewards = sentiment.reward_fn(samples, prompts, outputs)
    assert rewards[0] == rewards[1] == pytest.approx(direct(" and I loved it."))
    metrics = sentiment.metric_fn(samples, prompts, outputs)
    assert metrics["compound"] == rewards
    assert metrics["sample_compound"] == [pytest.approx(direct(s)) for s in samples]
    assert metrics["sample_compound"][0] < metrics["sample_compound"][1]


def test_metric_positive_share_uses_vaders_threshold():
    metrics = sentiment.metric_fn([""] * len(TEXTS), [""] * len(TEXTS), TEXTS)
    expected = [float(direct(t) >= 0.05) for t in TEXTS]
    assert metrics["positive"] == expected
    assert expected == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # the hand texts cover both sides
    assert metrics["compound"][-1] == 0.0  # an empty continuation is neutral


def test_missing_vader_names_the_extra(monkeypatch):
    sentiment.analyzer.cache_clear()
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    try:
        with pytest.raises(ImportError, match=r"pip install 'rlora\[real\]'"):
            sentiment.reward_fn(["a b"], ["a"], [" b"])
    finally:
        sentiment.analyzer.cache_clear()


def test_config_is_valid_and_uses_all_linear_lora(tmp_path):
    from rlora.config import load_config

    config = load_config(sentiment.make_config(str(tmp_path), str(tmp_path / "run"), total_steps=8))
    assert config.model.peft_config["target_modules"] == "all-linear"
    assert config.method.gen_kwargs["max_new_tokens"] < config.train.seq_length
    assert config.method.num_rollouts % config.train.batch_size == 0


# ---------------------------------------------------------------------------------------------
# PPO on SmolLM2-135M-Instruct (slow)
# ---------------------------------------------------------------------------------------------

# A smaller budget than the demo's 48 steps: 32 steps = 8 phases of 64 rollouts, 372 s on one
# thread beside another job. Measured held-out mean compound: seed 1000 (this test) 0.150 -> 0.443
# (+0.29), seed 1001 0.128 -> 0.390 (+0.26); asserted: +0.15.
SLOW_STEPS = 32
SLOW_MIN_RISE = 0.15


@pytest.mark.slow
def test_ppo_makes_smollm2_continuations_of_held_out_openings_more_positive(tmp_path):
    from rlora.demo import run_sentiment_demo
    from rlora.fetch import fetch

    summary = run_sentiment_demo(total_steps=SLOW_STEPS, run_dir=str(tmp_path / "run"), verbose=False,
                                 model_dir=fetch(sentiment.MODEL), eval_interval=SLOW_STEPS)
    (before, after), (positive_before, positive_after) = summary["compound"], summary["positive"]
    print(f"held-out compound {before:+.3f} -> {after:+.3f}, positive {positive_before:.3f} -> {positive_after:.3f}, "
          f"greedy compound {summary['greedy/compound'][0]:+.3f} -> {summary['greedy/compound'][1]:+.3f}, "
          f"{summary['wall_seconds']:.0f} s")
    assert summary["optimizer_steps"] == SLOW_STEPS
    assert after - before >= SLOW_MIN_RISE, summary["curve"]
    assert positive_after > positive_before, summary["curve"]
