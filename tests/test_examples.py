"""The example scripts' code paths, on tiny locally saved models (the real runs are slow tests
and the README's figures)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sentiment_example_runs_on_a_local_model(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("vaderSentiment")
    example = load_example("sentiment")
    trainer = example.main(["--model", tiny_model_dir("llama"), "train.total_steps=4", "train.batch_size=8",
                            "train.minibatch_size=4", "method.num_rollouts=8", "method.chunk_size=8",
                            "method.gen_kwargs.max_new_tokens=6", f"train.run_dir={tmp_path / 'run'}"])
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    scores = [r["rollout_scores/mean"] for r in records if "phase" in r]
    evals = [r for r in records if r.get("eval")]
    assert trainer.step == 4 and len(scores) == 2
    assert all(-1.0 <= s <= 1.0 for s in scores)  # VADER's compound score
    assert all(0.0 <= r["metrics/positive"] <= 1.0 for r in evals)
    assert "held-out mean compound" in capsys.readouterr().out


METHOD_CONFIGS = sorted(f[:-5] for f in os.listdir(os.path.join(EXAMPLES, "methods")) if f.endswith(".yaml"))


def test_there_is_a_config_for_every_method():
    assert METHOD_CONFIGS == ["dapo", "dr_grpo", "grpo", "gspo", "ppo", "reinforce_pp", "rloo"]


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_each_method_config_trains_on_a_local_model(tiny_model_dir, tmp_path, name):
    """Each examples/methods config as `rlora train` reads it, on a tiny model: one phase."""
    pytest.importorskip("vaderSentiment")
    import rlora
    from rlora.config import GRPOConfig, load_config

    path = os.path.join(EXAMPLES, "methods", f"{name}.yaml")
    group = isinstance(load_config(path).method, GRPOConfig)
    model = tiny_model_dir("llama")
    per_phase = 16 if group else 8  # two prompts of 8 completions, or 8 rollouts
    trainer = rlora.train(config=path, verbose=False, overrides=[
        f"model.model_path={model}", f"tokenizer.tokenizer_path={model}", f"train.run_dir={tmp_path}",
        f"train.batch_size={per_phase}", f"train.minibatch_size={per_phase}", f"method.num_rollouts={per_phase}",
        f"method.chunk_size={per_phase}", "method.gen_kwargs.max_new_tokens=4",
        f"train.total_steps={trainer_steps(load_config(path))}", "task.eval_prompts=[a, b]"])
    phase = [r for r in trainer.history if "phase" in r]
    assert len(phase) == 1
    assert ("reward" if group else "rollout_scores/mean") in phase[0]


def trainer_steps(config):
    return config.method.ppo_epochs  # one batch per epoch: one phase
