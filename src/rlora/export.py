"""`rlora export`: a checkpoint as a plain Hugging Face model, or as its peft adapter.

  rlora export run/ckpts/step_N OUT                  merged model + tokenizer (AutoModelForCausalLM)
  rlora export run/ckpts/step_N OUT --adapter-only   adapter + tokenizer (PeftModel.from_pretrained,
                                                     or model.model_path=OUT to train on)
  rlora export run/ckpts/step_N OUT --dtype bfloat16 the merged model in that precision

A run on a quantized base (`model.quantization`, QLoRA) merges its adapter into the base
dequantized (the very weights the 4-bit layers multiply by), never into 4-bit weights, which
would round the merged weight; the model is written in `--dtype` (default: `model.dtype`).

`OUT` is written under a temporary name beside it and renamed into place: it appears complete
or not at all, and an existing non-empty `OUT` is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence

ADAPTER, MODEL, TOKENIZER, CONFIG = "adapter", "model", "tokenizer", "config.yaml"
DTYPES = ("float32", "bfloat16", "float16")


def export(checkpoint: str, out: str, adapter_only: bool = False, dtype: str | None = None) -> str:
    """Write the policy of the rlora checkpoint directory `checkpoint` to `out`; returns `out`'s path.

    Default: a plain Hugging Face model directory. An adapter checkpoint is merged into the base
    model named by its `config.yaml` (`model.model_path`); a hydra or full checkpoint's `model/` is
    copied. `adapter_only=True`: the peft adapter directory as saved (LoRA and prompt learning).
    Either way the checkpoint's tokenizer goes beside it. `dtype` ("float32", "bfloat16",
    "float16"): the merged model's precision (default: as the base loads, dequantized for a
    quantized base).
    """
    checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
    out = os.path.abspath(os.path.expanduser(out))
    kind = _checkpoint_kind(checkpoint)
    _check_out(out)
    tokenizer_dir = os.path.join(checkpoint, TOKENIZER)
    if kind == MODEL:
        if adapter_only:
            raise ValueError(f"{checkpoint} holds a whole trained model (model/, hydra or full mode), not an "
                             "adapter; export it without --adapter-only")
        source = os.path.join(checkpoint, MODEL)
    if dtype is not None and (adapter_only or kind == MODEL):
        raise ValueError(f"dtype={dtype!r} sets the precision of a merged adapter export; drop it for "
                         f"{'--adapter-only' if adapter_only else 'a whole-model checkpoint (copied as saved)'}")
    if dtype not in (None, *DTYPES):
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    if kind == ADAPTER and adapter_only:
        source = os.path.join(checkpoint, ADAPTER)
    elif kind == ADAPTER:
        return _write_atomically(out, lambda tmp: _merge(checkpoint, tmp, dtype))

    def copy(tmp: str) -> None:  # the policy's adapter only: a critic adapter (adapter/value/) stays behind
        from rlora.models.policy import VALUE

        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(VALUE))
        shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)

    return _write_atomically(out, copy)


def _checkpoint_kind(checkpoint: str) -> str:
    """ADAPTER or MODEL, after checking that `checkpoint` is an rlora checkpoint directory."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist or is not a directory; give a checkpoint "
                                "directory such as run/ckpts/step_N")
    if os.path.isdir(os.path.join(checkpoint, ADAPTER)):
        kind = ADAPTER
    elif os.path.isdir(os.path.join(checkpoint, MODEL)):
        kind = MODEL
    else:
        hint = ""
        if os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
            hint = " It is a peft adapter directory; give the checkpoint directory that holds it."
        raise ValueError(f"{checkpoint} has no adapter/ or model/: not an rlora checkpoint (pick a directory like "
                         f"run/ckpts/step_N).{hint}")
    if not os.path.isdir(os.path.join(checkpoint, TOKENIZER)):
        raise ValueError(f"{checkpoint} has no tokenizer/: not a complete rlora checkpoint (a partial copy?); "
                         "export another checkpoint, e.g. an earlier step_N beside it")
    return kind


def _check_out(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; give a new directory, or remove it first")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory; give a new directory")


def _merge(checkpoint: str, tmp: str, dtype: str | None = None) -> None:
    """The adapter of `checkpoint` merged into its base (dequantized, for a quantized base),
    in `dtype` when given, saved with the tokenizer into `tmp`."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from rlora.config import load_config
    from rlora.models.loading import fit_to_tokenizer, load_base_model
    from rlora.models.quantization import dequantized, is_quantized

    adapter = os.path.join(checkpoint, ADAPTER)
    peft_config = PeftConfig.from_pretrained(adapter)
    if peft_config.is_prompt_learning:
        peft_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        raise ValueError(f"{checkpoint} holds a {peft_type} adapter: its virtual tokens are inputs, not weights, "
                         "and cannot be merged into the model; export with --adapter-only and load it with "
                         "PeftModel.from_pretrained")
    config_file = os.path.join(checkpoint, CONFIG)
    if not os.path.isfile(config_file):
        raise ValueError(f"{checkpoint} has no {CONFIG}, which names the base model to merge the adapter into; "
                         "export with --adapter-only")
    model_config = load_config(config_file).model
    if not isinstance(model_config.model_path, str):
        raise ValueError(f"the run of {checkpoint} started from a randomly initialised model (model.model_path was "
                         "a config object), whose weights no checkpoint holds; export with --adapter-only, or "
                         "train from a saved base model")
    tokenizer_dir = os.path.join(checkpoint, TOKENIZER)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=model_config.trust_remote_code)
    try:
        base = fit_to_tokenizer(load_base_model(model_config), tokenizer)
    except OSError as err:
        raise type(err)(f"{err} (the base model to merge the adapter of {checkpoint} into, as its {CONFIG} "
                        "names it; make it reachable, or export with --adapter-only)") from err
    if is_quantized(base):  # merge into the weights the run trained on, dequantized, not rounded to 4 bits again
        base = dequantized(base, torch.float32)
        dtype = dtype or ("float32" if model_config.dtype == "auto" else model_config.dtype)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    if dtype is not None:
        merged = merged.to(getattr(torch, dtype))
    merged.save_pretrained(tmp)
    shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)


def _write_atomically(out: str, write: Callable[[str], None]) -> str:
    """Run `write` on a fresh directory beside `out`, then rename it to `out` (missing or empty)."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users
        try:
            os.rename(tmp, out)  # replaces an empty directory, fails on a non-empty one
        except OSError as err:
            raise FileExistsError(f"could not move the export into {out} ({err}); was it filled meanwhile? "
                                  "Give a new directory") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rlora export`; returns the exit status (2 for a bad checkpoint or OUT)."""
    parser = argparse.ArgumentParser(
        prog="rlora export",
        description="Write a checkpoint's policy as a plain Hugging Face model (the adapter merged into its "
                    "base), or as its peft adapter.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory, e.g. run/ckpts/step_N")
    parser.add_argument("out", metavar="OUT", help="the directory to create (must not exist, or be empty)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the peft adapter and tokenizer instead of a merged model "
                             "(load with PeftModel.from_pretrained; needed for prompt/prefix tuning)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="the merged model's precision (default: the base's; a quantized base is "
                             "dequantized into model.dtype)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, adapter_only=args.adapter_only, dtype=args.dtype)
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    what = "adapter (PeftModel.from_pretrained)" if args.adapter_only else "model (AutoModelForCausalLM)"
    print(f"exported the {what} and tokenizer to {path}")
    return 0


__all__ = ["export", "export_main"]
