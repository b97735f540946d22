"""Multi-turn episodes on a tiny model: the tokens of each turn and of the environment between
them, the masks, log-probs equal to one pass over the whole conversation, KV-cache continuation
equal to re-running the conversation, budget endings, refusals and an environment that raises."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

import rlora
from rlora.config import load_config
from rlora.environments import Agent
from rlora.models import build_policy, load_tokenizer
from rlora.rollout.episodes import EpisodeRunner
from rlora.rollout.forward import forward_responses
from rlora.rollout.generation import DrawToken
from rlora.rollout.prompts import normalize_prompts
from rlora.tiny import agent_tokenizer, tiny_group_config, tiny_ppo_config

GEN = {"max_new_tokens": 5, "do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}


class Countdown:
    """Says a word after each turn, three times; the episode's reward is how often the model said 'a'."""

    def reset(self, **row):
        self.said, self.left = [], 3
        return None

    def step(self, reply):
        self.said.append(reply)
        self.left -= 1
        return None if self.left == 0 else f"again {self.left}"

    def get_reward(self):
        return float(sum(r.count("a") for r in self.said))


def build(model_dir, tmp_path, environment=Countdown, method="group", **sections):
    base = tiny_group_config if method == "group" else tiny_ppo_config
    config = base(model_dir, str(tmp_path), **sections)
    config["train"] = {**config["train"], "seq_length": 160}
    config["method"] = {**config["method"], "max_turns": 4, "gen_kwargs": GEN}
    return rlora.build_trainer(prompts=[[{"role": "user", "content": "hi"}], "go on"], config=config,
                               environment=environment, verbose=False)


def runner_and_policy(model_dir, seq_length=200, environment=Countdown, max_turns=4, keep_cache=True, **agent):
    config = load_config({"model": {"model_path": model_dir, "peft_config": {"peft_type": "LORA", "r": 4,
                                                                              "lora_alpha": 16}}})
    tok = load_tokenizer(config.tokenizer, model_dir)
    torch.manual_seed(1)
    policy = build_policy(config.model, tok, value_head=False)
    policy.eval()
    runner = EpisodeRunner(Agent(environment, max_turns=max_turns, **agent), tok, seq_length, keep_cache=keep_cache)
    return runner, policy, tok


def run(runner, policy, prompts, seed=3, **kwargs):
    torch.manual_seed(seed)
    return runner.run(policy, normalize_prompts(prompts), list(range(len(prompts))), GEN, **kwargs)


PROMPTS = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer opening"}]]


def runs(values: list[bool]) -> list[tuple[bool, int, int]]:
    """(value, start, end) of each run of equal values."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((values[start], start, i))
            start = i
    return out


def test_an_episode_is_the_rendering_of_its_conversation_with_the_replies_as_sampled(agent_model_dir):
    runner, policy, tok = runner_and_policy(agent_model_dir)
    rollouts = run(runner, policy, PROMPTS, num_generations=2)
    assert len(rollouts.episodes) == 4 and rollouts.action_mask.shape == rollouts.response_ids.shape
    assert max(e.turns for e in rollouts.episodes) >= 2
    for k, episode in enumerate(rollouts.episodes):
        opening = rollouts.query_ids[k][rollouts.query_mask[k]].tolist()
        response = rollouts.response_ids[k][rollouts.response_mask[k]].tolist()
        action = rollouts.action_mask[k][rollouts.response_mask[k]].tolist()
        replies = [response[a:b] for own, a, b in runs(action) if own]
        assert len(replies) == episode.turns
        # the conversation with each reply's exact text renders to the episode's tokens
        exact, turn = list(episode.messages[:episode.opening]), 0
        for message in episode.completion:
            if message["role"] == "assistant":
                reply = replies[turn]
                ended = reply[-1] == runner.end_of_turn
                exact.append({"role": "assistant", "content": tok.decode(reply[:-1] if ended else reply)})
                turn += 1
            else:
                exact.append(message)
        rendered = tok.apply_chat_template(exact, tokenize=False)
        decoded = tok.decode(opening + response)
        tail = rendered[len(decoded):]
        assert rendered.startswith(decoded) and tail in ("\n", "<|im_end|>\n"), (rendered, decoded)
        assert episode.ended_by in ("environment", "truncated", "budget", "max_turns")


def test_environment_tokens_are_context_never_actions(agent_model_dir):
    runner, policy, tok = runner_and_policy(agent_model_dir)
    rollouts = run(runner, policy, PROMPTS, num_generations=2)
    for k, episode in enumerate(rollouts.episodes):
        response = rollouts.response_ids[k][rollouts.response_mask[k]].tolist()
        action = rollouts.action_mask[k][rollouts.response_mask[k]].tolist()
        said = [m["content"] for m in episode.completion if m["role"] == "user"]
        between = [tok.decode(response[a:b]) for own, a, b in runs(action) if not own]
        assert len(between) == len(said)  # one stretch of environment tokens per message it said
        for text, words in zip(between, said):
            assert text == f"\n<|im_start|>user\n{words}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("keep_cache", [True, False], ids=["kv-cache", "re-prefill"])
def test_sampled_logprobs_equal_one_pass_over_the_whole_conversation(agent_model_dir, keep_cache):
    runner, policy, tok = runner_and_policy(agent_model_dir, keep_cache=keep_cache)
    calls: list[list[torch.Tensor]] = []
    original = policy.base_model.generate

    def generate(*args, **kwargs):
        calls.append([])
        return original(*args, **kwargs)

    draw = DrawToken.draw
    DrawToken.draw = staticmethod(lambda scores: (calls[-1].append(scores.float().log_softmax(-1)), draw(scores))[1])
    policy.base_model.generate = generate
    try:
        rollouts = run(runner, policy, PROMPTS, num_generations=2, share_prompt=True)
    finally:
        DrawToken.draw = staticmethod(draw)
        del policy.base_model.generate
    episodes = rollouts.episodes
    assert max(e.turns for e in episodes) >= 2  # a multi-turn episode was sampled
    # what each draw gave each sampled token of each turn, rows being the episodes still going
    sampled = {k: [] for k in range(len(episodes))}
    for turn, steps in enumerate(calls, 1):
        live = [k for k, e in enumerate(episodes) if e.turns >= turn]
        for position, k in enumerate(live):
            row = rollouts.response_ids[k][rollouts.action_mask[k]].tolist()
            done = sum(len(s) for s in sampled[k])
            reply = []
            for step in steps:
                if done + len(reply) >= len(row):
                    break
                token = row[done + len(reply)]
                reply.append(float(step[position, token]))
                if token == runner.end_of_turn:
                    break
            sampled[k].append(reply)
    with torch.no_grad():
        out = forward_responses(policy, rollouts.query_ids, rollouts.query_mask, rollouts.response_ids,
                                rollouts.response_mask)
    for k in range(len(episodes)):
        scored = out.logprobs[k][rollouts.action_mask[k]]
        drawn = torch.tensor([x for reply in sampled[k] for x in reply])
        assert len(drawn) == len(scored)
        torch.testing.assert_close(drawn, scored, atol=2e-5, rtol=0)


def test_kv_cache_continuation_samples_what_re_running_the_conversation_samples(agent_model_dir):
    runner, policy, _ = runner_and_policy(agent_model_dir, keep_cache=True)
    cached = run(runner, policy, PROMPTS, num_generations=2)
    runner.keep_cache = False
    again = run(runner, policy, PROMPTS, num_generations=2)
    assert torch.equal(cached.response_ids, again.response_ids)
    assert torch.equal(cached.action_mask, again.action_mask)


def test_a_message_over_the_budget_ends_the_episode_and_is_not_kept(agent_model_dir):
    runner, policy, tok = runner_and_policy(agent_model_dir, seq_length=135)
    rollouts = run(runner, policy, PROMPTS[:1], num_generations=2)
    lengths = rollouts.query_mask.sum(1) + rollouts.response_mask.sum(1)
    assert (lengths <= 135).all()
    assert any(e.ended_by == "budget" for e in rollouts.episodes)
    for e in rollouts.episodes:
        assert e.completion[-1]["role"] == "assistant" or e.ended_by != "budget"


class Raising(Countdown):
    def step(self, reply):
        raise KeyError("no such state")


def test_an_environment_that_raises_names_itself_the_method_and_the_record(agent_model_dir):
    runner, policy, _ = runner_and_policy(agent_model_dir, environment=Raising)
    with pytest.raises(RuntimeError, match=r"Raising\.step\(\) raised KeyError.*prompt 0 \('hi'"):
        run(runner, policy, PROMPTS, num_generations=1)


def test_a_template_that_rerenders_earlier_messages_is_refused(agent_model_dir):
    tok = agent_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "{% if loop.last %}!{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="prefix|HERMES_TOOL_TEMPLATE"):
        EpisodeRunner(Agent(Countdown, max_turns=2), tok, 100)


def test_tools_need_a_template_that_renders_them(agent_model_dir):
    tok = agent_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: the key.
        """
        return key

    with pytest.raises(ValueError, match="tokenizer.chat_template"):
        EpisodeRunner(Agent(tools=[lookup]), tok, 100)


class Lookup:
    """An environment whose public method is a tool (TRL's environment_factory)."""

    def reset(self, **row):
        self.calls = []
        return "find the code"

    def code(self, name: str) -> str:
        """The secret code of a name.

        Args:
            name: whose code.
        """
        self.calls.append(name)
        if name == "boom":
            raise ValueError("no code for boom")
        return f"code-{name}"


def test_tool_calls_run_and_their_results_follow_the_reply():
    agent = Agent(Lookup, max_turns=3)
    episode = agent.start(normalize_prompts(["x"])[0], "prompt 0")
    assert episode.messages == [{"role": "user", "content": "find the code"}] and "code" in episode.tools
    reply = 'let me see <tool_call>{"name": "code", "arguments": {"name": "bob"}}</tool_call>'
    following = agent.respond([episode], [reply], [False], ["prompt 0"])[0]
    assert following == [{"role": "tool", "name": "code", "content": "code-bob"}]
    assert episode.environment.calls == ["bob"] and episode.tool_calls == 1 and episode.tool_errors == 0
    bad = '<tool_call>{"name": "code", "arguments": {"name": "boom"}}</tool_call>'
    following = agent.respond([episode], [bad], [False], ["prompt 0"])[0]
    assert "no code for boom" in following[0]["content"] and episode.tool_errors == 1
    assert agent.respond([episode], ["done"], [False], ["prompt 0"])[0] is None  # no call, no step: it ends
    assert episode.ended_by == "environment" and episode.turns == 3


def test_tool_calling_iterations_are_capped_as_trl_caps_them():
    agent = Agent(Lookup, max_turns=5, max_tool_calling_iterations=1)
    episode = agent.start(normalize_prompts(["x"])[0], "prompt 0")
    call = '<tool_call>{"name": "code", "arguments": {"name": "a"}}</tool_call>'
    assert agent.respond([episode], [call], [False], ["p"])[0] is not None
    assert agent.respond([episode], [call], [False], ["p"])[0] is None  # the second call does not run
    assert episode.environment.calls == ["a"] and episode.ended_by == "max_tool_calling_iterations"


@pytest.mark.parametrize("method", ["group", "ppo"])
def test_agents_train_in_the_one_loop_and_log_their_episodes(agent_model_dir, tmp_path, method):
    seen = {}

    def said_a(completions, environments, **kwargs):
        seen["completions"], seen["environments"] = completions, environments
        return [float(c[0]["content"].startswith("a")) for c in completions]

    config = (tiny_group_config if method == "group" else tiny_ppo_config)(
        agent_model_dir, str(tmp_path), train={"total_steps": 2, "seq_length": 160})
    config["method"] = {**config["method"], "max_turns": 3, "gen_kwargs": GEN}
    trainer = rlora.train(reward_fn=said_a, prompts=PROMPTS * 2, config=config, environment=Countdown, verbose=False)
    phase = next(r for r in trainer.history if "phase" in r)
    assert phase["episodes/turns_max"] >= 2 and phase["episodes/environment_tokens_mean"] > 0
    assert "rewards/environment/mean" in phase and "rewards/said_a/mean" in phase
    assert all(isinstance(e, Countdown) for e in seen["environments"])
    assert any(m["role"] == "user" for c in seen["completions"] for m in c)  # the environment's words
    evals = [r for r in trainer.history if r.get("eval")]
    assert evals and "reward/environment/mean" in evals[-1]


def interleaved(exp_len: int = 6, seed: int = 0):
    """A PPO experience of 3 samples whose responses hold environment tokens between the model's
    (action_mask), and the same numbers with the environment tokens taken out (every token the model's)."""
    from rlora.tiny import random_experience

    exp = random_experience(3, 2, exp_len, 50, seed=seed)
    action = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    exp.response_mask[2, 5] = False  # padding at the end of a row
    exp.action_mask, exp.loss_mask = action & exp.response_mask, action & exp.response_mask
    compact = random_experience(3, 2, 4, 50, seed=seed)
    for name in ("response_ids", "logprobs", "values", "ref_logprobs"):
        rows = [getattr(exp, name)[k][exp.action_mask[k]] for k in range(3)]
        setattr(compact, name, torch.nn.utils.rnn.pad_sequence(rows, batch_first=True))
    lengths = exp.action_mask.sum(1)
    compact.response_mask = compact.loss_mask = torch.arange(4)[None, :] < lengths[:, None]
    compact.action_mask = compact.response_mask.clone()
    return exp, compact


def test_gae_runs_over_the_models_tokens_as_one_sequence():
    from rlora.config import PPOConfig
    from rlora.distributed import Processes
    from rlora.methods import build_method

    method = build_method(PPOConfig(gamma=0.9, lam=0.8, init_kl_coef=0.1), 8)
    exp, compact = interleaved()
    scores = torch.tensor([1.0, -0.5, 2.0])
    dist = Processes(Accelerator(cpu=True))
    for e in (exp, compact):
        method.advantages(e, scores, scores, method.run_state(None, torch.Generator(), ""), dist)
    for k in range(3):
        assert torch.allclose(exp.advantages[k][exp.action_mask[k]], compact.advantages[k][compact.action_mask[k]])
        assert torch.allclose(exp.returns[k][exp.action_mask[k]], compact.returns[k][compact.action_mask[k]])
    environment = exp.response_mask & ~exp.action_mask
    assert (exp.advantages[environment] == 0).all() and (exp.returns[environment] == 0).all()


@pytest.mark.parametrize("method", ["ppo", "grpo", "reinforce++"])
def test_environment_tokens_have_exactly_zero_gradient(method):
    from rlora.config import GRPOConfig, PPOConfig
    from rlora.distributed import Processes
    from rlora.methods import build_method
    from rlora.rollout.forward import ResponseOutputs

    config = PPOConfig() if method == "ppo" else GRPOConfig(num_generations=3, num_rollouts=3, beta=0.1,
                                                            advantage_estimator=method)
    m = build_method(config, 3)
    exp, _ = interleaved()
    scores = torch.tensor([1.0, -0.5, 2.0])
    m.advantages(exp, scores, scores, m.run_state(None, torch.Generator(), ""), Processes(Accelerator(cpu=True)))
    logprobs = (exp.logprobs + 0.1 * torch.randn_like(exp.logprobs)).requires_grad_()
    values = torch.randn_like(exp.values).requires_grad_()
    out = ResponseOutputs(logprobs, values if method == "ppo" else None, exp.ref_logprobs, torch.zeros_like(logprobs))
    loss, _ = m.loss(out, exp, float(exp.loss_mask.sum()))
    loss.backward()
    environment = exp.response_mask & ~exp.action_mask
    assert logprobs.grad[exp.action_mask].abs().sum() > 0
    assert (logprobs.grad[environment] == 0).all()
    if method == "ppo":
        assert (values.grad[environment] == 0).all() and values.grad[exp.action_mask].abs().sum() > 0


def test_an_agent_run_resumed_mid_phase_equals_the_uninterrupted_run(agent_model_dir, tmp_path):
    from safetensors.torch import load_file

    def run_to(run_dir, steps, **train):
        config = tiny_group_config(agent_model_dir, str(run_dir), train={"total_steps": steps, "seq_length": 160,
                                                                        "eval_interval": 1000, **train})
        config["method"] = {**config["method"], "max_turns": 3, "gen_kwargs": GEN}
        return rlora.train(prompts=PROMPTS * 2, config=config, environment=Countdown, verbose=False)

    run_to(tmp_path / "full", 6)
    run_to(tmp_path / "resumed", 2)  # stops mid-phase (4 steps a phase)
    run_to(tmp_path / "resumed", 6, resume_from_checkpoint="latest")
    a = load_file(f"{tmp_path}/full/ckpts/step_6/adapter/adapter_model.safetensors")
    b = load_file(f"{tmp_path}/resumed/ckpts/step_6/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Echo(Countdown):
    def reset(self, **row):
        super().reset()
        return f"echo {row['word']}"


def test_a_dict_of_environments_routes_each_record_by_its_environment_column():
    agent = Agent({"count": Countdown, "echo": Echo}, max_turns=2)
    prompts = normalize_prompts([{"prompt": "a", "environment": "echo", "word": "hey"},
                                 {"prompt": "b", "environment": "count", "word": "x"}])
    first, second = (agent.start(p, f"prompt {i}") for i, p in enumerate(prompts))
    assert isinstance(first.environment, Echo) and first.messages == [{"role": "user", "content": "echo hey"}]
    assert type(second.environment) is Countdown and second.messages == [{"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="names environment 'other'.*'environment' column"):
        agent.start(normalize_prompts([{"prompt": "c", "environment": "other", "word": "x"}])[0], "prompt 2")


def test_the_yaml_task_section_names_the_environment(agent_model_dir, tmp_path):
    module = tmp_path / "my_env.py"
    module.write_text("class Quiet:\n    def reset(self, **row):\n        return 'say something'\n"
                      "    def get_reward(self):\n        return 1.0\n")
    config = tiny_group_config(agent_model_dir, str(tmp_path / "run"), train={"total_steps": 1, "seq_length": 160},
                               task={"environment": f"{module}:Quiet", "prompts": ["x", "y", "z", "w"]})
    config["method"] = {**config["method"], "max_turns": 2, "gen_kwargs": GEN}
    trainer = rlora.train(config=config, verbose=False)
    phase = next(r for r in trainer.history if "phase" in r)
    assert phase["reward"] == 1.0 and phase["episodes/turns_max"] == 1  # step-less: one turn, then it ends


def test_multi_turn_episodes_are_refused_where_sharded_weights_need_every_process_in_each_forward():
    from types import SimpleNamespace

    from rlora.rollout.episodes import check_turns_agree

    for agent, world, sharded in ((SimpleNamespace(max_turns=3), 1, True), (SimpleNamespace(max_turns=3), 2, False),
                                  (SimpleNamespace(max_turns=1), 2, True)):
        check_turns_agree(agent, world, sharded)  # one process, whole weights, or one turn: every forward agrees
    with pytest.raises(ValueError, match="method.max_turns=3: .*ZeRO stage 2"):
        check_turns_agree(SimpleNamespace(max_turns=3), 2, True)
