"""The group methods in the one loop, on tiny models: which passes run, ratio 1, whole groups,
TRL's logged names, dynamic sampling, DAPO's step-wide normaliser, truncation masking, resume."""

from __future__ import annotations

import json

import pytest
import torch

import rlora
import rlora.api
from rlora.methods import group as group_module
from rlora.config import load_config
from rlora.models import build_policy, load_tokenizer
from rlora.rollout.prompts import normalize_prompts
from rlora.tiny import random_experience, tiny_group_config, tiny_ppo_config
from rlora.trainer import Trainer

PROMPTS = ["hello", "abc", "xyz", "the "]


def count_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


def steps_of(trainer, key):
    return [r[key] for r in trainer.history if key in r and "phase" not in r and not r.get("eval")]


def phases_of(trainer):
    return [r for r in trainer.history if "phase" in r]


def spy_forward(monkeypatch):
    """Record the flags of every pass over responses the trainer makes (shared-prefix or not)."""
    calls = []
    for name in ("forward_responses", "forward_group_responses"):
        def spy(*args, real=getattr(group_module, name), **kwargs):
            calls.append({k: kwargs.get(k, d) for k, d in (("with_policy", True), ("with_reference", False))})
            return real(*args, **kwargs)

        monkeypatch.setattr(group_module, name, spy)
    return calls


@pytest.mark.parametrize(("epochs", "batch", "beta", "estimator", "passes"), [
    (1, 16, 0.0, "grpo", 0), (2, 16, 0.0, "grpo", 1), (1, 8, 0.0, "grpo", 1), (1, 16, 0.1, "grpo", 1),
    (1, 16, 0.1, "reinforce++", 1),
], ids=["one-step-no-kl", "two-epochs", "two-steps-an-epoch", "kl", "reinforce++-kl"])
def test_only_the_passes_the_method_needs_run(tiny_model_dir, tmp_path, monkeypatch, epochs, batch, beta, estimator,
                                              passes):
    calls = spy_forward(monkeypatch)
    steps = epochs * 16 // batch
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path),
                               method={"ppo_epochs": epochs, "beta": beta, "advantage_estimator": estimator},
                               train={"total_steps": steps, "batch_size": batch, "minibatch_size": 8})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    old_pass = steps > 1 or (beta > 0 and estimator == "reinforce++")
    # one phase: 16 * epochs samples through the update in microbatches of 8 (2 * epochs calls); the
    # rollout pass, when it runs, takes the 16 in microbatches of 8 (2 calls)
    with_reference = [c for c in calls if c["with_reference"]]
    policy_only = [c for c in calls if c["with_policy"] and not c["with_reference"]]
    assert len(with_reference) == (2 if beta > 0 else 0)
    assert all(c["with_policy"] == old_pass for c in with_reference)
    assert len(policy_only) == 2 * epochs + (2 if old_pass and beta == 0 else 0)
    assert len(calls) == 2 * epochs + 2 * passes
    assert trainer.policy.value_head is None
    assert trainer.method.passes.reference == (beta > 0) and trainer.method.passes.old_logprobs == old_pass


def test_ratio_is_one_at_the_first_minibatch_and_moves_after(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 8})
    config["model"]["model_extra_configs"] = {"resid_pdrop": 0.3, "attn_pdrop": 0.3, "embd_pdrop": 0.3}
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    ratio = steps_of(trainer, "policy/ratio_mean")
    assert abs(ratio[0] - 1) < 1e-6 and abs(ratio[4] - 1) < 1e-6  # first step of each phase (dropout off)
    assert max(abs(r - 1) for r in ratio) > 1e-4  # later steps see the updated policy


def test_one_step_a_phase_has_ratio_exactly_one_and_still_learns_a_gradient(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), method={"ppo_epochs": 1},
                               train={"total_steps": 2, "batch_size": 16})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    assert not trainer.method.passes.old_logprobs
    assert steps_of(trainer, "policy/ratio_mean") == [1.0, 1.0]
    lora_b = [p for n, p in trainer.policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # lora_B starts at zero: it moved


def test_later_steps_of_a_one_epoch_phase_see_the_moved_policy(tiny_model_dir, tmp_path):
    # two optimizer steps a phase: the second one's samples are stale, so the old log-probs are measured
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), method={"ppo_epochs": 1},
                               train={"total_steps": 4, "batch_size": 8})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    ratio = steps_of(trainer, "policy/ratio_mean")
    assert trainer.method.passes.old_logprobs
    assert abs(ratio[0] - 1) < 1e-6 and abs(ratio[2] - 1) < 1e-6
    assert abs(ratio[1] - 1) > 1e-5 and abs(ratio[3] - 1) > 1e-5


def test_logs_trl_names_and_groups_are_whole(tiny_model_dir, tmp_path):
    seen = []

    def reward(samples, prompts, outputs, tokenizer, **_):
        seen.append(list(prompts))
        return count_s(samples, prompts, outputs, tokenizer)

    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), train={"total_steps": 4},
                               method={"chunk_size": 8})
    trainer = rlora.train(reward, PROMPTS, config=config, verbose=False)
    for prompts in seen[1:3]:  # after the baseline eval, two chunks of 2 prompts x 4 completions, rows of a prompt together
        assert len(prompts) == 8 and all(len(set(prompts[g * 4:(g + 1) * 4])) == 1 for g in range(2))
        assert prompts[0] != prompts[4]
    phase = phases_of(trainer)[0]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "time/rollout", "time/rollout_pass"):
        assert key in phase, key
    step = [r for r in trainer.history if "loss" in r][0]
    for key in ("loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy",
                "time/step"):
        assert key in step, key
    assert "kl" not in step and "values/mean" not in step
    assert 0 <= phase["frac_reward_zero_std"] <= 1 and step["entropy"] > 0


def test_kl_is_logged_and_the_reference_is_the_disabled_adapter(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), method={"beta": 0.5},
                               train={"total_steps": 4})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    kl = steps_of(trainer, "kl")
    assert kl[0] == 0.0  # LoRA starts at the base: policy == reference, k3 exactly 0
    assert kl[-1] > 0


def build(model_dir, run_dir, **sections):
    torch.manual_seed(0)
    config = load_config(tiny_group_config(model_dir, run_dir, **sections))
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    policy = build_policy(config.model, tokenizer, value_head=False)
    return Trainer(config, policy, tokenizer, count_s, normalize_prompts(PROMPTS), normalize_prompts(PROMPTS),
                   verbose=False)


def step_gradient(trainer, exp):
    """The gradient of one train_step (SGD with lr 1: the update is minus the gradient)."""
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    trainer.policy.eval()
    trainer.train_step(exp, torch.arange(len(exp)))
    return torch.cat([(b - p.detach()).flatten() for p, b in zip(trainer.policy.trainable_parameters(), before)])


def uneven_experience(n=8, num_generations=4):
    """Groups of 4 completions (each group one prompt) of uneven lengths."""
    exp = random_experience(n, 3, 6, vocab_size=30)
    exp.query_ids = exp.query_ids[::num_generations].repeat_interleave(num_generations, 0)
    lengths = torch.tensor([6, 1, 4, 2, 5, 3, 6, 2, 1, 1, 2, 6])[:n]
    exp.response_mask = torch.arange(6)[None, :] < lengths[:, None]
    exp.loss_mask = exp.response_mask.clone()
    exp.advantages = torch.randn(n)[:, None] * exp.response_mask
    return exp


@pytest.mark.parametrize(("loss_type", "shared"), [
    ("dapo", False), ("dapo", True), ("grpo", False), ("bnpo", False), ("dr_grpo", False), ("grpo", True)],
    ids=["dapo", "dapo-shared-prefix", "grpo", "bnpo", "dr_grpo", "grpo-shared-prefix"])
def test_step_gradient_does_not_depend_on_the_microbatch_split(tiny_model_dir, tmp_path, loss_type, shared):
    """12 completions of uneven lengths as one microbatch, as [8, 4] (the last batch of a phase whose
    num_rollouts is no multiple of batch_size) or [4, 4, 4]: one gradient for every loss_type, each
    microbatch weighted by its share of the batch (rows, or tokens where the loss divides by them)."""
    model_dir = tiny_model_dir("gpt2")
    grads = {}
    for minibatch in (12, 8, 4):
        trainer = build(model_dir, str(tmp_path / str(minibatch)), train={"batch_size": 24, "minibatch_size": minibatch},
                        method={"loss_type": loss_type, "ppo_epochs": 2, "shared_prefix": shared},
                        model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False}},
                        optimizer={"name": "sgd", "kwargs": {"lr": 1.0}})
        grads[minibatch] = step_gradient(trainer, uneven_experience(12))
    assert grads[12].abs().max() > 1e-4
    torch.testing.assert_close(grads[8], grads[12], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[4], grads[12], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_prefix_step_equals_the_unshared_one(tiny_model_dir, tmp_path, arch):
    grads = {}
    for shared in (False, True):
        trainer = build(tiny_model_dir(arch), str(tmp_path / str(shared)), method={"shared_prefix": shared},
                        model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False}},
                        optimizer={"name": "sgd", "kwargs": {"lr": 1.0}})
        grads[shared] = step_gradient(trainer, uneven_experience())
    assert grads[False].abs().max() > 1e-4
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-7)


def test_truncated_completions_can_be_left_out_of_the_loss(tiny_model_dir, tmp_path):
    # 2 new tokens: almost every completion is cut at max_new_tokens
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), train={"total_steps": 1},
                               method={"mask_truncated_completions": True,
                                       "gen_kwargs": {"max_new_tokens": 2, "do_sample": True}})
    trainer = rlora.build_trainer(count_s, PROMPTS, config=config, verbose=False)
    scored, stats = trainer._collect()
    exp = trainer._rollout_pass(scored.rollouts, torch.arange(16))
    truncated = scored.rollouts.truncated
    assert truncated.any()
    assert not exp.loss_mask[truncated].any()
    assert torch.equal(exp.loss_mask[~truncated], exp.response_mask[~truncated])
    assert stats["completions/clipped_ratio"] == truncated.float().mean()


def test_overlong_shaping_lowers_long_completions_rewards(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), method={"overlong_buffer_len": 4,
                                                                               "overlong_penalty_factor": 2.0})
    trainer = rlora.build_trainer(lambda samples, **_: [1.0] * len(samples), PROMPTS, config=config, verbose=False)
    scored, _ = trainer._collect()
    lengths = scored.rollouts.response_mask.sum(1).double()
    expected = 1.0 + torch.clamp(-(lengths - 2) / 4 * 2.0, max=0.0)  # L_max 6, buffer 4
    torch.testing.assert_close(scored.scores.double(), expected, rtol=0, atol=1e-6)


def constant_for_some(samples, prompts, outputs, tokenizer, **_):
    """Equal rewards for every completion of 'abc' and 'xyz'; varying ones for the others."""
    return [1.0 if p in ("abc", "xyz") else o.count("s") + len(o) / 10 for p, o in zip(prompts, outputs)]


def constant_for_abc(samples, prompts, outputs, tokenizer, **_):
    return [1.0 if p == "abc" else o.count("s") + len(o) / 10 for p, o in zip(prompts, outputs)]


def test_dynamic_sampling_keeps_only_groups_that_differ_and_discards_the_surplus(tiny_model_dir, tmp_path):
    # each draw of all 4 prompts keeps 3 groups: 2 draws give 6 for a phase of 4
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), method={"dynamic_sampling": True,
                                                                               "chunk_size": 16})
    trainer = rlora.build_trainer(constant_for_abc, PROMPTS, config=config, verbose=False)
    scored, stats = trainer._collect()
    groups = scored.scores.reshape(-1, 4)
    assert len(scored) == 16 and (groups.std(1) > 0).all()
    assert all(p != "abc" for p in scored.rollouts.prompts)
    assert stats["dynamic_sampling/dropped_groups"] >= 1 and stats["dynamic_sampling/filled"] == 0
    assert stats["frac_reward_zero_std"] > 0  # over every group drawn, before dropping
    drawn = stats["dynamic_sampling/draws"] * 4  # prompts drawn; 4 are kept
    surplus = drawn - stats["dynamic_sampling/dropped_groups"] - 4
    assert surplus > 0 and stats["dynamic_sampling/discarded_groups"] == surplus
    # the surplus was sampled by this phase's policy: the next phase draws afresh, nothing carried over
    prompts_before = trainer.state.loader.state_dict()
    again, again_stats = trainer._collect()
    assert trainer.state.loader.state_dict() != prompts_before and again_stats["dynamic_sampling/draws"] >= 2


@pytest.mark.parametrize("reward", [0.5, 0.1, 1 / 3], ids=["half", "tenth", "third"])
def test_dynamic_sampling_fills_up_with_equal_groups_after_the_cap(tiny_model_dir, tmp_path, reward):
    # 8 x 0.1 in float32 has a std of 8e-9, not 0: equality of the rewards is what counts
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), train={"minibatch_size": 8},
                               method={"dynamic_sampling": True, "num_generations": 8, "chunk_size": 8,
                                       "max_num_gen_batches": 2})
    trainer = rlora.build_trainer(lambda samples, **_: [reward] * len(samples), PROMPTS, config=config, verbose=False)
    scored, stats = trainer._collect()  # one group a draw
    assert len(scored) == 16 and stats["dynamic_sampling/draws"] == 2 and stats["dynamic_sampling/filled"] == 2
    assert stats["frac_reward_zero_std"] == 1.0


def final_tensors(run_dir, step):
    from safetensors.torch import load_file

    path = f"{run_dir}/ckpts/step_{step}"
    tensors = load_file(f"{path}/adapter/adapter_model.safetensors")
    optimizer = torch.load(f"{path}/optimizer.pt", weights_only=True)
    for i, state in optimizer["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return tensors


def records(run_dir, after):
    return [{k: v for k, v in r.items() if not k.startswith("time/")}
            for r in map(json.loads, open(f"{run_dir}/metrics.jsonl")) if r["step"] > after]


@pytest.mark.parametrize("method", [{}, {"dynamic_sampling": True, "chunk_size": 12, "beta": 0.1}],
                         ids=["grpo", "dapo-dynamic-sampling-kl"])
def test_resume_mid_phase_equals_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch, method):
    model = tiny_model_dir("gpt2")
    reward = constant_for_some if method else count_s
    monkeypatch.setattr(rlora.api, "resolve_function", lambda spec, key: reward if spec else None)

    def config(run_dir, steps, **train):
        return tiny_group_config(model, str(run_dir), method=method,
                                 train={"total_steps": steps, "eval_interval": 3, **train},
                                 task={"reward_fn": "support:reward", "prompts": PROMPTS})

    full = rlora.train(config=config(tmp_path / "full", 12), verbose=False)
    rlora.train(config=config(tmp_path / "resumed", 6), verbose=False)  # stops mid-phase 2
    state = json.load(open(tmp_path / "resumed" / "ckpts" / "step_6" / "trainer_state.json"))
    assert state["pending_phase"]["cursor"] == 2
    resumed = rlora.train(config=config(tmp_path / "resumed", 12, resume_from_checkpoint="latest"), verbose=False)
    assert resumed.step == full.step == 12
    a, b = final_tensors(tmp_path / "full", 12), final_tensors(tmp_path / "resumed", 12)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "resumed", 6) == records(tmp_path / "full", 6)


@pytest.mark.parametrize(("method", "model", "match"), [
    ({"num_generations": 1}, {}, "at least 2 completions"),
    ({"num_rollouts": 18}, {}, "multiple of method.num_generations=4"),
    ({"chunk_size": 6}, {}, "whole groups"),
    ({"vf_coef": 1.0}, {}, "method.vf_coef is a PPOConfig key"),
    ({"loss_type": "sum"}, {}, "method.loss_type='sum'"),
    ({"epsilon_high": 0.1}, {}, "clip-higher"),
    ({"overlong_buffer_len": 7}, {}, r"max_new_tokens=6"),
    ({"gen_kwargs": {"max_new_tokens": 6, "do_sample": False}}, {}, "must be sampled"),
    ({}, {"value_adapter": {"peft_type": "LORA", "r": 2}}, "no critic"),
], ids=["one-generation", "partial-group", "chunk-splits-groups", "ppo-key", "loss-type", "epsilon-high",
        "overlong-buffer", "greedy", "critic-adapter"])
def test_bad_group_settings_name_the_key_and_the_fix(tmp_path, method, model, match):
    with pytest.raises(ValueError, match=match):
        load_config(tiny_group_config("some/model", str(tmp_path), method=method, model=model))


def test_ppo_keys_under_ppo_and_group_keys_under_ppo_are_refused(tmp_path):
    with pytest.raises(ValueError, match="method.num_generations is a GRPOConfig key"):
        load_config(tiny_ppo_config("some/model", str(tmp_path), method={"num_generations": 4}))


def test_switching_method_by_override_keeps_what_was_set(tmp_path):
    config = load_config(tiny_ppo_config("some/model", str(tmp_path)),
                         ["method.name=GRPOConfig", "method.num_generations=4"])
    assert type(config.method).__name__ == "GRPOConfig"
    assert config.method.num_rollouts == 16 and config.method.ppo_epochs == 2  # set in the PPO config
    assert config.method.gen_kwargs["max_new_tokens"] == 6


def test_per_token_rewards_and_a_value_head_are_refused(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path))
    trainer = rlora.build_trainer(lambda outputs, **_: [[0.1] * len(o) for o in outputs], PROMPTS, config=config,
                                  verbose=False)
    with pytest.raises(ValueError, match="one reward per\ncompletion|one reward per completion"):
        trainer._collect()
    loaded = load_config(config)
    tokenizer = load_tokenizer(loaded.tokenizer, loaded.model.model_path)
    with pytest.raises(ValueError, match="value_head=False"):
        Trainer(loaded, build_policy(loaded.model, tokenizer), tokenizer, count_s, normalize_prompts(PROMPTS),
                normalize_prompts(PROMPTS), verbose=False)


def test_a_dynamic_sampling_cap_below_one_phase_of_chunks_is_refused(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path),
                               method={"dynamic_sampling": True, "chunk_size": 4, "max_num_gen_batches": 3})
    with pytest.raises(ValueError, match="max_num_gen_batches=3 is fewer than the 4 chunks"):
        rlora.build_trainer(count_s, PROMPTS, config=config, verbose=False)


@pytest.mark.parametrize("max_norm", [None, 1e-3], ids=["unclipped", "clipped"])
def test_gradient_norm_is_logged_and_clipped_when_asked(tiny_model_dir, tmp_path, max_norm):
    trainer = build(tiny_model_dir("gpt2"), str(tmp_path), train={"max_grad_norm": max_norm},
                    model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False}},
                    optimizer={"name": "sgd", "kwargs": {"lr": 1.0}})
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    trainer.policy.eval()
    stats = trainer.train_step(uneven_experience(), torch.arange(8))
    update = torch.cat([(b - p.detach()).flatten() for p, b in zip(trainer.policy.trainable_parameters(), before)])
    assert stats["grad_norm"] > 1e-2
    expected = min(float(stats["grad_norm"]), max_norm or float("inf"))  # SGD, lr 1: the update is the gradient
    assert update.norm().item() == pytest.approx(expected, rel=1e-4)


def test_bf16_mixed_precision_is_a_setting_and_scores_in_the_policy_precision(tiny_model_dir, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process; earlier tests set "no"
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), train={"mixed_precision": "bf16"},
                               method={"beta": 0.1})
    trainer = rlora.build_trainer(count_s, PROMPTS, config=config, verbose=False)
    assert trainer.accelerator.mixed_precision == "bf16"
    scored, _ = trainer._collect()
    exp = trainer._rollout_pass(scored.rollouts, torch.arange(16))
    mask = exp.response_mask
    # LoRA starts at the base: the reference pass (adapter off) equals the policy's under the same autocast
    assert trainer.method.passes.old_logprobs and trainer.method.passes.reference  # two epochs, beta > 0
    assert torch.equal(exp.ref_logprobs[mask], exp.logprobs[mask])
    try:
        trainer.learn()
    finally:
        AcceleratorState._reset_state(True)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history if "loss" in r)


def test_the_shared_prefix_update_runs_under_bf16_autocast_too(tiny_model_dir, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), train={"mixed_precision": "bf16"})
    trainer = rlora.build_trainer(count_s, PROMPTS, config=config, verbose=False)
    seen = []
    real = group_module.forward_group_responses

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(group_module, "forward_group_responses", spy)
    try:
        trainer.train_step(uneven_experience(), torch.arange(8))
    finally:
        AcceleratorState._reset_state(True)
    assert seen and all(seen)


def test_a_group_checkpoint_evaluates_and_a_ppo_run_cannot_resume_it(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path / "run"), train={"total_steps": 4},
                               method={"eval_gen_kwargs": {"greedy": {"do_sample": False}}})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    path = str(tmp_path / "run" / "ckpts" / "step_4")
    record = rlora.evaluate(path, reward_fn=count_s, prompts=PROMPTS, verbose=False)
    final = trainer.history[-1]  # the greedy eval of the trained policy, as evaluate() restores it
    assert record["step"] == 4 and record["reward/greedy/mean"] == pytest.approx(final["reward/greedy/mean"])
    ppo = tiny_ppo_config(tiny_model_dir("gpt2"), str(tmp_path / "run"), train={"resume_from_checkpoint": path})
    with pytest.raises(ValueError, match="without a value head"):
        rlora.train(count_s, PROMPTS, config=ppo, verbose=False)


def test_a_run_that_stops_mid_phase_logs_the_phase_rollouts(tiny_model_dir, tmp_path):
    # a phase of 4 optimizer steps (2 epochs x 2 batches), a run of 2: its rollouts were still scored
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 2, "batch_size": 8})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    phase = phases_of(trainer)
    assert len(phase) == 1 and phase[0]["phase"] == 1 and phase[0]["step"] == 1  # logged with its first step
    assert "reward" in phase[0] and "completions/mean_length" in phase[0]


def test_a_microbatch_without_loss_tokens_keeps_the_statistics_finite(tiny_model_dir, tmp_path):
    trainer = build(tiny_model_dir("gpt2"), str(tmp_path), train={"minibatch_size": 4},
                    method={"beta": 0.1, "mask_truncated_completions": True})
    exp = uneven_experience()
    exp.loss_mask[:4] = False  # every completion of the first microbatch was truncated
    trainer.policy.eval()
    stats = trainer.train_step(exp, torch.arange(8))
    for key in ("loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "policy/ratio_mean", "entropy"):
        assert torch.isfinite(torch.as_tensor(stats[key])), key


def test_entropy_is_the_mean_over_the_tokens_the_loss_counts(tiny_model_dir, tmp_path):
    from rlora.rollout.forward import forward_responses

    trainer = build(tiny_model_dir("gpt2"), str(tmp_path), train={"minibatch_size": 8},
                    method={"shared_prefix": False})
    exp = uneven_experience()
    exp.loss_mask[::2] = False
    trainer.policy.eval()
    with torch.no_grad():
        out = forward_responses(trainer.policy, exp.query_ids, exp.query_mask, exp.response_ids, exp.response_mask,
                                temperature=trainer.temperature, with_entropy=True)
    expected = out.entropy[exp.loss_mask].mean()
    stats = trainer.train_step(exp, torch.arange(8))
    assert float(stats["entropy"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(stats["entropy"]) != pytest.approx(float(out.entropy[exp.response_mask].mean()), rel=1e-3)


def test_reinforce_plus_plus_logs_its_reward_kl_under_its_own_name(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 2},
                               method={"beta": 0.1, "advantage_estimator": "reinforce++"})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    assert "kl" not in phases_of(trainer)[0] and "kl_in_reward" in phases_of(trainer)[0]
    assert not any("kl" in r for r in trainer.history if "loss" in r)  # the loss holds no KL term
