"""Roles on one base: reference == base bitwise, adapter toggling, what trains
(docs/design.md §1)."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

from rlora.config import ModelConfig
from rlora.models import Policy, build_policy, find_decoder_blocks, load_base_model, position_ids_from_mask
from rlora.tiny import ARCHITECTURES

ARCHES = list(ARCHITECTURES)  # every tiny shape: GPT-2, Llama, GPT-NeoX, OPT (+ project_out), Bloom, Qwen2, Gemma

PEFT_CONFIGS = {
    # init_lora_weights=False: lora_B is random, so the adapter changes the output from the start
    "lora": lambda arch: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, lora_dropout=0.0,
                                    init_lora_weights=False),
    "prefix": lambda arch: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prompt": lambda arch: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


def make_policy(path: str, **model_kwargs) -> Policy:
    from rlora.tiny import char_tokenizer

    return build_policy(ModelConfig(model_path=path, **model_kwargs), char_tokenizer()).eval()


def base_logits(path, input_ids, attention_mask):
    """The logits of the base as rlora loads it (its Python tanh GELUs fused, `fused_activations`)."""
    model = load_base_model(ModelConfig(model_path=path)).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask)).logits


def train_steps(policy: Policy, input_ids, attention_mask, steps: int = 3) -> None:
    """A few Adam steps on a loss that reaches every trainable parameter."""
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        out = policy(input_ids, attention_mask)
        logp = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        loss = -(logp * attention_mask[:, 1:]).mean() + out.values.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_reference_equals_base_bitwise(tiny_model_dir, batch, arch, kind):
    path = tiny_model_dir(arch)
    policy = make_policy(path, peft_config=PEFT_CONFIGS[kind](arch))
    input_ids, attention_mask = batch
    expected = base_logits(path, input_ids, attention_mask)
    ref = policy.reference_logits(input_ids, attention_mask)
    assert torch.equal(ref, expected)
    with torch.no_grad():
        out = policy(input_ids, attention_mask)
    assert out.logits.shape == expected.shape  # virtual-token positions removed
    assert out.values.shape == input_ids.shape and out.values.dtype == torch.float32
    real = attention_mask.bool()
    assert not torch.allclose(out.logits[real], expected[real])  # the adapter is active outside the block


@pytest.fixture(params=["left", "right"], ids=["left-padded", "right-padded"])
def padded_batch(tokenizer, request):
    """`(input_ids, attention_mask)` of two prompts of different lengths, padded on either side."""
    enc = tokenizer(["hello there", "abc"], padding=True, return_tensors="pt", add_special_tokens=False,
                    padding_side=request.param)
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hydra_reference_equals_base_at_init(tiny_model_dir, padded_batch, arch):
    """Bloom normalises its input embeddings (`word_embeddings_layernorm`) inside the model's forward: a
    branch fed the hidden state through `inputs_embeds` must not apply that again."""
    path = tiny_model_dir(arch)
    policy = make_policy(path, num_layers_unfrozen=1)
    input_ids, attention_mask = padded_batch
    expected = base_logits(path, input_ids, attention_mask)
    with torch.no_grad():
        out = policy(input_ids, attention_mask)
    assert torch.equal(policy.reference_logits(input_ids, attention_mask, policy_output=out), expected)
    assert torch.equal(out.logits, expected)


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_adapters_enabled_again_after_reference_even_when_it_raises(tiny_model_dir, batch, kind):
    policy = make_policy(tiny_model_dir("gpt2"), peft_config=PEFT_CONFIGS[kind]("gpt2"))
    input_ids, attention_mask = batch
    with torch.no_grad():
        before = policy(input_ids, attention_mask).logits
        with pytest.raises(RuntimeError, match="boom"):
            with policy.reference():
                raise RuntimeError("boom")
        after_raise = policy(input_ids, attention_mask).logits
        policy.reference_logits(input_ids, attention_mask)
        after_ref = policy(input_ids, attention_mask).logits
    assert torch.equal(before, after_raise)
    assert torch.equal(before, after_ref)
    assert not policy.lm._adapters_disabled


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kind", ["lora", "lora+modules_to_save", "prefix", "prompt"])
def test_only_adapter_and_value_head_change(tiny_model_dir, batch, arch, kind):
    if kind == "lora+modules_to_save":
        # a LayerNorm/RMSNorm beside the blocks: present in both shapes, not tied to anything
        norm = "ln_f" if arch == "gpt2" else "norm"
        peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, modules_to_save=[norm])
    else:
        peft_config = PEFT_CONFIGS[kind](arch)
    policy = make_policy(tiny_model_dir(arch), peft_config=peft_config)
    before = snapshot(policy)
    train_steps(policy, *batch)
    after = snapshot(policy)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    allowed = ("lora_", "modules_to_save", "value_head", "prompt_encoder")
    assert trainable and all(any(a in name for a in allowed) for name in trainable), trainable
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hydra_reference_stays_base_after_top_blocks_train(tiny_model_dir, padded_batch, arch):
    path = tiny_model_dir(arch)
    policy = make_policy(path, num_layers_unfrozen=1)
    input_ids, attention_mask = padded_batch
    expected = base_logits(path, input_ids, attention_mask)
    before = snapshot(policy.lm)
    train_steps(policy, input_ids, attention_mask)
    changed = {name for name, p in policy.lm.named_parameters() if not torch.equal(before[name], p)}
    _, _, blocks = find_decoder_blocks(policy.lm)
    top = {f"{n}" for n, _ in blocks[-1].named_parameters()}
    assert changed, "the top block did not train"
    bottom_ids = {id(p) for p in blocks[0].parameters()} | {id(p) for p in policy.lm.get_input_embeddings().parameters()}
    assert all(id(p) not in bottom_ids for n, p in policy.lm.named_parameters() if n in changed)
    assert any(n.endswith(t) for n in changed for t in top)
    with torch.no_grad():
        out = policy(input_ids, attention_mask)
    assert torch.equal(policy.reference_logits(input_ids, attention_mask, policy_output=out), expected)
    assert torch.equal(policy.reference_logits(input_ids, attention_mask), expected)
    assert not torch.equal(out.logits, expected)


def test_full_finetuning_reference_is_a_frozen_copy(tiny_model_dir, batch):
    path = tiny_model_dir("llama")
    policy = make_policy(path, num_layers_unfrozen=-1)
    input_ids, attention_mask = batch
    expected = base_logits(path, input_ids, attention_mask)
    train_steps(policy, input_ids, attention_mask)
    assert torch.equal(policy.reference_logits(input_ids, attention_mask), expected)
    assert all(p.requires_grad for p in policy.lm.parameters())


def test_peft_config_as_dict(tiny_model_dir):
    policy = make_policy(tiny_model_dir("gpt2"), peft_config={"peft_type": "LORA", "r": 2, "lora_alpha": 8})
    assert policy.mode == "adapter"
    assert policy.lm.peft_config["default"].r == 2


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "SEQ_2_SEQ_LM"])
def test_peft_task_type_mismatch_is_a_clear_error(tiny_model_dir, task_type):
    with pytest.raises(ValueError, match=rf"task_type='{task_type}'.*CAUSAL_LM"):
        make_policy(tiny_model_dir("gpt2"), peft_config={"peft_type": "LORA", "r": 2, "task_type": task_type})


def test_num_layers_unfrozen_ignored_under_peft_with_one_warning(tiny_model_dir):
    with pytest.warns(UserWarning, match="modules_to_save") as record:
        make_policy(tiny_model_dir("gpt2"), peft_config={"peft_type": "LORA", "r": 2}, num_layers_unfrozen=1)
    assert sum("num_layers_unfrozen" in str(w.message) for w in record) == 1


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="model.model_path='./no/such/model'"):
        make_policy("./no/such/model")


def test_policy_from_config_object_random_init(tokenizer):
    from rlora.tiny import tiny_config

    config = tiny_config("llama", vocab_size=len(tokenizer))
    policy = build_policy(ModelConfig(model_path=config, num_layers_unfrozen=1), tokenizer)
    assert policy.mode == "hydra" and policy.hydra.num_layers == 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mode, model_kwargs", [
    ("adapter", {"peft_config": {"peft_type": "LORA", "r": 2}}),
    ("hydra", {"num_layers_unfrozen": 1}),
    ("full", {"num_layers_unfrozen": -1}),
], ids=["adapter", "hydra", "full"])
def test_value_head_reads_the_last_hidden_state_of_every_architecture(tiny_model_dir, batch, arch, mode,
                                                                      model_kwargs):
    """OPT with `word_embed_proj_dim != hidden_size` (opt-350m) projects its last hidden state down
    (`project_out`) before the LM head: the value head reads that width, not `hidden_size`."""
    policy = make_policy(tiny_model_dir(arch), **model_kwargs)
    assert policy.mode == mode
    input_ids, attention_mask = batch
    with torch.no_grad():
        out = policy(input_ids, attention_mask)
    assert out.values.shape == input_ids.shape
    assert policy.value_head.net[0].in_features == out.hidden_states[-1].shape[-1]
