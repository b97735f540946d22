"""TRL 1.16's agent arguments through `rlora.trl`: the documented `environment_factory` example
(IncrementEnv) and standalone `tools`, with the import changed, on a tiny model whose chat
template renders tools."""

from __future__ import annotations

import random

import datasets
import pytest
from peft import LoraConfig

from rlora.trl import GRPOConfig, GRPOTrainer


class IncrementEnv:
    """TRL's documented environment: a counter the model increments through a tool."""

    def reset(self, **kwargs) -> str | None:
        self.counter = 0
        return "Counter reset to 0.\n"

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


def reward_func(environments, **kwargs):
    return [environment.counter for environment in environments]


def arguments(tmp_path, **fields):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=8, max_prompt_length=1000, max_steps=2, learning_rate=1e-2, logging_steps=1,
                report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=3)
    return GRPOConfig(**{**base, **fields})


def test_trl_s_increment_env_example_runs_with_the_import_changed(agent_model_dir, tmp_path):
    seen = []

    def counting(environments, completions, **kwargs):
        seen.append((environments, completions))
        return reward_func(environments, **kwargs)

    dataset = datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"Increment the counter by {i}."}] for i in range(1, 7)]})
    trainer = GRPOTrainer(model=agent_model_dir, reward_funcs=counting, args=arguments(tmp_path),
                          train_dataset=dataset, environment_factory=IncrementEnv,
                          peft_config=LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM"))
    trainer.train()
    assert trainer.state.global_step == 2
    environments, completions = seen[0]
    assert all(isinstance(e, IncrementEnv) for e in environments)
    assert all(c[0]["role"] == "assistant" for c in completions)  # TRL's completions: the messages after the prompt
    agent = trainer.trainer.sampler.episodes.agent
    episode = agent.start(trainer.trainer.prompts[0], "prompt 0")
    # reset()'s text is added to the prompt's last message, and the environment's method is a tool
    assert episode.messages[-1]["content"].endswith("Counter reset to 0.\n")
    assert list(episode.tools) == ["increment"]
    rendered = trainer.processing_class.apply_chat_template(episode.messages, tools=episode.schemas,
                                                            tokenize=False, add_generation_prompt=True)
    assert '"name": "increment"' in rendered and "<tools>" in rendered
    logged = [r for r in trainer.state.log_history if "reward" in r]
    assert "tools/call_frequency" in logged[0] and "episodes/turns_mean" in logged[0]


def test_without_a_dataset_the_environment_writes_each_prompt(agent_model_dir, tmp_path):
    class Target(IncrementEnv):
        def reset(self, **kwargs):
            self.counter = 0
            return "Increment the counter by 3."

    trainer = GRPOTrainer(model=agent_model_dir, reward_funcs=reward_func, args=arguments(tmp_path, max_steps=1),
                          environment_factory=Target, peft_config=LoraConfig(r=4, lora_alpha=16,
                                                                             task_type="CAUSAL_LM"))
    trainer.train()
    episode = trainer.trainer.sampler.episodes.agent.start(trainer.trainer.prompts[0], "prompt 0")
    assert episode.messages == [{"role": "user", "content": "Increment the counter by 3."}]


class SelfSampledIncrementEnv(IncrementEnv):
    """TRL's documented environment in its datasetless form: it samples its own target and scores
    itself."""

    def reset(self, **kwargs) -> str | None:
        self.counter = 0
        self.target = random.randint(1, 6)
        return f"Increment the counter by {self.target}."

    def get_reward(self) -> float:
        return float(self.counter == self.target)


def test_trl_s_documented_datasetless_example_with_chat_template_kwargs(agent_model_dir, tmp_path):
    # TRL's example: GRPOTrainer(model=..., args=GRPOConfig(max_steps=..., chat_template_kwargs={"enable_thinking":
    # False}), environment_factory=IncrementEnv); no dataset, no reward function: get_reward() is the reward
    random.seed(0)
    thinking_off = {"enable_thinking": False}
    trainer = GRPOTrainer(model=agent_model_dir, args=arguments(tmp_path, chat_template_kwargs=thinking_off),
                          environment_factory=SelfSampledIncrementEnv,
                          peft_config=LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM"))
    assert trainer.config.tokenizer.chat_template_kwargs == {"enable_thinking": False}
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [r for r in trainer.state.log_history if "reward" in r]
    assert logged and all(0.0 <= r["reward"] <= 1.0 for r in logged)
    assert all(r["rewards/environment/mean"] == r["reward"] for r in logged)  # get_reward() is the only source
    episode = trainer.trainer.sampler.episodes.agent.start(trainer.trainer.prompts[0], "prompt 0")
    assert episode.messages[-1]["content"].startswith("Increment the counter by")


def test_chat_template_kwargs_given_as_json_text_and_refused_when_not_a_dict(agent_model_dir, tmp_path):
    trainer = GRPOTrainer(model=agent_model_dir, reward_funcs=reward_func,
                          args=arguments(tmp_path, chat_template_kwargs='{"enable_thinking": false}'),
                          train_dataset=[{"prompt": [{"role": "user", "content": "x"}]}] * 4,
                          environment_factory=IncrementEnv)
    assert trainer.config.tokenizer.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ValueError, match=r"chat_template_kwargs='thinking off' is no JSON object"):
        GRPOTrainer(model=agent_model_dir, reward_funcs=reward_func,
                    args=arguments(tmp_path, chat_template_kwargs="thinking off"),
                    train_dataset=[{"prompt": [{"role": "user", "content": "x"}]}] * 4,
                    environment_factory=IncrementEnv)


def test_tools_and_the_iteration_cap_reach_the_loop(agent_model_dir, tmp_path):
    def double(x: int) -> int:
        """Double a number.

        Args:
            x: The number.
        """
        return 2 * x

    trainer = GRPOTrainer(model=agent_model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                          args=arguments(tmp_path, max_steps=1, max_tool_calling_iterations=2),
                          train_dataset=[{"prompt": [{"role": "user", "content": "double 4"}]}] * 4, tools=[double],
                          peft_config=LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM"))
    assert trainer.config.method.max_turns == 3 and trainer.config.method.max_tool_calling_iterations == 2
    trainer.train()
    assert list(trainer.trainer.sampler.episodes.agent.start(trainer.trainer.prompts[0], "p").tools) == ["double"]


def test_rollout_func_is_refused_with_the_alternative(agent_model_dir, tmp_path):
    with pytest.raises(ValueError, match="rollout_func.*environment_factory or tools"):
        GRPOTrainer(model=agent_model_dir, reward_funcs=reward_func, args=arguments(tmp_path),
                    train_dataset=[{"prompt": "x"}] * 4, rollout_func=lambda prompts, trainer: {})
