"""Benchmark: PPO + LoRA on randomwalks, rlora against TRL 0.11.4 in the same run.

Each trainer runs in its own process (its peak RSS is read from `wait4`), on the same SFT model,
with trlx's randomwalks settings: 128 rollouts per phase, 4 PPO epochs x 2 minibatches of 64
(8 optimizer steps; the peers call this one "step"), LoRA r=8 alpha=32 dropout 0.1, AdamW 3e-4,
KL coefficient 0. Evaluation (20 start letters x 8 sampled walks, and greedy) every 5 phases is
excluded from the timings.

    .venv/bin/python benchmarks/randomwalks.py                 # rlora alone
    .venv/bin/python benchmarks/randomwalks.py --peer          # and TRL 0.11.4 (.peers/venv-trl011)
    .venv/bin/python benchmarks/randomwalks.py --peer --bf16   # and rlora with a bf16 base

The peer needs `../shared/peers/` and its venv (see `../shared/peers/README.md`); with `--peer`,
both trainers start from the peer's SFT model (built once into `.peers/randomwalks-model`) so the
start is the same. The table and the command go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, record, run_measured  # noqa: E402

PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers")
PEER_VENV = os.path.join(ROOT, ".peers", "venv-trl011", "bin", "python")
PEER_MODEL = os.path.join(ROOT, ".peers", "randomwalks-model")
STEPS_PER_PHASE = 8


def rlora_worker(args: argparse.Namespace) -> None:
    """In the measured process: the demo's PPO run, then its phases and evals as JSON."""
    from rlora.api import set_threads
    from rlora.demo import run_demo
    from rlora.tracking import phase_seconds

    set_threads(2)
    bf16 = {"model_keys": {"dtype": "bfloat16"}, "merge_adapter_for_generation": True} if args.bf16 else {}
    summary = run_demo(total_steps=args.phases * STEPS_PER_PHASE, run_dir=args.out, model_dir=args.model,
                       eval_interval=5 * STEPS_PER_PHASE, seed=args.seed, verbose=False, **bf16)
    history = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    phases = phase_seconds(history)
    evals = [{"phase": r["step"] // STEPS_PER_PHASE, "sampled": r["metrics/optimality"],
              "greedy": r["metrics/greedy/optimality"]} for r in history if r.get("eval")]
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"rollout_s": [r["rollout"] for r in phases],
                   "update_s": [r["rollout_pass"] + r["update"] for r in phases],
                   "evals": evals, "trainable": summary["trainable_params"]}, f)


def summarize(name: str, rollout_s: list[float], update_s: list[float], evals: list[dict], rss: float) -> dict:
    """Per-phase seconds, phases and training seconds to 0.9 / 0.95 sampled optimality."""
    step_s = [a + b for a, b in zip(rollout_s, update_s)]
    cumulative = [sum(step_s[:i]) for i in range(len(step_s) + 1)]

    def reach(threshold: float) -> tuple[int | None, float | None]:
        hit = next((e["phase"] for e in evals if e["sampled"] >= threshold), None)
        return hit, (cumulative[hit] if hit is not None else None)

    last = evals[-3:]
    return {"name": name, "phases": len(step_s), "s_per_phase": sum(step_s) / len(step_s),
            "rollout_s": sum(rollout_s) / len(rollout_s), "update_s": sum(update_s) / len(update_s),
            "reach_0.9": reach(0.9), "reach_0.95": reach(0.95),
            "start": (evals[0]["sampled"], evals[0]["greedy"]),
            "end": (sum(e["sampled"] for e in last) / len(last), sum(e["greedy"] for e in last) / len(last)),
            "rss_mib": rss}


def run_rlora(args: argparse.Namespace, model: str | None, workdir: str, bf16: bool = False) -> dict:
    out = os.path.join(workdir, "rlora-bf16" if bf16 else "rlora")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--phases", str(args.phases), "--out", out,
           "--seed", str(args.seed)] + (["--model", model] if model else []) + (["--bf16"] if bf16 else [])
    rss = run_measured(cmd)
    data = json.load(open(os.path.join(out, "bench.json")))
    name = "rlora (PPO + LoRA), bf16 base, merged sampler" if bf16 else "rlora (PPO + LoRA)"
    return summarize(name, data["rollout_s"], data["update_s"], data["evals"], rss)


def run_peer(args: argparse.Namespace, workdir: str) -> dict:
    if not os.path.exists(PEER_MODEL):
        subprocess.run([PEER_VENV, os.path.join(PEERS, "sft_randomwalks.py"), "--epochs", "20", "--out", PEER_MODEL],
                       check=True, stdout=subprocess.DEVNULL)
    log = os.path.join(workdir, "peerA.jsonl")
    rss = run_measured([PEER_VENV, os.path.join(PEERS, "peerA_trl011_ppo.py"), "--model", PEER_MODEL,
                        "--max_steps", str(args.phases), "--max_seconds", "100000", "--eval_every", "5",
                        "--kl", "0.0", "--seed", str(args.seed), "--log", log])
    records = [json.loads(line) for line in open(log)]
    steps = [r for r in records if "step_s" in r]
    evals = [{"phase": r["step"], "sampled": r["eval_optimality"], "greedy": r["eval_greedy"]}
             for r in records if "eval_optimality" in r]
    return summarize("TRL 0.11.4 PPOTrainer + peft", [r["rollout_s"] for r in steps],
                     [r["ppo_update_s"] for r in steps], evals, rss)


def table(rows: list[dict], peer: dict | None) -> str:
    def reach(pair):
        phase, seconds = pair
        return "not reached" if phase is None else f"{phase} ({seconds:.1f} s)"

    lines = ["| trainer | phases | s / phase | rollout s | update s | phases (train s) to 0.9 | to 0.95 | "
             "sampled start -> end | greedy start -> end | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['phases']} | {r['s_per_phase']:.3f} | {r['rollout_s']:.3f} | "
                     f"{r['update_s']:.3f} | {reach(r['reach_0.9'])} | {reach(r['reach_0.95'])} | "
                     f"{r['start'][0]:.3f} -> {r['end'][0]:.3f} | {r['start'][1]:.3f} -> {r['end'][1]:.3f} | "
                     f"{r['rss_mib']:.0f} |")
    if peer is not None:
        ours, bf16 = rows[0], next((r for r in rows if "bf16" in r["name"]), None)
        lines.append("")
        lines.append(f"rlora / TRL 0.11.4 seconds per phase, same run: **{ours['s_per_phase'] / peer['s_per_phase']:.2f}**;"
                     f" peak RSS ratio {ours['rss_mib'] / peer['rss_mib']:.2f}"
                     + (f"; bf16 base / TRL: {bf16['s_per_phase'] / peer['s_per_phase']:.2f}" if bf16 else "")
                     + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=100, help="rollout phases (peers' steps)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--peer", action="store_true", help="also run TRL 0.11.4 from .peers/venv-trl011")
    parser.add_argument("--bf16", action="store_true", help="also rlora with model.dtype bfloat16 and a merged sampler")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.worker:
        return rlora_worker(args)
    if args.peer and not (os.path.exists(PEER_VENV) and os.path.isdir(PEERS)):
        sys.exit(f"--peer needs {PEER_VENV} and {PEERS}; see ../shared/peers/README.md")
    with tempfile.TemporaryDirectory() as workdir:
        peer = run_peer(args, workdir) if args.peer else None  # builds the shared SFT model first
        model = PEER_MODEL if args.peer else None
        rows = [run_rlora(args, model, workdir)] + ([peer] if peer else [])
        rows += [run_rlora(args, model, workdir, bf16=True)] if args.bf16 else []
    markdown = table(rows, peer)
    print(markdown)
    if not args.no_record:
        record("randomwalks", "randomwalks: PPO + LoRA vs TRL 0.11.4",
               "CPU, 2 threads; end = mean of the last 3 evals; one phase = 128 rollouts + 8 optimizer steps; "
               "times exclude evaluation", markdown)


if __name__ == "__main__":
    main()
