"""A bf16 model's attention in float32 on CPU (`model.attention_dtype`)."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_module

from rlora.config import ModelConfig
from rlora.models import build_policy, load_base_model
from rlora.models.attention import FLOAT32_SDPA, FLOAT32_SDPA_ON_CPU, _sdpa_in_float32_on_cpu, float32_attention
from rlora.tiny import char_tokenizer

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "init_lora_weights": False}


@pytest.mark.parametrize("setting, dtype, expected", [
    (None, "bfloat16", FLOAT32_SDPA_ON_CPU),
    ("float32", "bfloat16", FLOAT32_SDPA),
    ("model", "bfloat16", "sdpa"),
    (None, "float32", "sdpa"),  # nothing to upcast
], ids=["default", "always", "model's own", "float32 model"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_which_attention_a_model_loads_with(tiny_model_dir, arch, setting, dtype, expected):
    base = load_base_model(ModelConfig(model_path=tiny_model_dir(arch), dtype=dtype, attention_dtype=setting))
    assert base.config._attn_implementation == expected


def test_a_model_without_pluggable_sdpa_keeps_its_attention(tiny_model_dir):
    base = load_base_model(ModelConfig(model_path=tiny_model_dir("bloom"), dtype="bfloat16"))
    assert base.config._attn_implementation == "eager"
    assert not float32_attention(None, base)


def test_an_unknown_setting_names_the_choices(tiny_model_dir):
    base = load_base_model(ModelConfig(model_path=tiny_model_dir("llama"), dtype="bfloat16", attention_dtype="model"))
    with pytest.raises(ValueError, match=r"model.attention_dtype='fp32'.*'float32' \(always\)"):
        float32_attention("fp32", base)


@pytest.mark.parametrize("device, computed_in", [("cpu", torch.float32), ("meta", torch.bfloat16)])
def test_the_default_upcasts_only_on_cpu(monkeypatch, device, computed_in):
    """On another device (a GPU; `meta` stands in here) the model's bf16 attention runs as it is."""
    seen = []
    real = sdpa_module.sdpa_attention_forward

    def recording(module, query, *args, **kwargs):
        seen.append(query.dtype)
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", recording)
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.bfloat16, device=device) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = _sdpa_in_float32_on_cpu(module, q, k, v, None, scaling=8 ** -0.5)
    assert seen == [computed_in] and out.dtype == torch.bfloat16 and out.shape == (2, 5, 4, 8)


def test_float32_attention_is_closer_to_the_float32_model(tiny_model_dir, batch):
    """bf16 weights either way; the attention computed on float32 inputs rounds less."""
    path = tiny_model_dir("llama")
    input_ids, attention_mask = batch
    with torch.no_grad():
        exact = load_base_model(ModelConfig(model_path=path))(input_ids=input_ids, attention_mask=attention_mask)
        errors = {}
        for setting in ("float32", "model"):
            model = load_base_model(ModelConfig(model_path=path, dtype="bfloat16", attention_dtype=setting))
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            errors[setting] = (logits - exact.logits).abs().mean().item()
    assert errors["float32"] < errors["model"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_bf16_policy_with_float32_attention_keeps_its_invariants(tiny_model_dir, batch, arch):
    """The reference is the base bitwise, the adapter gets float32 gradients."""
    path = tiny_model_dir(arch)
    config = ModelConfig(model_path=path, dtype="bfloat16", peft_config=LORA)
    policy = build_policy(config, char_tokenizer()).eval()
    assert policy.base_model.config._attn_implementation == FLOAT32_SDPA_ON_CPU
    input_ids, attention_mask = batch
    base = load_base_model(ModelConfig(model_path=path, dtype="bfloat16")).eval()
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(policy.reference_logits(input_ids, attention_mask), expected)
    out = policy(input_ids, attention_mask)
    out.logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_a_model_whose_code_tests_for_the_name_sdpa_keeps_its_attention():
    """Falcon's modeling code branches on `_attn_implementation == "sdpa"`: under another name it
    would take the other branch."""
    from transformers import FalconConfig, FalconForCausalLM

    from rlora.models.attention import _tests_for_sdpa

    model = FalconForCausalLM(FalconConfig(vocab_size=35, hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                           attn_implementation="sdpa")).to(torch.bfloat16)
    assert _tests_for_sdpa(model)
    assert not float32_attention(None, model) and model.config._attn_implementation == "sdpa"


def test_bf16_autocast_does_not_cast_the_float32_attention_back(tiny_model_dir, batch):
    """`train.mixed_precision: bf16` over a bf16 model: autocast would run SDPA in bf16 again."""
    model = load_base_model(ModelConfig(model_path=tiny_model_dir("llama"), dtype="bfloat16")).eval()
    input_ids, attention_mask = batch
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(autocast, plain)
