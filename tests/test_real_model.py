"""The invariants on a real instruct model: SmolLM2-135M-Instruct (`rlora fetch`, cached).

Llama architecture, 30 layers, a ChatML chat template, pad = eos = `<|im_end|>`, no BOS. Slow
tier: the fetch takes about 20 s once, each test loads the 135 M-parameter model.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlora
from rlora.algo import token_rewards
from rlora.export import export
from rlora.fetch import fetch
from rlora.rollout.prompts import normalize_prompts

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "Say hello.", "What colour is the sky?",
             "Give me one word.", "Count to three.", "Is water wet?", "What is 2 + 2?"]
CHATS = [[{"role": "user", "content": q}] for q in QUESTIONS]
LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(int(os.environ.get("RLORA_NUM_THREADS", "1")))
    return fetch("smollm2-135m-instruct")


def build(smollm2, run_dir, lora=LORA, **method):
    gen = {"max_new_tokens": 24, "do_sample": True, "top_k": 0, "top_p": 1.0}
    config = {"train": {"seq_length": 96, "batch_size": 8, "minibatch_size": 4, "total_steps": 2, "run_dir": run_dir,
                        "eval_interval": 10**6, "checkpoint_interval": 10**6, "seed": 3},
              "model": {"model_path": smollm2, "peft_config": lora},
              "method": {"num_rollouts": 8, "chunk_size": 8, "ppo_epochs": 1, "init_kl_coef": 0.05, "gen_kwargs": gen,
                         **method},
              "optimizer": {"name": "adamw", "kwargs": {"lr": 1e-3}}}
    return rlora.build_trainer(lambda completions, **_: [float(len(c[0]["content"]) < 40) for c in completions],
                               CHATS, eval_prompts=CHATS, config=config, verbose=False)


def test_chat_prompts_are_rendered_exactly_as_apply_chat_template(smollm2, tmp_path):
    trainer = build(smollm2, str(tmp_path))
    tok = AutoTokenizer.from_pretrained(smollm2)
    for chat, ids in zip(CHATS, trainer.prompt_ids):
        expected = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == list(expected)
    assert trainer.tokenizer.pad_token_id == trainer.tokenizer.eos_token_id == 2


@torch.no_grad()
def test_reference_is_the_base_bitwise_and_sampling_is_scoring(smollm2, tmp_path, recorded_sampling):
    trainer = build(smollm2, str(tmp_path), lora={**LORA, "init_lora_weights": False})  # an adapter that acts
    rollouts = trainer.sampler.generate(list(range(8)), trainer.config.method.gen_kwargs, trainer.prompt_ids, trainer.prompts)
    ids = torch.cat([rollouts.query_ids[:1], rollouts.response_ids[:1]], 1)
    mask = torch.cat([rollouts.query_mask[:1], rollouts.response_mask[:1]], 1).long()
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = base(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(trainer.policy.reference_logits(ids, mask), expected)
    assert not torch.allclose(trainer.policy(ids, mask).logits, expected)

    with recorded_sampling(trainer.policy) as record:
        rollouts = trainer.sampler.generate(list(range(8)), trainer.config.method.gen_kwargs, trainer.prompt_ids,
                                     trainer.prompts)
    r = rollouts.response_ids.shape[1]
    sampled = record[0][:, :r].gather(-1, rollouts.response_ids[..., None]).squeeze(-1)
    exp = trainer._rollout_pass(rollouts, torch.arange(8))
    real = exp.response_mask
    # 30 layers of one packed forward against a KV-cached decode reassociate float sums: measured
    # at most 1.8e-5 on this model (the tiny models of tests/rollout/test_sampling.py: 2e-6)
    torch.testing.assert_close(exp.logprobs[real], sampled[real], atol=1e-4, rtol=0)


@torch.no_grad()
def test_terminal_reward_lands_on_a_generated_im_end_although_pad_is_eos(smollm2, tmp_path):
    trainer = build(smollm2, str(tmp_path))
    rollouts = trainer.sampler.generate(list(range(8)), {**trainer.config.method.gen_kwargs, "max_new_tokens": 48},
                                 trainer.prompt_ids, trainer.prompts)
    lengths = rollouts.response_mask.sum(1)
    last = rollouts.response_ids[torch.arange(8), lengths - 1]
    ended = last == 2
    assert ended.any(), "no answer ended its turn within 48 tokens"
    assert (rollouts.response_ids[~rollouts.response_mask] == 2).all()  # padding is <|im_end|> too, but masked
    zeros = torch.zeros(rollouts.response_ids.shape)
    rewards, _ = token_rewards(zeros, zeros, rollouts.response_mask, 0.0, torch.arange(1.0, 9.0))
    for i in torch.nonzero(ended).flatten().tolist():
        assert rewards[i, lengths[i] - 1] == i + 1 and rewards[i].sum() == i + 1  # on <|im_end|> itself


def test_exported_merged_model_greedy_equals_the_trained_policy(smollm2, tmp_path):
    trainer = build(smollm2, str(tmp_path / "run"))
    trainer.learn()
    checkpoint = os.path.join(str(tmp_path / "run"), "ckpts", f"step_{trainer.step}")
    out = export(checkpoint, str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 49152 and model.get_input_embeddings().num_embeddings == 49152
    prompts = normalize_prompts(CHATS[:4])
    greedy = {"max_new_tokens": 16, "do_sample": False}
    policy_outputs = trainer.generate([p.prompt for p in prompts], **greedy)
    exported = []
    for chat in CHATS[:4]:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=2)[0, ids["input_ids"].shape[1]:]
        exported.append(tok.decode(new, skip_special_tokens=True))
    assert exported == policy_outputs


GRPO_PHASES = 8  # of the demo's 10: one on-policy step each, 8 x 32 completions; about 2 min on one thread
# as the PPO test's (tests/tasks/test_oneword.py). Measured over 8 phases: seed 0 (this test)
# 0.44 -> 0.92, seed 1 0.30 -> 0.90
GRPO_MARGIN = 0.2


def test_grpo_raises_held_out_success_on_the_oneword_task(smollm2, tmp_path):
    """`rlora demo --task oneword --method grpo` for 8 phases (4 questions x 8 answers each, loss
    dapo, beta 0) raises the held-out success rate on the 50 questions by GRPO_MARGIN."""
    from rlora.tasks import oneword

    summary = oneword.run(total_steps=GRPO_PHASES, run_dir=str(tmp_path / "run"), model_path=smollm2,
                          eval_interval=10**6, method="grpo", verbose=False)
    (before, after), zero_std = summary["correct"], summary["frac_reward_zero_std"]
    print(f"held-out correct {before:.3f} -> {after:.3f}, rollout reward {summary['reward']}, frac_reward_zero_std "
          f"{zero_std}, {summary['s_per_phase']:.1f} s per phase, {summary['wall_seconds']:.0f} s")
    assert summary["optimizer_steps"] == summary["rollout_phases"] == GRPO_PHASES
    assert zero_std[0] < 1.0  # the base model's answers differ within a group: there is a signal to learn from
    assert after >= before + GRPO_MARGIN, f"held-out correct {before:.3f} -> {after:.3f}, wanted +{GRPO_MARGIN}"
