"""Checkpoints an older rlora wrote (tests/data/checkpoints-0.1, from tests/data/make_checkpoints_0_1.py
at commit 3d533dd) resume with today's code: mid-phase, with the run's history, and the groups that
version kept for a next phase discarded with a warning."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import rlora
from rlora.tiny import tiny_group_config, tiny_ppo_config

OLD = os.path.join(os.path.dirname(__file__), "data", "checkpoints-0.1")
PROMPTS = ["hello", "abc", "xyz", "the "]


def reward(samples, prompts, outputs, tokenizer, **_):
    return [1.0 if p == "abc" else o.count("s") + len(o) / 10 for p, o in zip(prompts, outputs)]


@pytest.mark.parametrize("name", ["ppo", "dapo"])
def test_an_older_checkpoint_resumes_mid_phase(tiny_model_dir, tmp_path, name):
    path = str(tmp_path / name)
    shutil.copytree(os.path.join(OLD, name), path)
    old_state = json.load(open(os.path.join(path, "trainer_state.json")))
    saved = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
    train = {"total_steps": 8, "run_dir": str(tmp_path / "run"), "resume_from_checkpoint": path}
    config = tiny_ppo_config(tiny_model_dir("gpt2"), "", train=train) if name == "ppo" else \
        tiny_group_config(tiny_model_dir("gpt2"), "", train=train,
                          method={"dynamic_sampling": True, "chunk_size": 16, "beta": 0.1})
    if name == "dapo":
        with pytest.warns(UserWarning, match="dynamic-sampling groups drawn beyond .* discarded"):
            trainer = rlora.build_trainer(reward, PROMPTS, config=config, verbose=False)
    else:
        trainer = rlora.build_trainer(reward, PROMPTS, config=config, verbose=False)
    assert trainer.step == old_state["step"] and trainer.state.pending.cursor == old_state["pending_phase"]["cursor"]
    assert trainer.history[:len(old_state["history"])] == old_state["history"]
    adapter = {k: v for k, v in trainer.policy.state_dict().items() if "lora_" in k}
    assert len(adapter) == len(saved) and all(any(torch.equal(v, w) for v in adapter.values())
                                              for w in saved.values())  # the saved adapter was loaded
    trainer.learn()
    assert trainer.step == 8 and trainer.phase == 2
    steps = [r for r in trainer.history if "grad_norm" in r and r["step"] > old_state["step"]]
    assert [r["step"] for r in steps] == list(range(old_state["step"] + 1, 9))
    assert all(r["skipped"] == 0.0 for r in steps)
