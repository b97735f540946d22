"""rlora draws sampled tokens itself (`DrawToken`): the distribution transformers would sample,
after the same warpers, and `generate` keeps its own draw wherever rlora's would not apply."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, \
    TopPLogitsWarper

from rlora.rollout.generation import DrawToken, drawn_here

SCORES = torch.tensor([2.0, 1.0, 0.5, -1.0, float("-inf"), 0.0])  # one entry already masked by a processor


def frequencies(draw, scores, n=200_000):
    tokens = draw(scores.expand(n, -1).clone()).argmax(-1)  # (n,) generate takes the one finite entry
    return torch.bincount(tokens, minlength=scores.shape[-1]).double() / n


def test_draw_returns_one_finite_entry_per_row():
    out = DrawToken([])(None, torch.randn(64, 1000))
    assert ((out == 0).sum(-1) == 1).all() and (torch.isinf(out).sum(-1) == 999).all()


def test_draw_frequencies_are_the_softmax_and_never_a_masked_token():
    freq = frequencies(DrawToken.draw, SCORES)
    expected = SCORES.softmax(-1).double()
    sigma = (expected * (1 - expected) / 200_000).sqrt()
    assert freq[4] == 0
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (freq, expected)


def test_the_warpers_run_before_the_draw_as_transformers_runs_them():
    """temperature 0.5, top-k 4, top-p 0.9 applied by transformers' own warpers, then softmax."""
    warpers = [TemperatureLogitsWarper(0.5), TopKLogitsWarper(4), TopPLogitsWarper(0.9)]
    warped = LogitsProcessorList(warpers)(None, SCORES[None].clone())[0]
    expected = warped.softmax(-1).double()
    freq = frequencies(lambda s: DrawToken(warpers)(None, s), SCORES)
    assert (freq[expected == 0] == 0).all() and (expected == 0).sum() >= 3, "top-p must have cut the tail"
    assert (freq - expected).abs().max() < 0.01


def test_generate_draws_here_with_the_same_settings_otherwise_unchanged():
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, max_new_tokens=4,
                              repetition_penalty=1.2)
    mine = object()
    new, arguments = drawn_here(config, {"logits_processor": [mine], "tokenizer": "t"})
    assert not new.do_sample and new.max_new_tokens == 4 and new.repetition_penalty == 1.2
    assert new.temperature is None and new.top_k is None and new.top_p is None and new.min_p is None
    assert config.do_sample and config.temperature == 0.7, "the caller's config is not changed"
    processors = arguments["logits_processor"]
    assert processors[0] is mine and isinstance(processors[-1], DrawToken) and arguments["tokenizer"] == "t"
    assert [type(w).__name__ for w in processors[-1].warpers] == [
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]


@pytest.mark.parametrize("settings", [{"do_sample": False}, {"do_sample": True, "num_beams": 2},
                                      {"do_sample": True, "num_return_sequences": 2},
                                      {"do_sample": True, "typical_p": 0.9},
                                      {"do_sample": True, "epsilon_cutoff": 0.01},
                                      {"do_sample": True, "typical_p": 0.0},
                                      {"do_sample": True, "penalty_alpha": 0.6},  # greedy would be contrastive search
                                      {"do_sample": True, "top_k": None}])  # transformers fills in its top_k=50
def test_generate_keeps_its_own_draw_where_this_one_does_not_apply(settings):
    config = GenerationConfig(max_new_tokens=4, **{"temperature": 1.0, "top_k": 0, "top_p": 1.0, **settings})
    assert drawn_here(config, {}) == (config, {})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampled_rollouts_match_transformers_sampling_in_distribution(tiny_model_dir, tokenizer, arch):
    """First tokens of 4000 rollouts of one prompt, drawn here and by transformers' multinomial:
    the two frequency tables agree within sampling noise."""
    from rlora.config import ModelConfig
    from rlora.models import build_policy
    from rlora.rollout.generation import rollout_generation_config

    policy = build_policy(ModelConfig(model_path=tiny_model_dir(arch), peft_config={
        "peft_type": "LORA", "r": 4, "init_lora_weights": False}), tokenizer).eval()
    ids = torch.tensor([tokenizer("the cat", add_special_tokens=False).input_ids] * 4000)
    gen = {"do_sample": True, "max_new_tokens": 1, "temperature": 0.8, "top_k": 20}
    config, _ = rollout_generation_config(gen, tokenizer, [tokenizer.eos_token_id])
    with torch.no_grad():
        theirs = policy.generate(ids, torch.ones_like(ids), generation_config=config)[:, -1]
        config_here, arguments = drawn_here(config, {})
        here = policy.generate(ids, torch.ones_like(ids), generation_config=config_here, **arguments)[:, -1]
    v = len(tokenizer)
    a, b = (torch.bincount(t, minlength=v).double() / len(t) for t in (theirs, here))
    p = (a + b) / 2
    assert (a - b).abs().max() <= 5 * (2 * p * (1 - p) / len(ids)).sqrt().max() + 1e-3
    assert (a > 0).sum() > 3, "a spread distribution, or this would test nothing"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_row_that_is_no_distribution_is_refused_as_multinomial_refuses_it(bad):
    scores = torch.randn(3, 10)
    scores[1] = bad  # nan / +inf logits of a diverged policy, or every token masked
    with pytest.raises(RuntimeError, match="1 of 3 rows"):
        DrawToken.draw(scores)
