"""Resolve what a config names: functions (`module:function`, `file.py:function`) and prompt
sources (lists, .txt/.jsonl files, `module:attribute`, `datasets:NAME[:SPLIT]`).

Naming code in a config runs it when training starts, as running a script would; loading a
config never imports anything it names.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable


def resolve_object(spec: str, key: str) -> Any:
    """The object named by `package.module:name` or `path/to/file.py:name`."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{key}={spec!r}: name an object as 'package.module:name' or 'path/to/file.py:name'")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise FileNotFoundError(f"{key}={spec!r}: no such file {where!r}")
        module_name = f"rlora_user_{os.path.splitext(os.path.basename(where))[0]}"
        loader_spec = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ImportError(f"{key}={spec!r}: cannot import {where!r} ({err}); check the module path "
                              "or give 'path/to/file.py:name'") from err
    if not hasattr(module, name):
        raise AttributeError(f"{key}={spec!r}: {where!r} has no attribute {name!r}")
    return getattr(module, name)


def resolve_function(spec: str | Callable | None, key: str) -> Callable | None:
    if spec is None or callable(spec):
        return spec
    fn = resolve_object(spec, key)
    if not callable(fn):
        raise TypeError(f"{key}={spec!r} names a {type(fn).__name__}, not a function")
    return fn


def load_prompts(source: Any, field: str = "prompt", key: str = "task.prompts") -> list[str | dict] | None:
    """Prompts from a list, a .txt/.jsonl file, `module:attribute` or `datasets:NAME[:SPLIT]`.

    Records (jsonl rows, dataset rows) become dicts whose `field` is the prompt and whose
    other keys are metadata passed to `reward_fn`.
    """
    if source is None or isinstance(source, list):
        return source
    if not isinstance(source, str):
        raise TypeError(f"{key}={source!r}: give a list, a file path, 'module:attribute' or 'datasets:NAME[:SPLIT]'")
    if source.startswith("datasets:") or source.endswith(".jsonl"):
        rows = load_rows(source, key)
        if source.startswith("datasets:") and rows and field not in rows[0]:
            raise ValueError(f"{key}={source} has columns {sorted(rows[0])}; set task.prompt_field to one of them")
        return [_record(row, field, f"{source} row {i}") for i, row in enumerate(rows, 1)]
    if source.endswith(".txt"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{key}={source!r}: no such file")
        with open(source, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.rstrip("\n")]
    value = resolve_object(source, key)
    value = value() if callable(value) else value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{key}={source!r} gave a {type(value).__name__}; it must be (or return) a list of prompts")
    return list(value)


def load_rows(source: str, key: str) -> list[Any]:
    """The records of a .jsonl file (one JSON value a line) or of `datasets:NAME[:SPLIT]` (a hub
    dataset, or a directory written by `save_to_disk`; split default "train")."""
    if source.startswith("datasets:"):
        return _dataset_rows(source[len("datasets:"):], key)
    if not source.endswith(".jsonl"):
        raise ValueError(f"{key}={source!r}: give a .jsonl file or datasets:NAME[:SPLIT]")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{key}={source!r}: no such file")
    rows = []
    with open(source, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{source}:{i}: not valid JSON ({err.msg}); write one JSON object a line"
                                     ) from err
    return rows


def _record(row: Any, field: str, where: str) -> str | dict:
    """A jsonl row or dataset record as a prompt: `field` is the prompt (text or chat messages),
    the other keys its metadata."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or not isinstance(row.get(field), (str, list)):
        raise ValueError(f"{where}: each record needs a {field!r} field holding text or a list of chat messages "
                         "(task.prompt_field names it)")
    return {"prompt": row[field], **{k: v for k, v in row.items() if k != field}}


def _dataset_rows(spec: str, key: str) -> list[dict]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{key}=datasets:{spec} needs the datasets package: pip install datasets") from err
    name, _, split = spec.partition(":")
    if os.path.isdir(name):
        data = datasets.load_from_disk(name)
        data = data[split or "train"] if isinstance(data, datasets.DatasetDict) else data
    else:
        data = datasets.load_dataset(name, split=split or "train")
    return list(data)
