"""End to end: PPO with LoRA on a tiny random GPT-2 raises a simple reward; the KL term holds
the policy near the reference."""

from __future__ import annotations

import pytest

import rlora

STEPS = 60  # 15 rollout phases of 64 samples, 4 optimizer steps each
PROMPTS = ["hello", "abc", "xyz", "the "]


def fraction_of_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


def run(model_dir, run_dir, init_kl_coef):
    config = {
        "train": {"seq_length": 32, "batch_size": 64, "total_steps": STEPS, "eval_interval": 1000,
                  "checkpoint_interval": 1000, "run_dir": run_dir, "seed": 1000},
        "model": {"model_path": model_dir, "peft_config": {"peft_type": "LORA", "r": 8, "lora_alpha": 32,
                                                           "lora_dropout": 0.1}},
        "method": {"num_rollouts": 64, "chunk_size": 64, "ppo_epochs": 4, "init_kl_coef": init_kl_coef,
                   "gen_kwargs": {"max_new_tokens": 8, "top_k": 0, "top_p": 1.0, "do_sample": True}},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 1e-2}},
    }
    trainer = rlora.train(fraction_of_s, PROMPTS, config=config, verbose=False)
    return [r for r in trainer.history if "phase" in r]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("gpt2")
    return {kl: run(model_dir, str(tmp_path_factory.mktemp(f"kl{kl}")), kl) for kl in (0.0, 1.0)}


def test_reward_rises_within_fifteen_phases(runs):
    scores = [r["rollout_scores/mean"] for r in runs[0.0]]
    assert len(scores) == 15
    # measured: 0.049 in the first phase -> 0.78 (mean of the last two phases)
    start, end = scores[0], sum(scores[-2:]) / 2
    assert start < 0.1
    assert end > 0.5 and end > 5 * start, scores


def test_large_kl_coefficient_keeps_the_policy_near_the_reference(runs):
    kl_free = sum(r["policy/kl"] for r in runs[0.0][-3:]) / 3
    kl_held = sum(r["policy/kl"] for r in runs[1.0][-3:]) / 3
    # measured: 17.1 nats per sample without the penalty, 0.34 with beta = 1
    assert kl_free > 5.0
    assert kl_held < 0.1 * kl_free, (kl_held, kl_free)
