"""Activation checkpointing (`model.gradient_checkpointing`): the update's gradients are those of
the run without it, in the plain and the shared-prefix passes, while each checkpointed layer
really recomputes in the backward pass; sampling and no-grad passes never checkpoint."""

from __future__ import annotations

import pytest
import torch

import rlora
from rlora.models.checkpointing import checkpointed_layers, checkpointing
from rlora.tiny import tiny_group_config, tiny_ppo_config

PROMPTS = ["hello", "abc", "xyz", "the "]


def count_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


def trainer_of(model_dir, run_dir, method, checkpointed):
    base = tiny_group_config if method != "ppo" else tiny_ppo_config
    config = base(model_dir, str(run_dir), model={"gradient_checkpointing": checkpointed},
                  method={"shared_prefix": method == "grpo-shared"} if method != "ppo" else {})
    trainer = rlora.build_trainer(count_s, prompts=PROMPTS, config=config, verbose=False)
    trainer.model.eval()  # as the loop runs every pass
    return trainer


@pytest.mark.parametrize("method", ["ppo", "grpo", "grpo-shared"])
def test_checkpointed_gradients_equal_the_kept_ones_and_layers_recompute(tiny_model_dir, tmp_path, method,
                                                                        monkeypatch):
    model_dir = tiny_model_dir("llama")
    grads, forwards = {}, {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        trainer = trainer_of(model_dir, tmp_path / str(checkpointed), method, checkpointed)
        phase, _ = trainer._collect()
        order = torch.arange(len(phase))
        exp = trainer._rollout_pass(phase.rollouts, order)
        trainer.method.advantages(exp, phase.scores, phase.scores, trainer.state, trainer.dist)
        mb = exp.select(order[:8])
        calls = []
        mlp = next(type(m) for m in trainer.policy.base_model.modules() if type(m).__name__.endswith("MLP"))
        monkeypatch.setattr(mlp, "forward", lambda self, *a, real=mlp.forward, **k: (calls.append(1),
                                                                                     real(self, *a, **k))[1])
        with trainer.sampler.precision(), checkpointing(trainer.policy.base_model, trainer.checkpointing):
            out = trainer.method.forward(trainer.model, trainer.policy, mb, trainer.temperature,
                                         with_entropy=trainer.method.with_entropy)
            loss, _ = trainer.method.loss(out, mb, float(mb.loss_mask.sum()))
        before = len(calls)
        loss.backward()
        forwards[checkpointed] = (before, len(calls) - before)
        monkeypatch.undo()
        grads[checkpointed] = {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}
        assert all(not m.training for m in trainer.policy.base_model.modules())  # eval mode restored
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-6, rtol=1e-5)
    assert forwards[False][1] == 0 and forwards[True][1] == forwards[True][0] > 0  # each MLP ran again in backward


def test_sampling_and_no_grad_passes_do_not_checkpoint(tiny_model_dir, tmp_path):
    trainer = trainer_of(tiny_model_dir("llama"), tmp_path, "grpo-shared", True)
    layers = checkpointed_layers(trainer.policy.base_model)
    assert layers
    with torch.no_grad(), checkpointing(trainer.policy.base_model):
        assert not any(m.training for m in layers)
    with checkpointing(trainer.policy.base_model):
        assert all(m.training for m in layers)
        assert not any(m.training for m in trainer.policy.base_model.modules() if isinstance(m, torch.nn.Dropout))
    assert not any(m.training for m in layers)


def test_a_checkpointed_run_trains(tiny_model_dir, tmp_path):
    config = tiny_group_config(tiny_model_dir("llama"), str(tmp_path), model={"gradient_checkpointing": True},
                               train={"total_steps": 4})
    trainer = rlora.train(count_s, prompts=PROMPTS, config=config, verbose=False)
    assert trainer.step == 4 and all(r["skipped"] == 0 for r in trainer.history if "skipped" in r)
