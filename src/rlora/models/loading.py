"""Load the base model and tokenizer and build the policy's roles on them.

Everything here runs once at start-up; errors name the config key to change.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from peft import PeftConfig, get_peft_config, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from rlora.models.policy import Policy

DEFAULT_PAD_TOKEN = "<|pad|>"


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


def load_tokenizer(tokenizer_config, model_path: Any, trust_remote_code: bool = False):
    """The tokenizer of `tokenizer.tokenizer_path` (default: the model's path).

    A tokenizer without a pad token gets a new `<|pad|>` token rather than reusing EOS (trlx's
    choice), so that EOS stays a real, rewarded response token; `build_policy` grows the
    embeddings to match.
    """
    path = tokenizer_config.tokenizer_path or model_path
    if not isinstance(path, str):
        raise ValueError("tokenizer.tokenizer_path is not set and model.model_path is a config object; "
                         "set tokenizer.tokenizer_path to a tokenizer directory")
    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer", "tokenizer.tokenizer_path",
                                 trust_remote_code=trust_remote_code, **tokenizer_config.tokenizer_extra_configs)
    tokenizer.padding_side = tokenizer_config.padding_side
    tokenizer.truncation_side = tokenizer_config.truncation_side
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer at {path!r} has no EOS token; set tokenizer.tokenizer_extra_configs."
                         "eos_token to the token that ends a response")
    return tokenizer


def load_base_model(model_config) -> PreTrainedModel:
    """The Hugging Face causal LM named by `model.model_path` (a path, hub name or config object)."""
    if model_config.model_arch_type != "causal":
        raise ValueError(f"model.model_arch_type={model_config.model_arch_type!r} is not supported; "
                         "rlora trains causal LMs (set it to 'causal')")
    path = model_config.model_path
    extra = dict(model_config.model_extra_configs)
    if isinstance(path, PretrainedConfig):
        return AutoModelForCausalLM.from_config(path, trust_remote_code=model_config.trust_remote_code, **extra)
    if not isinstance(path, str) or not path:
        raise ValueError(f"model.model_path={path!r}: set it to a model directory, a hub name, "
                         "or a transformers config object (random init)")
    return _from_pretrained(AutoModelForCausalLM, path, "model", "model.model_path",
                            trust_remote_code=model_config.trust_remote_code, **extra)


def resolve_peft_config(peft_config: PeftConfig | dict | None) -> PeftConfig | None:
    """A peft config object from an object or a plain dict, checked to fit a causal LM."""
    if peft_config is None:
        return None
    if isinstance(peft_config, dict):
        if "peft_type" not in peft_config:
            raise ValueError("model.peft_config needs a 'peft_type' (e.g. 'LORA')")
        peft_config = get_peft_config(dict(peft_config))
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"model.peft_config must be a peft PeftConfig or a dict, got {type(peft_config).__name__}")
    task_type = getattr(peft_config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    if task_type is None:
        peft_config.task_type = "CAUSAL_LM"
    elif task_type != "CAUSAL_LM":
        raise ValueError(f"model.peft_config.task_type={task_type!r} does not fit a causal language model; "
                         "set task_type='CAUSAL_LM' (or leave it out)")
    return peft_config


def build_policy(model_config, tokenizer) -> Policy:
    """Load the base once and build the policy, reference and value roles on it (SPEC §1)."""
    peft_config = resolve_peft_config(model_config.peft_config)
    n_unfrozen = model_config.num_layers_unfrozen
    if peft_config is None and n_unfrozen == 0:
        raise ValueError("model.num_layers_unfrozen=0 without a peft_config leaves nothing to train but the value "
                         "head; set a peft_config, -1 (train all), or N > 0 (train the top N blocks)")
    base = load_base_model(model_config)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    if base.generation_config is not None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    if peft_config is not None:
        if n_unfrozen >= 0:
            warnings.warn(f"model.num_layers_unfrozen={n_unfrozen} is ignored with a peft_config: the base stays "
                          "frozen. To train extra modules, list them in LoraConfig.modules_to_save.", stacklevel=2)
        base.requires_grad_(False)
        lm = get_peft_model(base, peft_config)
        return Policy(lm, "prompt" if peft_config.is_prompt_learning else "adapter")
    if n_unfrozen > 0:
        return Policy(base, "hydra", num_layers_unfrozen=n_unfrozen)
    return Policy(base, "full")
