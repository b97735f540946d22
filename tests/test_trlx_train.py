"""trlx's own script shapes through `import rlora.trlx as trlx`, trained on tiny local models."""

from __future__ import annotations

import os
import sys
import types

import pytest

import rlora.trlx as trlx
from rlora.trlx.data.default_configs import TRLConfig, default_ppo_config

SCRIPTS = os.path.join(os.path.dirname(__file__), "trlx_scripts")


def test_trlx_yaml_with_every_section_trains(tiny_model_dir, tmp_path, monkeypatch):
    wandb_init = {}

    class Run:
        def log(self, numbers, step):
            pass

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: wandb_init.update(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with open(os.path.join(SCRIPTS, "ppo_tiny.yml"), encoding="utf-8") as f:
        text = f.read()
    path = tmp_path / "ppo.yml"
    path.write_text(text.replace("MODEL", tiny_model_dir("gpt2")))
    config = TRLConfig.load_yaml(path).evolve(train=dict(run_dir=str(tmp_path / "run"), tracker="wandb"))

    def reward_fn(samples, prompts, outputs, tokenizer, **kwargs):
        return [float(o.count("a")) for o in outputs]

    trainer = trlx.train(reward_fn=reward_fn, prompts=["ab", "hello", "xyz"], config=config)
    assert trainer.step == 2
    # max_length = min_length = 12 over a longest prompt of 5 tokens: 7 new tokens, EOS held back before the 7th
    assert trainer.config.method.gen_kwargs == {"max_new_tokens": 7, "min_new_tokens": 7, "top_k": 0.0,
                                                "top_p": 1.0, "do_sample": True}
    phases = [r["response_length/mean"] for r in trainer.history if "response_length/mean" in r]
    assert phases and set(phases) == {7.0}  # every response exactly 7 tokens: 5 + 7 fits max_length
    assert trainer.config.method.scale_reward == "ignored"
    assert (wandb_init["name"], wandb_init["project"]) == ("tiny-run", "trlx")  # train.run_name reaches wandb
    assert config.method.gen_kwargs["max_length"] == 12  # the caller's config is left as it was


def test_model_path_argument_and_trlx_s_reward_and_metric_arguments(tiny_model_dir, tmp_path):
    seen = {}

    def reward_fn(**kwargs):
        seen.setdefault("reward", set(kwargs))
        return [0.0] * len(kwargs["samples"])

    def metric_fn(**kwargs):
        seen.setdefault("metric", set(kwargs))
        return {"n": [1.0] * len(kwargs["samples"])}

    model = tiny_model_dir("gpt2")
    config = default_ppo_config().evolve(
        train=dict(seq_length=16, batch_size=4, total_steps=1, tracker=None, run_dir=str(tmp_path)),
        model=dict(num_layers_unfrozen=-1, peft_config={"peft_type": "LORA", "r": 2}),  # lvwerra/gpt2-imdb
        tokenizer=dict(tokenizer_path=model),
        method=dict(num_rollouts=4, chunk_size=4, ppo_epochs=1, gen_kwargs=dict(max_new_tokens=3)))
    trainer = trlx.train(model_path=model, reward_fn=reward_fn, metric_fn=metric_fn,
                         prompts=[{"prompt": "ab", "topic": "x"}] * 4, config=config)
    assert trainer.config.model.model_path == model and config.model.model_path == "lvwerra/gpt2-imdb"
    # a reward_fn(**kwargs) gets trlx's keywords, and TRL's beside them (it could be written for either)
    assert {"samples", "prompts", "outputs", "tokenizer", "topic"} <= seen["reward"]
    assert seen["reward"] - {"samples", "prompts", "outputs", "tokenizer", "topic"} == {
        "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
    assert seen["metric"] == {"samples", "prompts", "outputs", "topic"}


def test_trlx_default_hub_names_fail_clearly_offline(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against an absent network
    config = default_ppo_config().evolve(train=dict(tracker=None, run_dir=str(tmp_path)))
    # trlx's defaults name hub models; without network rlora's loader names the key and the fix
    expected = "(?s)tokenizer.tokenizer_path='gpt2': could not load the tokenizer.*Give a local directory"
    with pytest.raises(OSError, match=expected):
        trlx.train(reward_fn=lambda samples, **kwargs: [0.0] * len(samples), config=config)
    with pytest.warns(UserWarning, match="no config given; using default_ppo_config"), \
            pytest.raises(OSError, match="gpt2"):
        trlx.train(reward_fn=lambda samples, **kwargs: [0.0] * len(samples), model_path=tiny_model_dir("gpt2"))
