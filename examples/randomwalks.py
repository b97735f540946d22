"""Randomwalks through the Python API: PPO with LoRA on a small GPT-2 fine-tuned on random walks.

    python examples/randomwalks.py
"""

import rlora
from rlora.tasks.randomwalks import make_task, sft_model

task = make_task()  # trlx's graph: 21 nodes, goal 'a', 1000 walks, seed 1002
model_dir = str(sft_model(task))  # SFT once (~20 s on 2 cores), then cached

config = rlora.load_config({
    "train": {"seq_length": 10, "batch_size": 64, "total_steps": 400, "eval_interval": 80},
    "model": {"model_path": model_dir,
              "peft_config": {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1}},
    "optimizer": {"name": "adamw", "kwargs": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-6}},
    "method": {"num_rollouts": 128, "chunk_size": 128, "ppo_epochs": 4, "init_kl_coef": 0.0, "vf_coef": 1.2,
               "cliprange_reward": 1.0, "gen_kwargs": {"max_new_tokens": 9, "top_k": 0, "top_p": 1.0, "do_sample": True},
               "eval_gen_kwargs": {"greedy": {"do_sample": False}}},
})

trainer = rlora.train(
    reward_fn=task.reward_fn,  # optimality of the walk in [0, 1]
    prompts=task.prompts,  # the start letters
    eval_prompts=task.prompts * 8,
    metric_fn=task.metric_fn,
    config=config,
)
final = trainer.history[-1]
print(f"sampled optimality {final['metrics/optimality']:.3f}, greedy {final['metrics/greedy/optimality']:.3f}")
print("greedy walks:", dict(zip(task.prompts, trainer.generate(task.prompts, do_sample=False))))
