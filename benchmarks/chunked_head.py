"""Benchmark: the language-model head run a chunk of positions at a time (`rlora.models.lm_head`)
against the whole head at once, in a GRPO update on SmolLM2-135M-Instruct, by completion length.

The update of `benchmarks/checkpointing.py` (8 completions, 2 prompts x 4 through the shared
prefix, LoRA r=8 all-linear, fp32), with activation checkpointing on as long completions want it:
forward, loss and backward with the head chunked (rlora's default) and whole (one chunk as large
as any input: the (b, t, v) logits kept for backward), run in turn (`--rounds`, the best of each
kept). Memory is the bytes autograd saves for backward (exact, allocator-independent) and, with
`--rss`, the peak RSS above the loaded model of a process running one step with
`MALLOC_MMAP_THRESHOLD_=131072` (so glibc returns freed buffers and RSS follows what is allocated,
the backward pass's own temporaries included).

    .venv/bin/python benchmarks/chunked_head.py [--lengths 128 512] [--rounds 2] [--rss] [--no-record]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpointing import microbatch, step, trainer_for, update_arguments  # noqa: E402
from common import record  # noqa: E402

from rlora.models import lm_head  # noqa: E402

CHUNK = lm_head.HEAD_CHUNK_ELEMENTS
WHOLE = 1 << 62  # every position in one chunk


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> None:
    """One step in this process; prints its peak RSS above the loaded model (MiB), sampled every 5 ms."""
    import threading
    import time

    lm_head.HEAD_CHUNK_ELEMENTS = WHOLE if args.worker_whole else CHUNK
    trainer = trainer_for(args.model, args.worker_length, True)
    mb = microbatch(trainer, args.worker_length)
    before = peak = _rss_mib()
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mib())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    step(trainer, mb)
    done.set()
    watcher.join()
    print(peak - before)


def rss_above_model(args, length: int, whole: bool) -> float:
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                          "--worker-length", str(length), "--worker-whole", str(int(whole))],
                         env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    args = update_arguments(__doc__, 2, "--worker-whole")
    if args.worker_length:
        return worker(args)
    rows = []
    for length in args.lengths:
        trainer = trainer_for(args.model, length, True)
        mb = microbatch(trainer, length)
        best = {}
        for _ in range(args.rounds):
            for whole in (False, True):
                lm_head.HEAD_CHUNK_ELEMENTS = WHOLE if whole else CHUNK
                seconds, saved = step(trainer, mb)
                best[whole] = (min(best.get(whole, (seconds,))[0], seconds), saved)
        lm_head.HEAD_CHUNK_ELEMENTS = CHUNK
        rss = {whole: rss_above_model(args, length, whole) for whole in (False, True)} if args.rss else {}
        rows.append((length, best, rss))
        print(f"{length} tokens: whole head {best[True][0]:.2f} s, {best[True][1] / 2**20:.0f} MiB saved; chunked "
              f"{best[False][0]:.2f} s, {best[False][1] / 2**20:.0f} MiB saved"
              + (f"; peak RSS above the model {rss[True]:.0f} / {rss[False]:.0f} MiB" if rss else ""), flush=True)
    lines = ["| completion tokens | s / update (whole head) | s / update (chunked) | time ratio | saved for backward "
             "(whole) | (chunked) | memory ratio |" + (" peak RSS above the model, whole / chunked MiB |"
                                                       if args.rss else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if args.rss else "")]
    for length, best, rss in rows:
        (t0, m0), (t1, m1) = best[True], best[False]
        extra = f" {rss[True]:.0f} / {rss[False]:.0f} |" if rss else ""
        lines.append(f"| {length} | {t0:.2f} | {t1:.2f} | {t1 / t0:.2f} | {m0 / 2**20:.0f} MiB | {m1 / 2**20:.0f} MiB "
                     f"| {m1 / m0:.2f} |{extra}")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("chunked-head", "The language-model head in chunks: a checkpointed GRPO update on SmolLM2-135M-Instruct",
               f"CPU, {args.threads} threads, fp32; 8 completions (2 prompts x 4, shared prefix), LoRA r=8 all-linear, "
               f"activation checkpointing on; chunks of {CHUNK} logits; best of {args.rounds} rounds", table)


if __name__ == "__main__":
    main()
