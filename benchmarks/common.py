"""Shared by the benchmark scripts: timing, recording a section of BENCHMARKS.md, and running the peers."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
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


def run_measured(cmd: list[str], env: dict | None = None) -> float:
    """Run `cmd` to completion; return its peak RSS in MiB."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 1024


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


# ---------------------------------------------------------------------------------------------
# Peers: the other libraries' scripts in ../shared/peers, each in its own venv under .peers/
# ---------------------------------------------------------------------------------------------

PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers")
PEER_MODEL = os.path.join(ROOT, ".peers", "randomwalks-model")  # the SFT model every randomwalks trainer starts from

# Runs a peer script with torch held at argv[1] threads: the peers call torch.set_num_threads(2)
# themselves, which would otherwise override what the rlora side is given.
_PINNED = ("import runpy, sys, torch; torch.set_num_threads(int(sys.argv[1])); "
           "torch.set_num_threads = lambda n: None; sys.argv = sys.argv[2:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def peer_python(venv: str) -> str:
    """The interpreter of the peer venv `.peers/<venv>`."""
    return os.path.join(ROOT, ".peers", venv, "bin", "python")


def peer_command(venv: str, script: str, args: list[str], threads: int, workdir: str) -> list[str]:
    """The command line of `../shared/peers/<script> args` in `.peers/<venv>`, on `threads` torch
    threads, run from a copy of the harness in `workdir` (the peers write beside themselves)."""
    copy = os.path.join(workdir, "peers")
    if not os.path.isdir(copy):
        shutil.copytree(PEERS, copy)
    return [peer_python(venv), "-c", _PINNED, str(threads), os.path.join(copy, script), *args]


def require_peer(venv: str, what: str) -> None:
    """Exit with the fix when the peer venv or the peer scripts are missing."""
    if not (os.path.exists(peer_python(venv)) and os.path.isdir(PEERS)):
        sys.exit(f"{what} needs {peer_python(venv)} and {PEERS}; see ../shared/peers/README.md")


def peer_model() -> str:
    """The peers' randomwalks SFT model, built once (TRL 0.11.4's venv, as ../shared/peers/README.md)."""
    if not os.path.exists(PEER_MODEL):
        require_peer("venv-trl011", f"building {PEER_MODEL}")
        subprocess.run([peer_python("venv-trl011"), os.path.join(PEERS, "sft_randomwalks.py"), "--epochs", "20",
                        "--out", PEER_MODEL], check=True, stdout=subprocess.DEVNULL)
    return PEER_MODEL


def peer_benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every rlora-vs-peer benchmark takes; the hidden `--out` is its rlora worker's directory."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each trainer (rlora and the peer)")
    parser.add_argument("--no-peer", action="store_true", help="rlora alone")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser
