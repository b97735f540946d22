"""The demo end to end: SFT (built in a temporary cache), PPO with LoRA, run directory."""

from __future__ import annotations

import json
import os

import pytest


@pytest.mark.slow
def test_demo_learns_randomwalks_and_leaves_a_run_directory(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlora.demo import run_demo

    summary = run_demo(total_steps=240, run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                       verbose=False)
    # measured: sampled 0.82 -> 0.99, greedy 0.85 -> 1.0 within 30 phases (240 steps)
    assert summary["sampled_optimality"][0] < 0.9
    assert summary["sampled_optimality"][1] >= 0.95
    assert summary["greedy_optimality"][1] == 1.0
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "summary.json", "reward.png", "kl.png", "metrics.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "summary.json").read_text())["optimizer_steps"] == 240
    adapter = os.path.join(summary["checkpoint"], "adapter")
    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "summary.json").read_text())["model_dir"])
    model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_sentiment_demo_on_a_tiny_model_prints_before_after_and_writes_a_summary(tiny_model_dir, tmp_path):
    """The sentiment demo's plumbing (SmolLM2 itself: tests/tasks/test_sentiment.py, slow)."""
    pytest.importorskip("vaderSentiment")
    from rlora.demo import run_sentiment_demo
    from rlora.tasks.sentiment import eval_prompts

    summary = run_sentiment_demo(total_steps=4, run_dir=str(tmp_path / "run"), verbose=False,
                                 model_dir=tiny_model_dir("llama"), eval_repeats=1, num_rollouts=32, chunk_size=32,
                                 gen_kwargs={"max_new_tokens": 4, "top_k": 0, "top_p": 1.0, "do_sample": True})
    assert summary["optimizer_steps"] == 4 and summary["rollout_phases"] == 2  # 2 epochs of one batch of 32 a phase
    for key in ("compound", "positive", "greedy/compound", "greedy/positive", "sample_compound"):
        before, after = summary[key]
        assert -1.0 <= before <= 1.0 and -1.0 <= after <= 1.0, key
    assert [row["prompt"] for row in summary["examples"]] == eval_prompts()[:8]
    assert all(isinstance(row["before"], str) and isinstance(row["after"], str) for row in summary["examples"])
    assert summary["eval_samples"] == summary["held_out_prompts"] == len(eval_prompts())
    assert set(summary["s_per_phase_parts"]) == {"rollout", "rollout_pass", "update"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["optimizer_steps"] == 4


# ---------------------------------------------------------------------------------------------
# --method grpo: the same tasks with GRPO, configs built without a model
# ---------------------------------------------------------------------------------------------


def demo_configs(task: str, method: str) -> dict:
    """The config a demo trains `task` with under `method`, at its default budget."""
    from rlora import demo
    from rlora.tasks import oneword, sentiment

    if task == "randomwalks":
        per_phase = demo.steps_per_phase(method)
        return demo.demo_config("some/model", "run", demo.PHASES * per_phase, eval_interval=10 * per_phase,
                                method=method)
    return (sentiment if task == "sentiment" else oneword).make_config("some/model", method=method)


@pytest.mark.parametrize("task", ["randomwalks", "sentiment", "oneword"])
def test_method_grpo_builds_a_group_config_with_the_ppo_demos_completions_phases_and_evaluation(task):
    from rlora.config import GRPOConfig, PPOConfig, load_config

    ppo, grpo = (load_config(demo_configs(task, method)) for method in ("ppo", "grpo"))
    assert isinstance(ppo.method, PPOConfig) and isinstance(grpo.method, GRPOConfig)
    g = grpo.method
    assert (g.num_generations, g.loss_type, g.beta, g.ppo_epochs, g.shared_prefix, g.dynamic_sampling) == \
        (8, "dapo", 0.0, 1, True, False)
    # the same completions per phase, sampled alike, and the same held-out evaluation
    assert g.num_rollouts == ppo.method.num_rollouts and g.chunk_size == ppo.method.chunk_size
    assert g.gen_kwargs == ppo.method.gen_kwargs and g.eval_gen_kwargs == ppo.method.eval_gen_kwargs
    assert grpo.train.seq_length == ppo.train.seq_length and grpo.model.peft_config == ppo.model.peft_config
    # one on-policy optimizer step a phase, over whole groups; as many phases as PPO's budget
    assert grpo.train.batch_size == g.num_rollouts and grpo.train.minibatch_size % g.num_generations == 0
    ppo_phases = ppo.train.total_steps // (ppo.method.ppo_epochs * ppo.method.num_rollouts // ppo.train.batch_size)
    assert grpo.train.total_steps == ppo_phases
    assert grpo.train.eval_interval * ppo.train.total_steps == ppo.train.eval_interval * grpo.train.total_steps
    assert grpo.model.value_adapter is None  # no critic
    assert grpo.optimizer.kwargs["lr"] >= ppo.optimizer.kwargs["lr"]


@pytest.mark.parametrize("task", ["randomwalks", "sentiment", "oneword"])
def test_unknown_method_is_refused_with_the_choices(task):
    with pytest.raises(ValueError, match="use one of ppo, grpo"):
        demo_configs(task, "dpo")


# what `rlora demo` reads of each task's summary, and a rise that passes / fails its --check
CHECKED = {"randomwalks": ("rlora.demo", "run_demo",
                           {"sampled_optimality": (0.8, 0.97), "greedy_optimality": (0.8, 1.0)},
                           {"sampled_optimality": (0.8, 0.9), "greedy_optimality": (0.8, 1.0)}),
           "sentiment": ("rlora.demo", "run_sentiment_demo", {"compound": (0.1, 0.4)}, {"compound": (0.1, 0.2)}),
           "oneword": ("rlora.tasks.oneword", "run", {"correct": (0.4, 0.7)}, {"correct": (0.4, 0.5)})}


@pytest.mark.parametrize("learned", [True, False], ids=["learned", "did-not-learn"])
@pytest.mark.parametrize("task", list(CHECKED))
def test_rlora_demo_method_grpo_runs_the_task_with_grpo_and_checks_the_rise(monkeypatch, task, learned):
    import importlib

    from rlora.cli import main

    module, name, rose, flat = CHECKED[task]
    calls = []

    def run(**kwargs):
        calls.append(kwargs)
        return rose if learned else flat

    monkeypatch.setattr(importlib.import_module(module), name, run)
    assert main(["demo", "--task", task, "--method", "grpo", "--check"]) == (0 if learned else 1)
    assert len(calls) == 1 and calls[0]["method"] == "grpo" and "total_steps" not in calls[0]  # GRPO's own budget


def test_sentiment_demo_with_grpo_on_a_tiny_model_logs_the_group_signals(tiny_model_dir, tmp_path):
    pytest.importorskip("vaderSentiment")
    from rlora.demo import run_sentiment_demo

    summary = run_sentiment_demo(total_steps=2, run_dir=str(tmp_path / "run"), verbose=False, method="grpo",
                                 model_dir=tiny_model_dir("llama"), eval_repeats=1, num_rollouts=16, chunk_size=16,
                                 gen_kwargs={"max_new_tokens": 4, "top_k": 0, "top_p": 1.0, "do_sample": True})
    assert summary["method"] == "grpo"
    assert summary["optimizer_steps"] == 2 and summary["rollout_phases"] == 2  # one step a phase
    assert len(summary["reward"]) == len(summary["frac_reward_zero_std"]) == 2
    assert all(0.0 <= f <= 1.0 for f in summary["frac_reward_zero_std"])
    assert summary["s_per_phase_parts"]["rollout_pass"] < summary["s_per_phase_parts"]["rollout"]  # no pass to run
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "grpo"
