"""DeepSpeed ZeRO through `accelerate launch` on two gloo processes (DeepSpeed's CPU build): the
same runs as DDP with the gradients and optimizer state partitioned (stage 2) or the weights too,
the frozen base's included (stage 3); resumed exactly, and resumed under DDP from a ZeRO checkpoint.

DeepSpeed's engine reduces the gradients (reduce-scatter into each process's partition) and runs
AdamW on its float32 partition of the adapters. Every pass computes with the weights DDP holds
(stage 3 gathers them before each module's forward), so sampling agrees exactly with DDP and the
updates to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from test_fsdp import assert_same_run, checkpoint_tensors, launch, reward_adapter  # noqa: F401 (a fixture)


def accelerate_config(tmp_path, stage):
    """An accelerate config for DeepSpeed ZeRO on 2 CPU processes: stage 2 the one rlora ships
    (configs/accelerate/zero2.yaml: its own batch and clipping numbers, which rlora's config
    replaces); stage 3 through a DeepSpeed config file that partitions even the tiny model's small
    weights (DeepSpeed keeps weights under `stage3_param_persistence_threshold` elements whole)."""
    if stage == 2:
        return Path(__file__).parents[1] / "configs" / "accelerate" / "zero2.yaml"
    deepspeed = tmp_path / f"ds_zero{stage}.json"
    deepspeed.write_text(json.dumps({
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    path = tmp_path / f"accelerate_zero{stage}.yaml"
    path.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
                                    "num_machines": 1, "num_processes": 2, "machine_rank": 0,
                                    "deepspeed_config": {"deepspeed_config_file": str(deepspeed)}}))
    return path


def assert_partitioned(run_dir, stage):
    """DeepSpeed's engine and ZeRO optimizer on each process, each holding about half of the
    adapters' float32 optimizer state, and under stage 3 about half of every weight."""
    held = [json.load(open(run_dir / f"held_rank{r}.json")) for r in (0, 1)]
    optimizer = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    for h in held:
        assert (h["model"], h["optimizer"]) == ("DeepSpeedEngine", optimizer), h
        assert abs(h["optimizer_partition"] / h["trainable"] - 0.5) < 0.05, (h["optimizer_partition"], h["trainable"])
        weights = h["zero_local"] / h["zero_total"]
        assert abs(weights - 0.5) < 0.05 if stage == 3 else weights == 1, weights


@pytest.mark.distributed
def test_ppo_with_critic_and_reward_adapters_under_zero_equals_ddp_and_resumes_exactly(tiny_model_dir, tmp_path,
                                                                                      reward_adapter):
    """PPO with policy, critic and reward adapters on one base, two microbatches a step (the
    engine's accumulation boundary at the second), the gradient clipped by DeepSpeed; under ZeRO-2
    and ZeRO-3, each resumed between a phase's steps, and DDP resumed from ZeRO-2's checkpoint."""
    from rlora.tiny import tiny_ppo_config

    def config(name, **train):
        return tiny_ppo_config(
            tiny_model_dir("llama"), str(tmp_path / name),
            train={"total_steps": 4, "checkpoint_interval": 1, "keep_checkpoints": 5, "max_grad_norm": 0.5,
                   "eval_interval": 2, **train},
            method={"num_rollouts": 8},
            model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False},
                   "value_adapter": {"peft_type": "LORA", "r": 2}, "reward_adapter": reward_adapter})

    def resume(name):
        return str(tmp_path / name / "ckpts" / "step_1")

    for stage in (2, 3):
        launch(tmp_path, {f"zero{stage}": config(f"zero{stage}"),
                          f"resumed{stage}": config(f"resumed{stage}", resume_from_checkpoint=resume(f"zero{stage}"))},
               accelerate_config(tmp_path, stage))
    launch(tmp_path, {"ddp": config("ddp"),
                      "ddp_resumed": config("ddp_resumed", resume_from_checkpoint=resume("zero2"))})
    for stage in (2, 3):
        assert_partitioned(tmp_path / f"zero{stage}", stage)
        assert_same_run(tmp_path / f"zero{stage}", tmp_path / "ddp", 4, atol=1e-5)
        a = checkpoint_tensors(tmp_path / f"zero{stage}" / "ckpts" / "step_4")
        b = checkpoint_tensors(tmp_path / f"resumed{stage}" / "ckpts" / "step_4")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (stage, key)
    a = checkpoint_tensors(tmp_path / "zero2" / "ckpts" / "step_4")
    b = checkpoint_tensors(tmp_path / "ddp_resumed" / "ckpts" / "step_4")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.distributed
def test_grpo_with_the_shared_prefix_under_zero_equals_ddp(tiny_model_dir, tmp_path):
    """GRPO on a tied GPT-2 through DeepSpeed's engine: the shared-prefix passes call the trunk
    inside the engine's forward, the reference switches the adapter off, two microbatches of a
    group each per process and step, two epochs, two phases; under ZeRO-2 and ZeRO-3, and ZeRO-3
    with activation checkpointing (each layer's weights gathered again for its recomputation)."""
    from rlora.tiny import tiny_group_config

    def config(name, checkpointing=False):
        return tiny_group_config(
            tiny_model_dir("gpt2"), str(tmp_path / name),
            train={"total_steps": 4, "batch_size": 16, "minibatch_size": 8, "checkpoint_interval": 1000},
            method={"beta": 0.1, "loss_type": "grpo", "num_rollouts": 16, "chunk_size": 16},
            model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False},
                   "gradient_checkpointing": checkpointing})

    launch(tmp_path, {"zero2": config("zero2")}, accelerate_config(tmp_path, 2))
    launch(tmp_path, {"zero3": config("zero3"), "zero3_checkpointing": config("zero3_checkpointing", True)},
           accelerate_config(tmp_path, 3))
    launch(tmp_path, {"ddp": config("ddp")})
    for run, stage in (("zero2", 2), ("zero3", 3), ("zero3_checkpointing", 3)):
        assert_partitioned(tmp_path / run, stage)
        assert_same_run(tmp_path / run, tmp_path / "ddp", 4, atol=1e-5)


def test_zero_takes_its_batch_fields_and_clipping_from_the_config_and_refuses_what_cannot_run():
    from types import SimpleNamespace

    from rlora import zero

    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                                               "train_micro_batch_size_per_gpu": "auto",
                                               "gradient_accumulation_steps": 1, "gradient_clipping": 1.0})
    zero.configure(plugin, batch_size=6, minibatch_size=4, world=2, max_grad_norm=None)  # microbatches of 4 and 2
    assert {k: plugin.deepspeed_config[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                    "train_batch_size", "gradient_clipping")} == \
        {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16,
         "gradient_clipping": 0.0}
    zero.configure(plugin, batch_size=8, minibatch_size=8, world=2, max_grad_norm=0.5)
    assert (plugin.deepspeed_config["gradient_accumulation_steps"], plugin.deepspeed_config["gradient_clipping"]) \
        == (1, 0.5)
    for config, match in (({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
                          ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section")):
        with pytest.raises(ValueError, match=match):
            zero.configure(SimpleNamespace(deepspeed_config=config), 8, 8, 2, None)


def test_zero3_refuses_what_writes_weights_outside_a_forward():
    from types import SimpleNamespace

    from rlora import zero

    def config(merge=False, dtype=None):
        return SimpleNamespace(method=SimpleNamespace(merge_adapter_for_generation=merge),
                               model=SimpleNamespace(generation_dtype=dtype))

    zero.check_partitionable(config(), SimpleNamespace(mode="adapter"))
    for args, mode, match in (((), "hydra", "hydra mode"), ((True,), "adapter", "merge_adapter_for_generation"),
                              ((False, "bfloat16"), "adapter", "generation_dtype='bfloat16'")):
        with pytest.raises(ValueError, match=match):
            zero.check_partitionable(config(*args), SimpleNamespace(mode=mode))
