"""The bad-input contract: each mistake gets an error naming the value and the fix, and loses nothing."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import rlora
import rlora.trainer
from rlora import checkpoint
from rlora.tiny import tiny_ppo_config

PROMPTS = ["hello", "abc", "xyz", "the "]


def run(model_dir, run_dir, reward_fn, prompts=PROMPTS, **sections):
    return rlora.train(reward_fn, prompts, config=tiny_ppo_config(model_dir, str(run_dir), **sections),
                       verbose=False)


def count_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


@pytest.mark.parametrize("reward_fn, error, match", [
    (lambda samples, **_: [0.0] * (len(samples) - 1), ValueError, r"returned 3 scores for 4 samples"),
    (lambda samples, **_: [float("nan")] * len(samples), ValueError, r"returned nan for sample 0"),
    (lambda samples, **_: [float("inf")] * len(samples), ValueError, r"returned inf for sample 0"),
    (lambda samples, **_: ["good"] * len(samples), ValueError, r"returned 'good' for sample 0"),
    (lambda samples, **_: 1 / 0, RuntimeError, r"reward_fn raised ZeroDivisionError.*batch of 4 samples"),
], ids=["count", "nan", "inf", "strings", "raises"])
def test_bad_reward_fn(tiny_model_dir, tmp_path, reward_fn, error, match):
    with pytest.raises(error, match=match):
        run(tiny_model_dir("gpt2"), tmp_path, reward_fn)  # the baseline eval scores 4 eval prompts first


@pytest.mark.parametrize("prompts, error, match", [
    ([], ValueError, "prompts is empty"),
    ("hello", TypeError, "wrap a single prompt in a list"),
    ([{"text": "x"}], TypeError, r"prompts\[0\].*nor a dict whose 'prompt' is one of those"),
    ([""], ValueError, r"prompts\[0\] is empty after tokenisation"),
], ids=["empty", "bare-string", "dict-without-prompt", "empty-prompt"])
def test_bad_prompts(tiny_model_dir, tmp_path, prompts, error, match):
    with pytest.raises(error, match=match):
        run(tiny_model_dir("gpt2"), tmp_path, count_s, prompts=prompts)


def test_long_prompt_is_truncated_from_the_configured_side_with_one_warning(tiny_model_dir, tmp_path):
    long = "x" * 40  # seq_length 32 - 6 new tokens = 26 prompt tokens
    with pytest.warns(UserWarning, match=r"1 of 2 prompts are longer than 26 tokens.*truncated from the left") as rec:
        trainer = run(tiny_model_dir("gpt2"), tmp_path, count_s, prompts=["s" + long, "abc"],
                      tokenizer={"truncation_side": "left"}, train={"total_steps": 1})
    assert sum("longer than" in str(w.message) for w in rec) == 1
    assert trainer.prompt_ids[0] == trainer.tokenizer(long[-26:], add_special_tokens=False).input_ids


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.model_path='/no/such/model'.*no such directory"):
        rlora.train(count_s, PROMPTS, config=tiny_ppo_config("/no/such/model", str(tmp_path),
                                                              tokenizer={"tokenizer_path": None}))


def test_peft_task_type_mismatch(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"task_type.*SEQ_CLS.*CAUSAL_LM"):
        run(tiny_model_dir("gpt2"), tmp_path, count_s,
            model={"peft_config": {"peft_type": "LORA", "r": 2, "task_type": "SEQ_CLS"}})


def test_unwritable_checkpoint_dir_is_a_clear_error(tiny_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"could not write the checkpoint .*writable directory"):
        run(tiny_model_dir("gpt2"), tmp_path / "run", count_s, train={"total_steps": 1,
                                                                      "checkpoint_dir": str(blocker / "ckpts")})


def test_failed_write_leaves_the_previous_checkpoint_intact(tiny_model_dir, tmp_path, monkeypatch):
    trainer = run(tiny_model_dir("gpt2"), tmp_path / "run", count_s, train={"total_steps": 1})
    path = str(tmp_path / "ckpt")
    trainer.save(path)
    before = {name: open(os.path.join(path, name), "rb").read() for name in ("trainer_state.json",
                                                                             "value_head.safetensors")}
    trainer.state.step = 99

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint there is intact"):
        trainer.save(path)
    for name, data in before.items():
        assert open(os.path.join(path, name), "rb").read() == data
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "run"]  # no temporary directory left behind
    checkpoint.check(path)


@pytest.mark.parametrize("damage, match", [
    (lambda p: os.remove(os.path.join(p, "trainer_state.json")), "trainer_state.json missing"),
    (lambda p: open(os.path.join(p, "trainer_state.json"), "w").write("{not json"), "trainer_state.json is corrupt"),
    (lambda p: open(os.path.join(p, "optimizer.pt"), "wb").write(b"\x00garbage"), r"refused to load .*optimizer.pt"),
    (lambda p: None, None),
], ids=["partial", "corrupt-json", "corrupt-optimizer", "intact"])
def test_corrupt_or_partial_checkpoint_given_to_resume(tiny_model_dir, tmp_path, damage, match):
    model = tiny_model_dir("gpt2")
    run(model, tmp_path / "run", count_s, train={"total_steps": 2})
    path = str(tmp_path / "run" / "ckpts" / "step_2")
    damage(path)
    config = tiny_ppo_config(model, str(tmp_path / "run"), train={"total_steps": 4, "resume_from_checkpoint": path})
    if match is None:
        assert rlora.train(count_s, PROMPTS, config=config, verbose=False).step == 4
    else:
        with pytest.raises(ValueError, match=match):
            rlora.train(count_s, PROMPTS, config=config, verbose=False)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['RLORA_PWNED']}",))


def test_checkpoint_with_a_pickled_object_is_refused_not_run(tiny_model_dir, tmp_path, monkeypatch):
    model = tiny_model_dir("gpt2")
    run(model, tmp_path / "run", count_s, train={"total_steps": 2})
    path = str(tmp_path / "run" / "ckpts" / "step_2")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RLORA_PWNED", str(marker))
    with open(os.path.join(path, "optimizer.pt"), "wb") as f:
        pickle.dump({"state": Exploit()}, f)
    config = tiny_ppo_config(model, str(tmp_path / "run"), train={"total_steps": 4, "resume_from_checkpoint": path})
    with pytest.raises(ValueError, match="refused to load .*optimizer.pt.*could run code\\); nothing in it was executed"):
        rlora.train(count_s, PROMPTS, config=config, verbose=False)
    assert not marker.exists()


def test_non_finite_step_is_skipped_then_repeated_ones_abort(tiny_model_dir, tmp_path, monkeypatch):
    import rlora.methods.ppo as trainer_module

    real = trainer_module.policy_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):  # microbatches 3 and 4 (the 2nd optimizer step) give NaN
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] in (3, 4) else (loss, stats)

    monkeypatch.setattr(trainer_module, "policy_loss", sometimes_nan)
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss or gradient; step skipped"):
        trainer = run(tiny_model_dir("gpt2"), tmp_path / "a", count_s, train={"total_steps": 4})
    steps = [r for r in trainer.history if "losses/total_loss" in r]
    assert [r["skipped"] for r in steps] == [0.0, 1.0, 0.0, 0.0]
    assert trainer.step == 4

    monkeypatch.setattr(trainer_module, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    before = None
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row .*train.max_bad_steps"):
        trainer_ref = {}
        original_step = rlora.trainer.PPOTrainer.train_step

        def spy(self, exp, batch):
            nonlocal before
            if before is None:
                before = [p.detach().clone() for p in self.policy.trainable_parameters()]
            trainer_ref["t"] = self
            return original_step(self, exp, batch)

        monkeypatch.setattr(rlora.trainer.PPOTrainer, "train_step", spy)
        run(tiny_model_dir("gpt2"), tmp_path / "b", count_s, train={"total_steps": 8})
    after = list(trainer_ref["t"].policy.trainable_parameters())
    assert all(torch.equal(b, a) for b, a in zip(before, after))  # NaN never reached the weights




def test_a_seq_length_beyond_the_models_positions_is_refused_up_front(tiny_model_dir, tmp_path):
    import rlora
    from rlora.tiny import tiny_ppo_config

    # trlx's default seq_length against a tiny GPT-2 of 128 positions, with a long prompt
    config = tiny_ppo_config(tiny_model_dir("gpt2"), str(tmp_path), train={"seq_length": 1024})
    with pytest.raises(ValueError, match=r"train\.seq_length=1024 .*128 positions.*set train\.seq_length to at most 128"):
        rlora.build_trainer(lambda samples, **_: [0.0] * len(samples), ["abc " * 100], config=config, verbose=False)
