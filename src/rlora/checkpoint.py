"""Checkpoints: a directory written under a temporary name and renamed into place (SPEC §5).

Layout of a checkpoint directory:
  adapter/                 the policy adapter in peft's format (adapter and prompt modes)
  model/                   the trained model, save_pretrained (hydra and full modes)
  value_head.safetensors   the value head
  trainer_state.json       step counters, KL coefficient, running reward moments, ref stats,
                           prompt-loader position
  config.yaml              the resolved config
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from safetensors.torch import save_file

from rlora.config import save_config


def trainer_state(trainer) -> dict:
    """The scalar state of a run, as plain JSON data."""
    return {
        "step": trainer.step,
        "phase": trainer.phase,
        "kl_ctl": trainer.kl_ctl.state_dict(),
        "running_moments": trainer.running.state_dict(),
        "ref_mean": trainer.ref_mean,
        "ref_std": trainer.ref_std,
        "prompt_loader": trainer.loader.state_dict(),
    }


def save(trainer, path: str) -> str:
    """Write `trainer`'s checkpoint to `path` atomically: a failed write leaves any previous
    checkpoint at `path` as it was."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        policy = trainer.policy
        if policy.is_peft:
            policy.lm.save_pretrained(os.path.join(tmp, "adapter"))
        else:
            policy.lm.save_pretrained(os.path.join(tmp, "model"))
        trainer.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        state = {k: v.detach().cpu().contiguous() for k, v in policy.value_head.state_dict().items()}
        save_file(state, os.path.join(tmp, "value_head.safetensors"))
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(trainer_state(trainer), f, indent=1)
        save_config(trainer.config, os.path.join(tmp, "config.yaml"))
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "ckpt"))
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
