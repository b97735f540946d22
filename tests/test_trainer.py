"""The PPO loop on tiny models: ratio starts at 1, dropout off, rewards placed, things logged."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig

import rlora
from rlora.algo import AdaptiveKLController
from rlora.tiny import random_experience, tiny_ppo_config as tiny_run_config

PROMPTS = ["hello", "abc", "xyz", "the "]


def count_s(samples, prompts, outputs, tokenizer, **_):
    """Reward: the fraction of 's' characters in the output."""
    return [o.count("s") / max(1, len(o)) for o in outputs]


def steps_of(trainer, key):
    return [r[key] for r in trainer.history if key in r and "phase" not in r and not r.get("eval")]


MODES = {
    "lora": {},
    "prefix": {"peft_config": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)},
    "prompt": {"peft_config": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)},
    "hydra": {"peft_config": None, "num_layers_unfrozen": 1},
    "full": {"peft_config": None, "num_layers_unfrozen": -1},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_ratio_is_one_at_the_first_minibatch_of_each_phase(tiny_model_dir, tmp_path, mode):
    # lora_dropout=0.5 and GPT-2 dropout 0.3 would move the ratio if any PPO pass ran with dropout on
    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path), model=MODES[mode], train={"total_steps": 12})
    config["model"]["model_extra_configs"] = {"resid_pdrop": 0.3, "attn_pdrop": 0.3, "embd_pdrop": 0.3}
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    dev, approx_kl = steps_of(trainer, "policy/ratio_max_abs_dev"), steps_of(trainer, "policy/approx_kl")
    steps_per_phase = 2 * 2  # ppo_epochs x (num_rollouts / batch_size)
    firsts = range(0, len(dev), steps_per_phase)
    assert len(firsts) == 3
    for i in firsts:
        assert dev[i] <= 1e-5, (i, dev[i])
        assert abs(approx_kl[i]) <= 1e-10, (i, approx_kl[i])
    assert max(dev) > 1e-3  # later minibatches do see the updated policy


def test_ratio_exactly_one_when_rollout_pass_and_update_share_the_layout(tiny_model_dir, tmp_path):
    # one chunk, one batch, one microbatch: the first update sees the rollout pass's batch (shuffled rows)
    config = tiny_run_config(tiny_model_dir("llama"), str(tmp_path),
                             train={"batch_size": 16, "minibatch_size": 16, "total_steps": 4},
                             method={"chunk_size": 16, "ppo_epochs": 2})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    dev = steps_of(trainer, "policy/ratio_max_abs_dev")
    assert dev[0] == 0.0 and dev[2] == 0.0
    assert dev[1] > 0.0


def test_dropout_modules_are_in_eval_mode_in_every_ppo_pass(tiny_model_dir, tmp_path):
    seen = []
    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 2})

    def record(module, args):
        seen.append(module.training)

    from rlora.trainer import PPOTrainer

    original = PPOTrainer.learn

    def learn(self):
        for m in self.policy.modules():
            if isinstance(m, torch.nn.Dropout):
                m.register_forward_pre_hook(record)
        return original(self)

    PPOTrainer.learn = learn
    try:
        rlora.train(count_s, PROMPTS, config=config, verbose=False)
    finally:
        PPOTrainer.learn = original
    assert seen and not any(seen)


def test_microbatches_give_the_same_step_as_one_batch(tiny_model_dir, tmp_path):
    """The loss is divided by the number of microbatches: same update either way (equal lengths)."""
    from rlora.models import build_policy, load_tokenizer
    from rlora.config import load_config
    from rlora.rollout.prompts import normalize_prompts
    from rlora.trainer import PPOTrainer

    updates = []
    model_dir = tiny_model_dir("gpt2")  # built before seeding: the adapter init below must be the same each time
    for minibatch in (8, 4, 2):
        torch.manual_seed(0)
        config = load_config(tiny_run_config(model_dir, str(tmp_path / str(minibatch)),
                                             train={"minibatch_size": minibatch},
                                             model={"peft_config": {"peft_type": "LORA", "r": 4,
                                                                    "init_lora_weights": False}}))
        tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
        policy = build_policy(config.model, tokenizer)
        trainer = PPOTrainer(config, policy, tokenizer, count_s, normalize_prompts(PROMPTS),
                             normalize_prompts(PROMPTS), verbose=False)
        n = 8
        exp = random_experience(n, 3, 5, vocab_size=30)
        before = [p.detach().clone() for p in policy.trainable_parameters()]
        policy.eval()
        trainer.train_step(exp, torch.arange(n))
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(policy.trainable_parameters(), before)]))
    assert updates[0].abs().max() > 1e-4
    torch.testing.assert_close(updates[1], updates[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(updates[2], updates[0], rtol=0, atol=1e-6)


def test_history_metrics_file_and_kl_controller_once_per_phase(tiny_model_dir, tmp_path):
    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path / "run"),
                             train={"total_steps": 12, "eval_interval": 4},
                             method={"target": 0.5, "horizon": 100, "init_kl_coef": 0.2})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False, metric_fn=lambda samples, **_: {
        "length": [float(len(s)) for s in samples]})
    phases = [r for r in trainer.history if "phase" in r]
    assert [r["phase"] for r in phases] == [1, 2, 3]
    controller = AdaptiveKLController(0.2, target=0.5, horizon=100)
    for record in phases:  # the coefficient used in a phase is the one updated after the previous phase
        assert record["kl_ctl_value"] == pytest.approx(controller.value, rel=1e-12)
        controller.update(record["policy/kl"], n_steps=16)
    assert trainer.state.kl_ctl.value == pytest.approx(controller.value, rel=1e-12)
    evals = [r for r in trainer.history if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all("metrics/length" in r and "reward/mean" in r for r in evals)
    step = [r for r in trainer.history if "losses/total_loss" in r]
    assert [r["step"] for r in step] == list(range(1, 13))
    for key in ("losses/policy_loss", "losses/value_loss", "policy/approx_kl", "policy/clipfrac", "values/mean",
                "returns/mean", "learning_rate"):
        assert all(math.isfinite(r[key]) for r in step), key
    lines = [json.loads(x) for x in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
    assert lines == trainer.history
    assert os.path.isfile(os.path.join(tmp_path, "run", "reward.png"))
    assert os.path.isdir(os.path.join(tmp_path, "run", "ckpts", "step_12", "adapter"))


def test_dict_prompts_carry_metadata_and_dense_rewards(tiny_model_dir, tmp_path):
    calls = []

    def reward_fn(samples, prompts, outputs, tokenizer, target, **_):
        calls.append(target)
        # dense: +1 on each response token that is the prompt's target character
        return [[float(ch == t) for ch in o] for o, t in zip(outputs, target)]

    prompts = [{"prompt": p, "target": t} for p, t in zip(PROMPTS, "sabc")]
    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 4},
                             model={"peft_config": {"peft_type": "LORA", "r": 4}})
    trainer = rlora.train(reward_fn, prompts, config=config, verbose=False, stop_sequences=["."])
    assert calls and all(set(c) <= set("sabc") for c in calls)
    assert [len(c) for c in calls[:3]] == [4, 8, 8]  # the baseline eval, then two chunks of 8
    assert trainer.history[0]["eval"] and "reward/mean" in trainer.history[0]


def test_gen_experience_kwargs_drive_rollouts_and_gen_kwargs_drive_eval(tiny_model_dir, tmp_path):
    def reward_fn(samples, prompts, outputs, tokenizer, **_):
        return [0.0 for _ in outputs]

    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 4},
                             method={"gen_experience_kwargs": {"max_new_tokens": 3, "do_sample": True, "top_k": 0},
                                     "gen_kwargs": {"max_new_tokens": 9, "do_sample": False}})
    trainer = rlora.train(reward_fn, PROMPTS, config=config, verbose=False)
    phase = [r for r in trainer.history if "phase" in r][0]
    assert phase["response_length/mean"] <= 3
    assert max(len(o) for o in trainer.generate(PROMPTS)) > 3


@pytest.mark.parametrize("mode", ["lora", "hydra", "full"])
def test_ppo_runs_on_opt_with_a_projected_hidden_state(tiny_model_dir, tmp_path, mode):
    """opt-350m's shape: `word_embed_proj_dim` (16) != `hidden_size` (32), project_in/project_out."""
    config = tiny_run_config(tiny_model_dir("opt_proj"), str(tmp_path), model=MODES[mode])
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    losses = steps_of(trainer, "losses/total_loss")
    assert trainer.step == 4 and len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_eval_variants_with_more_new_tokens_stay_within_seq_length(tiny_model_dir, tmp_path):
    """Eval prompts leave room for the longest eval variant, not only for gen_kwargs' length."""
    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path), train={"seq_length": 32},
                             method={"eval_gen_kwargs": {"long": {"max_new_tokens": 20, "min_new_tokens": 20}}})
    trainer = rlora.build_trainer(lambda samples, **_: [0.0] * len(samples), ["a" * 30], eval_prompts=["b" * 30],
                                  config=config, verbose=False)
    assert max(len(ids) for ids in trainer.eval_prompt_ids) + 20 <= 32
    assert max(len(ids) for ids in trainer.prompt_ids) + 6 <= 32


def test_logged_learning_rate_is_the_rate_each_step_used(tiny_model_dir, tmp_path):
    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 4},
                             scheduler={"name": "linear", "kwargs": {"start_factor": 0.5, "end_factor": 0.0}})
    trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
    # LinearLR over total_iters = total_steps = 4 from lr 1e-2: step k uses 1e-2 * (0.5 - 0.5 * k / 4)
    assert steps_of(trainer, "learning_rate") == pytest.approx([5e-3, 3.75e-3, 2.5e-3, 1.25e-3], rel=1e-12)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0  # the schedule's end, for a step never taken


@pytest.mark.parametrize("precision", ["medium", None], ids=["medium", "unset"])
def test_float32_matmul_precision_is_set_for_the_process_only_when_asked(tiny_model_dir, tmp_path, precision):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # a user's own setting, which null leaves alone
        config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path),
                                 train={"float32_matmul_precision": precision})
        rlora.build_trainer(lambda samples, **_: [0.0] * len(samples), PROMPTS, config=config, verbose=False)
        assert torch.get_float32_matmul_precision() == (precision or "high")
    finally:
        torch.set_float32_matmul_precision(before)


def build_ppo(model_dir, run_dir, **sections):
    from rlora.config import load_config
    from rlora.models import build_policy, load_tokenizer
    from rlora.rollout.prompts import normalize_prompts
    from rlora.trainer import PPOTrainer

    torch.manual_seed(0)
    config = load_config(tiny_run_config(model_dir, run_dir, **sections))
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    return PPOTrainer(config, build_policy(config.model, tokenizer), tokenizer, count_s, normalize_prompts(PROMPTS),
                      normalize_prompts(PROMPTS), verbose=False)


def test_unequal_microbatches_weigh_by_their_share_of_the_batch(tiny_model_dir, tmp_path):
    """12 samples of uneven lengths as [12], [8, 4] or [4, 4, 4]: one gradient (the PPO loss is a
    mean over the batch's real tokens, so each microbatch counts by its tokens)."""
    model_dir = tiny_model_dir("gpt2")
    exp = random_experience(12, 3, 6, vocab_size=30)
    exp.response_mask = torch.arange(6)[None, :] < torch.tensor([6, 1, 4, 2, 5, 3, 6, 2, 1, 1, 2, 6])[:, None]
    exp.loss_mask = exp.response_mask.clone()
    grads = {}
    for minibatch in (12, 8, 4):
        trainer = build_ppo(model_dir, str(tmp_path / str(minibatch)),
                            train={"batch_size": 24, "minibatch_size": minibatch},
                            model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False}},
                            optimizer={"name": "sgd", "kwargs": {"lr": 1.0}})
        before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
        trainer.policy.eval()
        trainer.train_step(exp, torch.arange(12))
        grads[minibatch] = torch.cat([(b - p.detach()).flatten()
                                      for p, b in zip(trainer.policy.trainable_parameters(), before)])
    assert grads[12].abs().max() > 1e-4
    torch.testing.assert_close(grads[8], grads[12], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[4], grads[12], rtol=0, atol=1e-6)


def test_an_epochs_cap_below_total_steps_is_said_before_the_run_starts(tiny_model_dir, tmp_path):
    # 16 rollouts, batches of 8, 2 epochs: 4 optimizer steps a phase; 2 phases allow 8 of the 20 asked
    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 20, "epochs": 2})
    with pytest.warns(UserWarning, match=r"train\.epochs=2 .*8 optimizer steps.*train\.total_steps=20"):
        trainer = rlora.build_trainer(count_s, PROMPTS, config=config, verbose=False)
    assert trainer.total_steps == 8


def test_by_default_a_run_lasts_total_steps(tiny_model_dir, tmp_path, recwarn):
    # one optimizer step a phase: trlx's epochs=100 used to stop this run at step 100
    config = tiny_run_config(tiny_model_dir("gpt2"), str(tmp_path), train={"total_steps": 1000, "batch_size": 16},
                             method={"ppo_epochs": 1})
    trainer = rlora.build_trainer(count_s, PROMPTS, config=config, verbose=False)
    assert trainer.total_steps == 1000
    assert not [w for w in recwarn if "train.epochs" in str(w.message)]
