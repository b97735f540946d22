"""Rollouts are sampled from exactly the distribution that PPO scores (docs/design.md §9).

For each architecture and each way the two could drift apart (a sampling temperature, a
checkpoint's own `generation_config`, several EOS ids, bf16 autocast), one rollout phase is
generated while the processed logits that `generate` sampled from are recorded. Then:
- the rollout pass's log-probs equal those sampling-time log-probs (fp32: within 1e-5);
- with the zero-initialised LoRA adapter, policy and reference log-probs are bitwise equal;
- the first minibatch of the update sees a ratio of exactly 1.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import GenerationConfig

from rlora.config import load_config
from rlora.models import build_policy, load_tokenizer
from rlora.rollout.prompts import normalize_prompts
from rlora.rollout.rewards import RewardFunctions
from rlora.tiny import ARCHITECTURES, tiny_ppo_config
from rlora.trainer import PPOTrainer

PROMPTS = ["hello there", "ab", "the cat sat", "x"]  # unequal lengths: generation pads on the left
SETTINGS = ["plain", "temperature", "checkpoint_generation_config", "several_eos", "bf16_autocast", "bf16_sampler"]


def zero_reward(samples, **_):
    return [0.0] * len(samples)


def make_trainer(model_dir, tmp_path, setting, peft_config=None, prompts=PROMPTS):
    gen = {"max_new_tokens": 6, "top_k": 0, "top_p": 1.0, "do_sample": True}
    if setting == "temperature":
        gen["temperature"] = 0.7
    if setting == "several_eos":
        gen["eos_token_id"] = [2, 3, 4]  # EOS and the first two letters: most rows stop early
    sections = {"method": {"num_rollouts": 4, "chunk_size": 4, "ppo_epochs": 1, "gen_kwargs": gen},
                "train": {"batch_size": 4, "minibatch_size": 4}}
    config = tiny_ppo_config(model_dir, str(tmp_path / "run"), **sections)
    if peft_config == "hydra":  # no PEFT: the top block trains, the reference is its frozen copy
        config["model"].update(peft_config=None, num_layers_unfrozen=1)
    else:
        config["model"]["peft_config"] = peft_config or {"peft_type": "LORA", "r": 4, "lora_alpha": 16,
                                                         "target_modules": "all-linear"}
    if setting == "bf16_sampler":  # rollouts drawn on a bf16 copy, scored in float32
        config["model"]["generation_dtype"] = "bfloat16"
    config = load_config(config)
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    policy = build_policy(config.model, tokenizer)
    if setting == "checkpoint_generation_config":  # what instruct checkpoints ship
        policy.base_model.generation_config = GenerationConfig(
            do_sample=True, temperature=0.5, repetition_penalty=1.3, top_k=5, top_p=0.8, no_repeat_ngram_size=2,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if setting == "bf16_autocast" else "no")
    items = normalize_prompts(prompts)
    return PPOTrainer(config, policy, tokenizer, zero_reward, items, items, accelerator=accelerator, verbose=False)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def rollout_phase(trainer, recorded_sampling):
    """One phase's rollouts and its rollout pass, with the sampling-time log-probs.

    Shape: -> rollouts, exp, ref (n, r), sampled (n, r)."""
    method = trainer.config.method
    with recorded_sampling(trainer.policy) as record:
        rollouts = trainer.sampler.generate(list(range(len(trainer.prompts))), method.gen_experience_kwargs or
                                            method.gen_kwargs, trainer.prompt_ids, trainer.prompts, recast=True)
    (scores,) = record
    r = rollouts.response_ids.shape[1]
    sampled = scores[:, :r].gather(-1, rollouts.response_ids[..., None]).squeeze(-1)  # (n, r)
    order = torch.arange(len(rollouts.prompts))
    exp = trainer._rollout_pass(rollouts, order)
    return rollouts, exp, exp.ref_logprobs, sampled


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scored_distribution_is_the_sampled_one(tiny_model_dir, tmp_path, arch, setting, recorded_sampling):
    trainer = make_trainer(tiny_model_dir(arch), tmp_path, setting)
    rollouts, exp, ref, sampled = rollout_phase(trainer, recorded_sampling)
    mask = exp.response_mask
    assert mask.any(1).all()
    # bf16 keeps 8 significant bits: a KV-cached decode step and one packed forward round their
    # matmuls differently, and one bf16 step of a logit between 4 and 8 is 2^-5 = 0.031, so there
    # the two agree to bf16's precision only (measured: at most 0.026 over these models)
    # The bf16 sampler runs the whole model in bf16, its residual stream and norms too (autocast
    # rounds only the matmuls' inputs), so its log-probs stray further: measured at most 0.062,
    # 0.010 to 0.021 on average, over these models
    atol = {"bf16_autocast": 0.05, "bf16_sampler": 0.1}.get(setting, 1e-5)
    torch.testing.assert_close(exp.logprobs[mask], sampled[mask], atol=atol, rtol=0)
    if setting == "bf16_sampler":  # drawn in bf16, scored in float32: a bf16 rounding apart
        gap = (exp.logprobs[mask] - sampled[mask]).abs()
        assert 0 < gap.mean() < 0.03
        assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    assert torch.equal(exp.logprobs[mask], ref[mask])  # zero-init adapter: policy == reference, bitwise
    exp.advantages = torch.randn_like(exp.logprobs) * mask
    exp.returns = torch.randn_like(exp.logprobs) * mask
    stats = trainer.train_step(exp, torch.arange(len(exp)))
    assert float(stats["policy/ratio_max_abs_dev"]) == 0.0


@pytest.mark.parametrize("setting", ["plain", "bf16_autocast"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bloom"])
def test_hydra_reference_runs_in_the_policy_precision(tiny_model_dir, tmp_path, arch, setting, recorded_sampling):
    trainer = make_trainer(tiny_model_dir(arch), tmp_path, setting, peft_config="hydra")
    _, exp, ref, sampled = rollout_phase(trainer, recorded_sampling)
    mask = exp.response_mask
    assert torch.equal(exp.logprobs[mask], ref[mask])  # top block untrained yet: policy == its frozen copy
    torch.testing.assert_close(exp.logprobs[mask], sampled[mask], atol=0.05 if setting == "bf16_autocast" else 1e-5,
                               rtol=0)


def test_reward_fn_gets_the_prompts_as_given(tiny_model_dir, tmp_path):
    seen = []

    def reward_fn(samples, prompts, outputs, **_):
        seen.extend(prompts)
        assert samples == [p + o for p, o in zip(prompts, outputs)]
        return [0.0] * len(samples)

    given = ["<|bos|>system: be brief\nuser: hi", "<|eos|>ab", "the cat sat", "x"]  # special tokens in the text
    trainer = make_trainer(tiny_model_dir("gpt2"), tmp_path, "plain", prompts=given)
    trainer.reward_fn = RewardFunctions(reward_fn)
    trainer.total_steps = 1
    trainer.learn()
    assert seen and set(seen) <= set(given) and "<|bos|>system: be brief\nuser: hi" in seen


@pytest.mark.parametrize("setting", ["several_eos", "plain"])
def test_responses_end_at_the_first_stop_id(tiny_model_dir, tmp_path, setting, recorded_sampling):
    trainer = make_trainer(tiny_model_dir("llama"), tmp_path, setting, prompts=PROMPTS * 4)
    rollouts, exp, _, _ = rollout_phase(trainer, recorded_sampling)
    stops = {2, 3, 4} if setting == "several_eos" else {trainer.tokenizer.eos_token_id}
    lengths = rollouts.response_mask.sum(1)
    stopped = 0
    for ids, n in zip(rollouts.response_ids.tolist(), lengths.tolist()):
        assert not stops & set(ids[:n - 1]), "a stop id inside a response"
        stopped += ids[n - 1] in stops
    if setting == "several_eos":
        assert stopped >= 3 and (lengths < 6).any()  # several rows ended at one of the stop ids
    assert (rollouts.response_ids[~rollouts.response_mask] == trainer.tokenizer.pad_token_id).all()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_prompt_learning_scores_what_it_sampled_on_padded_rows(tiny_model_dir, tmp_path, arch, kind, recorded_sampling):
    peft = {"peft_type": "PROMPT_TUNING" if kind == "prompt" else "PREFIX_TUNING", "num_virtual_tokens": 3}
    trainer = make_trainer(tiny_model_dir(arch), tmp_path, "temperature", peft_config=peft)
    torch.nn.init.normal_(next(trainer.policy.lm.prompt_encoder.parameters()), std=1.0)  # virtual tokens that matter
    rollouts, exp, _, sampled = rollout_phase(trainer, recorded_sampling)
    assert not rollouts.query_mask.all(), "the batch must hold left-padded prompts"
    torch.testing.assert_close(exp.logprobs[exp.response_mask], sampled[exp.response_mask], atol=1e-5, rtol=0)
