"""Activations run cheaper: Python tanh GELUs fused into torch's kernel, composed ones recomputed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

import rlora.models.activations as activations_module
from rlora.config import ModelConfig
from rlora.models import build_policy, load_base_model
from rlora.models.activations import Recomputed, fuse_activations
from rlora.tiny import ARCHITECTURES, char_tokenizer

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "init_lora_weights": False}


def activation_types(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__module__ == "transformers.activations"}


@pytest.mark.parametrize("python_gelu", [NewGELUActivation, FastGELUActivation], ids=["gelu_new", "gelu_fast"])
def test_the_fused_kernel_is_the_same_function_to_float_rounding(python_gelu):
    torch.manual_seed(0)
    x = (torch.randn(4096) * 3).requires_grad_(True)
    grad = torch.randn(4096)
    composed = python_gelu()(x)
    (composed_grad,) = torch.autograd.grad(composed, x, grad)
    fused = GELUTanh()(x)
    (fused_grad,) = torch.autograd.grad(fused, x, grad)
    torch.testing.assert_close(fused, composed, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused_grad, composed_grad, atol=1e-5, rtol=0)
    assert not torch.equal(fused, composed)  # a different kernel: not bitwise, so the tests say which they expect


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "model's own"])
def test_gpt2_loads_with_the_fused_gelu_and_its_config_untouched(tiny_model_dir, fused):
    path = tiny_model_dir("gpt2")
    base = load_base_model(ModelConfig(model_path=path, fused_activations=fused))
    assert activation_types(base) == ({"GELUTanh"} if fused else {"NewGELUActivation"})
    assert base.config.activation_function == "gelu_new"  # saved and exported as it was loaded


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - {"gpt2"}))
def test_other_activations_are_left_as_they_are(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert fuse_activations(plain) == 0
    assert activation_types(load_base_model(ModelConfig(model_path=path))) == activation_types(plain)


@torch.no_grad()
def test_fused_gpt2_logits_match_the_plain_model_to_rounding(tiny_model_dir, batch):
    path = tiny_model_dir("gpt2")
    input_ids, attention_mask = batch
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    fused = load_base_model(ModelConfig(model_path=path)).eval()
    expected = plain(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(fused(input_ids=input_ids, attention_mask=attention_mask).logits, expected,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_kwargs", [{"num_layers_unfrozen": 1}, {"num_layers_unfrozen": -1}],
                         ids=["hydra", "full"])
def test_frozen_reference_copies_run_the_same_kernel(tiny_model_dir, model_kwargs):
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), **model_kwargs), char_tokenizer())
    assert "NewGELUActivation" not in activation_types(policy)
    assert "GELUTanh" in activation_types(policy.hydra if policy.hydra is not None else policy.ref_model)


def kept_for_backward(policy, input_ids, attention_mask) -> tuple[list[torch.Tensor], int]:
    """The trainable parameters' gradients of a loss on every output, and how many elements
    autograd kept for backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = policy(input_ids, attention_mask)
        (out.logits.logsumexp(-1).sum() + out.values.sum()).backward()
    return [p.grad.clone() for p in policy.trainable_parameters()], sum(saved)


def make_policy(path: str, **model_kwargs):
    torch.manual_seed(0)
    return build_policy(ModelConfig(model_path=path, peft_config=LORA, **model_kwargs), char_tokenizer()).eval()


def unwrap_recomputed(policy) -> None:
    for parent in list(policy.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Recomputed):
                setattr(parent, name, child.act)


def test_recomputed_gelu_new_gives_the_same_gradients_and_keeps_less(tiny_model_dir, batch, monkeypatch):
    """GPT-2's gelu_new (fusion off) keeps four (b, t, 4h) tensors for backward; recomputed, only
    its input. Same gradients bitwise either way."""
    monkeypatch.setattr(activations_module, "RECOMPUTE_MIN_ELEMENTS", 0)  # tiny inputs recompute too
    path = tiny_model_dir("gpt2")  # made before seeding: both policies below start alike
    recomputed = make_policy(path, fused_activations=False)
    assert {type(m.act) for m in recomputed.modules() if isinstance(m, Recomputed)} == {NewGELUActivation}
    plain = make_policy(path, fused_activations=False)
    unwrap_recomputed(plain)
    grads, kept = kept_for_backward(recomputed, *batch)
    plain_grads, plain_kept = kept_for_backward(plain, *batch)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    assert kept < plain_kept


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "gemma"])
def test_single_kernel_activations_are_not_recomputed(tiny_model_dir, arch, monkeypatch):
    """The fused GELU, GPT-NeoX's exact GELU, Llama's SiLU and Gemma's GELUTanh keep only their
    input already: a checkpoint around them would only run them twice."""
    monkeypatch.setattr(activations_module, "RECOMPUTE_MIN_ELEMENTS", 0)
    policy = make_policy(tiny_model_dir(arch))
    assert activation_types(policy) and not any(isinstance(m, Recomputed) for m in policy.modules())


def test_the_fused_gelu_keeps_no_more_than_the_recomputed_one(tiny_model_dir, batch, monkeypatch):
    """Fusing replaces recomputation for GPT-2: the kernel keeps only its input, and gradients
    agree with the recomputed gelu_new's to rounding."""
    monkeypatch.setattr(activations_module, "RECOMPUTE_MIN_ELEMENTS", 0)
    path = tiny_model_dir("gpt2")
    fused_grads, fused_kept = kept_for_backward(make_policy(path), *batch)
    grads, kept = kept_for_backward(make_policy(path, fused_activations=False), *batch)
    assert fused_kept <= kept
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, single", [
    ("silu", True), ("gelu", True), ("gelu_pytorch_tanh", True), ("mish", True), ("linear", True),
    ("gelu_python", False), ("gelu_python_tanh", False), ("gelu_new", False), ("quick_gelu", False),
])
def test_which_transformers_activations_count_as_one_kernel(name, single):
    from transformers.activations import ACT2FN

    from rlora.models.activations import _single_kernel

    assert _single_kernel(ACT2FN[name]) == single
