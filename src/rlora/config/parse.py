"""Parsing configs: YAML, dicts and dotted overrides into the sections, and the sections back
into plain data. The one place that builds sections from data; `validation` checks what it built."""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from rlora.config.sections import SECTIONS, Config, GRPOConfig, ModelConfig
from rlora.config.trl_names import legacy_value
from rlora.config.validation import check_value, is_instance, method_class, unknown_key, unknown_section_key, validate

PRETRAINED_KEY = "pretrained_config"  # model_path saved as {pretrained_config: {...}} means a config object
_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # YAML 1.1 reads `1e-5` as a string


def load_config(source: Config | dict | str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """A validated `Config` from a `Config` (deep-copied), a dict, or a YAML file path.

    `overrides` are `"a.b.c=value"` strings applied in order; values are parsed with
    `yaml.safe_load` (`method.gamma=0.99`, `train.tags=[a,b]`, `method.target=null`) and may reach
    into dict fields (`method.gen_kwargs.max_new_tokens=9`, `model.peft_config.r=16`).
    """
    if source is None:
        config = Config()
    elif isinstance(source, Config):
        config = copy.deepcopy(source)
    elif isinstance(source, dict):
        config = from_dict(Config, copy.deepcopy(source))
    elif isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            data = fix_yaml_floats(yaml.safe_load(f))
        config = from_dict(Config, data if data is not None else {})
    else:
        raise TypeError(f"config source must be a rlora.Config, a dict or a YAML path, got {type(source).__name__}")
    for text in overrides or []:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {text!r} must look like 'section.key=value', e.g. 'method.gamma=0.99'")
        _apply_override(config, key.strip().split("."), fix_yaml_floats(yaml.safe_load(raw)), text)
    validate(config)
    return config


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Section `cls` (or the whole `Config`) built from the mapping `data` found at key `path`,
    rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise TypeError(f"{path or 'config'}={data!r} must be a mapping of {cls.__name__} keys")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if cls is Config and key == "method" and isinstance(value, dict):
            kwargs[key] = from_dict(method_class(value.get("name", "PPOConfig")), value, full)
            continue
        if key not in hints:
            raise unknown_section_key(cls, full, hints)
        if cls is GRPOConfig:
            value = legacy_value(key, value)  # TRL's older `scale_rewards: true`
        if cls is ModelConfig and key == "model_path" and isinstance(value, dict) and set(value) == {PRETRAINED_KEY}:
            from transformers import AutoConfig
            value = AutoConfig.for_model(**value[PRETRAINED_KEY])
        kwargs[key] = check_value(hints[key], value, full, from_dict)
    return cls(**kwargs)


def _apply_override(config: Config, parts: list[str], value: Any, text: str) -> None:
    """Set the dotted key `parts` on `config` in place: dataclass fields, dict keys, or object attributes."""
    obj, path = config, ""
    for i, part in enumerate(parts):
        full, last = f"{path}.{part}" if path else part, i == len(parts) - 1
        if isinstance(obj, SECTIONS):
            hints = typing.get_type_hints(type(obj))
            if full == "method.name" and last:  # another method: a new section keeping the shared settings
                config.method = _switch_method(config.method, value)
                return
            if part not in hints:
                raise unknown_section_key(type(obj), full, hints)
            if last:
                if isinstance(obj, GRPOConfig):
                    value = legacy_value(part, value)  # TRL's older `scale_rewards=true`
                setattr(obj, part, check_value(hints[part], value, full, from_dict))
            else:
                obj = getattr(obj, part)
        elif isinstance(obj, dict):
            if last:
                obj[part] = value
            else:
                obj = obj.setdefault(part, {})
        elif obj is None or isinstance(obj, (str, int, float, bool, list)):
            raise ValueError(f"override {text!r}: {path}={obj!r} has no key {part!r}; "
                             f"set {path} to a mapping first" + (" (it is null)" if obj is None else ""))
        else:  # a PeftConfig / PretrainedConfig object: set its attribute
            if not hasattr(obj, part):
                raise unknown_key(full, [k for k in vars(obj) if not k.startswith("_")])
            if last:
                setattr(obj, part, value)
            else:
                obj = getattr(obj, part)
        path = full


def _switch_method(section: Any, name: Any) -> Any:
    """`section` as the method section `name` selects; settings both sections have, set away from
    their defaults, carry over (PPO's default 4 epochs do not become the group methods')."""
    cls = method_class(name)
    if isinstance(section, cls):
        section.name = name
        return section
    defaults = type(section)()
    shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(section)}
    kept = {key: copy.deepcopy(getattr(section, key)) for key in shared
            if key != "name" and getattr(section, key) != getattr(defaults, key)}
    return cls(**kept, name=name)


def fix_yaml_floats(data: Any) -> Any:
    """Turn strings like "1e-5" (floats in YAML 1.2, strings to PyYAML) into floats, recursively."""
    if isinstance(data, str) and _SCI_FLOAT.match(data):
        return float(data)
    if isinstance(data, dict):
        return {k: fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [fix_yaml_floats(v) for v in data]
    return data


def config_to_dict(config: Config) -> dict:
    """Plain data (dicts, lists, str, numbers, bool, None) that `save_config` writes and `load_config` reads.

    A peft `PeftConfig` becomes its `to_dict()` with enums as strings and sets as sorted lists;
    a `PretrainedConfig` model_path becomes `{"pretrained_config": config.to_dict()}`.
    """
    return _plain(config)


def _plain(value: Any) -> Any:
    if isinstance(value, SECTIONS):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=str)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if is_instance(value, "peft", "PeftConfig"):
        return _plain(value.to_dict())
    if is_instance(value, "transformers", "PretrainedConfig"):
        data = value.to_dict()
        data.pop("transformers_version", None)
        return {PRETRAINED_KEY: _plain(data)}
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    return value


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write `config` as YAML; `load_config(path)` gives an equal config back."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
