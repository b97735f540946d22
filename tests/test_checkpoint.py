"""Checkpoints: exact resume (in process, after SIGKILL, after SIGTERM), atomic writes, safe loading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rlora
from rlora import checkpoint
from rlora.tiny import ARCHITECTURES, tiny_ppo_config

PROMPTS = ["hello", "abc", "xyz", "the "]
def config_for(model_dir, run_dir, total_steps, model=None, **train):
    # 4 optimizer steps per phase; evals every 3 steps interleave with phases and checkpoints
    return tiny_ppo_config(model_dir, str(run_dir), train={"total_steps": total_steps, "eval_interval": 3, **train},
                           task={"reward_fn": "tests_support:count_s", "prompts": PROMPTS}, model=model or {})


def final_state(run_dir, step):
    path = os.path.join(run_dir, "ckpts", f"step_{step}")
    tensors = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
    tensors.update({f"value_head.{k}": v for k, v in load_file(os.path.join(path, "value_head.safetensors")).items()})
    optimizer = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    for i, param_state in optimizer["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in param_state.items() if torch.is_tensor(v)})
    return tensors


def step_records(run_dir, after=0):
    """Records of each optimizer step and eval after `after`, timings left out."""
    out = []
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        record = json.loads(line)
        if record["step"] > after:
            out.append({k: v for k, v in record.items() if not k.startswith("time/")})
    return out


def assert_same_run(run_a, run_b, step, after):
    a, b = final_state(run_a, step), final_state(run_b, step)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    records = step_records(run_b, after)
    assert records == step_records(run_a, after)
    assert any("losses/total_loss" in r for r in records)


@pytest.fixture
def support_module(tmp_path, monkeypatch):
    """`tests_support:count_s` importable here and in subprocesses."""
    (tmp_path / "tests_support.py").write_text(
        "def count_s(samples, prompts, outputs, tokenizer, **_):\n"
        "    return [o.count('s') / max(1, len(o)) for o in outputs]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


@pytest.fixture
def reference_run(tiny_model_dir, tmp_path, support_module):
    """An uninterrupted run of 12 steps (3 phases)."""
    run_dir = tmp_path / "uninterrupted"
    rlora.train(config=config_for(tiny_model_dir("gpt2"), run_dir, 12), verbose=False)
    return str(run_dir)


def test_stop_and_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path, reference_run):
    run_dir = tmp_path / "resumed"
    model = tiny_model_dir("gpt2")
    rlora.train(config=config_for(model, run_dir, 6), verbose=False)  # stops mid-phase (step 6 of 4 + 4)
    assert json.load(open(run_dir / "ckpts" / "step_6" / "trainer_state.json"))["pending_phase"]["cursor"] == 2
    trainer = rlora.train(config=config_for(model, run_dir, 12, resume_from_checkpoint="latest"), verbose=False)
    assert trainer.step == 12 and trainer.phase == 3
    assert_same_run(reference_run, str(run_dir), 12, after=6)


def run_cli(config, run_dir, *extra):
    path = os.path.join(run_dir, "config.yaml")
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return subprocess.Popen([sys.executable, "-m", "rlora", "train", path, *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def interrupt(config, run_dir, at_step, sig):
    """Start `rlora train`, send `sig` once checkpoint `step_<at_step>` exists; returns its exit code."""
    proc = run_cli(config, run_dir)
    wait_for(os.path.join(run_dir, "ckpts", f"step_{at_step}"), proc)
    proc.send_signal(sig)
    code = proc.wait()
    return code, proc.stderr.read()


def resume_latest_matches(config, run_dir, reference_run, after):
    resumed = run_cli(config, run_dir, "--resume", "latest")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert_same_run(reference_run, run_dir, 12, after=after)


def test_sigkill_right_after_a_checkpoint_then_resume(tiny_model_dir, tmp_path, reference_run):
    run_dir = str(tmp_path / "killed")
    config = config_for(tiny_model_dir("gpt2"), run_dir, 12, checkpoint_interval=5, keep_checkpoints=5)
    code, _ = interrupt(config, run_dir, 5, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(run_dir, "ckpts", "step_12"))
    resume_latest_matches(config, run_dir, reference_run, after=5)


def test_sigterm_mid_phase_saves_then_resume(tiny_model_dir, tmp_path, reference_run):
    run_dir = str(tmp_path / "terminated")
    config = config_for(tiny_model_dir("gpt2"), run_dir, 12, checkpoint_interval=2, keep_checkpoints=10)
    code, stderr = interrupt(config, run_dir, 2, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr
    stopped_at = json.load(open(os.path.join(checkpoint.resolve("latest", run_dir, "ckpts"), "trainer_state.json")))
    assert 2 <= stopped_at["step"] < 12
    resume_latest_matches(config, run_dir, reference_run, after=stopped_at["step"])


def test_keep_checkpoints_and_best(tiny_model_dir, tmp_path, support_module):
    run_dir = tmp_path / "run"
    rlora.train(config=config_for(tiny_model_dir("gpt2"), run_dir, 8, checkpoint_interval=2, keep_checkpoints=2),
                verbose=False)
    names = sorted(os.listdir(run_dir / "ckpts"))
    assert names == ["best", "step_6", "step_8"]
    checkpoint.check(str(run_dir / "ckpts" / "best"))


def trained(policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}


WITHOUT_PEFT = {"hydra": {"peft_config": None, "num_layers_unfrozen": 1},
                "full": {"peft_config": None, "num_layers_unfrozen": -1}}


@pytest.fixture
def perturbed_checkpoint(tiny_model_dir, tmp_path, support_module):
    """`make(arch, mode)` -> (config, checkpoint path, the trained tensors saved in it): every
    trainable tensor of a fresh trainer moved by noise, then saved as training saves."""

    def make(arch, mode):
        config = config_for(tiny_model_dir(arch), tmp_path / "run", 4, model=WITHOUT_PEFT[mode])
        trainer = rlora.build_trainer(config=config, verbose=False)
        with torch.no_grad():
            for p in trainer.policy.trainable_parameters():
                p.add_(torch.randn_like(p))
        return config, trainer.save(str(tmp_path / "ckpt")), trained(trainer.policy)

    return make


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mode", list(WITHOUT_PEFT))
def test_hydra_and_full_checkpoints_restore_every_trained_tensor(perturbed_checkpoint, arch, mode):
    """transformers 5 saves GPT-NeoX's `lm_head` as `embed_out` (its original checkpoint name): the
    load maps names as transformers does and refuses to leave any trained tensor behind."""
    config, path, saved = perturbed_checkpoint(arch, mode)
    fresh = rlora.build_trainer(config=config, verbose=False)
    assert all(not torch.equal(p, saved[name]) for name, p in trained(fresh.policy).items())
    checkpoint.load_weights(fresh.policy, path, fresh.accelerator.device)
    loaded = trained(fresh.policy)
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize("edit, match", [
    (lambda tensors: tensors.pop(sorted(tensors)[-1]), "no weights for trained parameters.*1 missing"),
    (lambda tensors: tensors.update(extra=torch.zeros(2)), "unexpected tensor 'extra'"),
], ids=["missing", "unexpected"])
def test_a_model_checkpoint_that_does_not_fit_is_a_clear_error(perturbed_checkpoint, edit, match):
    from safetensors.torch import save_file

    config, path, _ = perturbed_checkpoint("llama", "hydra")
    file = os.path.join(path, "model", "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    fresh = rlora.build_trainer(config=config, verbose=False)
    with pytest.raises(ValueError, match=match):
        checkpoint.load_weights(fresh.policy, path, fresh.accelerator.device)


PROMPT_LEARNING = {
    "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3},
    "prefix": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3},
    "prefix+projection": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "prefix_projection": True,
                          "encoder_hidden_size": 16},
}


@pytest.mark.parametrize("kind", list(PROMPT_LEARNING))
def test_prompt_and_prefix_tuning_resume_and_evaluate(tiny_model_dir, tmp_path, support_module, kind):
    """peft saves prompt learning's virtual tokens as `prompt_embeddings` (with prefix_projection,
    the projected prefix, not the embedding and MLP that train): the checkpoint restores those."""
    model, peft = tiny_model_dir("gpt2"), {"peft_config": PROMPT_LEARNING[kind]}
    reference = tmp_path / "uninterrupted"
    rlora.train(config=config_for(model, reference, 8, model=peft), verbose=False)
    run_dir = tmp_path / "resumed"
    stopped = rlora.train(config=config_for(model, run_dir, 6, model=peft), verbose=False)
    saved = trained(stopped.policy)
    path = str(run_dir / "ckpts" / "step_6")
    fresh = rlora.build_trainer(config=os.path.join(path, "config.yaml"), verbose=False)
    checkpoint.load_weights(fresh.policy, path, fresh.accelerator.device)
    assert trained(fresh.policy).keys() == saved.keys()
    assert any("prompt_encoder" in name for name in saved)
    for name, value in trained(fresh.policy).items():
        assert torch.equal(value, saved[name]), name
    assert "reward/mean" in rlora.evaluate(path, verbose=False)
    rlora.train(config=config_for(model, run_dir, 8, model=peft, resume_from_checkpoint="latest"), verbose=False)
    assert_same_run(str(reference), str(run_dir), 8, after=6)


def test_resume_with_a_larger_total_steps_keeps_the_linear_schedule_and_says_so(tiny_model_dir, tmp_path,
                                                                                 support_module):
    run_dir, model = tmp_path / "run", tiny_model_dir("gpt2")
    scheduler = {"name": "linear", "kwargs": {"start_factor": 1.0, "end_factor": 0.5}}  # total_iters: total_steps
    rlora.train(config={**config_for(model, run_dir, 4), "scheduler": scheduler}, verbose=False)
    with pytest.warns(UserWarning, match=r"total_iters=4 .* total_iters=8 \(from train.total_steps\).* kept"):
        trainer = rlora.train(config={**config_for(model, run_dir, 8, resume_from_checkpoint="latest"),
                                      "scheduler": scheduler}, verbose=False)
    rates = [r["learning_rate"] for r in trainer.history if "learning_rate" in r]
    # the first run's 4-step decay from 1e-2 to 5e-3, then its end rate: exactly as that run would go on
    assert rates == pytest.approx([1e-2, 8.75e-3, 7.5e-3, 6.25e-3] + [5e-3] * 4, rel=1e-12)
