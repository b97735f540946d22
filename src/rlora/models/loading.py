"""Load the base model and tokenizer and build the policy's roles on them.

`model.model_path` names a base model, or a saved peft adapter directory (a checkpoint's
`adapter/`, an `rlora export --adapter-only` directory) whose training then continues on the base
its `adapter_config.json` names.

Everything here runs once at start-up; errors name the config key to change.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_config, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from rlora.models.activations import fuse_activations
from rlora.models.attention import float32_attention
from rlora.models.policy import POLICY, REFERENCE, REWARD, VALUE, Policy
from rlora.models.quantization import is_quantized, keep_trainable, quantization_config, require_bitsandbytes
from rlora.models.score_head import load_score_head
from rlora.models.trunk import hidden_width
from rlora.tools import resolve_chat_template

ADAPTER_CONFIG = "adapter_config.json"


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub name ("name" or "org/name")."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def _from_pretrained(loader: Any, path: str, what: str, key: str, **kwargs):
    if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"{key}={path!r}: no such directory; give a local model directory "
                                "or a hub name such as 'gpt2'")
    try:
        return loader.from_pretrained(os.path.expanduser(path), **kwargs)
    except OSError as err:
        raise OSError(f"{key}={path!r}: could not load the {what} ({err}). Give a local directory written by "
                      "save_pretrained, or a hub name with network access (or a warm cache).") from err


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")  # where configs keep it


def max_positions(config: PretrainedConfig) -> int | None:
    """The most positions a model's config names (None when it names none)."""
    text = config.get_text_config()
    return next((getattr(text, key) for key in POSITION_KEYS if isinstance(getattr(text, key, None), int)), None)


def check_positions(seq_length: int, config: PretrainedConfig) -> None:
    """Refuse a `train.seq_length` beyond the positions the model has (trlx's default 1024 against
    a small model), before a long prompt runs off its position embeddings mid-run."""
    positions = max_positions(config)
    if positions is not None and seq_length > positions:
        raise ValueError(f"train.seq_length={seq_length} is more than the {positions} positions this model has "
                         f"({type(config).__name__}); prompt plus response must fit in them: set train.seq_length to "
                         f"at most {positions}")


def adapter_dir(path: Any) -> str | None:
    """`path` expanded, if it is a local directory holding a saved peft adapter; else None."""
    if not isinstance(path, str) or not path:
        return None
    path = os.path.expanduser(path)
    return path if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) else None


def adapter_base_path(path: str) -> str:
    """The base model an adapter directory was trained on (`base_model_name_or_path`)."""
    config_file = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(config_file, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"model.model_path={path!r}: could not read {config_file} ({err}); "
                         "give an adapter directory written by peft's save_pretrained") from err
    if not isinstance(base, str) or not base:
        raise ValueError(f"model.model_path={path!r} is a peft adapter whose {ADAPTER_CONFIG} names no "
                         "base_model_name_or_path; set it there to the base model's directory or hub name")
    return base


def _default_tokenizer_path(model_path: Any) -> Any:
    """The model's path; for an adapter directory without tokenizer files, the checkpoint's
    `tokenizer/` beside it, else the adapter's base."""
    adapter = adapter_dir(model_path)
    if adapter is None or os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        return model_path
    sibling = os.path.join(os.path.dirname(os.path.abspath(adapter)), "tokenizer")
    if os.path.isfile(os.path.join(sibling, "tokenizer_config.json")):
        return sibling
    return adapter_base_path(adapter)


def load_tokenizer(tokenizer_config, model_path: Any, trust_remote_code: bool = False):
    """The tokenizer of `tokenizer.tokenizer_path` (default: the model's path; for an adapter
    directory, its own tokenizer, else its checkpoint's `tokenizer/`, else its base's).

    A tokenizer without a pad token (GPT-2's) pads with its EOS id. Padding is a matter of masks:
    every pass and every statistic reads `attention_mask` / `response_mask`, never the pad id,
    so a generated EOS stays a real, rewarded token. No token is added, so the base keeps its
    vocabulary and the adapter and a merged export load on the original base and tokenizer.
    """
    path = tokenizer_config.tokenizer_path or _default_tokenizer_path(model_path)
    if not isinstance(path, str):
        raise ValueError("tokenizer.tokenizer_path is not set and model.model_path is a config object; "
                         "set tokenizer.tokenizer_path to a tokenizer directory")
    key = "tokenizer.tokenizer_path" if tokenizer_config.tokenizer_path else "model.model_path"
    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer", key,
                                 trust_remote_code=trust_remote_code, **tokenizer_config.tokenizer_extra_configs)
    if tokenizer_config.chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(tokenizer_config.chat_template)
    tokenizer.padding_side = tokenizer_config.padding_side
    tokenizer.truncation_side = tokenizer_config.truncation_side
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer at {path!r} has no EOS token; set tokenizer.tokenizer_extra_configs."
                         "eos_token to the token that ends a response")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_config, model: PreTrainedModel | None = None) -> PreTrainedModel:
    """The Hugging Face causal LM named by `model.model_path` (a path, hub name or config object),
    or `model` when given (already loaded), its Python-composed tanh GELUs fused
    (`model.fused_activations`), its attention in the precision `model.attention_dtype` says, and
    its 4-bit layers kept on a differentiable kernel (`rlora.models.quantization.keep_trainable`).

    For a peft adapter directory, the base model it names (without the adapter).
    """
    model = keep_trainable(_load_base_model(model_config) if model is None else model)
    if model_config.fused_activations:
        fuse_activations(model)
    float32_attention(model_config.attention_dtype, model)
    return model


def _load_base_model(model_config) -> PreTrainedModel:
    if model_config.model_arch_type != "causal":
        raise ValueError(f"model.model_arch_type={model_config.model_arch_type!r} is not supported; "
                         "rlora trains causal LMs (set it to 'causal')")
    path = model_config.model_path
    extra = {"dtype": _torch_dtype(model_config.dtype), **model_config.model_extra_configs}
    if model_config.quantization is not None:  # a 4-bit (or 8-bit) base: rlora.models.quantization
        extra["quantization_config"] = quantization_config(model_config)
    elif _is_bitsandbytes(extra.get("quantization_config")):
        require_bitsandbytes("model.model_extra_configs.quantization_config")
    if isinstance(path, PretrainedConfig):
        if extra["dtype"] == "auto":  # a config object has no checkpoint precision of its own
            extra["dtype"] = torch.float32
        return AutoModelForCausalLM.from_config(path, trust_remote_code=model_config.trust_remote_code, **extra)
    if not isinstance(path, str) or not path:
        raise ValueError(f"model.model_path={path!r}: set it to a model directory, a hub name, "
                         "or a transformers config object (random init)")
    key = "model.model_path"
    adapter = adapter_dir(path)
    if adapter is not None:
        path, key = adapter_base_path(adapter), f"base_model_name_or_path (in {adapter}/{ADAPTER_CONFIG})"
    return _from_pretrained(AutoModelForCausalLM, path, "model", key,
                            trust_remote_code=model_config.trust_remote_code, **extra)


def _is_bitsandbytes(config: Any) -> bool:
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes" or isinstance(config, dict) and any(
        config.get(key) for key in ("load_in_4bit", "load_in_8bit"))


def _torch_dtype(name: str):
    """`model.dtype` as `from_pretrained` takes it: a torch dtype, or "auto"."""
    return name if name == "auto" else getattr(torch, name)


def resolve_peft_config(peft_config: PeftConfig | dict | None, key: str = "model.peft_config") -> PeftConfig | None:
    """A peft config object from an object or a plain dict, checked to fit a causal LM."""
    if peft_config is None:
        return None
    if isinstance(peft_config, dict):
        if "peft_type" not in peft_config:
            raise ValueError(f"{key} needs a 'peft_type' (e.g. 'LORA')")
        peft_config = get_peft_config(dict(peft_config))
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"{key} must be a peft PeftConfig or a dict, got {type(peft_config).__name__}")
    task_type = getattr(peft_config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    if task_type is None:
        peft_config.task_type = "CAUSAL_LM"
    elif task_type != "CAUSAL_LM":
        raise ValueError(f"{key}.task_type={task_type!r} does not fit a causal language model; "
                         "set task_type='CAUSAL_LM' (or leave it out)")
    return peft_config


def fit_to_tokenizer(base: PreTrainedModel, tokenizer) -> PreTrainedModel:
    """Grow `base`'s embeddings to the tokenizer's size (tokens the user added to it) and set its pad id."""
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    if base.generation_config is not None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    return base


def build_policy(model_config, tokenizer, value_head: bool = True, model: Any = None) -> Policy:
    """Load the base once and build the policy, reference and value roles on it (docs/design.md §1);
    `value_head=False` for the critic-free group methods.

    `model`, when given, is the model itself instead of `model.model_path`: a `PreTrainedModel`
    (the base), or a `PeftModel` whose adapter the policy trains on from its weights (an SFT
    adapter), as TRL's trainers take them."""
    if isinstance(model, PeftModel):
        return _policy_of_peft_model(model, model_config, tokenizer, value_head)
    adapter = adapter_dir(model_config.model_path)
    if adapter is not None and model_config.peft_config is not None:
        raise ValueError(f"model.model_path={model_config.model_path!r} is a saved peft adapter, whose training "
                         "continues with its own config, and model.peft_config is set too; drop model.peft_config "
                         "(or point model.model_path at the base model to train a new adapter)")
    peft_config = resolve_peft_config(model_config.peft_config)
    n_unfrozen = model_config.num_layers_unfrozen
    if adapter is None and peft_config is None and n_unfrozen == 0:
        raise ValueError("model.num_layers_unfrozen=0 without a peft_config leaves nothing to train but the value "
                         "head; set a peft_config, -1 (train all), or N > 0 (train the top N blocks)")
    base = fit_to_tokenizer(load_base_model(model_config, model), tokenizer)
    if adapter is not None or peft_config is not None:
        if n_unfrozen >= 0:
            warnings.warn(f"model.num_layers_unfrozen={n_unfrozen} is ignored with a peft adapter: the base stays "
                          "frozen. To train extra modules, list them in LoraConfig.modules_to_save.", stacklevel=2)
        base.requires_grad_(False)
        if peft_config is not None:
            size_virtual_tokens(peft_config, base)
        lm = load_trainable_adapter(base, adapter) if adapter is not None else get_peft_model(base, peft_config)
        return _adapter_policy(lm, model_config, value_head, started_from=adapter)
    if is_quantized(base):
        raise ValueError("the base is quantized, and quantized weights cannot train: without a peft adapter its own "
                         "blocks would; set model.peft_config (QLoRA), or load the base unquantized")
    if base.dtype != torch.float32:
        raise ValueError(f"model.dtype={model_config.dtype!r} loads the base in {base.dtype}, but without a peft "
                         "adapter its own weights train; train those in float32 (model.dtype: float32) or train an "
                         "adapter on the low-precision frozen base (model.peft_config)")
    for key in ("value_adapter", "reward_adapter"):
        if getattr(model_config, key) is not None:
            raise ValueError(f"model.{key} is set but the policy has no peft adapter (it trains "
                             f"{'its top blocks' if n_unfrozen > 0 else 'the whole model'}); a critic or reward "
                             "adapter shares the frozen base with a LoRA policy: set model.peft_config")
    if model_config.reference == "adapter":
        raise ValueError("model.reference='adapter' is a frozen copy of the adapter the policy starts from, but this "
                         "policy trains without a peft adapter; set model.reference: base")
    if n_unfrozen > 0:
        return Policy(base, "hydra", num_layers_unfrozen=n_unfrozen, value_head=value_head)
    return Policy(base, "full", value_head=value_head)


def _policy_of_peft_model(lm: PeftModel, model_config, tokenizer, value_head: bool) -> Policy:
    """The policy of a peft model given as it is: its active adapter trains on from its weights,
    as the policy's ("default"), on its base, frozen."""
    if model_config.peft_config is not None:
        raise ValueError("the model is a PeftModel, whose adapter trains on, and a peft config is given too; "
                         "merge and unload the adapter into its base first, or give no peft config")
    if lm.active_adapter != POLICY:
        raise ValueError(f"the PeftModel's active adapter is {lm.active_adapter!r}; rlora trains the adapter named "
                         f"{POLICY!r} (peft's default name): load it under that name")
    base = lm.get_base_model()
    load_base_model(model_config, base)  # fused activations and the attention precision, in place
    fit_to_tokenizer(base, tokenizer)
    for name, p in lm.named_parameters():
        p.requires_grad_(f".{POLICY}." in name or name.endswith(f".{POLICY}"))
    if lm.active_peft_config.is_prompt_learning:
        lm.prompt_encoder[POLICY].requires_grad_(True)
    return _adapter_policy(lm, model_config, value_head, started_from="the PeftModel given")


def _adapter_policy(lm: PeftModel, model_config, value_head: bool, started_from: str | None) -> Policy:
    """A policy that trains `lm`'s adapter, with its role adapters and, with `model.reference:
    adapter`, a frozen copy of the adapter it `started_from` as the KL reference."""
    policy = Policy(lm, "prompt" if lm.active_peft_config.is_prompt_learning else "adapter", value_head=value_head)
    if model_config.reference == "adapter":
        if started_from is None:
            raise ValueError("model.reference='adapter' is a frozen copy of the adapter the policy starts from, but "
                             "this policy starts from a fresh one (equal to the base); give model.model_path a saved "
                             "adapter (an SFT adapter), or set model.reference: base")
        add_reference_adapter(policy)
    add_role_adapters(policy, model_config)
    return policy


def add_reference_adapter(policy: Policy) -> None:
    """A frozen copy of the policy's adapter, as it is now, under the name `REFERENCE`: the KL
    reference of a run that starts from a trained adapter (TRL copies a PeftModel's adapter into
    a frozen reference adapter the same way), on the same base, not a second model."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    lm = policy.lm
    if policy.mode != "adapter":
        raise ValueError("model.reference='adapter' needs an adapter of LoRA's kind (LoRA, DoRA, LoHa, ...) beside "
                         "which a frozen copy can sit; prompt learning keeps model.reference: base")
    trainable = {name for name, p in lm.named_parameters() if p.requires_grad}
    lm.add_adapter(REFERENCE, copy.deepcopy(lm.peft_config[POLICY]))
    set_peft_model_state_dict(lm, get_peft_model_state_dict(lm, adapter_name=POLICY), adapter_name=REFERENCE)
    lm.set_adapter(POLICY)
    for name, p in lm.named_parameters():
        p.requires_grad_(name in trainable)


def size_virtual_tokens(peft_config: PeftConfig, base: PreTrainedModel) -> None:
    """Prompt tuning / p-tuning: virtual tokens as wide as the input embeddings they sit beside.

    peft sizes them to `hidden_size`, which is not the embedding width when a model projects its
    embeddings (OPT's `word_embed_proj_dim`, as opt-350m); prefix tuning's width is the attention's
    and stays as peft sets it.
    """
    if peft_config.is_prompt_learning and getattr(peft_config, "peft_type", None) != "PREFIX_TUNING" \
            and getattr(peft_config, "token_dim", None) is None:
        peft_config.token_dim = base.get_input_embeddings().embedding_dim


def load_trainable_adapter(base: PreTrainedModel, path: str) -> PeftModel:
    """The adapter saved at `path` on `base`, its weights trainable (peft loads adapters frozen
    unless told otherwise: trlx's loader left them so).

    peft refuses to load prompt-learning adapters as trainable, since a prefix saved through its
    projection MLP cannot be split back; those load frozen and their saved virtual-token
    embeddings are then trained directly.
    """
    config = PeftConfig.from_pretrained(path)
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type not in (None, "CAUSAL_LM"):
        raise ValueError(f"model.model_path={path!r} is a peft adapter for task_type={task_type!r}, not a causal "
                         "language model; give an adapter trained with task_type='CAUSAL_LM'")
    config.task_type = "CAUSAL_LM"  # peft's causal-LM wrapper, also for an adapter saved without a task type
    if not config.is_prompt_learning:
        return PeftModel.from_pretrained(base, path, config=config, is_trainable=True)
    lm = PeftModel.from_pretrained(base, path, config=config)
    lm.prompt_encoder[lm.active_adapter].requires_grad_(True)
    return lm


def add_role_adapters(policy: Policy, model_config) -> None:
    """Attach the critic adapter (`model.value_adapter`, trainable) and the reward adapter with
    its score head (`model.reward_adapter`, frozen) to the policy's peft model, beside its own.

    Afterwards the policy's adapter is the active one, and exactly the policy and critic
    adapters (and the value head) require gradients.
    """
    lm = policy.lm
    if model_config.value_adapter is None and model_config.reward_adapter is None:
        return
    ptype = getattr(lm.active_peft_config.peft_type, "value", lm.active_peft_config.peft_type)
    if policy.mode != "adapter" or ptype != "LORA":
        raise ValueError(f"model.value_adapter / model.reward_adapter need a LoRA policy adapter, not {ptype}: peft "
                         "combines adapters of one type on a model (and `rlora rm` writes LoRA). Use a LoRA "
                         "model.peft_config.")
    trainable = {name for name, p in lm.named_parameters() if p.requires_grad}
    if model_config.reward_adapter is not None:
        path = adapter_dir(model_config.reward_adapter)
        if path is None:
            raise FileNotFoundError(f"model.reward_adapter={model_config.reward_adapter!r} is not a directory "
                                    f"holding {ADAPTER_CONFIG}; give the --out directory of `rlora rm`")
        policy.reward_head = load_score_head(path, hidden_width(lm.get_base_model()), lm.get_base_model().device)
        _load_adapter(lm, path, REWARD, "model.reward_adapter", trainable=False)
    value = model_config.value_adapter
    if isinstance(value, str):
        path = adapter_dir(value)
        if path is None:
            raise FileNotFoundError(f"model.value_adapter={value!r} is not a directory holding {ADAPTER_CONFIG}; "
                                    "give a LoRA config, or a reward-adapter directory to start the critic from")
        _load_adapter(lm, path, VALUE, "model.value_adapter", trainable=True)
    elif value is not None:
        lm.add_adapter(VALUE, resolve_peft_config(value, "model.value_adapter"))
    lm.set_adapter(POLICY)
    critic = {id(p) for p in adapter_parameters(lm, VALUE)}
    for name, p in lm.named_parameters():
        p.requires_grad_(name in trainable or id(p) in critic)


def adapter_parameters(lm: PeftModel, name: str) -> list:
    """The parameters of the peft adapter `name` in every tuner layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [p for module in lm.modules() if isinstance(module, BaseTunerLayer)
            for attr in module.adapter_layer_names if name in getattr(module, attr)
            for p in getattr(module, attr)[name].parameters()]


def _load_adapter(lm: PeftModel, path: str, name: str, key: str, trainable: bool) -> None:
    config = PeftConfig.from_pretrained(path)
    if getattr(config.peft_type, "value", config.peft_type) != "LORA":
        raise ValueError(f"{key}={path!r} is a {config.peft_type} adapter; a critic or reward adapter must be LoRA "
                         "(as `rlora rm` writes)")
    config.task_type = "CAUSAL_LM"
    try:
        lm.load_adapter(path, adapter_name=name, is_trainable=trainable, peft_config=config)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"{key}={path!r} does not fit this base model ({err}); train it on model.model_path's "
                         "base (rlora rm --model ...)") from err
