"""FSDP2 sharding (`train.fsdp`) on two gloo processes: the same run as DDP, sharded, resumed exactly.

Each run is `rlora.train` under torchrun; its checkpoints hold what is compared. FSDP2 gathers
the very weights DDP holds, so the passes agree bitwise and only the gradient reduction (FSDP2's
reduce-scatter against DDP's all-reduce) may round differently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

WORKER = textwrap.dedent('''
    import json, os, sys
    import rlora
    from torch.distributed.tensor import DTensor
    from rlora.distributed import leave_process_group
    from rlora.models import lm_head

    # a few positions' logits per chunk, so the head runs chunked and checkpointed in every run (the tiny
    # vocabulary would fit one chunk): recomputed in backward, sharded and under DDP alike
    lm_head.HEAD_CHUNK_ELEMENTS = 160

    def count_s(samples, prompts, outputs, tokenizer, **_):
        return [o.count("s") / max(1, len(o)) for o in outputs]

    for config_path in sys.argv[1:]:  # one run after another in the same processes
        trainer = rlora.train(count_s, ["hello", "abc", "xyz", "the "], config=config_path, verbose=False)
        params = list(trainer.policy.named_parameters())
        zero = getattr(trainer.optimizer, "optimizer", None)
        held = {"dtensor": {name: isinstance(p, DTensor) for name, p in params},
                "total": sum(p.numel() for _, p in params),
                "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for _, p in params),
                "model": type(trainer.model).__name__, "optimizer": type(zero).__name__,
                "trainable": sum(getattr(p, "ds_numel", p.numel()) for _, p in params if p.requires_grad),
                "optimizer_partition": sum(flat.numel() for flat in getattr(
                    zero, "fp32_partitioned_groups_flat", getattr(zero, "single_partition_of_fp32_groups", []))),
                "zero_total": sum(p.ds_numel if hasattr(p, "ds_tensor") else p.numel() for _, p in params),
                "zero_local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for _, p in params)}
        with open(os.path.join(trainer.run_dir, f"held_rank{trainer.dist.rank}.json"), "w") as f:
            json.dump(held, f)
    leave_process_group()
''')


def launch(tmp_path, configs: dict[str, dict], accelerate_config=None) -> None:
    """`rlora.train` of each config in turn (keyed by its run directory's name), all in one
    launch of two processes over gloo: torchrun, or `accelerate launch` with `accelerate_config`."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    paths = []
    for name, config in configs.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(config))
    launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if accelerate_config is None else \
        ["accelerate.commands.launch", "--config_file", str(accelerate_config)]
    cmd = [sys.executable, "-m", *launcher, str(worker), *map(str, paths)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-12000:]


def checkpoint_tensors(directory):
    """Adapters (policy and critic), value head and optimizer state of a checkpoint, by name."""
    tensors = {f"adapter.{k}": v for k, v in load_file(directory / "adapter" / "adapter_model.safetensors").items()}
    if (directory / "adapter" / "value").is_dir():
        tensors.update({f"critic.{k}": v
                        for k, v in load_file(directory / "adapter" / "value" / "adapter_model.safetensors").items()})
    if (directory / "value_head.safetensors").exists():
        tensors.update({f"value_head.{k}": v for k, v in load_file(directory / "value_head.safetensors").items()})
    optimizer = torch.load(directory / "optimizer.pt", weights_only=True)
    for i, state in optimizer["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return tensors


def records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


SAMPLED = ("reward/mean", "rewards/count_s/mean", "response_length/mean", "rollout_scores/mean")


def assert_same_run(sharded_dir, ddp_dir, step, atol):
    """The same records (the same rewards of what was sampled, exactly: the same samples were
    drawn; losses and norms to float rounding), and the same weights and optimizer state at the
    end up to `atol`."""
    a, b = records(sharded_dir), records(ddp_dir)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    assert sorted({r["step"] for r in a if "loss" in r}) == list(range(1, step + 1))
    for x, y in zip(a, b):
        for key in x:
            if key in SAMPLED:
                assert x[key] == y[key], (key, x, y)
            elif not key.startswith("time/") and isinstance(x[key], float):
                assert abs(x[key] - y[key]) <= atol + 1e-4 * abs(y[key]), (key, x[key], y[key])
    x = checkpoint_tensors(sharded_dir / "ckpts" / f"step_{step}")
    y = checkpoint_tensors(ddp_dir / "ckpts" / f"step_{step}")
    assert x.keys() == y.keys() and any("lora_B" in k for k in x)
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=0, atol=atol, msg=key)


def assert_sharded(run_dir):
    """Every parameter a DTensor on each process, and each process holding about half of them."""
    held = [json.load(open(run_dir / f"held_rank{r}.json")) for r in (0, 1)]
    for h in held:
        assert all(h["dtensor"].values()), [n for n, d in h["dtensor"].items() if not d][:5]
        assert any("lora_A" in name for name in h["dtensor"])
        assert abs(h["local"] / h["total"] - 0.5) < 0.05, h["local"] / h["total"]
    assert held[0]["local"] + held[1]["local"] == held[0]["total"]


@pytest.fixture
def reward_adapter(tiny_model_dir, tmp_path):
    """A reward adapter and score head on the tiny llama (`rlora rm`, a few pairs)."""
    from rlora.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "sss", "rejected": "abc"}) + "\n"
                             for p in ("hello", "xyz")))
    out = str(tmp_path / "rm")
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(pairs), "--out", out,
                 "--eval-fraction", "0", "--epochs", "1"]) == 0
    return out


def test_ppo_with_critic_and_reward_adapters_sharded_equals_ddp_and_resumes_exactly(tiny_model_dir, tmp_path,
                                                                                    reward_adapter):
    """PPO on an untied llama: policy, critic and reward adapters on one sharded base, the value
    head in the root unit, the gradient clipped over the shards; two phases of two steps
    (sampling after a sharded step), and a resume from the checkpoint between a phase's steps."""
    from rlora.tiny import tiny_ppo_config

    def config(name, fsdp, **train):
        return tiny_ppo_config(
            tiny_model_dir("llama"), str(tmp_path / name),
            train={"total_steps": 4, "checkpoint_interval": 1, "keep_checkpoints": 5, "fsdp": fsdp,
                   "max_grad_norm": 0.5, "eval_interval": 2, **train},
            method={"num_rollouts": 8},
            model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False},
                   "value_adapter": {"peft_type": "LORA", "r": 2}, "reward_adapter": reward_adapter})

    launch(tmp_path, {"ddp": config("ddp", False), "fsdp": config("fsdp", True),
                      "resumed": config("resumed", True, resume_from_checkpoint=str(tmp_path / "fsdp/ckpts/step_1"))})
    assert_sharded(tmp_path / "fsdp")
    assert_same_run(tmp_path / "fsdp", tmp_path / "ddp", 4, atol=1e-5)
    a = checkpoint_tensors(tmp_path / "fsdp" / "ckpts" / "step_4")
    b = checkpoint_tensors(tmp_path / "resumed" / "ckpts" / "step_4")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_grpo_with_the_shared_prefix_sharded_equals_ddp(tiny_model_dir, tmp_path):
    """GRPO on a tied GPT-2 (embedding and head in the root unit): the shared-prefix passes call the
    trunk directly, the reference switches the adapter off, two epochs need the old log-probs;
    a group per process and pass, two phases; also with activation checkpointing, which recomputes
    each sharded layer (gathering it again) in the backward."""
    from rlora.tiny import tiny_group_config

    def config(name, fsdp, checkpointing=False):
        return tiny_group_config(
            tiny_model_dir("gpt2"), str(tmp_path / name),
            train={"total_steps": 4, "batch_size": 8, "minibatch_size": 8, "checkpoint_interval": 1000,
                   "fsdp": fsdp},
            method={"beta": 0.1, "loss_type": "grpo", "num_rollouts": 8, "chunk_size": 8},
            model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False},
                   "gradient_checkpointing": checkpointing})

    launch(tmp_path, {"ddp": config("ddp", False), "fsdp": config("fsdp", True),
                      "fsdp_checkpointing": config("fsdp_checkpointing", True, checkpointing=True)})
    for run in ("fsdp", "fsdp_checkpointing"):  # recomputed layers in the backward: the same run
        assert_sharded(tmp_path / run)
        assert_same_run(tmp_path / run, tmp_path / "ddp", 4, atol=1e-5)


def test_fsdp_refuses_what_cannot_run_sharded(tmp_path):
    from rlora.config import load_config

    with pytest.raises(ValueError, match="merge_adapter_for_generation"):
        load_config({"train": {"fsdp": True}, "model": {"model_path": "x"},
                     "method": {"merge_adapter_for_generation": True}})
    with pytest.raises(ValueError, match="generation_dtype"):
        load_config({"train": {"fsdp": True}, "model": {"model_path": "x", "generation_dtype": "bfloat16"}})
