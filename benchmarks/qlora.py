"""Benchmark: GRPO on the oneword task (`rlora.tasks.oneword`) over SmolLM2-135M-Instruct held in
4 bits (`model.quantization: nf4`, QLoRA) against the float32 and bf16 bases.

Each base trains in its own process (peak RSS from `wait4`) with the task's GRPO settings (4
questions x 8 completions a phase, one optimizer step a phase, LoRA r=8 on every linear layer,
AdamW 1e-3): held-out correct answers (greedy, the task's held-out questions) before the first
step and after the last, and seconds per step (the mean phase: rollout, passes and update; the
evaluations are not counted). The nf4 base computes in float32 (`model.dtype: float32`), with
float32 adapters; the bf16 base is `model.dtype: bfloat16` with the adapters computing in bf16
(`model.adapter_compute_dtype`'s default). A CPU without AMX-BF16 multiplies bf16 several times
slower than float32, so `--bf16-steps` gives that row fewer steps (its accuracy then is not
comparable with the others'; the table says how many steps each row ran).

    .venv/bin/python benchmarks/qlora.py --steps 10 --bf16-steps 2    # into BENCHMARKS.md
    .venv/bin/python benchmarks/qlora.py --steps 1 --bf16-steps 0 --no-record    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record, run_measured  # noqa: E402

BASES = {  # row: config overrides
    "float32": [],
    "nf4 (4-bit, float32 compute)": ["model.quantization=nf4"],
    "bfloat16": ["model.dtype=bfloat16"],
}


def run_base(name: str, steps: int, threads: int, workdir: str) -> dict:
    """One training run in a fresh process: its summary plus its peak RSS (MiB)."""
    run_dir = os.path.join(workdir, name.split()[0])
    cmd = [sys.executable, "-m", "rlora.tasks.oneword", "--method", "grpo", "--steps", str(steps),
           "--run-dir", run_dir, "--eval-interval", str(10**6), *BASES[name]]
    env = {**os.environ, "RLORA_NUM_THREADS": str(threads)}
    rss = run_measured(cmd, env)
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return {**summary, "rss": rss, "steps": steps}


def table(rows: dict[str, dict]) -> str:
    lines = ["| base | steps | held-out correct (before -> after) | one word | s / step | peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['steps']} | {r['correct'][0]:.2f} -> {r['correct'][1]:.2f} | "
                     f"{r['one_word'][0]:.2f} -> {r['one_word'][1]:.2f} | {r['s_per_phase']:.1f} | {r['rss']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps (phases) of the float32 and nf4 runs")
    parser.add_argument("--bf16-steps", type=int, default=2, help="steps of the bf16 run (0 = skip it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in BASES:
            steps = args.bf16_steps if name == "bfloat16" else args.steps
            if steps > 0:
                rows[name] = run_base(name, steps, args.threads, workdir)
                print(name, {k: rows[name][k] for k in ("correct", "one_word", "s_per_phase", "rss")}, flush=True)
    markdown = table(rows)
    print(markdown)
    if not args.no_record:
        record("qlora", "QLoRA: a 4-bit base against float32 and bf16 (SmolLM2-135M-Instruct, oneword, GRPO)",
               f"{args.threads} thread(s), CPU; held-out: the task's held-out questions, greedy; s / step excludes "
               "evaluation", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
