"""`model.reference: adapter`: the KL reference is a frozen copy of the adapter the policy starts
from (an SFT adapter), on the same base, as TRL's reference for a PeftModel."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import rlora
from rlora.config import ModelConfig
from rlora.models import build_policy
from rlora.tiny import char_tokenizer, tiny_group_config

PROMPTS = ["hello", "abc", "xyz", "the "]


def count_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


@pytest.fixture
def sft_adapter(tiny_model_dir, tmp_path):
    """A LoRA adapter that moved away from its base (random B), saved as training saves one."""
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM"))
    path = str(tmp_path / "sft")
    lm.save_pretrained(path)
    return path


def digest(path):
    with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def first_and_last_kl(trainer):
    kl = [r["kl"] for r in trainer.history if "kl" in r and "loss" in r]
    return kl[0], kl[-1]


@pytest.mark.parametrize("reference", ["adapter", "base"])
def test_a_run_from_an_sft_adapter_measures_kl_from_the_reference_it_names(sft_adapter, tmp_path, reference):
    before = digest(sft_adapter)
    config = tiny_group_config(sft_adapter, str(tmp_path / "run"), train={"total_steps": 4}, method={"beta": 0.1},
                               model={"peft_config": None, "reference": reference})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    first, last = first_and_last_kl(trainer)
    if reference == "adapter":  # the policy starts as the reference, bitwise: k3 exactly 0
        assert trainer.policy.has_reference_adapter and first == 0.0 and last > 0
    else:  # the SFT adapter has moved from the base
        assert not trainer.policy.has_reference_adapter and first > 1e-4
    assert digest(sft_adapter) == before  # the adapter on disk is untouched


def test_the_reference_adapter_stays_frozen_and_only_the_policy_trains(sft_adapter, tmp_path):
    config = tiny_group_config(sft_adapter, str(tmp_path / "run"), train={"total_steps": 2}, method={"beta": 0.1},
                               model={"peft_config": None, "reference": "adapter"})
    trainer = rlora.build_trainer(count_s, PROMPTS, config=config, verbose=False)
    lm = trainer.policy.lm
    reference = {n: p.detach().clone() for n, p in lm.named_parameters() if ".reference." in n}
    policy = {n: p.detach().clone() for n, p in lm.named_parameters() if ".default." in n}
    assert reference and all(not p.requires_grad for n, p in lm.named_parameters() if ".reference." in n)
    trainer.learn()
    after = dict(lm.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in reference.items())
    assert any(not torch.equal(after[n], v) for n, v in policy.items())
    saved = os.listdir(os.path.join(trainer.run_dir, "ckpts", "step_2", "adapter"))
    assert "reference" not in saved  # a checkpoint holds the trained adapter only


def test_a_peft_model_given_as_it_is_trains_its_adapter_with_it_as_the_reference(sft_adapter, tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    lm = PeftModel.from_pretrained(base, sft_adapter, is_trainable=False)
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), reference="adapter"), char_tokenizer(),
                          value_head=False, model=lm)
    assert policy.lm is lm and policy.has_reference_adapter
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == \
        {n for n, _ in policy.named_parameters() if ".default." in n}
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(policy(ids, torch.ones_like(ids)).logits, policy.reference_logits(ids, torch.ones_like(ids)))


def test_an_adapter_reference_needs_an_adapter_to_start_from(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), model={"reference": "adapter"})
    with pytest.raises(ValueError, match="starts from a fresh one"):
        rlora.build_trainer(count_s, PROMPTS, config=config, verbose=False)
