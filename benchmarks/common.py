"""Shared by the benchmark scripts: timing and recording a section of BENCHMARKS.md."""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of `fn` (seconds): the least disturbed by a shared machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def record(name: str, title: str, note: str, markdown: str, path: str = os.path.join(ROOT, "BENCHMARKS.md")) -> None:
    """Replace (or add) the section `name` of BENCHMARKS.md with `markdown` and the command that made it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    section = f"{begin}\n## {title}\n\n`{command}` ({time.strftime('%Y-%m-%d')}; {note})\n\n{markdown}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nFigures printed by `benchmarks/`.\n"
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)
