"""Benchmark: how far the randomwalks PPO step is from this machine's compute floor.

One optimizer step of the demo's settings (64 samples, prompt 1 + response 9 tokens, LoRA r=8 on
the 0.8 M-parameter SFT GPT-2): its forward + backward FLOPs, counted by torch's FlopCounterMode,
divided by this machine's measured matmul rate, against the measured step time.

    .venv/bin/python benchmarks/compute_floor.py
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_of, record  # noqa: E402


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of `(m, k) @ (k, n)` in `dtype` on this machine, best of several runs."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    reps = 50
    seconds = best_of(lambda: [a @ b for _ in range(reps)], repeats=5)
    return 2 * m * k * n * reps / seconds


def main() -> None:
    import tempfile

    import rlora
    from rlora.demo import demo_config
    from rlora.tasks.randomwalks import make_task, sft_model
    from rlora.tiny import random_experience

    torch.set_num_threads(2)
    task = make_task()
    with tempfile.TemporaryDirectory() as run_dir:
        config = demo_config(str(sft_model(task)), run_dir, total_steps=8, eval_interval=10**6)
        trainer = rlora.train(task.reward_fn, task.prompts, config=config, verbose=False)
    n, r = 64, 9
    exp = random_experience(n, 1, r, vocab_size=len(trainer.tokenizer) - 1, seed=0)
    batch = torch.arange(n)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(exp, batch)
    flops = counter.get_total_flops()
    step_s = best_of(lambda: trainer.train_step(exp, batch), repeats=10)
    hidden = trainer.policy.base_model.config.n_embd
    rate = matmul_rate(n * (r + 1), hidden, 3 * hidden)  # the shape of c_attn in this step
    floor_s = flops / rate
    rows = ["| quantity | value |", "|---|---|",
            f"| forward + backward FLOPs of one optimizer step | {flops / 1e9:.3f} GFLOP |",
            f"| matmul rate at the step's shapes ({n * (r + 1)} x {hidden} x {3 * hidden}) | {rate / 1e9:.1f} GFLOP/s |",
            f"| compute floor (FLOPs / rate) | {floor_s * 1000:.1f} ms |",
            f"| measured optimizer step (best of 10) | {step_s * 1000:.1f} ms |",
            f"| measured / floor | {step_s / floor_s:.2f} |"]
    table = "\n".join(rows)
    print(table)
    record("compute_floor", "randomwalks PPO step against the compute floor", "CPU, 2 threads", table)


if __name__ == "__main__":
    main()
