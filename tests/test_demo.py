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
