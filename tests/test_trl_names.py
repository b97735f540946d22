"""TRL's GRPOConfig names in rlora configs: the equivalent or the reason, not a spelling guess."""

from __future__ import annotations

import dataclasses
import typing
import warnings

import pytest

from rlora.config import Config, GRPOConfig, load_config, validate
from rlora.config.trl_names import GRPO_FIELDS, legacy_value, trl_key_hint

# The fields TRL 1.16.0 declares on GRPOConfig itself (trl/trainer/grpo_config.py), in its order.
TRL_1_16_GRPO_FIELDS = [
    "learning_rate", "model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "disable_dropout",
    "cast_lm_head_to_fp32", "remove_unused_columns", "num_generations", "num_generations_eval",
    "max_completion_length", "ds3_gather_for_generation", "shuffle_dataset", "pad_to_multiple_of",
    "generation_batch_size", "steps_per_generation", "temperature", "top_p", "top_k", "min_p", "generation_kwargs",
    "chat_template_kwargs", "repetition_penalty", "cache_implementation", "use_vllm", "vllm_mode", "vllm_model_impl",
    "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_server_host",
    "vllm_server_port", "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
    "vllm_max_model_length", "vllm_tensor_parallel_size", "beta", "num_iterations", "epsilon", "delta",
    "epsilon_high", "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
    "vespo_lambda_neg", "importance_sampling_level", "reward_weights", "multi_objective_aggregation",
    "scale_rewards", "loss_type", "mask_truncated_completions", "sync_ref_model", "ref_model_mixup_alpha",
    "ref_model_sync_steps", "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy", "entropy_coef_min",
    "entropy_coef_max", "entropy_coef_delta", "entropy_target", "max_tool_calling_iterations",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min", "off_policy_mask_threshold", "use_bias_correction_kl", "log_completions",
    "log_multimodal", "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo",
    "use_transformers_continuous_batching", "transformers_continuous_batching_config", "use_transformers_paged",
    "vllm_importance_sampling_cap",
]


def grpo(**method):
    return {"model": {"model_path": "x"}, "method": {"name": "GRPOConfig", **method}}


def test_every_trl_1_16_grpo_field_is_in_the_table():
    assert [name for name in TRL_1_16_GRPO_FIELDS if name not in GRPO_FIELDS] == []


def _resolves(path: str) -> bool:
    """`path` names a field of rlora's config (a GRPOConfig method), or a key inside a dict field."""
    cls: typing.Any = Config
    parts = path.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if cls is Config and part == "method":
            cls = GRPOConfig
            continue
        if part not in hints:
            return False
        tp = hints[part]
        if tp is dict or typing.get_origin(tp) is not None and dict in typing.get_args(tp):
            return i + 2 >= len(parts)  # a dict field, or one key inside it
        if not dataclasses.is_dataclass(tp):
            return i == len(parts) - 1
        cls = tp
    return False


@pytest.mark.parametrize("name", sorted(n for n, f in GRPO_FIELDS.items() if f.rlora), ids=str)
def test_each_equivalent_is_an_rlora_key(name):
    assert _resolves(GRPO_FIELDS[name].rlora), GRPO_FIELDS[name]


@pytest.mark.parametrize("name", sorted(n for n, f in GRPO_FIELDS.items() if not f.rlora), ids=str)
def test_each_field_rlora_does_not_run_says_why(name):
    assert len(GRPO_FIELDS[name].note) > 20


@pytest.mark.parametrize("key, value, expected, misleading", [
    ("num_iterations", 2, r"'method.num_iterations' is TRL's GRPOConfig.num_iterations; rlora's equivalent is "
                          r"'method.ppo_epochs'", "num_generations"),
    ("steps_per_generation", 4, r"equivalent is 'method.num_rollouts'.*train.minibatch_size x steps_per_generation",
     "num_generations"),
    ("generation_batch_size", 64, r"equivalent is 'method.num_rollouts'", "num_generations"),
    ("delta", 2.0, r"'method.delta' is TRL's GRPOConfig.delta, which rlora does not run: two-sided clipping",
     "beta"),
    ("max_completion_length", 64, r"equivalent is 'method.gen_kwargs.max_new_tokens'", None),
    ("reward_weights", [1.0, 0.5], r"equivalent is 'task.reward_weights'", None),
    ("learning_rate", 1e-6, r"equivalent is 'optimizer.kwargs.lr'", None),
    ("temperature", 0.7, r"equivalent is 'method.gen_kwargs.temperature'", None),
    ("use_vllm", True, r"which rlora does not run: rlora samples with transformers' generate", None),
], ids=["num_iterations", "steps_per_generation", "generation_batch_size", "delta", "max_completion_length",
        "reward_weights", "learning_rate", "temperature", "use_vllm"])
def test_trl_names_get_their_equivalent_not_a_spelling_guess(key, value, expected, misleading):
    with pytest.raises(ValueError, match=expected) as err:
        load_config(grpo(**{key: value}))
    if misleading:
        assert "did you mean" not in str(err.value) and misleading not in str(err.value)


def test_trl_names_in_other_sections_and_in_overrides():
    with pytest.raises(ValueError, match="'train.max_steps' is TRL's GRPOConfig.max_steps; .* 'train.total_steps'"):
        load_config({"model": {"model_path": "x"}, "train": {"max_steps": 10}})
    with pytest.raises(ValueError, match="'method.num_iterations' .* 'method.ppo_epochs'"):
        load_config(grpo(), overrides=["method.num_iterations=2"])
    with pytest.raises(ValueError, match="did you mean 'method.num_generations'"):  # a plain typo keeps its hint
        load_config(grpo(num_generation=4))


def test_a_key_of_the_other_method_is_still_named_as_such():
    with pytest.raises(ValueError, match="method.beta is a GRPOConfig key"):
        load_config({"model": {"model_path": "x"}, "method": {"beta": 0.1}})


def test_trl_key_hint_is_none_for_rlora_s_own_key_and_for_other_names():
    assert trl_key_hint("method.ppo_epochs") is None and trl_key_hint("method.gama") is None
    assert trl_key_hint("method.num_generations") is None  # already rlora's key: the same name


@pytest.mark.parametrize("value, expected", [(True, "group"), (False, "none"), ("batch", "batch")],
                         ids=["true", "false", "string"])
def test_scale_rewards_boolean_of_older_trl_loads_as_trl_maps_it(value, expected):
    assert load_config(grpo(scale_rewards=value)).method.scale_rewards == expected
    assert legacy_value("scale_rewards", value) == expected


def test_scale_rewards_boolean_on_a_built_config_names_the_string():
    config = Config(method=GRPOConfig(scale_rewards=True))
    config.model.model_path = "x"
    with pytest.raises(ValueError, match=r"method.scale_rewards=True is TRL's older boolean: use 'group'"):
        validate(config)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "dr_grpo"])
def test_gspo_with_a_token_sum_loss_warns_naming_the_paper_s_loss_type(loss_type):
    with pytest.warns(UserWarning, match=rf"importance_sampling_level='sequence' \(GSPO\) with "
                                         rf"loss_type='{loss_type}'.*by its length.*loss_type: grpo"):
        load_config(grpo(importance_sampling_level="sequence", loss_type=loss_type))


def test_gspo_with_the_paper_s_loss_type_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(grpo(importance_sampling_level="sequence", loss_type="grpo"))
        load_config(grpo(loss_type="dapo"))  # token level: dapo is the usual choice
