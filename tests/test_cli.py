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
    with pytest.raises(ValueError, match="needs a string 'prompt' field"):
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
