"""Checkpoints: a directory written under a temporary name and renamed into place (docs/design.md
§7). A checkpoint holds the run state (`rlora.state.RunState`) and the `Parts` that own weights.

Layout of a checkpoint directory:
  adapter/                 the policy adapter in peft's format (adapter and prompt modes);
                           adapter/value/ the critic adapter, when there is one
  model/                   the trained model, save_pretrained (hydra and full modes)
  prompt_encoder.safetensors   prompt and prefix tuning: the trained prompt encoder (virtual-token
                           embeddings, prefix MLP), which adapter/ holds only as its output
  tokenizer/               the tokenizer (with any pad token rlora added)
  value_head.safetensors   the value head (PPO; group methods have none)
  optimizer.pt, scheduler.pt   their state dicts (tensors and plain data; loaded weights_only)
  rng.safetensors          the batch shuffle generator (the same on every process) and, for a phase
                           stopped between its optimizer steps, its batches
  rank_R.safetensors       process R's torch RNG states and, for a phase stopped between its
                           optimizer steps, its share of the experience
  rank_R.json              process R's python and numpy RNG states
  trainer_state.json       steps, KL coefficient, reward moments, ref stats, prompt-loader
                           position, history, run directory, number of processes
  config.yaml              the resolved config

Loading never unpickles arbitrary objects: tensors come from safetensors, optimizer and
scheduler state through `torch.load(weights_only=True)`, the rest from JSON and YAML.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlora import zero
from rlora.config import save_config
from rlora.models.policy import POLICY, VALUE
from rlora.models.sharding import full_optimizer_state, full_trainable_state, is_sharded, load_full_optimizer_state, \
    load_full_state, peft_saved_names
from rlora.rollout.store import Experience
from rlora.state import PhaseState, RunState

REQUIRED = ("trainer_state.json", "config.yaml", "rng.safetensors", "rank_0.json",
            "rank_0.safetensors")
PROMPT_ENCODER = "prompt_encoder.safetensors"


def step_dir(prefix: str) -> re.Pattern:
    """The names of step checkpoints: `prefix` then the step (`train.checkpoint_prefix`)."""
    return re.compile(rf"^{re.escape(prefix)}(\d+)$")


@dataclass
class Parts:
    """What a checkpoint saves and restores besides the run state."""

    policy: Any  # rlora.models.Policy: adapters, prompt encoder or model, value head
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    config: Any  # rlora.Config: written as config.yaml, read for checks on resume
    dist: Any  # rlora.distributed.Processes
    device: torch.device


def save(path: str, state: RunState, parts: Parts) -> str:
    """Write the run's checkpoint to `path` atomically; every process calls it.

    The main process makes a temporary directory beside `path`, each process adds its own
    state, and the main process writes the rest and renames the directory into place. A failed
    write (unwritable directory, disk full) removes the temporary files, leaves any previous
    checkpoint at `path` as it was and raises `OSError` saying so.
    """
    dist = parts.dist
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    tmp, error = None, None
    if dist.is_main:
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        except OSError as err:
            error = err
    tmp, error = dist.broadcast((tmp, error))
    gathered = _gather(parts) if error is None else None  # every process takes part
    if error is None:
        try:
            _write_rank(state, parts, tmp)
        except OSError as err:
            error = err
    errors = [e for e in dist.gather([error]) if e is not None]
    error = errors[0] if errors else None
    if dist.is_main:
        try:
            if error is not None:
                raise error
            _write(state, parts, tmp, gathered)
            old = None
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
                os.rename(path, os.path.join(old, "checkpoint"))
            os.rename(tmp, path)
            tmp = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            error = err
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    error = dist.broadcast(error)
    if error is not None:
        raise OSError(f"could not write the checkpoint {path}: {error}. Any previous checkpoint there is intact. "
                      "Free disk space or set train.checkpoint_dir / train.run_dir to a writable directory."
                      ) from error
    return path


def _write_rank(state: RunState, parts: Parts, directory: str) -> None:
    """This process's own state: RNG states and its share of a stopped phase's experience."""
    rank = parts.dist.rank
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    if state.pending is not None:
        tensors.update({f"exp.{name}": value for name, value in vars(state.pending.exp).items()})
    save_file(_contiguous(tensors), os.path.join(directory, f"rank_{rank}.safetensors"))
    numpy_state = np.random.get_state()
    with open(os.path.join(directory, f"rank_{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"python_rng": random.getstate(),
                   "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}, f)


def _gather(parts: Parts) -> dict[str, Any] | None:
    """A sharded run's trainable weights and optimizer state, or a ZeRO run's optimizer state,
    whole on the main process, in the layout a run on one process saves (`rlora.models.sharding`,
    `rlora.zero`); every process must call it. None when nothing is partitioned."""
    save_optimizer = parts.config.train.save_optimizer
    if is_sharded(parts.policy):  # the weights first: torch's optimizer gather fails before them (KeyError)
        weights = full_trainable_state(parts.policy)
        return {"weights": weights,
                "optimizer": full_optimizer_state(parts.policy, _inner(parts.optimizer)) if save_optimizer else None}
    partitioned = zero.zero_optimizer(parts.optimizer)
    if partitioned is not None:
        params = parts.policy.trainable_parameters()
        return {"weights": zero.full_trainable_state(parts.policy) if zero.partitions_weights(partitioned) else None,
                "optimizer": zero.full_optimizer_state(partitioned, params) if save_optimizer else None}
    return None


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _write(state: RunState, parts: Parts, directory: str, gathered: dict[str, Any] | None = None) -> None:
    policy = parts.policy
    weights = None if gathered is None else gathered["weights"]  # an FSDP2 or ZeRO-3 run's, gathered whole
    if policy.is_peft:  # the policy's adapter and the critic's; a reward adapter is frozen and stays where it is
        lm_weights = {} if weights is None else {"state_dict": _under(weights, "lm.")}
        policy.lm.save_pretrained(os.path.join(directory, "adapter"),
                                  selected_adapters=[POLICY] + ([VALUE] if policy.has_value_adapter else []),
                                  **lm_weights)
    else:
        policy.lm.save_pretrained(os.path.join(directory, "model"))
    if policy.mode == "prompt":
        save_file(_contiguous(policy.lm.prompt_encoder[POLICY].state_dict()), os.path.join(directory, PROMPT_ENCODER))
    parts.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    if policy.value_head is not None:
        head = policy.value_head.state_dict() if weights is None else _under(weights, "value_head.")
        save_file(_contiguous(head), os.path.join(directory, "value_head.safetensors"))
    if parts.config.train.save_optimizer:
        torch.save(parts.optimizer.state_dict() if gathered is None else gathered["optimizer"],
                   os.path.join(directory, "optimizer.pt"))
        torch.save(parts.scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
    pending = state.pending
    rng = {"shuffle": state.shuffle.get_state()}
    if pending is not None:
        rng.update({f"batch.{i}": batch for i, batch in enumerate(pending.batches)})
    save_file(_contiguous(rng), os.path.join(directory, "rng.safetensors"))
    data = {
        "processes": parts.dist.world,
        "step": state.step,
        "phase": state.phase,
        "run_dir": os.path.abspath(state.run_dir),
        "kl_ctl": state.kl_ctl.state_dict(),
        "running_moments": state.running.state_dict(),
        "ref_mean": state.ref_mean,
        "ref_std": state.ref_std,
        "prompt_loader": state.loader.state_dict(),
        "bad_steps": state.bad_steps,
        "best_reward": state.best_reward if np.isfinite(state.best_reward) else None,
        "pending_phase": None if pending is None else {"cursor": pending.cursor, "n_batches": len(pending.batches),
                                                       "stats": pending.stats},
        "history": state.history,
    }
    with open(os.path.join(directory, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    save_config(parts.config, os.path.join(directory, "config.yaml"))


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `tensors` whose names start with `prefix`, named without it."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def check(path: str) -> None:
    """Raise a clear error unless `path` is a complete rlora checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; give a checkpoint directory "
                                "(run_dir/ckpts/step_N) or 'latest'")
    missing = [name for name in REQUIRED if not os.path.exists(os.path.join(path, name))]
    if not (os.path.isdir(os.path.join(path, "adapter")) or os.path.isdir(os.path.join(path, "model"))):
        missing.append("adapter/ or model/")
    if missing:
        raise ValueError(f"{path} is not a complete rlora checkpoint: {', '.join(missing)} missing (a partial or "
                         "corrupt copy?). Resume from another checkpoint, e.g. an earlier step_N beside it.")


def _torch_load(path: str, device) -> dict:
    """A state dict of tensors and plain data; anything else (a pickled object that could run
    code) is refused, never executed."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refused to load {path}: it is not plain tensors and data (corrupt, or holding pickled "
                         "objects that could run code); nothing in it was executed. Resume from another checkpoint."
                         ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is corrupt ({err}); resume from another checkpoint") from err


def load(path: str, state: RunState, parts: Parts) -> None:
    """Restore everything `save` wrote into a fresh run's `state` and `parts` (same config)."""
    check(path)
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}/trainer_state.json is corrupt ({err}); resume from another checkpoint") from err
    dist = parts.dist
    if data["processes"] != dist.world:
        raise ValueError(f"{path} was written by {data['processes']} processes; an exact resume needs the same "
                         f"number, but this run has {dist.world}. Launch with {data['processes']}.")
    partitioned = zero.zero_optimizer(parts.optimizer)
    if partitioned is None:
        load_weights(parts.policy, path, parts.device)
    else:  # ZeRO: stage 3's weights whole while they load; the float32 masters, which its steps write back, after
        with zero.gathered(parts.policy.trainable_parameters(), modify=True):
            load_weights(parts.policy, path, parts.device)
        zero.refresh_master_weights(partitioned)
    device = _file_device(parts.device)
    if os.path.exists(os.path.join(path, "optimizer.pt")):
        saved = _torch_load(os.path.join(path, "optimizer.pt"), device)
        if is_sharded(parts.policy):  # each process keeps its shard of the whole state
            load_full_optimizer_state(parts.policy, _inner(parts.optimizer), saved)
        elif partitioned is not None:  # ZeRO: each process keeps its partition
            zero.load_full_optimizer_state(partitioned, parts.policy.trainable_parameters(), saved)
        else:
            parts.optimizer.load_state_dict(saved)
        schedule = _torch_load(os.path.join(path, "scheduler.pt"), "cpu")
        if dist.is_main:
            _warn_if_schedule_length_differs(schedule, parts.scheduler.state_dict(), parts.config, path)
        parts.scheduler.load_state_dict(schedule)
    rng = load_file(os.path.join(path, "rng.safetensors"))
    state.shuffle.set_state(rng["shuffle"])
    mine = load_file(os.path.join(path, f"rank_{dist.rank}.safetensors"))
    torch.set_rng_state(mine["rng.torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda_{i}" in mine:
                torch.cuda.set_rng_state(mine[f"rng.cuda_{i}"], i)
    with open(os.path.join(path, f"rank_{dist.rank}.json"), encoding="utf-8") as f:
        host_rng = json.load(f)
    random.setstate((host_rng["python_rng"][0], tuple(host_rng["python_rng"][1]), host_rng["python_rng"][2]))
    kind, keys, *rest = host_rng["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    state.step, state.phase = data["step"], data["phase"]
    state.kl_ctl.load_state_dict(data["kl_ctl"])
    state.running.load_state_dict(data["running_moments"])
    state.ref_mean, state.ref_std = data["ref_mean"], data["ref_std"]
    state.loader.load_state_dict(data["prompt_loader"])
    state.bad_steps = data["bad_steps"]
    state.best_reward = data["best_reward"] if data["best_reward"] is not None else -float("inf")
    state.history = data["history"]
    if not parts.config.train.run_dir:
        state.run_dir = data["run_dir"]
    if host_rng.get("buffer") is not None and dist.is_main:
        warnings.warn(f"{path} holds dynamic-sampling groups drawn beyond its last phase's need (an older rlora kept "
                      "them for the next phase); they are discarded, as the policy that sampled them has moved. The "
                      "resumed run draws fresh prompts instead, so it differs from the run that wrote it.")
    pending = data["pending_phase"]
    if pending is not None:
        exp = Experience(**{k[len("exp."):]: v for k, v in mine.items() if k.startswith("exp.")})
        batches = [rng[f"batch.{i}"] for i in range(pending["n_batches"])]
        state.pending = PhaseState(exp, batches, pending["cursor"], pending["stats"])


def _warn_if_schedule_length_differs(saved: dict, built: dict, config, path: str) -> None:
    """The schedule's length is part of its saved state, so a resume keeps the checkpoint's (an exact
    continuation); say so when this run's config asks for another length."""
    key = {"linear": "total_iters", "cosine_annealing": "T_max"}.get(config.scheduler.name)
    if key is None or key not in saved or saved[key] == built[key]:
        return
    source = f"scheduler.kwargs.{key}" if key in config.scheduler.kwargs else "train.total_steps"
    then = ""
    if key == "total_iters":
        then = (f", so after step {saved[key]} the rate stays at end_factor x lr = "
                f"{saved['end_factor'] * saved['base_lrs'][0]:g}")
    warnings.warn(f"{path} holds a {config.scheduler.name} learning-rate schedule of {key}={saved[key]} steps, but "
                  f"this run's config gives {key}={built[key]} (from {source}). The checkpoint's schedule is kept, "
                  f"as the run that wrote it would have continued{then}. To schedule over {built[key]} steps, start "
                  f"a new run with that length (a schedule cannot be stretched mid-run).")


def load_weights(policy, path: str, device: torch.device) -> None:
    """Put the trained weights of checkpoint `path` (adapters, prompt encoder or model, value head)
    into `policy`, in place (an optimizer built on its parameters keeps them)."""
    from peft import set_peft_model_state_dict

    device = _file_device(device)
    saved_critic = os.path.isdir(os.path.join(path, "adapter", VALUE))
    if policy.has_value_adapter != saved_critic:
        raise ValueError(f"{path} was written {'with' if saved_critic else 'without'} a critic adapter (adapter/"
                         f"{VALUE}/) but this run has {'one' if policy.has_value_adapter else 'none'}: set "
                         "model.value_adapter as the run that wrote it did")
    sharded: dict[str, torch.Tensor] | None = {} if is_sharded(policy) else None  # whole tensors, by parameter name
    try:
        if policy.mode == "prompt":  # peft's adapter/ holds the prompt encoder's output, not what trains
            if not os.path.isfile(os.path.join(path, PROMPT_ENCODER)):
                raise ValueError(f"{path} has no {PROMPT_ENCODER} (the trained prompt encoder): it was written "
                                 "by an older rlora; its adapter/ loads with PeftModel.from_pretrained, for inference")
            encoder = load_file(os.path.join(path, PROMPT_ENCODER), device=device)
            policy.lm.prompt_encoder[POLICY].load_state_dict(encoder, strict=True)
        elif policy.is_peft:
            adapters = [(POLICY, "adapter")]
            if policy.has_value_adapter:
                adapters.append((VALUE, os.path.join("adapter", VALUE)))
            for name, where in adapters:
                adapter = load_file(os.path.join(path, where, "adapter_model.safetensors"), device=device)
                if sharded is not None:  # peft's names mapped to the policy's parameters, loaded below with the head
                    names = peft_saved_names(policy.lm, name)
                    unexpected = sorted(set(adapter) - set(names))
                    sharded.update({f"lm.{names[k]}": v for k, v in adapter.items() if k in names})
                else:
                    unexpected = set_peft_model_state_dict(policy.lm, adapter, adapter_name=name).unexpected_keys
                if unexpected:
                    raise ValueError(f"the adapter in {path}/{where} does not fit the run's config (unexpected "
                                     f"{unexpected[:3]}); resume with the run's config")
        else:
            load_model_weights(policy.lm, os.path.join(path, "model"), device)
        head = os.path.join(path, "value_head.safetensors")
        if (policy.value_head is None) == os.path.isfile(head):
            raise ValueError(f"{path} was written {'with' if os.path.isfile(head) else 'without'} a value head (PPO "
                             "has one, the group methods none) but this run has "
                             f"{'none' if policy.value_head is None else 'one'}: resume with the method.name that "
                             "wrote it")
        if policy.value_head is not None and sharded is not None:
            sharded.update({f"value_head.{k}": v for k, v in load_file(head, device=device).items()})
        elif policy.value_head is not None:
            policy.value_head.load_state_dict(load_file(head, device=device))
        if sharded is not None:  # every process read the whole files; each keeps its shards
            load_full_state(policy, sharded)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"could not load the weights in {path} ({err}); is it a checkpoint of this config?") from err


def load_model_weights(model, directory: str, device: str) -> None:
    """Copy the weights `save_pretrained` wrote to `directory` into `model`'s own tensors, in place.

    save_pretrained writes some tensors under their architecture's original checkpoint names
    (transformers 5: GPT-NeoX's `lm_head` as `embed_out`); the names expected here come from the
    same mapping (`revert_weight_conversion`), and a file written under the module's own names
    loads too. Strict: a tensor of the file that fits none of the model's, a shape that differs,
    or a trainable parameter that the file does not hold is a `ValueError`.
    """
    from transformers.core_model_loading import revert_weight_conversion

    own = model.state_dict()  # detached views of the parameters: copying into them loads in place
    targets = {**own, **revert_weight_conversion(model, own)}  # file name -> the model's tensor
    in_place = {t.data_ptr() for t in own.values()}
    files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    loaded = set()
    for file in files:
        for name, tensor in load_file(os.path.join(directory, file), device=device).items():
            target = targets.get(name)
            if target is None or target.data_ptr() not in in_place:
                reason = "fits no tensor of" if target is None else "is stored converted (fused or split) for"
                raise ValueError(f"{directory}/{file} holds an unexpected tensor {name!r}: it {reason} this "
                                 f"{type(model).__name__}; resume with the config and base model of the run that "
                                 "wrote it")
            if target.shape != tensor.shape:
                raise ValueError(f"{directory}/{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the model's "
                                 f"{tuple(target.shape)}; resume with the config and base model of the run that "
                                 "wrote it")
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(target.data_ptr())
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in loaded]
    if missing:
        raise ValueError(f"{directory} holds no weights for trained parameters of this {type(model).__name__}: "
                         f"{missing[:3]} ({len(missing)} missing); it is not a complete checkpoint of this run: "
                         "resume from another checkpoint")


def _file_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device)  # safetensors rejects "cpu:0"


def resolve(spec: str, run_dir: str | None, checkpoint_dir: str, prefix: str = "step_") -> str:
    """A checkpoint path from `train.resume_from_checkpoint`: a directory, or "latest" (the
    newest complete `<prefix>N` of `run_dir`)."""
    if spec != "latest":
        return spec
    if run_dir is None:
        raise ValueError("resume_from_checkpoint='latest' needs train.run_dir: the run to continue")
    directory = os.path.join(run_dir, checkpoint_dir)
    steps = sorted((int(m.group(1)), name) for name in (os.listdir(directory) if os.path.isdir(directory) else [])
                   if (m := step_dir(prefix).match(name)))
    for _, name in reversed(steps):
        try:
            check(os.path.join(directory, name))
            return os.path.join(directory, name)
        except ValueError:
            continue
    raise FileNotFoundError(f"no complete checkpoint under {directory}; start without resuming")


def prune(directory: str, keep: int, prefix: str = "step_") -> None:
    """Delete all but the newest `keep` `<prefix>N` checkpoints, and temporary directories of
    failed writes (`.old-` ones are kept: after a crash mid-rename they may hold the only copy)."""
    names = os.listdir(directory)
    steps = sorted((int(m.group(1)), name) for name in names if (m := step_dir(prefix).match(name)))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    for name in names:
        if name.startswith(".") and ".tmp-" in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
