"""Two processes over gloo (torchrun, as `accelerate launch` does): the same training as one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    import rlora
    from rlora.config import load_config
    from rlora.models import build_policy, load_tokenizer
    from rlora.rollout.prompts import normalize_prompts
    from rlora.tiny import random_experience
    from rlora.trainer import PPOTrainer

    mode, config_path, out = sys.argv[1:4]
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))

    def count_s(samples, prompts, outputs, tokenizer, **_):
        return [o.count("s") / max(1, len(o)) for o in outputs]

    if mode == "train":
        trainer = rlora.train(count_s, ["hello", "abc", "xyz", "the "], config=config_path, verbose=False)
    elif mode == "group-step":  # advantages from every process's rewards, then one step; each holds one group
        config = load_config(config_path)
        tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
        torch.manual_seed(0)
        policy = build_policy(config.model, tokenizer, value_head=False)
        trainer = PPOTrainer(config, policy, tokenizer, count_s, normalize_prompts(["a"]), normalize_prompts(["a"]),
                             verbose=False)
        n, G = 8, 4
        exp = random_experience(n, 3, 6, vocab_size=30)
        exp.query_ids = exp.query_ids[::G].repeat_interleave(G, 0)
        exp.response_mask = torch.arange(6)[None, :] < torch.tensor([6, 1, 4, 2, 5, 3, 6, 2])[:, None]
        exp.loss_mask = exp.response_mask.clone()
        rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 2.0, 1.0, 3.0, 0.0])
        share = n // world
        mine = exp.select(torch.arange(rank * share, (rank + 1) * share))
        trainer.method.advantages(mine, rewards, rewards, trainer.state, trainer.dist)  # fills mine.advantages
        save_file({"advantages": mine.advantages.contiguous()}, os.path.join(out, f"advantages_rank{rank}.safetensors"))
        policy.eval()
        trainer.train_step(mine, torch.arange(share))
    else:  # one optimizer step on a fixed experience batch, split over the processes
        config = load_config(config_path)
        tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
        torch.manual_seed(0)
        policy = build_policy(config.model, tokenizer)
        trainer = PPOTrainer(config, policy, tokenizer, count_s, normalize_prompts(["a"]), normalize_prompts(["a"]),
                             verbose=False)
        n = 8
        exp = random_experience(n, 3, 5, vocab_size=30)
        share = n // world
        mine = exp.select(torch.arange(rank * share, (rank + 1) * share))
        policy.eval()
        trainer.train_step(mine, torch.arange(share))
    params = {name: p.detach().clone() for name, p in trainer.policy.named_parameters() if p.requires_grad}
    save_file(params, os.path.join(out, f"params_rank{rank}.safetensors"))
    from rlora.distributed import leave_process_group
    wrapped = isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    leave_process_group()
    if world > 1:  # the reducer went before the group (a reducer outliving it can deadlock at exit)
        assert wrapped and "reducer" not in trainer.model.__dict__, "the DDP reducer outlived the process group"
''')


LEAVE = textwrap.dedent('''
    import gc, os, weakref
    import torch
    import torch.distributed as dist
    from rlora.distributed import leave_process_group, track_wrapper

    dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=0, world_size=1)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    model(torch.ones(4, 3)).sum().backward()  # a collective in flight on gloo's thread, as after training
    track_wrapper(model)
    reducer = weakref.ref(model.reducer)
    seen = []
    destroy = dist.destroy_process_group

    def watched(*args, **kwargs):
        gc.collect()
        seen.append(reducer() is None)
        return destroy(*args, **kwargs)

    dist.destroy_process_group = watched
    leave_process_group()
    assert seen == [True], "the DDP reducer was alive when the process group was destroyed"
    assert not dist.is_initialized()
    print("ok")
''')


def test_leaving_the_group_frees_the_ddp_reducers_first(tmp_path):
    # gdb on a run hung at exit: the main thread, freeing a DDP reducer after destroy_process_group,
    # held the group's last reference and joined gloo's worker thread, which waited for the GIL
    result = subprocess.run([sys.executable, "-c", LEAVE], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "STORE": str(tmp_path / "store")})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def launch(tmp_path, mode, config, nproc, *extra_args):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    config_path = tmp_path / f"config_{mode}_{nproc}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / f"out_{mode}_{nproc}"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(worker), mode, str(config_path), str(out), *extra_args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def small_config(model_dir, run_dir, **train):
    from rlora.tiny import tiny_ppo_config

    return tiny_ppo_config(model_dir, str(run_dir), train={"total_steps": 8, "checkpoint_interval": 4, **train})


def test_ranks_hold_identical_weights_after_training(tiny_model_dir, tmp_path):
    out = launch(tmp_path, "train", small_config(tiny_model_dir("gpt2"), tmp_path / "run"), 2)
    a, b = (load_file(out / f"params_rank{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    fresh = load_file(os.path.join(tmp_path / "run" / "ckpts" / "step_8" / "adapter" / "adapter_model.safetensors"))
    assert any(torch.count_nonzero(v) for k, v in fresh.items() if "lora_B" in k)  # it trained
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert sorted(r["step"] for r in records if "losses/total_loss" in r) == list(range(1, 9))  # one writer


def logged_rates(run_dir):
    return [r["learning_rate"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "learning_rate" in r]


def test_learning_rate_schedule_advances_once_per_step_whatever_the_process_count(tiny_model_dir, tmp_path):
    # train.batch_size is global, so an optimizer step is the same unit of work on 1 or 2 processes
    rates = {}
    for nproc in (1, 2):
        config = small_config(tiny_model_dir("gpt2"), tmp_path / f"run{nproc}", total_steps=4)
        config["scheduler"] = {"name": "linear", "kwargs": {"start_factor": 1.0, "end_factor": 0.0}}
        launch(tmp_path, "train", config, nproc)
        rates[nproc] = logged_rates(tmp_path / f"run{nproc}")
    assert rates[2] == rates[1]
    assert len(rates[1]) == 4 and rates[1] == sorted(set(rates[1]), reverse=True)  # it decays, step by step


@pytest.mark.parametrize("roles", ["policy", "policy+critic"])
def test_two_processes_half_batch_step_equals_one_process_full_batch(tiny_model_dir, tmp_path, roles):
    config = small_config(tiny_model_dir("gpt2"), tmp_path / "run", batch_size=8, minibatch_size=4)
    config["model"]["peft_config"] = {"peft_type": "LORA", "r": 4, "init_lora_weights": False}
    if roles == "policy+critic":  # DDP syncs the critic adapter's gradients as well
        config["model"]["value_adapter"] = {"peft_type": "LORA", "r": 4, "init_lora_weights": False}
    one = load_file(launch(tmp_path, "step", config, 1) / "params_rank0.safetensors")
    two = load_file(launch(tmp_path, "step", config, 2) / "params_rank0.safetensors")
    torch.manual_seed(0)
    changed = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)
    from rlora.config import load_config
    from rlora.models import build_policy, load_tokenizer

    loaded = load_config(config)
    initial = {n: p for n, p in build_policy(loaded.model, load_tokenizer(loaded.tokenizer, loaded.model.model_path))
               .named_parameters() if p.requires_grad}
    changed = sum(not torch.equal(initial[k], one[k]) for k in one)
    assert changed == len(one)  # the step moved every trainable tensor, identically in both layouts


@pytest.mark.parametrize("method", [
    {"loss_type": "dapo", "scale_rewards": "batch"},
    {"loss_type": "grpo", "advantage_estimator": "reinforce++_baseline"},
], ids=["dapo-batch-scale", "reinforce++-global-whitening"])
def test_group_method_two_processes_equal_one(tiny_model_dir, tmp_path, method):
    """Each process holds whole groups; batch statistics (reward std, REINFORCE++ whitening, DAPO's
    token count) are global, and the shared-prefix pass still syncs gradients (through DDP)."""
    from rlora.tiny import tiny_group_config

    config = tiny_group_config(tiny_model_dir("gpt2"), str(tmp_path / "run"), method=method,
                               train={"batch_size": 8, "minibatch_size": 8},  # a group per process
                               model={"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False}},
                               optimizer={"name": "sgd", "kwargs": {"lr": 1.0}})
    one, two = (launch(tmp_path, "group-step", config, nproc) for nproc in (1, 2))
    advantages = torch.cat([load_file(two / f"advantages_rank{r}.safetensors")["advantages"] for r in (0, 1)])
    torch.testing.assert_close(advantages, load_file(one / "advantages_rank0.safetensors")["advantages"],
                               rtol=0, atol=1e-6)
    a, b = (load_file(out / "params_rank0.safetensors") for out in (one, two))
    c = load_file(two / "params_rank1.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
        assert torch.equal(b[key], c[key]), key


def test_two_process_randomwalks_learns_and_resumes(tmp_path):
    from rlora.demo import demo_config
    from rlora.tasks.randomwalks import make_task, sft_model

    model_dir = str(sft_model(make_task(), cache_dir=str(tmp_path / "cache")))
    run_dir = tmp_path / "run"
    config = demo_config(model_dir, str(run_dir), total_steps=64, eval_interval=32)
    config["train"]["checkpoint_interval"] = 32
    config["task"] = {"reward_fn": "rlora.tasks.randomwalks:reward_fn", "metric_fn": "rlora.tasks.randomwalks:metric_fn",
                      "prompts": "rlora.tasks.randomwalks:default_prompts"}
    config_path = tmp_path / "rw.yaml"
    config_path.write_text(yaml.safe_dump(config))

    def rlora_train(launcher, *args):
        result = subprocess.run([*launcher, "-m", "rlora", "train", str(config_path), *args], capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    rlora_train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    evals = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evals = [r for r in evals if r.get("eval")]
    # measured: sampled optimality 0.65 -> 0.95 (greedy 0.85 -> 0.99) in 8 phases, 64 rollouts per process
    assert evals[-1]["metrics/optimality"] > evals[0]["metrics/optimality"] + 0.1, evals
    assert sorted(os.listdir(run_dir / "ckpts")) == ["best", "step_32", "step_64"]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    rlora_train([accelerate, "launch", "--config_file", os.path.join(ROOT, "configs", "accelerate", "cpu_2proc.yaml")],
                "train.total_steps=96", "--resume", "latest")
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert max(steps) == 96 and steps == sorted(steps)
    assert "step_96" in os.listdir(run_dir / "ckpts")


def children(pid):
    """{child pid: its environment} of process `pid`, from /proc."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    found[int(entry)] = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
    return found


def kill_tree(proc):
    """SIGKILL `proc` and its children: torchrun starts each worker in a session of its own."""
    for pid in [*children(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.communicate(timeout=30)[1]


def finish(proc, timeout):
    """`proc`'s exit code and stderr; killed with its workers if it runs past `timeout` seconds,
    which fails the test instead of hanging it."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args} still ran after {timeout} s (hung?); killed. stderr: {kill_tree(proc)[-3000:]}")
    return proc.returncode, stderr


def adapter_and_optimizer(checkpoint_dir):
    tensors = load_file(checkpoint_dir / "adapter" / "adapter_model.safetensors")
    tensors.update({f"value_head.{k}": v for k, v in load_file(checkpoint_dir / "value_head.safetensors").items()})
    optimizer = torch.load(checkpoint_dir / "optimizer.pt", weights_only=True)
    for i, state in optimizer["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return tensors


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's worker processes through /proc")
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_is_exact(tiny_model_dir, tmp_path):
    (tmp_path / "support.py").write_text(
        "def count_s(samples, prompts, outputs, tokenizer, **_):\n"
        "    return [o.count('s') / max(1, len(o)) for o in outputs]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rlora",
                "train"]

    def config_file(name):
        config = small_config(tiny_model_dir("gpt2"), tmp_path / name, total_steps=8, checkpoint_interval=2,
                              keep_checkpoints=10)
        config["scheduler"] = {"name": "linear", "kwargs": {"start_factor": 1.0, "end_factor": 0.1}}  # state matters
        config["task"] = {"reward_fn": "support:count_s", "prompts": ["hello", "abc", "xyz", "the "]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    def rlora_train(name, *args):
        return subprocess.Popen([*torchrun, config_file(name), *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)

    code, stderr = finish(rlora_train("uninterrupted"), 120)
    assert code == 0, stderr[-3000:]

    run_dir = tmp_path / "stopped"
    proc = rlora_train("stopped")
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "ckpts" / "step_2").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        rank1 = [pid for pid, env in children(proc.pid).items() if b"RANK=1" in env]
        assert rank1, "rank 1 was not running when step_2 appeared"
        os.kill(rank1[0], signal.SIGTERM)  # one rank only: the other must stop at the same step boundary
        _, stderr = finish(proc, 120)  # torchrun exits non-zero: its workers stopped with 128 + 15
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert stderr.count("stopped by signal 15") == 2, stderr[-3000:]  # each rank saved and stopped itself
    stopped_at = max(int(name.split("_")[1]) for name in os.listdir(run_dir / "ckpts") if name.startswith("step_"))
    assert 2 <= stopped_at < 8, stderr[-3000:]

    code, stderr = finish(rlora_train("stopped", "--resume", "latest"), 120)
    assert code == 0, stderr[-3000:]
    a = adapter_and_optimizer(tmp_path / "uninterrupted" / "ckpts" / "step_8")
    b = adapter_and_optimizer(run_dir / "ckpts" / "step_8")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r for r in map(json.loads, open(tmp_path / "uninterrupted" / "metrics.jsonl")) if "learning_rate" in r]
    resumed = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "learning_rate" in r]
    assert [r["learning_rate"] for r in resumed] == [r["learning_rate"] for r in steps]
