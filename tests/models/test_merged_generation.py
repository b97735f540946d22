"""Merged-adapter generation restores the frozen base exactly, however often it runs."""

from __future__ import annotations

import torch

from rlora.config import ModelConfig
from rlora.models import build_policy
from rlora.tiny import char_tokenizer


def test_base_weights_bitwise_unchanged_after_50_merged_rollouts_with_a_changing_adapter(tiny_model_dir, batch):
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), peft_config={
        "peft_type": "LORA", "r": 8, "lora_alpha": 32, "target_modules": ["c_attn", "c_proj", "c_fc"]}),
        char_tokenizer()).eval()
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    adapter = [p for n, p in policy.named_parameters() if "lora_" in n]
    input_ids, attention_mask = batch
    optimizer = torch.optim.SGD(adapter, lr=0.5)
    for _ in range(50):
        with torch.no_grad():  # the adapter changes between merges, as in PPO
            for p in adapter:
                p.add_(torch.randn_like(p) * 0.05)
        policy.generate(input_ids, attention_mask, merged=True, max_new_tokens=3, do_sample=True, pad_token_id=0)
        loss = policy(input_ids, attention_mask).logits.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(base[n], p) for n, p in policy.named_parameters() if not p.requires_grad)
    assert not any(m.merged for m in policy.lm.modules() if hasattr(m, "merged_adapters"))


def test_merged_generation_samples_the_same_as_unmerged_greedy(tiny_model_dir, batch):
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("llama"), peft_config={
        "peft_type": "LORA", "r": 8, "init_lora_weights": False}), char_tokenizer()).eval()
    input_ids, attention_mask = batch
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    unmerged = policy.generate(input_ids, attention_mask, **kwargs)
    merged = policy.generate(input_ids, attention_mask, merged=True, **kwargs)
    assert torch.equal(merged, unmerged)
