"""Benchmark: peak memory of a phase, PPO (critic on its own adapter) against a group method, and a
group method's peak as the phase grows at a fixed microbatch.

SmolLM2-135M-Instruct on the sentiment task of `examples/methods/` (LoRA r=8 all-linear, 16 new
tokens, microbatches of 32 completions). Each run is one rollout phase in its own process; its
peak RSS is read from `wait4`. The group method is GRPO with beta 0 and one epoch (no reference
or old-log-prob pass); PPO runs its rollout pass (policy, critic adapter, reference) and 2 epochs.

    .venv/bin/python benchmarks/group_memory.py            # into BENCHMARKS.md
    .venv/bin/python benchmarks/group_memory.py --no-record
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, record, run_measured  # noqa: E402

RUNS = {  # name -> (config, completions per phase)
    "PPO, critic adapter": ("ppo", 64),
    "GRPO, 64 completions a phase": ("grpo", 64),
    "GRPO, 256 completions a phase": ("grpo", 256),
}


def worker(args: argparse.Namespace) -> None:
    """In the measured process: one phase of `args.config` with `args.completions` completions."""
    import rlora

    config = os.path.join(ROOT, "examples", "methods", f"{args.config}.yaml")
    steps = 2 if args.config == "ppo" else args.completions // 32  # one phase: 2 epochs, or one pass
    rlora.train(config=config, verbose=False, overrides=[
        f"model.model_path={args.model}", f"tokenizer.tokenizer_path={args.model}", f"train.run_dir={args.out}",
        f"train.num_threads={args.threads}", f"method.num_rollouts={args.completions}",
        f"method.chunk_size={min(args.completions, 64)}", f"train.total_steps={steps}",
        f"train.batch_size={32 if args.config == 'ppo' else args.completions}", "train.minibatch_size=32",
        "method.beta=0.0" if args.config != "ppo" else "method.init_kl_coef=0.05",
        "task.eval_prompts=[Great food and]", "train.save_best=false"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--completions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from rlora.fetch import fetch

    model = fetch("smollm2-135m-instruct")
    rss = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, (config, completions) in RUNS.items():
            rss[name] = run_measured([sys.executable, os.path.abspath(__file__), "--worker", "--config", config,
                                      "--completions", str(completions), "--model", model, "--threads",
                                      str(args.threads), "--out", os.path.join(workdir, config + str(completions))])
            print(f"{name}: {rss[name]:.0f} MiB", flush=True)
    ppo, small, large = (rss[name] for name in RUNS)
    lines = ["| run | peak RSS MiB | / PPO |", "|---|---|---|"]
    lines += [f"| {name} | {value:.0f} | {value / ppo:.2f} |" for name, value in rss.items()]
    markdown = "\n".join(lines + ["", f"GRPO / PPO peak RSS at the same phase: **{small / ppo:.2f}** "
                                  f"({ppo - small:+.0f} MiB for PPO); 4x the completions a phase at the same "
                                  f"microbatch: {large / small:.2f}x the peak."])
    print(markdown)
    if not args.no_record:
        record("group_memory", "Peak memory: PPO against a group method, and a growing phase",
               f"CPU, {args.threads} threads; SmolLM2-135M-Instruct, LoRA r=8 all-linear, microbatch 32, 16 new tokens",
               markdown)


if __name__ == "__main__":
    main()
