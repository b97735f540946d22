"""Critic and reward adapters beside the policy's on one base (issue 8)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

import rlora
from rlora.config import ModelConfig, load_config
from rlora.models import build_policy, load_base_model, load_tokenizer, position_ids_from_mask
from rlora.models.loading import adapter_parameters
from rlora.models.policy import POLICY, REWARD, VALUE
from rlora.models.score_head import ScoreHead, load_score_head, sequence_scores
from rlora.reward_model import save_reward_adapter
from rlora.rollout.prompts import normalize_prompts
from rlora.rollout.forward import forward_responses
from rlora.rollout.rewards import add_scores
from rlora.tiny import char_tokenizer, random_experience, tiny_ppo_config
from rlora.trainer import PPOTrainer

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "init_lora_weights": False}
PROMPTS = ["hello", "abc", "xyz", "the "]


def count_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_dir):
    """A reward adapter (random, non-zero LoRA B) + random score head saved on the tiny GPT-2."""
    torch.manual_seed(99)
    path = str(tmp_path_factory.mktemp("reward"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    head = ScoreHead(base.config.hidden_size)
    save_reward_adapter(model, head, char_tokenizer(), path, {})
    return path


def make_trainer(model_dir: str, run_dir: str, reward_fn=count_s, **model):
    torch.manual_seed(0)
    config = load_config(tiny_ppo_config(model_dir, run_dir, model={"peft_config": LORA, **model}))
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    policy = build_policy(config.model, tokenizer)
    trainer = PPOTrainer(config, policy, tokenizer, reward_fn, normalize_prompts(PROMPTS),
                         normalize_prompts(PROMPTS), verbose=False)
    policy.eval()
    return trainer


def adapter_state(policy, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in adapter_parameters(policy.lm, name)]


def test_each_adapter_moves_only_through_its_own_loss(tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("gpt2")
    exp = random_experience(8, 3, 5, vocab_size=30)
    runs = {}
    for name in ("both", "no_value_loss", "no_policy_loss"):
        trainer = make_trainer(model_dir, str(tmp_path / name), value_adapter=LORA)
        if name == "no_value_loss":
            trainer.config.method.vf_coef = 0.0
        if name == "no_policy_loss":
            import rlora.methods.ppo as trainer_module

            real = trainer_module.policy_loss
            monkeypatch.setattr(trainer_module, "policy_loss",
                                lambda *a, **k: (lambda loss, stats: (0.0 * loss, stats))(*real(*a, **k)))
        before = {role: adapter_state(trainer.policy, role) for role in (POLICY, VALUE)}
        trainer.train_step(exp, torch.arange(8))
        monkeypatch.undo()
        after = {role: adapter_state(trainer.policy, role) for role in (POLICY, VALUE)}
        after["head"] = [p.detach().clone() for p in trainer.policy.value_head.parameters()]
        for role in (POLICY, VALUE):
            moved = max((a - b).abs().max().item() for a, b in zip(after[role], before[role]))
            after[f"{role}_moved"] = moved
        runs[name] = after
    assert runs["both"]["default_moved"] > 1e-4 and runs["both"]["value_moved"] > 1e-4
    # the value loss never reaches the policy adapter, the policy loss never the critic or its head
    for a, b in zip(runs["both"][POLICY], runs["no_value_loss"][POLICY]):
        assert torch.equal(a, b)
    for a, b in zip(runs["both"][VALUE] + runs["both"]["head"],
                    runs["no_policy_loss"][VALUE] + runs["no_policy_loss"]["head"]):
        assert torch.equal(a, b)


def test_both_trainable_adapters_get_gradients_in_one_step_and_nothing_flips(tiny_model_dir, tmp_path,
                                                                          reward_dir):
    trainer = make_trainer(tiny_model_dir("gpt2"), str(tmp_path), value_adapter=LORA, reward_adapter=reward_dir)
    policy = trainer.policy
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}
    assert all(not p.requires_grad for p in adapter_parameters(policy.lm, REWARD))
    assert all(p.requires_grad for p in adapter_parameters(policy.lm, POLICY) + adapter_parameters(policy.lm, VALUE))
    exp = random_experience(4, 3, 5, vocab_size=30)
    forward_responses(policy, exp.query_ids, exp.query_mask, exp.response_ids, exp.response_mask,
                      with_reference=True)  # the rollout pass, reference included, comes first in a phase
    assert {name: p.requires_grad for name, p in policy.named_parameters()} == flags
    logprobs, values, _, _ = forward_responses(policy, exp.query_ids, exp.query_mask, exp.response_ids,
                                            exp.response_mask)
    (logprobs.sum() + values.sum()).backward()
    for role in (POLICY, VALUE):
        grads = [p.grad for p in adapter_parameters(policy.lm, role)]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, role
    assert all(p.grad is None for p in adapter_parameters(policy.lm, REWARD))
    policy.reward_scores(exp.response_ids, exp.response_mask.long())
    assert {name: p.requires_grad for name, p in policy.named_parameters()} == flags
    assert policy.lm.active_adapters == [POLICY]


def test_reference_is_base_bitwise_with_every_role_attached(tiny_model_dir, reward_dir, batch):
    path = tiny_model_dir("gpt2")
    policy = build_policy(ModelConfig(model_path=path, peft_config=LORA, value_adapter=LORA,
                                      reward_adapter=reward_dir), char_tokenizer()).eval()
    input_ids, attention_mask = batch
    base = load_base_model(ModelConfig(model_path=path)).eval()  # as rlora loads it
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask)).logits
        assert not torch.equal(policy(input_ids, attention_mask).logits, expected)  # the adapter acts
    assert torch.equal(policy.reference_logits(input_ids, attention_mask), expected)


def test_switching_adapters_is_exception_safe(tiny_model_dir, reward_dir):
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), peft_config=LORA, value_adapter=LORA,
                                      reward_adapter=reward_dir), char_tokenizer())
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with policy.use_adapter(REWARD):
            assert policy.lm.active_adapters == [REWARD]
            raise RuntimeError("boom")
    assert policy.lm.active_adapters == [POLICY]
    assert {name: p.requires_grad for name, p in policy.named_parameters()} == flags


def test_value_head_reads_the_critic_adapters_trunk(tiny_model_dir, batch):
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), peft_config=LORA, value_adapter=LORA),
                          char_tokenizer()).eval()
    input_ids, attention_mask = batch
    with torch.no_grad():
        out = policy(input_ids, attention_mask)
        with policy.use_adapter(VALUE):
            hidden = policy.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                               position_ids=position_ids_from_mask(attention_mask)).hidden_states[-1]
        assert torch.allclose(out.values, policy.value_head(hidden), atol=1e-6)
        assert not torch.allclose(out.values, policy.value_head(out.hidden_states[-1]), atol=1e-3)


def test_reward_adapter_scores_equal_a_standalone_load_and_stay_frozen(tiny_model_dir, tmp_path, reward_dir):
    trainer = make_trainer(tiny_model_dir("gpt2"), str(tmp_path), reward_adapter=reward_dir)
    policy = trainer.policy
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    standalone = PeftModel.from_pretrained(base, reward_dir).eval()
    head = load_score_head(reward_dir, base.config.hidden_size)
    exp = random_experience(4, 3, 5, vocab_size=30)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0  # a shorter row: read at its own last real token
    ids = exp.response_ids[:, :1].repeat(1, 6)
    with torch.no_grad():
        expected = sequence_scores(standalone, head, ids, mask)
    torch.testing.assert_close(policy.reward_scores(ids, mask), expected, rtol=0, atol=1e-6)
    frozen = adapter_state(policy, REWARD) + [p.detach().clone() for p in policy.reward_head.parameters()]
    trainer.train_step(random_experience(8, 3, 5, vocab_size=30), torch.arange(8))
    after = adapter_state(policy, REWARD) + [p.detach().clone() for p in policy.reward_head.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after))


def test_ppo_with_only_a_reward_adapter_and_checkpointed_critic(tiny_model_dir, tmp_path, reward_dir):
    config = tiny_ppo_config(tiny_model_dir("gpt2"), str(tmp_path / "run"),
                             model={"peft_config": LORA, "value_adapter": LORA, "reward_adapter": reward_dir},
                             train={"total_steps": 4})
    torch.manual_seed(0)
    initial = build_policy(load_config(config).model, char_tokenizer())
    trainer = rlora.train(prompts=PROMPTS, config=config, verbose=False)
    # both trainable adapters moved over learn(): rollout passes (reference included) freeze nothing
    for role in (POLICY, VALUE):
        assert all(not torch.equal(a, b) for a, b in zip(adapter_state(initial, role),
                                                           adapter_state(trainer.policy, role))), role
    evals = [r for r in trainer.history if r.get("eval")]
    assert len(evals) == 2 and all("reward/mean" in r for r in evals)
    # the eval reward is the adapter's mean score over the eval samples, not a placeholder 0
    assert evals[0]["reward/mean"] != 0.0
    checkpoint = f"{trainer.run_dir}/ckpts/step_4"
    resumed = rlora.train(prompts=PROMPTS, config=config, verbose=False,
                          overrides=[f"train.resume_from_checkpoint={checkpoint}"])
    for role in (POLICY, VALUE):
        for a, b in zip(adapter_state(trainer.policy, role), adapter_state(resumed.policy, role)):
            assert torch.equal(a, b), role


def test_value_adapter_can_start_from_the_reward_adapter(tiny_model_dir, reward_dir):
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), peft_config=LORA,
                                      value_adapter=reward_dir), char_tokenizer())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    saved = adapter_parameters(PeftModel.from_pretrained(base, reward_dir), "default")
    critic = adapter_parameters(policy.lm, VALUE)
    assert len(critic) == len(saved) > 0
    assert all(torch.equal(a, b) and a.requires_grad for a, b in zip(critic, saved))


def test_add_scores_puts_the_adapter_score_at_the_last_real_token():
    lengths = torch.tensor([2, 3])
    assert torch.equal(add_scores(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25]), lengths),
                       torch.tensor([1.5, 2.25]))
    dense = add_scores(torch.zeros(2, 3), torch.tensor([0.5, 0.25]), lengths)
    assert torch.equal(dense, torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.25]]))
    assert torch.equal(add_scores(None, torch.tensor([0.5]), lengths[:1]), torch.tensor([0.5]))


@pytest.mark.parametrize("model_kwargs, match", [
    ({"peft_config": None, "num_layers_unfrozen": -1, "value_adapter": LORA}, "model.value_adapter"),
    ({"peft_config": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "value_adapter": LORA},
     "LoRA"),
    ({"peft_config": LORA, "reward_adapter": "/no/such/dir"}, "rlora rm"),
    ({"peft_config": LORA, "value_adapter": {"peft_type": "LORA", "rr": 4}}, "model.value_adapter.rr"),
    ({"peft_config": LORA, "value_adapter": {"peft_type": "LOHA", "r": 4}}, "model.value_adapter.peft_type"),
    ({"peft_config": {"peft_type": "LOHA", "r": 4}, "value_adapter": LORA}, "LoRA policy adapter"),
    ({"peft_config": LORA, "value_adapter": {**LORA, "modules_to_save": ["lm_head"]}},
     "model.value_adapter.modules_to_save"),
])
def test_role_adapter_misconfigurations_are_clear_errors(tiny_model_dir, model_kwargs, match):
    config = tiny_ppo_config(tiny_model_dir("gpt2"), "unused", model=model_kwargs)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        config = load_config(config)
        build_policy(config.model, load_tokenizer(config.tokenizer, config.model.model_path))


def test_reward_head_of_another_base_is_refused(tmp_path, reward_dir):
    with pytest.raises(ValueError, match="hidden size"):
        load_score_head(reward_dir, hidden_size=7)


def test_all_roles_hold_one_copy_of_the_base(tiny_model_dir, reward_dir):
    path = tiny_model_dir("gpt2")
    policy = build_policy(ModelConfig(model_path=path, peft_config=LORA, value_adapter=LORA,
                                      reward_adapter=reward_dir), char_tokenizer())
    base = AutoModelForCausalLM.from_pretrained(path)
    adapters = {id(p) for role in (POLICY, VALUE, REWARD) for p in adapter_parameters(policy.lm, role)}
    heads = {id(p) for p in [*policy.value_head.parameters(), *policy.reward_head.parameters()]}
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in policy.parameters()
                if id(p) not in adapters | heads}
    base_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                      for p in base.parameters()}.values())
    assert sum(storages.values()) == base_bytes  # no second copy for the reference, critic or reward model


def test_resuming_with_a_different_critic_setting_is_a_clear_error(tiny_model_dir, tmp_path):
    config = tiny_ppo_config(tiny_model_dir("gpt2"), str(tmp_path / "run"), model={"peft_config": LORA},
                             train={"total_steps": 4})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    checkpoint = f"{trainer.run_dir}/ckpts/step_4"
    with pytest.raises(ValueError, match="without a critic adapter"):
        rlora.train(count_s, PROMPTS, config=config, verbose=False, overrides=[
            f"train.resume_from_checkpoint={checkpoint}", "model.value_adapter={peft_type: LORA, r: 4}"])


def test_export_adapter_only_leaves_the_critic_behind(tiny_model_dir, tmp_path):
    from rlora.export import export

    config = tiny_ppo_config(tiny_model_dir("gpt2"), str(tmp_path / "run"),
                             model={"peft_config": LORA, "value_adapter": LORA}, train={"total_steps": 4})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    checkpoint = f"{trainer.run_dir}/ckpts/step_4"
    assert os.path.isdir(f"{checkpoint}/adapter/{VALUE}")
    out = export(checkpoint, str(tmp_path / "out"), adapter_only=True)
    assert os.path.isfile(f"{out}/adapter_model.safetensors") and not os.path.exists(f"{out}/{VALUE}")
