"""Trackers: metrics.jsonl always; W&B goes offline without a key; plots are written."""

from __future__ import annotations

import json
import sys
import types

from rlora.tracking import Tracker, plot_history


def test_metrics_jsonl_and_resume_rewrite(tmp_path):
    tracker = Tracker(str(tmp_path), None)
    tracker.log({"step": 1, "a": 1.0})
    tracker.log({"step": 2, "a": 2.0})
    tracker.close()
    resumed = Tracker(str(tmp_path), None, history=[{"step": 1, "a": 1.0}])  # a checkpoint taken at step 1
    resumed.log({"step": 2, "a": 3.0})
    resumed.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 1, "a": 1.0},
                                                                              {"step": 2, "a": 3.0}]


def test_wandb_runs_offline_without_a_key(tmp_path, monkeypatch):
    calls = {}

    class Run:
        def log(self, numbers, step):
            calls.setdefault("log", []).append((numbers, step))

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.setdefault("init", kwargs) and Run() or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tracker = Tracker(str(tmp_path), "wandb", config={"x": 1}, project_name="p")
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    tracker.log({"step": 3, "reward/mean": 0.5, "note": "text is not logged"})
    tracker.close()
    assert calls["init"]["project"] == "p" and calls["init"]["config"] == {"x": 1}
    assert calls["log"] == [({"reward/mean": 0.5}, 3)] and calls["finished"]


def test_plots(tmp_path):
    history = [{"step": s, "rollout_scores/mean": s / 10, "policy/sqrt_kl": 0.1, "metrics/optimality": 0.5 + s / 100}
               for s in range(5)]
    written = plot_history(history, str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in written} == {"reward.png", "kl.png", "metrics.png"}


def test_group_method_plots(tmp_path):
    history = [{"step": s, "reward": s / 10, "loss": 0.1, "kl": 0.01, "completions/mean_length": 5.0,
                "frac_reward_zero_std": 0.25} for s in range(5)]
    written = plot_history(history, str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in written} == {"reward.png", "kl.png", "losses.png", "lengths.png",
                                                        "groups.png"}
