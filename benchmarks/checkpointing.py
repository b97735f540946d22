"""Benchmark: activation checkpointing (`model.gradient_checkpointing`) in a GRPO update on
SmolLM2-135M-Instruct, by completion length.

One microbatch of 8 completions (2 prompts x 4, the shared prefix's pass) of `--lengths` tokens
each, LoRA r=8 on every linear layer, fp32: the update's forward, loss and backward with and
without checkpointing, run in turn (`--rounds`, the best of each kept). Memory is what the
backward pass keeps: the bytes of every tensor autograd saves for it (counted with
`torch.autograd.graph.saved_tensors_hooks`, exact and independent of the allocator), and the
peak RSS of a process that runs the step alone (`--rss`).

    .venv/bin/python benchmarks/checkpointing.py [--lengths 128 512] [--rounds 3] [--rss] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record, run_measured  # noqa: E402

import rlora  # noqa: E402
from rlora.fetch import fetch  # noqa: E402
from rlora.models.checkpointing import checkpointing  # noqa: E402
from rlora.rollout.store import Experience  # noqa: E402

G, PROMPTS = 4, ["Write one sentence about the sea.", "Write one sentence about a mountain."]


def trainer_for(model: str, length: int, checkpointed: bool):
    config = {"train": {"seq_length": length + 64, "batch_size": 8, "minibatch_size": 8, "total_steps": 1,
                        "run_dir": "/tmp/rlora-bench-checkpointing", "tracker": None},
              "model": {"model_path": model, "gradient_checkpointing": checkpointed,
                        "peft_config": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                                        "task_type": "CAUSAL_LM"}},
              "method": {"name": "GRPOConfig", "num_rollouts": 8, "num_generations": G, "chunk_size": 8,
                         "gen_kwargs": {"max_new_tokens": length, "do_sample": True}}}
    trainer = rlora.build_trainer(lambda completions, **_: [0.0] * len(completions), prompts=PROMPTS,
                                  config=config, verbose=False)
    trainer.model.eval()
    return trainer


def microbatch(trainer, length: int) -> Experience:
    """Random completions of `length` real tokens after the two prompts, with random advantages."""
    g = torch.Generator().manual_seed(0)
    ids = [trainer.prompt_ids[i] for i in range(len(PROMPTS)) for _ in range(G)]
    p = max(map(len, ids))
    query = torch.tensor([[0] * (p - len(x)) + x for x in ids])
    qmask = torch.tensor([[False] * (p - len(x)) + [True] * len(x) for x in ids])
    n = len(ids)
    response = torch.randint(100, 40000, (n, length), generator=g)
    rmask = torch.ones(n, length, dtype=torch.bool)
    zeros = torch.zeros(n, length)
    return Experience(query, qmask, response, rmask, logprobs=zeros, values=zeros,
                      advantages=torch.randn(n, 1, generator=g).expand(n, length).clone(), returns=zeros,
                      ref_logprobs=zeros, loss_mask=rmask)


def step(trainer, mb: Experience) -> tuple[float, int]:
    """One update's forward, loss and backward: its seconds and the bytes saved for backward."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    trainer.optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with trainer.sampler.precision(), checkpointing(trainer.policy.base_model, trainer.checkpointing):
            out = trainer.method.forward(trainer.model, trainer.policy, mb, 1.0, with_entropy=True)
            loss, _ = trainer.method.loss(out, mb, float(mb.loss_mask.sum()))
    loss.backward()
    return time.perf_counter() - t0, saved[0]


def worker(args) -> None:
    trainer = trainer_for(args.model, args.worker_length, args.worker_checkpointed)
    step(trainer, microbatch(trainer, args.worker_length))


def update_arguments(doc: str, rounds: int, worker_flag: str) -> argparse.Namespace:
    """The options of a benchmark that compares two kinds of update by completion length; the
    hidden `--worker-length` and `worker_flag` run one step in a process of its own (`--rss`).
    Sets the torch threads and fetches the model."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss", action="store_true", help="also the peak RSS of a process running one step")
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--worker-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument(worker_flag, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.model = args.model or fetch("smollm2-135m-instruct")
    return args


def main() -> None:
    args = update_arguments(__doc__, 3, "--worker-checkpointed")
    if args.worker_length:
        return worker(args)
    rows = []
    for length in args.lengths:
        trainers = {c: trainer_for(args.model, length, c) for c in (False, True)}
        mb = microbatch(trainers[False], length)
        best = {c: (float("inf"), 0) for c in trainers}
        for _ in range(args.rounds):
            for c, trainer in trainers.items():
                seconds, saved = step(trainer, mb)
                best[c] = (min(best[c][0], seconds), saved)
        rss = {c: run_measured([sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                                "--worker-length", str(length), "--worker-checkpointed", str(int(c))])
               for c in trainers} if args.rss else {}
        rows.append((length, best, rss))
        print(f"{length} tokens: kept {best[False][0]:.2f} s, {best[False][1] / 2**20:.0f} MiB saved; checkpointed "
              f"{best[True][0]:.2f} s, {best[True][1] / 2**20:.0f} MiB saved", flush=True)
    lines = ["| completion tokens | s / update (kept) | s / update (checkpointed) | time ratio | saved for backward "
             "(kept) | (checkpointed) | memory ratio |" + (" peak RSS kept / checkpointed MiB |" if args.rss else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if args.rss else "")]
    for length, best, rss in rows:
        (t0, m0), (t1, m1) = best[False], best[True]
        extra = f" {rss[False]:.0f} / {rss[True]:.0f} |" if rss else ""
        lines.append(f"| {length} | {t0:.2f} | {t1:.2f} | {t1 / t0:.2f} | {m0 / 2**20:.0f} MiB | {m1 / 2**20:.0f} MiB "
                     f"| {m1 / m0:.2f} |{extra}")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("checkpointing", "Activation checkpointing: a GRPO update on SmolLM2-135M-Instruct",
               f"CPU, {args.threads} threads, fp32; 8 completions (2 prompts x 4, shared prefix), LoRA r=8 all-linear; "
               f"best of {args.rounds} rounds", table)


if __name__ == "__main__":
    main()
