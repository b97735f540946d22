"""The randomwalks task of trlx (examples/randomwalks): learn to walk a random graph to its goal.

A random directed graph on `n_nodes` nodes named `a`, `b`, ... has node `a` as its absorbing
goal. The training data are random walks over it; prompts are start letters; a sample is scored
by how close its walk comes to the shortest path from its start to `a`. For the same
parameters the graph, walks, prompts and metric equal trlx's and the peer harness's
(`../shared/peers/rw_task.py`): the numpy `RandomState(seed)` calls are made in the same order.

`sft_model` builds (once, then caches) the stand-in for the hub model `CarperAI/randomwalks`:
a 0.8 M-parameter GPT-2 trained on the walks by supervised fine-tuning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import string
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from rlora.cache import cache_root
from rlora.sft import forked_rng, sft
from rlora.tiny import char_tokenizer, tiny_config

GOAL = 0  # node `a`
SFT_FORMAT = 1  # bump when the cached model's layout or training changes, so old caches are rebuilt


# ---------------------------------------------------------------------------------------------
# Data: graph, walks, shortest paths (same RNG sequence as trlx)
# ---------------------------------------------------------------------------------------------


def random_graph(n_nodes: int, p_edge: float, rng: np.random.RandomState) -> np.ndarray:
    """Adjacency (n_nodes, n_nodes) of a random digraph where every node has an outgoing edge.

    Edges are drawn independently with probability `p_edge` (no self-loops) until every row has
    one; then the goal's edges are replaced by a self-loop so a walk that reaches it stays.
    """
    while True:
        adjacency = rng.rand(n_nodes, n_nodes) > (1 - p_edge)
        np.fill_diagonal(adjacency, False)
        if adjacency.any(axis=1).all():
            break
    adjacency[GOAL, :] = False
    adjacency[GOAL, GOAL] = True
    return adjacency


def random_walks(adjacency: np.ndarray, n_walks: int, max_length: int, rng: np.random.RandomState) -> list[str]:
    """`n_walks` walks of at most `max_length` nodes from uniform non-goal starts, stopping at the goal."""
    n_nodes = len(adjacency)
    letters = string.ascii_lowercase[:n_nodes]
    walks = []
    for _ in range(n_walks):
        node = rng.randint(n_nodes)
        while node == GOAL:  # redraw: walks never start at the goal
            node = rng.randint(n_nodes)
        nodes = [node]
        while len(nodes) < max_length and node != GOAL:
            node = rng.choice(np.nonzero(adjacency[node])[0])
            nodes.append(node)
        walks.append("".join(letters[i] for i in nodes))
    return walks


def shortest_path_lengths(adjacency: np.ndarray, max_length: int) -> dict[str, int]:
    """Node count of the shortest path from each node to the goal, capped at `max_length`.

    A node that cannot reach the goal gets `max_length`; the goal itself gets 1.
    """
    graph = nx.from_numpy_array(adjacency, create_using=nx.DiGraph)
    edges_to_goal = nx.single_target_shortest_path_length(graph, GOAL)
    letters = string.ascii_lowercase[: len(adjacency)]
    return {letters[node]: min(edges_to_goal[node] + 1, max_length) if node in edges_to_goal else max_length
            for node in range(len(adjacency))}


# ---------------------------------------------------------------------------------------------
# Metric (pure functions of a sample and the graph)
# ---------------------------------------------------------------------------------------------


def walk_length(sample: str, adjacency: np.ndarray, max_length: int) -> int:
    """Nodes the walk `sample` visits up to and including the goal, or `max_length` if invalid.

    Invalid: a character that is not a node of the graph, a step along a missing edge, never
    reaching the goal, or reaching it only after more than `max_length` nodes (trlx gives such
    over-long samples a negative optimality; generated samples never are that long).
    Characters after the first arrival at the goal are ignored.
    """
    letters = string.ascii_lowercase[: len(adjacency)]
    previous = None
    for position, char in enumerate(sample[:max_length]):
        node = letters.find(char)
        if node < 0 or (previous is not None and not adjacency[previous, node]):
            return max_length
        if node == GOAL:
            return position + 1
        previous = node
    return max_length


def optimality(sample: str, adjacency: np.ndarray, shortest: Mapping[str, int], max_length: int) -> float:
    """(max_length - L) / (max_length - L*) in [0, 1]: 1 for a shortest walk, 0 for an invalid one.

    L is `walk_length(sample)`, L* = `shortest[start]`, the shortest node count from the
    sample's first character. Where trlx divides by zero or fails, this returns 0.0:
    - a start that cannot reach the goal within `max_length` nodes (L* = max_length, the
      unreachable case): no walk from it scores, so every sample from it is 0.0, not NaN;
    - an empty sample, or one whose first character is not a node (no start to compare with).
    A sample that starts at the goal has L = L* = 1 and scores 1.0.
    """
    if not sample or sample[0] not in shortest:
        return 0.0
    best = shortest[sample[0]]
    if best >= max_length:
        return 0.0
    return (max_length - walk_length(sample, adjacency, max_length)) / (max_length - best)


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomWalksTask:
    """Parameters of a randomwalks task and the data built from them by `make_task`.

    Equality and hashing use the five parameters only; the data is a function of them.
    """

    n_nodes: int
    """Nodes in the graph, named by the first `n_nodes` letters; `a` is the goal."""
    max_length: int
    """Most nodes in a walk; a sample that has not reached `a` within it is invalid."""
    n_walks: int
    """Random walks generated as the training data."""
    p_edge: float
    """Probability of each directed edge between two distinct nodes."""
    seed: int
    """Seed of the numpy `RandomState` that draws the graph and the walks."""
    adjacency: np.ndarray = field(compare=False, repr=False)
    """(n_nodes, n_nodes) bool, read-only: `adjacency[i, j]` is the edge i -> j."""
    walks: list[str] = field(compare=False, repr=False)
    """The training walks, each a string of node letters."""
    prompts: list[str] = field(compare=False, repr=False)
    """Sorted distinct start letters of the walks."""
    shortest_lengths: dict[str, int] = field(compare=False, repr=False)
    """Shortest node count from each node's letter to `a`, capped at `max_length`."""

    def params(self) -> dict:
        """The five parameters (not the data) as a plain dict: `make_task(**task.params())` rebuilds it."""
        return {name: getattr(self, name) for name in ("n_nodes", "max_length", "n_walks", "p_edge", "seed")}

    @property
    def letters(self) -> str:
        """The node names, `a` first."""
        return string.ascii_lowercase[: self.n_nodes]

    def metric_fn(self, samples: Sequence[str], *_, **__) -> dict[str, list[float]]:
        """Per-sample `optimality` and walk `lengths` of `samples` (other arguments are ignored)."""
        return {"optimality": [optimality(s, self.adjacency, self.shortest_lengths, self.max_length) for s in samples],
                "lengths": [float(walk_length(s, self.adjacency, self.max_length)) for s in samples]}

    def reward_fn(self, samples: Sequence[str], prompts=None, outputs=None, tokenizer=None, **_) -> list[float]:
        """The optimality of each sample (prompt + output) as its reward."""
        return [optimality(s, self.adjacency, self.shortest_lengths, self.max_length) for s in samples]

    def tokenizer(self):
        """A character tokenizer over the node letters (0 pad, 1 bos, 2 eos, 3.. letters, then unk)."""
        return char_tokenizer(self.letters)


def make_task(n_nodes: int = 21, max_length: int = 10, n_walks: int = 1000, p_edge: float = 0.1,
              seed: int = 1002) -> RandomWalksTask:
    """Build the graph, walks, prompts and shortest lengths; the defaults are trlx's."""
    if not 2 <= n_nodes <= 26:
        raise ValueError(f"n_nodes={n_nodes} is out of range; nodes are named by letters, use 2..26")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no step to take; use max_length >= 2")
    if n_walks < 1:
        raise ValueError(f"n_walks={n_walks}; generate at least one walk")
    if not 0.0 < p_edge <= 1.0:
        raise ValueError(f"p_edge={p_edge} must be in (0, 1]; with 0 no graph has an edge out of every node")
    rng = np.random.RandomState(seed)
    adjacency = random_graph(n_nodes, p_edge, rng)
    walks = random_walks(adjacency, n_walks, max_length, rng)
    adjacency.setflags(write=False)
    return RandomWalksTask(n_nodes=n_nodes, max_length=max_length, n_walks=n_walks, p_edge=p_edge, seed=seed,
                           adjacency=adjacency, walks=walks, prompts=sorted({w[0] for w in walks}),
                           shortest_lengths=shortest_path_lengths(adjacency, max_length))


@functools.lru_cache(maxsize=1)
def default_task() -> RandomWalksTask:
    """The task with trlx's parameters, built once per process."""
    return make_task()


# The default task's pieces by name, for configs (`task.reward_fn: rlora.tasks.randomwalks:reward_fn`).
def reward_fn(samples, prompts=None, outputs=None, tokenizer=None, **_) -> list[float]:
    return default_task().reward_fn(samples)


def metric_fn(samples, *_, **__) -> dict[str, list[float]]:
    return default_task().metric_fn(samples)


def default_prompts() -> list[str]:
    return list(default_task().prompts)


# ---------------------------------------------------------------------------------------------
# Evaluation and the cached SFT model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, task: RandomWalksTask, n_per_prompt: int = 8, greedy: bool = False,
             seed: int | None = None) -> dict:
    """Mean optimality of `model`'s completions of every prompt, as the peer harness measures it.

    Sampled: each prompt `n_per_prompt` times with plain sampling (top_k 0, top_p 1); greedy: once
    each. At most `max_length - 1` new tokens; the scored string is prompt + completion decoded
    without special tokens. `seed` fixes the sampling without touching the caller's RNG state.
    Returns `optimality` (the mean) and the `samples`.
    """
    prompts = list(task.prompts) * (1 if greedy else n_per_prompt)
    input_ids = torch.tensor([tokenizer(p, add_special_tokens=False).input_ids for p in prompts])  # (b, 1)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    options = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, top_p=1.0)
    was_training = model.training
    model.eval()
    with forked_rng(device):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=task.max_length - 1, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **options)
    model.train(was_training)
    samples = tokenizer.batch_decode(out, skip_special_tokens=True)
    return {"optimality": float(np.mean(task.metric_fn(samples)["optimality"])), "samples": samples}


SFT_ARCH = dict(arch="gpt2", hidden=128, layers=4, heads=4, max_positions=32)  # the peer's gpt2_config


def sft_model_dir(task: RandomWalksTask, cache_dir: str | os.PathLike | None = None, epochs: int = 20,
                  seed: int = 0, batch_size: int = 50, lr: float = 1e-3) -> Path:
    """Where `sft_model` keeps the model for these arguments: a name hashed from all of them."""
    key = dict(format=SFT_FORMAT, task=task.params(), arch=SFT_ARCH, epochs=epochs, seed=seed,
               batch_size=batch_size, lr=lr)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"randomwalks-sft-{digest}"


def sft_model(task: RandomWalksTask, cache_dir: str | os.PathLike | None = None, epochs: int = 20, seed: int = 0,
              batch_size: int = 50, lr: float = 1e-3, log=None) -> Path:
    """Path of a tiny GPT-2 fine-tuned on `task.walks` (each + eos), built on first use then cached.

    The model (`SFT_ARCH`: hidden 128, 4 layers, 4 heads, 32 positions, no dropout; 0.8 M
    parameters) is saved with `save_pretrained` (safetensors) beside its tokenizer and
    `sft_eval.json` (sampled and greedy optimality, final loss, seconds, and the cache key).
    It lives at `sft_model_dir(...)`, under `cache_dir` (default `cache_root()`), and is written
    to a temporary directory renamed into place only when complete, so an interrupted build
    leaves nothing that looks valid. `log` receives per-epoch stats.
    """
    from transformers import AutoModelForCausalLM

    final = sft_model_dir(task, cache_dir, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr)
    if final.is_dir():
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        tokenizer = task.tokenizer()
        config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SFT_ARCH)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        start = time.perf_counter()
        history = sft(model, tokenizer, task.walks, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log)
        seconds = time.perf_counter() - start
        sampled = evaluate(model, tokenizer, task, n_per_prompt=50, seed=123)
        greedy = evaluate(model, tokenizer, task, greedy=True)
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        report = dict(task=task.params(), arch=SFT_ARCH, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
                      sampled_optimality=sampled["optimality"], sampled_per_prompt=50,
                      greedy_optimality=greedy["optimality"], final_loss=history[-1]["loss"], sft_seconds=seconds,
                      walk_optimality=float(np.mean(task.metric_fn(task.walks)["optimality"])))
        (building / "sft_eval.json").write_text(json.dumps(report, indent=1))
        try:
            os.replace(building, final)
        except OSError:
            if not final.is_dir():  # only a concurrent build that finished first is acceptable
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final
