"""TRL 1.16's GRPO scripts on rlora with the import changed (`rlora.trl`): TRL's documented examples
on tiny models, TRL's batch arithmetic, the SFT-adapter reference, reward models, callbacks,
outputs, resume, and the refusals."""

from __future__ import annotations

import hashlib
import json
import os

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback

from rlora.trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'][0] }}:{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>a:{% endif %}")


def args(tmp_path, **fields):
    """A small run's GRPOConfig, as a TRL script on a CPU would set it."""
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
                use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=3)
    return GRPOConfig(**{**base, **fields})


def lora():
    return LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")


# --- TRL's quickstart: a length reward on a text dataset
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def test_the_quickstart_trains_with_the_import_changed(tiny_model_dir, tmp_path):
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in ["hello", "abc", "xyz", "the "] * 2])
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, args=args(tmp_path),
                          train_dataset=dataset, peft_config=lora())
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.state.max_steps == 2
    logged = [r for r in trainer.state.log_history if "reward" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for key in ("loss", "grad_norm", "learning_rate", "reward", "reward_std", "frac_reward_zero_std", "entropy",
                "clip_ratio/region_mean", "completions/mean_length", "rewards/reward_len/mean", "step_time", "epoch"):
        assert key in logged[0], key
    assert isinstance(trainer.model, PeftModel)
    assert os.path.isdir(os.path.join(tmp_path, "out", "checkpoint-2"))  # TRL's layout: output_dir/checkpoint-N


def test_trl_s_batch_arithmetic_gives_the_same_prompts_completions_and_steps(tiny_model_dir, tmp_path):
    """per_device 4 x accumulation 2 on one process, 4 generations: a generation of 8 completions
    (2 prompts), trained num_iterations=2 times in steps of 8: TRL's 2 optimizer steps a
    generation; 6 prompts, 2 epochs: floor(6/2) x 2 x 2 = 12 steps."""
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the ", "a", "b"]]
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, train_dataset=dataset,
                          peft_config=lora(),
                          args=args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                    num_iterations=2, max_steps=-1, num_train_epochs=2))
    config = trainer.config
    assert (config.method.num_rollouts, config.method.num_generations, config.method.ppo_epochs) == (8, 4, 2)
    assert (config.train.batch_size, config.train.minibatch_size, config.train.total_steps) == (8, 4, 12)
    assert trainer.args.generation_batch_size == 8 and trainer.args.steps_per_generation == 2


# --- conversational prompts, a format reward and an accuracy reward reading a column, weighted
def format_reward(completions, **kwargs):
    return [1.0 if c[0]["content"].startswith("a") else 0.0 for c in completions]


def accuracy_reward(completions, solution, **kwargs):
    return [float(s in c[0]["content"]) for c, s in zip(completions, solution)]


def test_conversational_prompts_and_weighted_rewards_with_a_solution_column(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tokenizer.chat_template = TEMPLATE
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"say {s}"}], "solution": s}
                                          for s in "aesx"])
    seen = []

    def spy(completions, solution, **kwargs):
        seen.append(list(solution))
        return accuracy_reward(completions, solution)

    spy.__name__ = "accuracy_reward"
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=[format_reward, spy], train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora(),
                          args=args(tmp_path, reward_weights=[0.5, 2.0], max_completion_length=8))
    trainer.train()
    assert seen and all(set(s) <= set("aesx") for s in seen)
    record = [r for r in trainer.state.log_history if "reward" in r][0]
    assert {"rewards/format_reward/mean", "rewards/accuracy_reward/mean"} <= set(record)
    expected = 0.5 * record["rewards/format_reward/mean"] + 2.0 * record["rewards/accuracy_reward/mean"]
    assert record["reward"] == pytest.approx(expected, abs=1e-6)


# --- a reward model, scored as TRL scores one
def test_a_sequence_classification_reward_model_scores_as_trl_does(tiny_model_dir, tmp_path, tokenizer):
    from transformers import GPT2ForSequenceClassification

    from rlora.tiny import tiny_config
    from rlora.trl.rewards import SequenceClassifierReward

    torch.manual_seed(5)
    config = tiny_config("gpt2", vocab_size=len(tokenizer))
    config.num_labels = 1
    path = str(tmp_path / "rm")
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    reward = SequenceClassifierReward(path, None)
    scores = reward(["ab", "abc"], ["cd", "d"])
    model = GPT2ForSequenceClassification.from_pretrained(path).eval()
    for text, score in zip(["abcd", "abcd"], scores):  # prompt + completion, no special tokens
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
        assert score == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the "]]
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=path, train_dataset=dataset, peft_config=lora(),
                          args=args(tmp_path, max_steps=1))
    trainer.train()
    assert "rewards/rm/mean" in [r for r in trainer.state.log_history if "reward" in r][0]


# --- an SFT adapter: the reference is that adapter as it was
def test_a_run_from_an_sft_peft_model_logs_kl_zero_at_its_first_step(tiny_model_dir, tmp_path):
    torch.manual_seed(7)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")),
                         LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM"))
    sft.save_pretrained(str(tmp_path / "sft"))
    file = os.path.join(tmp_path, "sft", "adapter_model.safetensors")
    before = hashlib.sha256(open(file, "rb").read()).hexdigest()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")),
                                      str(tmp_path / "sft"), is_trainable=True)
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the "]]
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, train_dataset=dataset,
                          args=args(tmp_path, beta=0.1, max_steps=3))
    trainer.train()
    kl = [r["kl"] for r in trainer.state.log_history if "kl" in r]
    assert kl[0] == 0.0 and kl[-1] > 0.0
    assert hashlib.sha256(open(file, "rb").read()).hexdigest() == before


# --- callbacks, outputs and resume
class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("begin", state.global_step, "model" in kwargs))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step", state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, sorted(logs)))

    def on_save(self, args, state, control, **kwargs):
        self.events.append(("save", state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("end", state.global_step, len(state.log_history)))


def test_callbacks_see_transformers_events_and_save_model_loads_with_peft(tiny_model_dir, tmp_path):
    recorder = Recorder()
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the "]]
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, train_dataset=dataset,
                          peft_config=lora(), callbacks=[recorder],
                          args=args(tmp_path, max_steps=4, logging_steps=2, save_strategy="steps", save_steps=2))
    trainer.train()
    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "begin" and recorder.events[0][2] and kinds[-1] == "end"
    assert [e[1] for e in recorder.events if e[0] == "step"] == [1, 2, 3, 4]
    logs = [e for e in recorder.events if e[0] == "log"]
    assert [e[1] for e in logs[:2]] == [2, 4] and "reward" in logs[0][2] and "train_runtime" in logs[-1][2]
    assert [e[1] for e in recorder.events if e[0] == "save"] == [2, 4]
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")), out).eval()
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-6)


def final_adapter(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))


def test_resume_from_checkpoint_continues_exactly(tiny_model_dir, tmp_path):
    # a constant rate: TRL's default linear decay runs over max_steps, so a 2-step run is no prefix of a 4-step one
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the "]]

    def run(directory, steps, resume=None):
        trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, train_dataset=dataset,
                              peft_config=lora(), args=args(directory, max_steps=steps, save_strategy="steps",
                                                            save_steps=2, num_iterations=2,
                                                            lr_scheduler_type="constant"))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run(tmp_path / "full", 4)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 4, resume=True)
    assert resumed.state.global_step == 4
    a, b = final_adapter(tmp_path / "full" / "out" / "checkpoint-4"), final_adapter(tmp_path / "part" / "out" /
                                                                                     "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- RLOO, and what is refused
def test_rloo_runs_the_leave_one_out_baseline_with_its_defaults(tiny_model_dir, tmp_path):
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the "]]
    trainer = RLOOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, train_dataset=dataset,
                          peft_config=lora(), args=RLOOConfig(**{**json.loads(json.dumps(dict(
                              output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                              max_completion_length=6, report_to="none", use_cpu=True, bf16=False,
                              save_strategy="no", disable_tqdm=True)))}))
    method = trainer.config.method
    assert (method.advantage_estimator, method.num_generations, method.beta) == ("rloo", 2, 0.05)
    trainer.train()
    assert trainer.trainer.method.passes.reference  # beta > 0: the reference pass runs


@pytest.mark.parametrize(("fields", "match"), [
    ({"use_vllm": True}, r"use_vllm=True: .*vLLM is not used"),
    ({"sync_ref_model": True}, r"sync_ref_model=True: .*reference is the frozen base"),
    ({"top_entropy_quantile": 0.2}, "high-entropy tokens is not implemented"),
    ({"optim": "sgd"}, r"optim='sgd'.*AdamW"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1: a TrainingArguments setting"),
], ids=["vllm", "ref-sync", "entropy-mask", "optimizer", "training-arguments"])
def test_what_rlora_does_not_run_is_refused_with_the_reason(tiny_model_dir, tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, train_dataset=[{"prompt": "a"}] * 4,
                    peft_config=lora(), args=args(tmp_path, **fields))


def test_an_unknown_field_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(TypeError, match="did you mean 'max_completion_length'"):
        args(tmp_path, max_completion_lenght=8)


# --- the same examples on a real model (slow tier)
@pytest.fixture(scope="module")
def smollm2():
    from rlora.fetch import fetch

    return fetch("smollm2-135m-instruct")


@pytest.mark.slow
def test_trl_s_examples_on_smollm2(smollm2, tmp_path):
    """The quickstart's length reward on text prompts, then a chat dataset with weighted format and
    accuracy rewards, then an SFT adapter's run at KL 0: TRL's scripts, the import changed."""
    text = datasets.Dataset.from_list([{"prompt": p} for p in ["The weather today", "My favourite food",
                                                               "A good book", "The city at night"]])
    trainer = GRPOTrainer(model=smollm2, reward_funcs=reward_len, train_dataset=text, peft_config=lora(),
                          args=args(tmp_path / "quickstart", per_device_train_batch_size=16, num_generations=4,
                                    max_completion_length=12, learning_rate=1e-3))
    trainer.train()
    assert trainer.state.global_step == 2
    chat = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"Say the letter {s}."}],
                                        "solution": s} for s in "abcd"])
    trainer = GRPOTrainer(model=smollm2, reward_funcs=[format_reward, accuracy_reward], train_dataset=chat,
                          peft_config=lora(), args=args(tmp_path / "chat", per_device_train_batch_size=16,
                                                        num_generations=4, max_completion_length=12,
                                                        reward_weights=[0.5, 2.0]))
    trainer.train()
    record = [r for r in trainer.state.log_history if "reward" in r][0]
    assert record["reward"] == pytest.approx(0.5 * record["rewards/format_reward/mean"] +
                                             2.0 * record["rewards/accuracy_reward/mean"], abs=1e-6)
    trainer.save_model(str(tmp_path / "sft"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), str(tmp_path / "sft"),
                                      is_trainable=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, train_dataset=text,
                          args=args(tmp_path / "from-sft", per_device_train_batch_size=16, num_generations=4,
                                    max_completion_length=12, beta=0.1, max_steps=1))
    trainer.train()
    assert [r["kl"] for r in trainer.state.log_history if "kl" in r][0] == 0.0


# --- what a script does after train(), and what its callbacks ask
class StopAtTwo(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_save = True
            control.should_training_stop = True
        return control


def test_control_requests_are_carried_out_and_train_returns_trl_s_output(tiny_model_dir, tmp_path):
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the "]]
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, train_dataset=dataset,
                          peft_config=lora(), callbacks=[StopAtTwo()], args=args(tmp_path, max_steps=6,
                                                                                logging_steps=0.5))
    output = trainer.train()
    trainer.end()  # TRL's scripts call it after train() with transformers >= 5.18
    assert output.global_step == 2 and "train_runtime" in output.metrics and output.training_loss == \
        pytest.approx(output.metrics["train_loss"])
    assert os.path.isdir(os.path.join(tmp_path, "out", "checkpoint-2"))
    assert trainer.state.logging_steps == 3  # half of max_steps=6, as transformers reads a fraction
    with pytest.raises(NotImplementedError, match="output_dir only"):
        trainer.push_to_hub()


@pytest.mark.parametrize(("fields", "logged"), [({"logging_strategy": "no"}, []), ({"logging_steps": 2}, [2, 4])],
                         ids=["no-logging", "every-2"])
def test_the_logging_strategy_is_honoured(tiny_model_dir, tmp_path, fields, logged):
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the "]]
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, train_dataset=dataset,
                          peft_config=lora(), args=args(tmp_path, max_steps=4, **fields))
    trainer.train()
    assert [r["step"] for r in trainer.state.log_history if "reward" in r] == logged


def test_evaluation_follows_eval_strategy_and_eval_on_start(tiny_model_dir, tmp_path):
    dataset = [{"prompt": p} for p in ["hello", "abc", "xyz", "the "]]
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, train_dataset=dataset,
                          eval_dataset=dataset[:2], peft_config=lora(),
                          args=args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2))
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_reward" in r]
    assert [r["step"] for r in evals] == [2, 4]  # TRL's eval_on_start is False: no step-0 evaluation
    assert set(trainer.evaluate()) >= {"eval_reward"}


def test_rloo_takes_only_trl_s_rloo_fields_and_a_peft_model_s_run_is_described_by_its_config(tiny_model_dir,
                                                                                             tmp_path):
    with pytest.raises(TypeError, match="unknown argument 'loss_type'"):
        RLOOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type="cispo")
    torch.manual_seed(7)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")),
                         LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM"))
    trainer = GRPOTrainer(model=sft, reward_funcs=reward_len, train_dataset=[{"prompt": "ab"}] * 4,
                          args=args(tmp_path, per_device_train_batch_size=4, num_generations=8,
                                    generation_batch_size=8))
    initial = os.path.join(tmp_path, "out", "initial_adapter")
    assert trainer.config.model.model_path == initial and os.path.isfile(os.path.join(initial, "adapter_config.json"))
    assert trainer.config.model.reference == "adapter"
    assert trainer.config.method.shared_prefix is False  # a process's microbatch of 4 holds no whole group of 8
    assert trainer.config.method.use_bias_correction_kl is True  # TRL's default


@pytest.mark.parametrize("fields, expected", [({}, True), ({"gradient_checkpointing": False}, False),
                                              ({"activation_checkpointing": False}, False)])
def test_gradient_checkpointing_carries_over_under_either_name(tiny_model_dir, tmp_path, fields, expected):
    trainer = GRPOTrainer(model=tiny_model_dir("gpt2"), reward_funcs=reward_len, args=args(tmp_path, **fields),
                          train_dataset=[{"prompt": "hello"}] * 8, peft_config=lora())
    assert trainer.config.model.gradient_checkpointing is expected
