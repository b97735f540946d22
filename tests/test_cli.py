"""The `rlora` command: `rlora train CONFIG.yaml overrides`, with the task named in the config."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import yaml

from rlora.cli import main
from rlora.data import load_prompts, resolve_function


def write_task(tmp_path):
    (tmp_path / "my_task.py").write_text(textwrap.dedent("""
        CALLS = []

        def reward(samples, prompts, outputs, tokenizer, topic=None, **_):
            CALLS.append(topic)
            return [o.count("s") / max(1, len(o)) for o in outputs]

        def lengths(samples, prompts, outputs, **_):
            return {"length": [float(len(o)) for o in outputs]}
    """))
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"text": t, "topic": i % 2})
                                                       for i, t in enumerate(["hello", "abc", "xyz", "the "])))
    return tmp_path


def test_rlora_train_from_yaml_with_overrides(tiny_model_dir, tmp_path):
    write_task(tmp_path)
    config = {
        "train": {"seq_length": 32, "batch_size": 8, "total_steps": 2, "eval_interval": 1000,
                  "run_dir": str(tmp_path / "run")},
        "model": {"model_path": tiny_model_dir("gpt2"), "peft_config": {"peft_type": "LORA", "r": 4}},
        "method": {"num_rollouts": 8, "chunk_size": 8, "ppo_epochs": 1,
                   "gen_kwargs": {"max_new_tokens": 4, "do_sample": True, "top_k": 0}},
        "task": {"reward_fn": f"{tmp_path}/my_task.py:reward", "metric_fn": f"{tmp_path}/my_task.py:lengths",
                 "prompts": str(tmp_path / "prompts.jsonl"), "prompt_field": "text", "stop_sequences": ["."]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "train.total_steps=3", "method.gen_kwargs.max_new_tokens=5"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert max(r["step"] for r in records) == 3
    assert "metrics/length" in records[0] and records[0]["metrics/length"] <= 5
    saved = yaml.safe_load(open(tmp_path / "run" / "ckpts" / "step_3" / "config.yaml"))
    assert saved["method"]["gen_kwargs"]["max_new_tokens"] == 5 and saved["task"]["prompt_field"] == "text"


def test_rlora_train_rejects_a_nested_typo_before_loading(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"model_path": "x"}, "method": {"gama": 0.9}}))
    with pytest.raises(ValueError, match="method.gama.*gamma"):
        main(["train", str(path)])


def test_prompt_sources(tmp_path):
    write_task(tmp_path)
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    rows = load_prompts(str(tmp_path / "prompts.jsonl"), field="text")
    assert rows[1] == {"prompt": "abc", "topic": 1}
    assert load_prompts("rlora.tasks.randomwalks:default_prompts")[:3] == ["b", "c", "d"]
    with pytest.raises(ValueError, match="needs a 'prompt' field holding text or a list of chat messages"):
        load_prompts(str(tmp_path / "prompts.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_function_specs(tmp_path):
    write_task(tmp_path)
    assert resolve_function(f"{tmp_path}/my_task.py:reward", "task.reward_fn").__name__ == "reward"
    assert resolve_function("os.path:join", "k") is os.path.join
    with pytest.raises(ValueError, match="'package.module:name'"):
        resolve_function("no_colon", "task.reward_fn")
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        resolve_function("os.path:nope", "task.reward_fn")
    with pytest.raises(TypeError, match="not a function"):
        resolve_function("os:sep", "task.reward_fn")


def test_rlora_eval_scores_a_checkpoint_without_writing_to_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    import rlora
    from rlora.trainer import PPOTrainer

    write_task(tmp_path)
    config = {
        "train": {"seq_length": 32, "batch_size": 8, "total_steps": 2, "eval_interval": 1000,
                  "run_dir": str(tmp_path / "run")},
        "model": {"model_path": tiny_model_dir("gpt2"), "peft_config": {"peft_type": "LORA", "r": 4}},
        "method": {"num_rollouts": 8, "chunk_size": 8, "ppo_epochs": 1, "init_kl_coef": 0.0,
                   "gen_kwargs": {"max_new_tokens": 4, "do_sample": True, "top_k": 0}},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 0.05}},
        "task": {"reward_fn": f"{tmp_path}/my_task.py:reward", "metric_fn": f"{tmp_path}/my_task.py:lengths",
                 "prompts": str(tmp_path / "prompts.jsonl"), "prompt_field": "text"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    checkpoint = tmp_path / "run" / "ckpts" / "step_2"
    files = {p: os.path.getmtime(p) for p in checkpoint.rglob("*")}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    evaluated = {}
    real_evaluate = PPOTrainer.evaluate

    def spy(self):
        evaluated.update(get_peft_model_state_dict(self.policy.lm))
        return real_evaluate(self)

    monkeypatch.setattr(PPOTrainer, "evaluate", spy)
    assert main(["eval", str(checkpoint), "method.gen_kwargs.do_sample=false"]) == 0
    monkeypatch.undo()
    saved = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    assert evaluated.keys() == saved.keys() and all(evaluated[k].equal(saved[k]) for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the zero init
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["step"] == 2 and {"reward/mean", "metrics/length"} <= set(record)
    assert {p: os.path.getmtime(p) for p in checkpoint.rglob("*")} == files
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    # greedy outputs of the trained policy, as a resumed trainer evaluates them in place
    trainer = rlora.build_trainer(config=str(checkpoint / "config.yaml"), verbose=False, overrides=[
        "method.gen_kwargs.do_sample=false", f"train.resume_from_checkpoint={checkpoint}",
        f"train.run_dir={tmp_path / 'resumed'}"])
    assert trainer.evaluate()["reward/mean"] == record["reward/mean"]


def test_rlora_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["eval", str(tmp_path / "nope")])


@pytest.mark.parametrize("rise, status", [(0.3, 0), (0.1, 1)], ids=["learned", "did-not-learn"])
def test_demo_task_oneword_runs_the_task_with_its_seed_and_checks_the_rise(monkeypatch, rise, status):
    from rlora.tasks import oneword

    calls = []

    def run(**kwargs):
        calls.append(kwargs)
        return {"correct": (0.4, 0.4 + rise)}

    monkeypatch.setattr(oneword, "run", run)
    assert main(["demo", "--task", "oneword", "--steps", "8", "--check"]) == status
    assert calls == [{"run_dir": None, "model_path": None, "seed": 0, "total_steps": 8}]
