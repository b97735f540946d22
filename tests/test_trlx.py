"""rlora.trlx's configs: trlx's classes, defaults, sweep updates and YAML files, with every key checked."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import yaml

import rlora
from rlora.config import load_config
from rlora.trlx import api as trlx_api
from rlora.trlx.data import configs as trlx_configs
from rlora.trlx.data.default_configs import (
    ModelConfig,
    PPOConfig,
    TrainConfig,
    TRLConfig,
    default_ilql_config,
    default_ppo_config,
    default_sft_config,
)

TRLX_YAML_PATH = os.path.join(os.path.dirname(__file__), "trlx_scripts", "ppo_tiny.yml")


def test_default_ppo_config_has_trlx_values():
    config = default_ppo_config()
    assert isinstance(config, rlora.Config) and isinstance(config, TRLConfig)
    t, m, p = config.train, config.model, config.method
    assert (t.seq_length, t.epochs, t.total_steps, t.batch_size, t.checkpoint_interval, t.eval_interval) == \
        (1024, 100, 10000, 32, 10000, 100)
    assert (t.tracker, t.project_name, t.pipeline, t.trainer, t.seed) == \
        ("wandb", "trlx", "PromptPipeline", "AcceleratePPOTrainer", 1000)
    assert (m.model_path, m.num_layers_unfrozen, config.tokenizer.tokenizer_path) == ("lvwerra/gpt2-imdb", 2, "gpt2")
    assert config.optimizer.kwargs == {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-6}
    assert config.scheduler.kwargs == {"T_max": 1e12, "eta_min": 3e-5}
    assert (p.num_rollouts, p.chunk_size, p.ppo_epochs, p.init_kl_coef, p.target, p.horizon, p.gamma, p.lam,
            p.cliprange, p.cliprange_value, p.vf_coef, p.scale_reward, p.cliprange_reward) == \
        (128, 128, 4, 0.001, None, 10000, 1.0, 0.95, 0.2, 0.2, 1.0, "ignored", 10.0)
    assert p.gen_kwargs == {"max_new_tokens": 40, "top_k": 0, "top_p": 1.0, "do_sample": True}
    load_config(config)  # valid as it is


def test_trlx_train_config_defaults_are_trlx_s():
    train = TrainConfig(seq_length=10, epochs=1, total_steps=1, batch_size=2, checkpoint_interval=1,
                        eval_interval=1, pipeline="PromptPipeline", trainer="AcceleratePPOTrainer")
    assert (train.tracker, train.project_name, train.trainer_kwargs, train.run_name) == ("wandb", "trlx", {}, None)
    assert TRLConfig(train=train).train is train


def test_update_applies_dotted_and_nested_hparams_without_touching_the_base():
    base = default_ppo_config()
    hparams = json.loads('{"method.gamma": 0.9, "train": {"seed": 3}, "method.gen_kwargs.temperature": 0.7,'
                         ' "model.peft_config": {"peft_type": "LORA", "r": 4}}')
    config = TRLConfig.update(base, hparams)
    assert isinstance(config, TRLConfig) and isinstance(config.train, TrainConfig)
    assert (config.method.gamma, config.train.seed, config.model.peft_config) == \
        (0.9, 3, {"peft_type": "LORA", "r": 4})
    assert config.method.gen_kwargs == {"max_new_tokens": 40, "top_k": 0, "top_p": 1.0, "do_sample": True,
                                        "temperature": 0.7}  # merged into the dict (trlx dropped new keys)
    assert (base.method.gamma, base.train.seed, "temperature" in base.method.gen_kwargs) == (1.0, 1000, False)
    assert TRLConfig.update(base.to_dict(), hparams) == config  # trlx's sentiment scripts pass a dict


@pytest.mark.parametrize("key, message", [
    ("metod.gamma", "did you mean 'method'"),
    ("method.gama", "did you mean 'method.gamma'"),
    ("train.seeed", "did you mean 'train.seed'"),
    ("method.gen_kwargs.max_new_token", "did you mean 'method.gen_kwargs.max_new_tokens'"),
    ("seed", "give its dotted path, e.g. 'train.seed'"),
], ids=["section", "field", "train-field", "gen-kwarg", "no-section"])
def test_update_rejects_typos_at_every_depth(key, message):
    with pytest.raises(ValueError, match=message):
        load_config(TRLConfig.update(default_ppo_config(), {key: 1}))


def test_evolve_to_dict_and_str_round_trip():
    config = default_ppo_config().evolve(method=dict(gamma=0.99, gen_kwargs=dict(max_new_tokens=100)))
    assert (config.method.gamma, config.method.gen_kwargs["max_new_tokens"], config.method.gen_kwargs["top_k"]) == \
        (0.99, 100, 0)
    assert TRLConfig.from_dict(config.to_dict()) == config
    assert json.loads(str(config)) == config.to_dict()


def test_trlx_yaml_with_every_section_loads(tmp_path):
    path = tmp_path / "ppo.yml"
    with open(TRLX_YAML_PATH, encoding="utf-8") as f:
        text = f.read()
    path.write_text(text.replace("MODEL", "some/model"))
    config = TRLConfig.load_yaml(path)
    assert (config.train.trainer, config.train.pipeline, config.train.run_name) == \
        ("AcceleratePPOTrainer", "PromptPipeline", "tiny-run")
    assert config.method.scale_reward == "ignored"  # trlx's `false`
    assert config.method.gen_kwargs["max_length"] == 12
    assert yaml.safe_load(text)["train"].keys() <= set(config.to_dict()["train"])


def test_old_orchestrator_key_is_read_or_refused():
    data = default_ppo_config().to_dict()
    data["train"]["orchestrator"] = "PPOOrchestrator"
    assert TRLConfig.from_dict(data).train.trainer == "AcceleratePPOTrainer"
    data["train"]["orchestrator"] = "OfflineOrchestrator"
    with pytest.raises(ValueError, match="train.orchestrator='OfflineOrchestrator'.*PPOOrchestrator"):
        TRLConfig.from_dict(data)


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"max_length": 48, "top_k": 0}, "method.gen_kwargs.max_length=48 .*set method.gen_kwargs.max_new_tokens"),
    ({"max_new_tokens": 8, "min_length": 4}, "method.gen_kwargs.min_length=4 .*min_new_tokens"),
], ids=["max_length", "min_length"])
def test_rlora_config_refuses_total_lengths_naming_the_new_token_keys(gen_kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_config({"model": {"model_path": "x"}, "method": {"gen_kwargs": gen_kwargs}})


def test_trainer_kwargs_must_be_empty():
    with pytest.raises(ValueError, match=r"train.trainer_kwargs=\{'logit_mask': 1\}.*set it to \{\}"):
        load_config({"model": {"model_path": "x"}, "train": {"trainer_kwargs": {"logit_mask": 1}}})


@pytest.mark.parametrize("longest, gen_kwargs, expected", [
    (4, {"max_length": 12, "min_length": 12, "top_k": 0}, {"max_new_tokens": 8, "min_new_tokens": 8, "top_k": 0}),
    (4, {"max_length": 12, "min_length": 3}, {"max_new_tokens": 8}),  # min already met by every prompt
    (1, {"max_length": 2}, {"max_new_tokens": 1}),
], ids=["both", "min-met", "one-token"])
def test_total_lengths_become_new_token_counts_over_the_longest_prompt(longest, gen_kwargs, expected):
    assert trlx_api.new_token_lengths(gen_kwargs, longest) == expected


def test_total_length_without_room_or_beside_max_new_tokens():
    with pytest.raises(ValueError, match=r"max_length=5 .*longest prompt \(5 tokens\).*max_new_tokens"):
        trlx_api.new_token_lengths({"max_length": 5}, 5)
    with pytest.warns(UserWarning, match="max_length=30 dropped because max_new_tokens=6"):
        assert trlx_api.new_token_lengths({"max_length": 30, "max_new_tokens": 6}, 4) == {"max_new_tokens": 6}


def test_as_rlora_config_translates_without_modifying_its_argument(monkeypatch):
    base = default_ppo_config()
    base.method.scale_reward = False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trlx_api, "_wandb_installed", lambda: False)
    with pytest.warns(UserWarning, match="train.tracker='wandb' .* wandb is not installed"):
        config = trlx_api.as_rlora_config(base, model_path="local/dir/model")
    assert (config.model.model_path, config.tokenizer.tokenizer_path, config.train.tracker) == \
        ("local/dir/model", "gpt2", None)
    # chunk_size counts what each process generates at once, in rlora as in trlx: it stays
    assert (config.method.num_rollouts, config.method.chunk_size, config.train.batch_size) == (256, 128, 64)
    assert config.method.scale_reward == "ignored"
    assert (base.model.model_path, base.train.batch_size, base.train.tracker) == ("lvwerra/gpt2-imdb", 32, "wandb")


def test_wandb_installed_keeps_the_tracker(monkeypatch):
    monkeypatch.setattr(trlx_api, "_wandb_installed", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trlx_api.as_rlora_config(default_ppo_config()).train.tracker == "wandb"


def test_generation_sweeps_are_refused_naming_eval_gen_kwargs():
    config = default_ppo_config().evolve(train=dict(tracker=None), method=dict(gen_kwargs=dict(temperature=[0.5, 1.0])))
    with pytest.raises(ValueError, match="gen_kwargs.temperature=.*method.eval_gen_kwargs"):
        trlx_api.as_rlora_config(config)


@pytest.mark.parametrize("kwargs", [{"dataset": ([], [])}, {"samples": ["a b"]}, {"samples": ["a"], "rewards": [1.0]}],
                         ids=["dataset", "samples", "samples-rewards"])
def test_offline_arguments_name_what_rlora_does_instead(kwargs):
    import rlora.trlx as trlx

    with pytest.raises(ValueError, match="offline training .* not implemented.*reward_fn=.*rlora sft.*rlora rm"):
        trlx.train(config=default_ppo_config(), **kwargs)


def test_no_config_and_no_reward_fn_is_refused():
    import rlora.trlx as trlx

    with pytest.raises(ValueError, match="give reward_fn="):
        trlx.train(prompts=["a"])


@pytest.mark.parametrize("fn", [default_ilql_config, default_sft_config], ids=["ilql", "sft"])
def test_ilql_and_sft_defaults_say_what_to_use(fn):
    with pytest.raises(NotImplementedError, match="rlora (rm|sft)"):
        fn()


def test_section_classes_are_rlora_s():
    assert ModelConfig is rlora.config.ModelConfig and PPOConfig is rlora.config.PPOConfig
    assert issubclass(trlx_configs.TrainConfig, rlora.config.TrainConfig)


# Every name trlx 0.7's examples import from trlx's modules (examples/**/*.py at 3340c2f).
TRLX_EXAMPLE_IMPORTS = [
    ("data.configs", "ModelConfig"), ("data.configs", "OptimizerConfig"), ("data.configs", "SchedulerConfig"),
    ("data.configs", "TokenizerConfig"), ("data.configs", "TrainConfig"), ("data.configs", "TRLConfig"),
    ("data.default_configs", "ModelConfig"), ("data.default_configs", "OptimizerConfig"),
    ("data.default_configs", "PPOConfig"), ("data.default_configs", "SchedulerConfig"),
    ("data.default_configs", "TokenizerConfig"), ("data.default_configs", "TrainConfig"),
    ("data.default_configs", "TRLConfig"), ("data.default_configs", "default_ppo_config"),
    ("data.default_configs", "ILQLConfig"), ("data.default_configs", "SFTConfig"),
    ("data.default_configs", "default_ilql_config"), ("data.default_configs", "default_sft_config"),
    ("data.default_configs", "default_nemo_1_3b_config"), ("data.default_configs", "default_nemo_2b_config"),
    ("data.default_configs", "default_nemo_20b_config"),
    ("models.modeling_ppo", "PPOConfig"), ("models.modeling_ilql", "ILQLConfig"),
    ("trainer.accelerate_rft_trainer", "RFTConfig"), ("trainer.accelerate_sft_trainer", "SFTConfig"),
    ("trainer.nemo_ppo_trainer", "PPOGPT"), ("trainer.nemo_ppo_trainer", "megatron_trainer"),
    ("trainer.nemo_ilql_trainer", "ILQLGPT"), ("trainer.nemo_ilql_trainer", "megatron_trainer"),
]


@pytest.mark.parametrize("module, name", TRLX_EXAMPLE_IMPORTS, ids=[f"{m}.{n}" for m, n in TRLX_EXAMPLE_IMPORTS])
def test_every_name_trlx_examples_import_is_importable(module, name):
    import importlib

    assert hasattr(importlib.import_module(f"rlora.trlx.{module}"), name)


def test_modeling_ppo_config_is_rlora_s():
    from rlora.trlx.models.modeling_ppo import PPOConfig as ModelingPPOConfig

    assert ModelingPPOConfig is rlora.config.PPOConfig
    config = TRLConfig(method=ModelingPPOConfig(name="PPOConfig", num_rollouts=8, chunk_size=8, ppo_epochs=1,
                                                init_kl_coef=0.01, target=None, horizon=10000, gamma=1, lam=0.95,
                                                cliprange=0.2, cliprange_value=0.2, vf_coef=1,
                                                scale_reward="ignored", ref_mean=None, ref_std=None,
                                                cliprange_reward=10, gen_kwargs=dict(max_new_tokens=8)))
    config.model.model_path = "some/model"
    load_config(config)


REFUSED = [
    ("data.default_configs", "ILQLConfig", "ILQLConfig: rlora implements online PPO only, not trlx's ILQL.*rlora rm"),
    ("models.modeling_ilql", "ILQLConfig", "ILQLConfig: rlora implements online PPO only"),
    ("trainer.accelerate_rft_trainer", "RFTConfig", "RFTConfig: .*rejection.*GRPOConfig"),
    ("trainer.accelerate_sft_trainer", "SFTConfig", "SFTConfig: .*rlora sft"),
    ("data.default_configs", "SFTConfig", "SFTConfig: .*rlora sft"),
    ("data.default_configs", "default_nemo_20b_config", "default_nemo_20b_config: .*NeMo.*default_ppo_config"),
    ("data.default_configs", "default_nemo_2b_config", "default_nemo_2b_config: .*NeMo"),
    ("data.default_configs", "default_nemo_1_3b_config", "default_nemo_1_3b_config: .*NeMo"),
    ("trainer.nemo_ppo_trainer", "PPOGPT", "PPOGPT: .*NeMo"),
    ("trainer.nemo_ppo_trainer", "megatron_trainer", "megatron_trainer: .*NeMo"),
    ("trainer.nemo_ilql_trainer", "ILQLGPT", "ILQLGPT: .*NeMo"),
]


@pytest.mark.parametrize("module, name, message", REFUSED, ids=[f"{m}.{n}" for m, n, _ in REFUSED])
def test_unsupported_trlx_names_refuse_at_use_with_the_reason(module, name, message):
    import importlib

    refused = getattr(importlib.import_module(f"rlora.trlx.{module}"), name)
    with pytest.raises(NotImplementedError, match=message):
        refused(name="ilqlconfig", tau=0.7)  # as trlx's examples call them, keywords and all
    assert refused.__doc__.startswith("Not available: ")
