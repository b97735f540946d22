"""A quantized frozen base (QLoRA, `model.quantization`): every role on the one 4-bit base, only
adapters train, what cannot run is refused, and export merges into the dequantized base."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import rlora
from rlora.config import load_config
from rlora.models import build_policy, load_tokenizer
from rlora.models.loading import adapter_parameters
from rlora.models.policy import POLICY, VALUE
from rlora.models.quantization import keep_trainable
from rlora.models.score_head import ScoreHead
from rlora.reward_model import save_reward_adapter
from rlora.rollout.prompts import normalize_prompts
from rlora.tiny import char_tokenizer, random_experience, tiny_group_config, tiny_ppo_config
from rlora.trainer import PPOTrainer

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0}
PROMPTS = ["hello", "abc", "xyz", "the "]
QUANT_LAYER = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}


def count_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


def make_policy(model_dir: str, run_dir: str, value_head: bool = True, **model):
    config = load_config(tiny_ppo_config(model_dir, run_dir, model={"peft_config": LORA, **model}))
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    return config, tokenizer, build_policy(config.model, tokenizer, value_head=value_head).eval()


def base_bytes(policy) -> dict[str, torch.Tensor]:
    """Every tensor of the frozen base (quantized weights, their scales, norms, embeddings)."""
    return {k: v.clone() for k, v in policy.base_model.state_dict().items() if "lora_" not in k}


def unchanged(before: dict[str, torch.Tensor], policy) -> bool:
    after = base_bytes(policy)
    return after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def quant_layers(policy) -> set[str]:
    return {type(m.get_base_layer()).__name__ for m in policy.lm.modules() if hasattr(m, "lora_A")}


def batch():
    ids = torch.randint(3, 30, (3, 9), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize(("quantization", "arch"), [("nf4", "llama"), ("fp4", "llama"), ("int8", "llama"),
                                                    ("nf4", "gpt2")], ids=["nf4", "fp4", "int8", "nf4-gpt2"])
def test_the_base_loads_quantized_and_the_adapters_stay_float32(tiny_model_dir, tmp_path, quantization, arch):
    _, _, policy = make_policy(tiny_model_dir(arch), str(tmp_path), quantization=quantization)
    assert quant_layers(policy) == {QUANT_LAYER[quantization]}
    trainable = policy.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert not any(p.requires_grad for n, p in policy.lm.named_parameters() if "lora_" not in n)
    assert all(p.dtype in (torch.uint8, torch.int8) for n, p in policy.base_model.named_parameters()
               if n.endswith("base_layer.weight"))


def test_nf4_computes_in_model_dtype_with_double_quantization(tiny_model_dir, tmp_path):
    _, _, policy = make_policy(tiny_model_dir("llama"), str(tmp_path), quantization="nf4", dtype="bfloat16")
    layer = next(m.get_base_layer() for m in policy.lm.modules() if hasattr(m, "lora_A"))
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.quant_state.nested
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())


def test_reference_is_the_quantized_base_and_moves_apart_from_the_policy(tiny_model_dir, tmp_path):
    config, tokenizer, policy = make_policy(tiny_model_dir("llama"), str(tmp_path), quantization="nf4")
    ids, mask = batch()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True))
    keep_trainable(plain)  # the kernel rlora's base computes with (rlora.models.quantization)
    with torch.no_grad():
        base = plain(input_ids=ids, attention_mask=mask).logits
        ref = policy.reference_logits(ids, mask)
        assert torch.equal(ref, base)  # the adapter off: the 4-bit base itself, bitwise
        assert torch.equal(policy(ids, mask).logits, ref)  # LoRA's B starts at zero
    trainer = PPOTrainer(config, policy, tokenizer, count_s, normalize_prompts(PROMPTS), normalize_prompts(PROMPTS),
                         verbose=False)
    trainer.train_step(random_experience(8, 3, 5, vocab_size=30), torch.arange(8))
    with torch.no_grad():
        assert torch.equal(policy.reference_logits(ids, mask), base)
        assert (policy(ids, mask).logits - base).abs().max() > 1e-3


def test_a_pass_without_gradient_leaves_the_4bit_layers_differentiable(tokenizer, tmp_path):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel with no
    backward the first time its layer runs in eval mode without gradient (as generation does);
    the layer then passes no gradient to its input. rlora keeps the differentiable kernel: the
    adapters' gradients after such a pass equal those before it, bitwise. (On a CPU without
    AVX512-BF16 bitsandbytes never repacks, and this holds either way.) The model is 64 wide, the
    narrowest that bitsandbytes' repacking accepts (one 64-value block a row)."""
    from rlora.tiny import tiny_model

    torch.manual_seed(0)
    model_dir = str(tmp_path / "llama-64")
    tiny_model("llama", tokenizer, hidden=64).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _, _, policy = make_policy(model_dir, str(tmp_path), quantization="nf4")
    with torch.no_grad():  # B starts at zero; a non-zero B lets the gradient reach every A too
        for p in adapter_parameters(policy.lm, POLICY):
            p.normal_(0, 0.1)
    ids, mask = batch()

    def gradients() -> list[torch.Tensor]:
        policy.zero_grad()
        policy(ids, mask).logits.float().pow(2).mean().backward()
        return [p.grad.clone() for p in adapter_parameters(policy.lm, POLICY)]

    before = gradients()
    with torch.no_grad():
        policy(ids, mask)  # eval mode, no gradient: where bitsandbytes would repack
    after = gradients()
    layers = [m for m in policy.lm.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(g.abs().sum() > 0 for g in after)


@pytest.mark.parametrize("critic", ["value-head", "value-adapter"])
def test_a_ppo_step_changes_only_adapter_and_value_weights(tiny_model_dir, tmp_path, critic):
    extra = {"value_adapter": LORA} if critic == "value-adapter" else {}
    config, tokenizer, policy = make_policy(tiny_model_dir("llama"), str(tmp_path), quantization="nf4", **extra)
    trainer = PPOTrainer(config, policy, tokenizer, count_s, normalize_prompts(PROMPTS), normalize_prompts(PROMPTS),
                         verbose=False)
    before, frozen = base_bytes(policy), [p.detach().clone() for p in policy.trainable_parameters()]
    trainer.train_step(random_experience(8, 3, 5, vocab_size=30), torch.arange(8))
    moved = [not torch.equal(a, p) for a, p in zip(frozen, policy.trainable_parameters())]
    assert unchanged(before, policy)
    assert all(moved[-2:])  # the value head (last registered) moved
    roles = [POLICY, VALUE] if critic == "value-adapter" else [POLICY]
    for role in roles:
        assert any(not torch.equal(a, p) for a, p in zip(frozen, policy.trainable_parameters())
                   if any(p is q for q in adapter_parameters(policy.lm, role)))


def test_a_grpo_run_with_the_shared_prefix_trains_only_the_adapter(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), train={"total_steps": 1},
                               model={"quantization": "nf4", "peft_config": LORA})
    trainer = rlora.build_trainer(reward_fn=count_s, prompts=PROMPTS, config=config, verbose=False)
    before = base_bytes(trainer.policy)
    adapter = [p.detach().clone() for p in adapter_parameters(trainer.policy.lm, POLICY)]
    trainer.learn()
    assert unchanged(before, trainer.policy)
    assert any(not torch.equal(a, p) for a, p in zip(adapter, adapter_parameters(trainer.policy.lm, POLICY)))


def test_reference_and_reward_adapters_sit_on_the_quantized_base(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    torch.manual_seed(5)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)
    start, reward = str(tmp_path / "start"), str(tmp_path / "reward")
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(start)
    scored = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    save_reward_adapter(scored, ScoreHead(scored.config.hidden_size), char_tokenizer(), reward, {})
    config = load_config(tiny_ppo_config(start, str(tmp_path / "run"), model={
        "peft_config": None, "quantization": "nf4", "reference": "adapter", "reward_adapter": reward}))
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    policy = build_policy(config.model, tokenizer).eval()
    assert quant_layers(policy) == {"Linear4bit"}
    ids, mask = batch()
    with torch.no_grad():
        logits = policy(ids, mask).logits
        assert torch.equal(policy.reference_logits(ids, mask), logits)  # the starting adapter, not the base
        with policy.lm.disable_adapter():
            assert (policy.lm(input_ids=ids, attention_mask=mask).logits - logits).abs().max() > 1e-3
        scores = policy.reward_scores(ids, mask)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


# --- refusals
@pytest.mark.parametrize(("model", "method", "match"), [
    ({"quantization": "nf4"}, {"merge_adapter_for_generation": True}, "rounds the merged weight"),
    ({"quantization": "nf4", "generation_dtype": "bfloat16"}, {}, "would recast the quantized weights"),
    ({"quantization": "nf4", "peft_config": None, "num_layers_unfrozen": 1}, {}, "quantized weights cannot train"),
    ({"quantization": "nf4", "model_extra_configs": {"quantization_config": {"load_in_4bit": True}}}, {},
     "give one of the two"),
    ({"model_extra_configs": {"quantization_config": {"load_in_4bit": True}}},
     {"merge_adapter_for_generation": True}, "rounds the merged weight"),
    ({"quantization": "nf8"}, {}, "use 'nf4' or 'fp4'"),
], ids=["merged-sampler", "generation-dtype", "hydra", "both", "extra-configs-merged", "unknown"])
def test_what_cannot_run_on_a_quantized_base_is_refused_before_loading(tmp_path, model, method, match):
    config = tiny_ppo_config("/nonexistent/model", str(tmp_path), model={"peft_config": LORA, **model},
                             method=method)
    with pytest.raises(ValueError, match=match):
        load_config(config)


def test_a_config_object_base_cannot_be_quantized(tmp_path):
    from rlora.tiny import tiny_config

    config = tiny_ppo_config("unused", str(tmp_path), model={"peft_config": LORA, "quantization": "nf4"})
    config["model"]["model_path"] = tiny_config("llama", 35)
    with pytest.raises(ValueError, match="save_pretrained the model"):
        load_config(config)


def test_a_model_given_quantized_refuses_the_merged_sampler(tiny_model_dir, tmp_path):
    _, _, policy = make_policy(tiny_model_dir("llama"), str(tmp_path), quantization="nf4")
    ids, mask = batch()
    with pytest.raises(ValueError, match="round the merged weights"):
        policy.generate(ids, mask, merged=True, max_new_tokens=2)
    assert policy.generate(ids, mask, max_new_tokens=2, do_sample=False).shape == (3, 11)


def test_a_missing_bitsandbytes_names_the_extra(tiny_model_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"rlora\[quant\]"):
        make_policy(tiny_model_dir("llama"), str(tmp_path), quantization="nf4")


# --- the TRL face
def test_trl_s_quantization_config_loads_the_base_quantized(tiny_model_dir, tmp_path):
    from rlora.trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=1,
                      max_completion_length=4, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                      disable_tqdm=True, logging_steps=1)
    trainer = GRPOTrainer(model=tiny_model_dir("llama"), reward_funcs=lambda completions, **_: [1.0] * len(completions),
                          train_dataset=[{"prompt": p} for p in PROMPTS], args=args,
                          peft_config=LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                          quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_compute_dtype=torch.float32))
    assert quant_layers(trainer.trainer.policy) == {"Linear4bit"}
    assert trainer.config.model.model_extra_configs["quantization_config"]["quant_method"] == "bitsandbytes"


# --- learning (slow tier)
@pytest.mark.slow
def test_a_4bit_base_learns(tiny_model_dir, tmp_path):
    """GRPO on the nf4 tiny model raises the fraction of "s" as it does unquantized
    (tests/test_group_learning.py): 15 phases of 64 completions, 2 optimizer steps each."""
    config = {
        "train": {"seq_length": 32, "batch_size": 32, "total_steps": 30, "eval_interval": 1000,
                  "checkpoint_interval": 1000, "run_dir": str(tmp_path), "seed": 1000},
        "model": {"model_path": tiny_model_dir("gpt2"), "quantization": "nf4",
                  "peft_config": {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0}},
        "method": {"name": "GRPOConfig", "num_rollouts": 64, "num_generations": 8, "chunk_size": 64,
                   "beta": 0.0, "gen_kwargs": {"max_new_tokens": 8, "top_k": 0, "top_p": 1.0, "do_sample": True}},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 1e-2}},
    }
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    rewards = [r["reward"] for r in trainer.history if "phase" in r]
    assert len(rewards) == 15
    start, end = rewards[0], sum(rewards[-2:]) / 2
    assert start < 0.1
    # measured: 0.01 in the first phase -> 0.95 (mean of the last two); unquantized: 0.05 -> 0.96-0.98
    assert end > 0.3 and end > 4 * start, rewards
    assert quant_layers(trainer.policy) == {"Linear4bit"}
