"""rlora.config: trlx defaults, unknown keys at every depth, overrides, YAML round trip, validation."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from peft import LoraConfig
from transformers import GPT2Config

from rlora.config import (Config, ModelConfig, PPOConfig, config_to_dict, load_config, save_config,
                          validate)

BASE = {"model": {"model_path": "some/model"}}


def with_base(data: dict) -> dict:
    """`data` plus a model_path, so only the part under test can fail."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    out.setdefault("model", {}).setdefault("model_path", "some/model")
    return out


# ---------------------------------------------------------------- defaults

PPO_DEFAULTS = {
    "ppo_epochs": 4, "num_rollouts": 128, "chunk_size": 128, "init_kl_coef": 0.001, "target": None,
    "horizon": 10000, "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 1.0,
    "scale_reward": "ignored", "ref_mean": None, "ref_std": None, "cliprange_reward": 10.0,
    "gen_kwargs": {"max_new_tokens": 40, "top_k": 0, "top_p": 1.0, "do_sample": True},
    "gen_experience_kwargs": None, "num_value_layers_unfrozen": 0,
}


@pytest.mark.parametrize(("key", "expected"), PPO_DEFAULTS.items(), ids=PPO_DEFAULTS.keys())
def test_ppo_defaults_match_trlx(key, expected):
    assert getattr(load_config(BASE).method, key) == expected


def test_optimizer_and_scheduler_defaults_match_trlx():
    config = load_config(BASE)
    assert config.optimizer.name == "adamw"
    assert config.optimizer.kwargs == {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-6}
    assert config.scheduler.name == "cosine_annealing"
    assert config.scheduler.kwargs == {"T_max": 1e12, "eta_min": 3e-5}
    assert (config.train.seq_length, config.train.batch_size, config.train.minibatch_size) == (1024, 128, None)
    assert config.tokenizer.padding_side == "left"


def test_default_instances_do_not_share_mutable_fields():
    a, b = Config(), Config()
    a.method.gen_kwargs["max_new_tokens"] = 3
    a.train.tags.append("x")
    assert b.method.gen_kwargs["max_new_tokens"] == 40 and b.train.tags == []


# ---------------------------------------------------------------- unknown keys

@pytest.mark.parametrize(("data", "bad", "suggestion"), [
    ({"methd": {}}, "methd", "method"),
    ({"method": {"gama": 0.9}}, "method.gama", "method.gamma"),
    ({"train": {"batch_sise": 8}}, "train.batch_sise", "train.batch_size"),
    ({"tokenizer": {"padding_sde": "left"}}, "tokenizer.padding_sde", "tokenizer.padding_side"),
    ({"method": {"gen_kwargs": {"max_new_tokens": 8, "top_kk": 0}}}, "method.gen_kwargs.top_kk",
     "method.gen_kwargs.top_k"),
    ({"method": {"gen_experience_kwargs": {"max_new_tokens": 8, "do_smaple": True}}},
     "method.gen_experience_kwargs.do_smaple", "method.gen_experience_kwargs.do_sample"),
    ({"model": {"peft_config": {"peft_type": "LORA", "lora_alpah": 16}}}, "model.peft_config.lora_alpah",
     "model.peft_config.lora_alpha"),
], ids=["section", "method-field", "train-field", "tokenizer-field", "gen_kwargs", "gen_experience_kwargs",
        "peft_config"])
def test_unknown_key_names_path_and_suggestion(data, bad, suggestion):
    with pytest.raises(ValueError, match="unknown config key") as err:
        load_config(with_base(data))
    assert f"'{bad}'" in str(err.value)
    assert f"'{suggestion}'" in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  model_path: x\nmethod:\n  gama: 0.9\n")
    with pytest.raises(ValueError, match=r"method\.gama.*method\.gamma"):
        load_config(path)


TRLX_PPO_YAML = """
train:
  seq_length: 1024
  epochs: 100
  total_steps: 10000
  batch_size: 32
  checkpoint_interval: 10000
  eval_interval: 100
  pipeline: "PromptPipeline"
  trainer: "AcceleratePPOTrainer"
  checkpoint_dir: "checkpoints/ppo_sentiments"
model:
  model_path: "lvwerra/gpt2-imdb"
  num_layers_unfrozen: 2
tokenizer:
  tokenizer_path: "gpt2"
  truncation_side: "right"
optimizer:
  name: "adamw"
  kwargs: {lr: 1.0e-4, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 1.0e-6}
scheduler:
  name: "cosine_annealing"
  kwargs: {T_max: 10000, eta_min: 1.0e-4}
method:
  name: "ppoconfig"
  num_rollouts: 128
  chunk_size: 128
  ppo_epochs: 4
  init_kl_coef: 0.05
  target: 6
  horizon: 10000
  gamma: 1
  lam: 0.95
  cliprange: 0.2
  cliprange_value: 0.2
  vf_coef: 1
  scale_reward: "ignored"
  ref_mean: null
  ref_std: null
  cliprange_reward: 10
  gen_kwargs: {max_new_tokens: 40, top_k: 0, top_p: 1.0, do_sample: True}
"""


def test_trlx_ppo_yaml_loads_unchanged(tmp_path):
    path = tmp_path / "ppo_config.yml"
    path.write_text(TRLX_PPO_YAML)
    config = load_config(path)
    assert (config.train.batch_size, config.model.num_layers_unfrozen, config.method.target) == (32, 2, 6.0)
    assert config.optimizer.kwargs["lr"] == 1e-4 and config.scheduler.kwargs["T_max"] == 10000


def test_free_form_dicts_are_not_key_checked():
    config = load_config(with_base({"model": {"model_extra_configs": {"anything": 1}},
                                    "optimizer": {"kwargs": {"lr": 1e-4, "foo": 2}}}))
    assert config.model.model_extra_configs == {"anything": 1}
    assert config.optimizer.kwargs == {"lr": 1e-4, "foo": 2}


def test_unknown_peft_type_suggests():
    with pytest.raises(ValueError, match="did you mean 'LORA'"):
        load_config(with_base({"model": {"peft_config": {"peft_type": "lora", "r": 8}}}))


# ---------------------------------------------------------------- overrides

@pytest.mark.parametrize(("override", "get", "expected"), [
    ("method.gamma=0.99", lambda c: c.method.gamma, 0.99),
    ("method.gamma=1", lambda c: c.method.gamma, 1.0),
    ("train.batch_size=16", lambda c: c.train.batch_size, 16),
    ("train.tags=[a,b]", lambda c: c.train.tags, ["a", "b"]),
    ("method.scale_reward=null", lambda c: c.method.scale_reward, None),
    ("method.target=6", lambda c: c.method.target, 6.0),
    ("optimizer.kwargs.lr=1e-4", lambda c: c.optimizer.kwargs["lr"], 1e-4),
    ("method.gen_kwargs.max_new_tokens=9", lambda c: c.method.gen_kwargs, {"max_new_tokens": 9, "top_k": 0,
                                                                            "top_p": 1.0, "do_sample": True}),
    ("model.peft_config.r=16", lambda c: c.model.peft_config, {"peft_type": "LORA", "r": 16}),
], ids=["float", "int-to-float", "int", "list", "null", "target", "sci-notation", "gen_kwargs-key", "peft-key"])
def test_override_applies(override, get, expected):
    source = with_base({"model": {"peft_config": {"peft_type": "LORA", "r": 8}}})
    value = get(load_config(source, [override]))
    assert value == expected and type(value) is type(expected)


def test_override_reaches_into_peft_config_object():
    source = Config(model=ModelConfig(model_path="x", peft_config=LoraConfig(r=8, task_type="CAUSAL_LM")))
    config = load_config(source, ["model.peft_config.r=16"])
    assert config.model.peft_config.r == 16
    assert source.model.peft_config.r == 8  # the source is copied, not mutated


@pytest.mark.parametrize(("override", "bad", "suggestion"), [
    ("method.gama=0.9", "method.gama", "method.gamma"),
    ("trian.seed=1", "trian", "train"),
    ("method.gen_kwargs.top_kk=3", "method.gen_kwargs.top_kk", "method.gen_kwargs.top_k"),
], ids=["field", "section", "gen_kwargs"])
def test_override_of_unknown_key_raises_with_suggestion(override, bad, suggestion):
    with pytest.raises(ValueError, match="unknown config key") as err:
        load_config(BASE, [override])
    assert f"'{bad}'" in str(err.value) and f"'{suggestion}'" in str(err.value)


@pytest.mark.parametrize("override", ["method.gamma", "=3"], ids=["no-equals", "no-key"])
def test_malformed_override_raises(override):
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(BASE, [override])


def test_override_into_null_dict_says_so():
    with pytest.raises(ValueError, match="model.peft_config=None"):
        load_config(BASE, ["model.peft_config.r=16"])


# ---------------------------------------------------------------- round trip

ROUND_TRIP_CASES = {
    "defaults": BASE,
    "lora-dict": with_base({"model": {"peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8,
                                                      "lora_alpha": 32, "lora_dropout": 0.1,
                                                      "target_modules": ["c_attn"]}}}),
    "changed": with_base({"train": {"tags": ["x", "y"], "minibatch_size": 32, "tracker": "tensorboard"},
                          "method": {"gamma": 0.99, "target": 6.0, "scale_reward": None,
                                     "gen_experience_kwargs": {"max_new_tokens": 8, "temperature": 0.7}},
                          "optimizer": {"kwargs": {"lr": 1.0e-5, "betas": [0.9, 0.999]}}}),
}


@pytest.mark.parametrize("data", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
def test_yaml_round_trip_is_identity(data, tmp_path):
    config = load_config(data)
    save_config(config, tmp_path / "sub" / "config.yaml")
    again = load_config(tmp_path / "sub" / "config.yaml")
    assert again == config
    assert config_to_dict(again) == config_to_dict(config)
    assert yaml.safe_load((tmp_path / "sub" / "config.yaml").read_text()) == config_to_dict(config)


def test_lora_config_object_is_kept_and_round_trips_to_equivalent_dict(tmp_path):
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj"]
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=modules, task_type="CAUSAL_LM")
    config = load_config(Config(model=ModelConfig(model_path="x", peft_config=lora)))
    assert config.model.peft_config == lora and isinstance(config.model.peft_config, LoraConfig)
    as_dict = config_to_dict(config)["model"]["peft_config"]
    assert as_dict["peft_type"] == "LORA" and type(as_dict["peft_type"]) is str
    assert as_dict["target_modules"] == sorted(modules)  # peft stores a set; saved sorted for stable YAML
    save_config(config, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.model.peft_config == as_dict
    assert config_to_dict(again) == config_to_dict(config)


def test_pretrained_config_model_path_round_trips(tmp_path):
    gpt2 = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, bos_token_id=1, eos_token_id=2)
    config = load_config(Config(model=ModelConfig(model_path=gpt2)))
    assert config.model.model_path == gpt2
    save_config(config, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert isinstance(again.model.model_path, GPT2Config) and again.model.model_path.n_layer == 2
    assert config_to_dict(again) == config_to_dict(config)


def test_yaml_sci_notation_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  model_path: x\noptimizer:\n  kwargs:\n    lr: 1e-5\nmethod:\n  init_kl_coef: 5e-2\n")
    config = load_config(path)
    assert config.optimizer.kwargs["lr"] == 1e-5 and config.method.init_kl_coef == 0.05


# ---------------------------------------------------------------- cross-field checks

CROSS_FIELD = {
    "minibatch-not-divisor": ({"train": {"batch_size": 8, "minibatch_size": 3}}, "train.minibatch_size"),
    "minibatch-too-big": ({"train": {"batch_size": 8, "minibatch_size": 16}}, "train.minibatch_size"),
    "minibatch-zero": ({"train": {"minibatch_size": 0}}, "train.minibatch_size"),
    "batch-size-zero": ({"train": {"batch_size": 0}}, "train.batch_size"),
    "gen-no-max-new-tokens": ({"method": {"gen_kwargs": {"top_k": 0}}}, "method.gen_kwargs.max_new_tokens"),
    "gen-too-long": ({"train": {"seq_length": 40}}, "method.gen_kwargs.max_new_tokens"),
    "gen-exp-too-long": ({"train": {"seq_length": 64}, "method": {"gen_experience_kwargs": {"max_new_tokens": 64}}},
                         "method.gen_experience_kwargs.max_new_tokens"),
    "gen-exp-no-max": ({"method": {"gen_experience_kwargs": {"do_sample": True}}},
                       "method.gen_experience_kwargs.max_new_tokens"),
    "num-return-sequences": ({"method": {"gen_kwargs": {"max_new_tokens": 8, "num_return_sequences": 4}}},
                             "method.gen_kwargs.num_return_sequences"),
    "eval-num-return-sequences": ({"method": {"eval_gen_kwargs": {"best_of": {"num_return_sequences": 2}}}},
                                  "method.eval_gen_kwargs.best_of.num_return_sequences"),
    "scale-reward": ({"method": {"scale_reward": "whiten"}}, "method.scale_reward"),
    "ppo-epochs": ({"method": {"ppo_epochs": 0}}, "method.ppo_epochs"),
    "num-rollouts": ({"method": {"num_rollouts": 0}}, "method.num_rollouts"),
    "chunk-size": ({"method": {"chunk_size": 0}}, "method.chunk_size"),
    "gamma-high": ({"method": {"gamma": 1.5}}, "method.gamma"),
    "gamma-negative": ({"method": {"gamma": -0.1}}, "method.gamma"),
    "lam-high": ({"method": {"lam": 1.01}}, "method.lam"),
    "cliprange": ({"method": {"cliprange": 0}}, "method.cliprange"),
    "cliprange-value": ({"method": {"cliprange_value": -1}}, "method.cliprange_value"),
    "horizon": ({"method": {"horizon": 0}}, "method.horizon"),
    "target": ({"method": {"target": 0}}, "method.target"),
    "init-kl-coef": ({"method": {"init_kl_coef": -0.1}}, "method.init_kl_coef"),
    "lr-zero": ({"optimizer": {"kwargs": {"lr": 0}}}, "optimizer.kwargs.lr"),
    "lr-missing": ({"optimizer": {"kwargs": {"eps": 1e-8}}}, "optimizer.kwargs.lr"),
    "optimizer-name": ({"optimizer": {"name": "adamw_8bit_bnb"}}, "optimizer.name"),
    "scheduler-name": ({"scheduler": {"name": "warmup"}}, "scheduler.name"),
    "padding-side": ({"tokenizer": {"padding_side": "middle"}}, "tokenizer.padding_side"),
    "truncation-side": ({"tokenizer": {"truncation_side": "both"}}, "tokenizer.truncation_side"),
    "tracker": ({"train": {"tracker": "mlflow"}}, "train.tracker"),
    "num-layers-unfrozen": ({"model": {"num_layers_unfrozen": -2}}, "model.num_layers_unfrozen"),
    "nothing-trainable": ({"model": {"num_layers_unfrozen": 0}}, "model.num_layers_unfrozen"),
    "peft-no-type": ({"model": {"peft_config": {"r": 8}}}, "model.peft_config"),
    "peft-task-type": ({"model": {"peft_config": {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM"}}},
                       "model.peft_config.task_type"),
    "ilql-trainer": ({"train": {"trainer": "AccelerateILQLTrainer"}}, "train.trainer"),
    "pipeline": ({"train": {"pipeline": "PromptPipelin"}}, "train.pipeline"),
    "method-name": ({"method": {"name": "ILQLConfig"}}, "method.name"),
    "seq2seq": ({"model": {"model_arch_type": "seq2seq"}}, "model.model_arch_type"),
    "model-dtype": ({"model": {"dtype": "float16"}}, "model.dtype"),
    "model-generation-dtype": ({"model": {"generation_dtype": "float16"}}, "model.generation_dtype"),
    "model-attention-dtype": ({"model": {"attention_dtype": "bfloat16"}}, "model.attention_dtype"),
    "adapter-compute-dtype": ({"model": {"adapter_compute_dtype": "bfloat16"}}, "model.adapter_compute_dtype"),
    "matmul-precision": ({"train": {"float32_matmul_precision": "bf16"}}, "train.float32_matmul_precision"),
    "model-path-empty": ({"model": {"model_path": ""}}, "model.model_path"),
    "model-path-int": ({"model": {"model_path": 3}}, "model.model_path"),
}


@pytest.mark.parametrize(("data", "key"), CROSS_FIELD.values(), ids=CROSS_FIELD.keys())
def test_cross_field_check_names_key(data, key):
    with pytest.raises(ValueError) as err:
        load_config(with_base(data))
    assert str(err.value).startswith(f"{key}=")


def test_messages_say_what_to_change():
    with pytest.raises(ValueError, match="one trainer for every method"):
        load_config(with_base({"train": {"trainer": "AccelerateILQLTrainer"}}))
    with pytest.raises(ValueError, match="divisor of 8"):
        load_config(with_base({"train": {"batch_size": 8, "minibatch_size": 3}}))


def test_missing_model_path_says_to_set_it():
    with pytest.raises(ValueError, match="set model.model_path"):
        load_config({})


def test_valid_edge_values_pass():
    config = load_config(with_base({"train": {"batch_size": 8, "minibatch_size": 2, "seq_length": 41},
                                    "method": {"gamma": 0.0, "lam": 1.0, "scale_reward": "running",
                                               "init_kl_coef": 0, "target": 6}}))
    assert config.train.minibatch_size == 2 and config.method.init_kl_coef == 0.0


def test_validate_checks_configs_built_in_python():
    config = Config(model=ModelConfig(model_path="x"), method=PPOConfig(gamma=2.0))
    with pytest.raises(ValueError, match=r"^method\.gamma=2\.0"):
        validate(config)
    with pytest.raises(TypeError, match="config.train is a dict"):
        validate(dataclasses.replace(config, train={"seed": 1}))


# ---------------------------------------------------------------- types

TYPE_ERRORS = {
    "str-for-float": ({"method": {"gamma": "abc"}}, "method.gamma", "float"),
    "float-for-int": ({"train": {"batch_size": 1.5}}, "train.batch_size", "int"),
    "bool-for-int": ({"train": {"seed": True}}, "train.seed", "int"),
    "int-for-str": ({"train": {"checkpoint_dir": 3}}, "train.checkpoint_dir", "str"),
    "list-item": ({"train": {"tags": ["a", 1]}}, "train.tags[1]", "str"),
    "dict-for-list": ({"train": {"tags": {"a": 1}}}, "train.tags", "list[str]"),
    "list-for-dict": ({"method": {"gen_kwargs": [1, 2]}}, "method.gen_kwargs", "dict"),
    "str-for-bool": ({"train": {"save_best": "yes please"}}, "train.save_best", "bool"),
    "section-not-mapping": ({"train": 3}, "train", "TrainConfig"),
    "max-new-tokens-float": ({"method": {"gen_kwargs": {"max_new_tokens": 8.5}}},
                             "method.gen_kwargs.max_new_tokens", "integer"),
}


@pytest.mark.parametrize(("data", "key", "expected"), TYPE_ERRORS.values(), ids=TYPE_ERRORS.keys())
def test_type_error_names_key_value_and_type(data, key, expected):
    with pytest.raises((TypeError, ValueError)) as err:
        load_config(with_base(data))
    assert str(err.value).startswith(f"{key}=") and expected in str(err.value)


def test_int_is_widened_for_float_fields():
    config = load_config(with_base({"method": {"gamma": 1, "cliprange_reward": 5}}))
    assert type(config.method.gamma) is float and config.method.cliprange_reward == 5.0
