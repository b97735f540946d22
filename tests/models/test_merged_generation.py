"""Generation on other weights than training's (the adapter merged in, a bf16 copy) leaves the
model bitwise as it was, however often it runs."""

from __future__ import annotations

import pytest
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


def lora_policy(model_dir, **model):
    return build_policy(ModelConfig(model_path=model_dir, peft_config={
        "peft_type": "LORA", "r": 8, "target_modules": "all-linear", "init_lora_weights": False}, **model),
        char_tokenizer()).eval()


def test_a_bf16_sampler_is_the_merged_model_in_bf16_and_leaves_the_fp32_model_bitwise(tiny_model_dir, batch):
    """Greedy decoding on the bf16 sampler gives exactly what the merged model with its parameters
    cast to bf16 gives, and after it every parameter is the same float32 tensor as before."""
    policy = lora_policy(tiny_model_dir("llama"))
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in policy.named_parameters()}
    input_ids, attention_mask = batch
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    sampled = policy.generate(input_ids, attention_mask, dtype=torch.bfloat16, **kwargs)
    for n, p in policy.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n
    assert not any(m.merged for m in policy.lm.modules() if hasattr(m, "merged_adapters"))
    import copy

    merged = copy.deepcopy(policy.lm).merge_and_unload()
    for p in merged.parameters():  # the sampler recasts parameters; buffers (Llama's rotary inv_freq) stay fp32
        p.data = p.data.to(torch.bfloat16)
    expected = merged.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert torch.equal(sampled, expected)
    with policy.generation_weights(dtype=torch.bfloat16):
        assert policy.lm(input_ids=input_ids, attention_mask=attention_mask).logits.dtype == torch.bfloat16


def test_a_bf16_sampler_restores_the_model_when_generation_raises(tiny_model_dir, batch):
    policy = lora_policy(tiny_model_dir("gpt2"))
    input_ids, attention_mask = batch
    try:
        policy.generate(input_ids, attention_mask, dtype=torch.bfloat16, max_new_tokens=2, bad_setting=1)
    except ValueError:
        pass
    else:
        raise AssertionError("generate should have refused the unknown argument")
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert not any(m.merged for m in policy.lm.modules() if hasattr(m, "merged_adapters"))


def test_a_recast_sampler_is_refused_under_zero3(tiny_model_dir, batch):
    policy = lora_policy(tiny_model_dir("gpt2"))
    with pytest.raises(ValueError, match="generation_dtype=torch.bfloat16.*ZeRO stage 3"):
        policy.generate(*batch, dtype=torch.bfloat16, max_new_tokens=2, synced_gpus=True)


@pytest.mark.parametrize("mode", ["adapter", "hydra", "full"])
def test_the_lm_head_reads_a_contiguous_input_in_every_role(tiny_model_dir, mode):
    """A strided input to the head (transformers' `hidden[:, -1:]` on a first decode step) reaches
    it contiguous, in the policy and in the frozen reference copies, with the same logits."""
    extra = {"adapter": {"peft_config": {"peft_type": "LORA", "r": 4}}, "hydra": {"num_layers_unfrozen": 1},
             "full": {"num_layers_unfrozen": -1}}[mode]
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("llama"), **extra), char_tokenizer()).eval()
    heads = [policy.base_model.get_output_embeddings()]
    heads += [policy.ref_model.get_output_embeddings()] if mode == "full" else []
    heads += [m for m in policy.hydra.modules() if m is not heads[0] and isinstance(m, torch.nn.Linear)
              and m.out_features == heads[0].out_features] if mode == "hydra" else []
    assert len(heads) == {"adapter": 1, "hydra": 2, "full": 2}[mode]
    hidden = torch.randn(3, 5, heads[0].in_features)
    for head in heads:
        seen = []
        handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
        logits = head(hidden[:, -1:, :])
        handle.remove()
        assert seen == [True]
        torch.testing.assert_close(logits, hidden[:, -1:, :] @ head.weight.T, rtol=0, atol=1e-6)



@pytest.mark.parametrize("target", ["lm_head", "wte"])
def test_an_adapted_tied_embedding_stays_unmerged_so_the_sampler_is_the_policy(tiny_model_dir, batch, target):
    """GPT-2 ties its input embedding to its head: merging an adapter on one of them would put the
    delta into both. Such a layer runs unmerged, so merged and bf16 samplers keep the policy's logits."""
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), peft_config={
        "peft_type": "LORA", "r": 4, "target_modules": ["c_attn", target], "init_lora_weights": False}),
        char_tokenizer()).eval()
    input_ids, attention_mask = batch
    with torch.no_grad():
        expected = policy.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        with policy.generation_weights(merge=True):
            merged = policy.lm(input_ids=input_ids, attention_mask=attention_mask).logits
            assert sum(m.merged for m in policy.lm.modules() if hasattr(m, "merged_adapters")) > 0, "c_attn merges"
        with policy.generation_weights(dtype=torch.bfloat16):
            sampler = policy.lm(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-4)
    assert (sampler - expected).abs().max() < 0.1 * expected.abs().max(), "a bf16 rounding, not another model"


def test_a_lora_bias_over_a_bias_free_base_samples_in_bf16_unmerged(tiny_model_dir, batch):
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("llama"), peft_config={
        "peft_type": "LORA", "r": 4, "target_modules": "all-linear", "lora_bias": True, "init_lora_weights": False}),
        char_tokenizer()).eval()
    out = policy.generate(*batch, dtype=torch.bfloat16, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch[0].shape[1] + 4
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_a_bf16_model_with_a_bf16_sampler_samples_on_its_own_weights(tiny_model_dir, batch):
    """model.dtype bfloat16 and generation_dtype bfloat16: nothing is recast or merged (the fp32
    adapter runs as in training)."""
    policy = lora_policy(tiny_model_dir("llama"), dtype="bfloat16")
    with policy.generation_weights(dtype=torch.bfloat16):
        assert not any(m.merged for m in policy.lm.modules() if hasattr(m, "merged_adapters"))
        assert any(p.dtype == torch.float32 for n, p in policy.lm.named_parameters() if "lora_" in n)
