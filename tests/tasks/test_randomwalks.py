"""The randomwalks task: metric on a hand-made graph, data equal to the peer harness, cached SFT model."""

import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from rlora.tasks import randomwalks
from rlora.tasks.randomwalks import make_task, optimality, shortest_path_lengths, walk_length

PEER_TASK = Path(__file__).resolve().parents[2] / ".." / "shared" / "peers" / "rw_task.py"


def hand_graph() -> np.ndarray:
    """a (goal, self-loop); b -> a; c -> b, d; d -> b, c; e <-> f, a cycle that never reaches a.

    Shortest node counts to a: a 1, b 2 ("ba"), c 3 ("cba"), d 3 ("dba"), e and f unreachable.
    """
    edges = ["aa", "ba", "cb", "cd", "db", "dc", "ef", "fe"]
    adjacency = np.zeros((6, 6), dtype=bool)
    for edge in edges:
        adjacency["abcdef".index(edge[0]), "abcdef".index(edge[1])] = True
    return adjacency


def test_shortest_path_lengths_of_hand_graph():
    assert shortest_path_lengths(hand_graph(), max_length=5) == {"a": 1, "b": 2, "c": 3, "d": 3, "e": 5, "f": 5}
    assert shortest_path_lengths(hand_graph(), max_length=3) == {"a": 1, "b": 2, "c": 3, "d": 3, "e": 3, "f": 3}


# (sample, max_length, optimality, walk length); optimality = (max_length - L) / (max_length - L*)
CASES = [
    ("ba", 5, 1.0, 2),
    ("cba", 5, 1.0, 3),
    ("cdba", 5, (5 - 4) / (5 - 3), 4),
    ("cdcba", 5, 0.0, 5),  # valid, but uses every allowed node
    ("cbabcd", 5, 1.0, 3),  # characters after reaching a are ignored
    ("a", 5, 1.0, 1),  # starting at the goal: L = L* = 1
    ("cxba", 5, 0.0, 5),  # x is not a node
    ("cgba", 5, 0.0, 5),  # g is a letter, but not of this 6-node graph
    ("ca", 5, 0.0, 5),  # no edge c -> a
    ("cdb", 5, 0.0, 5),  # never reaches a
    ("cdcdba", 5, 0.0, 5),  # reaches a only at node 6 > max_length (trlx: negative)
    ("efef", 5, 0.0, 5),  # unreachable start: trlx gives 0/0 = NaN
    ("ef", 5, 0.0, 5),
    ("cba", 3, 0.0, 3),  # shortest path as long as max_length: 0/0 in trlx
    ("", 5, 0.0, 5),
    ("xba", 5, 0.0, 5),  # first character not a node: no start to compare with
    ("Cba", 5, 0.0, 5),
]


@pytest.mark.parametrize("sample, max_length, expected, length", CASES,
                         ids=["shortest-b", "shortest-c", "longer-by-one", "longest-valid", "tail-ignored",
                              "starts-at-goal", "non-letter", "letter-outside-graph", "missing-edge",
                              "never-reaches-goal", "overlong", "unreachable-start", "unreachable-start-short",
                              "shortest-equals-max-length", "empty", "unknown-first-char", "uppercase-first-char"])
def test_optimality_on_hand_graph(sample, max_length, expected, length):
    adjacency = hand_graph()
    shortest = shortest_path_lengths(adjacency, max_length)
    score = optimality(sample, adjacency, shortest, max_length)
    assert not math.isnan(score)
    assert score == pytest.approx(expected, abs=1e-12)
    assert walk_length(sample, adjacency, max_length) == length


@pytest.fixture(scope="module")
def task():
    return make_task()


@pytest.fixture(scope="module")
def peer():
    """The peer harness's `generate_random_walks()` output, or a skip when ../shared is absent."""
    if not PEER_TASK.is_file():
        pytest.skip(f"peer harness not found at {PEER_TASK}")
    spec = importlib.util.spec_from_file_location("peer_rw_task", PEER_TASK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metric_fn, prompts, walks, adjacency, shortest = module.generate_random_walks(seed=1002)
    return {"metric_fn": metric_fn, "prompts": prompts, "walks": walks, "adjacency": adjacency,
            "shortest": shortest}


def test_same_data_as_peer(task, peer):
    assert task.walks == peer["walks"]
    assert task.prompts == peer["prompts"]
    np.testing.assert_array_equal(task.adjacency, peer["adjacency"])
    assert [task.shortest_lengths[c] for c in task.letters[1:]] == peer["shortest"]


def test_walk_metric_equals_peer(task, peer):
    ours = task.metric_fn(task.walks)["optimality"]
    theirs = peer["metric_fn"](peer["walks"])["optimality"]  # float32 in the peer
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


def test_seed_1002_data_without_peer(task):
    # Pinned from the peer harness so the RNG sequence is checked even where ../shared is absent.
    assert task.walks[:5] == ["oseotba", "qka", "jrmhnba", "cua", "qkinba"]
    assert [task.shortest_lengths[c] for c in task.letters[1:]] == \
        [2, 3, 3, 5, 5, 3, 4, 4, 4, 2, 3, 5, 3, 4, 4, 3, 5, 4, 3, 2]
    assert np.mean(task.metric_fn(task.walks)["optimality"]) == pytest.approx(0.7901798, abs=1e-6)


def test_graph_invariants(task):
    adjacency = task.adjacency
    assert adjacency.dtype == bool and adjacency.shape == (21, 21)
    assert adjacency.any(axis=1).all(), "every node needs an outgoing edge"
    assert adjacency[0].tolist() == [True] + [False] * 20, "the goal only loops to itself"
    assert not adjacency.flags.writeable
    assert all(len(w) <= task.max_length for w in task.walks)


def test_prompts_are_distinct_single_letters(task):
    assert len(set(task.prompts)) == len(task.prompts) == 20
    assert all(len(p) == 1 and p in task.letters[1:] for p in task.prompts)
    assert task.prompts == sorted(task.prompts)


def test_reward_and_metric_contracts(task):
    samples = ["tba", "tb", "?", ""]
    metric = task.metric_fn(samples, ["t", "t", "?", ""], ["ba", "b", "", ""], extra="ignored")
    assert metric["optimality"] == [1.0, 0.0, 0.0, 0.0]
    assert metric["lengths"] == [3.0, 10.0, 10.0, 10.0]
    assert task.reward_fn(samples, prompts=None, outputs=None, tokenizer=None, step=3) == metric["optimality"]


def test_tokenizer_is_one_token_per_node(task):
    tok = task.tokenizer()
    assert tok("abu", add_special_tokens=False).input_ids == [3, 4, 23]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_task_equality_is_by_parameters():
    assert make_task(n_walks=10) == make_task(n_walks=10)
    assert hash(make_task(n_walks=10)) == hash(make_task(n_walks=10))
    assert make_task(n_walks=10) != make_task(n_walks=10, seed=7)


@pytest.mark.parametrize("kwargs, flag", [({"n_nodes": 27}, "n_nodes"), ({"max_length": 1}, "max_length"),
                                          ({"p_edge": 0.0}, "p_edge"), ({"n_walks": 0}, "n_walks")],
                         ids=["too-many-nodes", "no-step", "no-edges", "no-walks"])
def test_make_task_rejects_bad_parameters(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        make_task(**kwargs)


def test_sft_model_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(randomwalks, "sft", interrupted)
    with pytest.raises(KeyboardInterrupt):
        randomwalks.sft_model(make_task(n_walks=10), cache_dir=tmp_path, epochs=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("changed", [{"epochs": 19}, {"seed": 1}, {"lr": 3e-4}, {"batch_size": 25},
                                     {"task": {"seed": 1003}}, {"task": {"n_walks": 99}}],
                         ids=["epochs", "sft-seed", "lr", "batch-size", "task-seed", "task-n-walks"])
def test_sft_cache_key_covers_every_parameter(tmp_path, changed):
    base = make_task(n_walks=100)
    sft_changes = {name: value for name, value in changed.items() if name != "task"}
    task = make_task(**{**base.params(), **changed.get("task", {})})
    assert randomwalks.sft_model_dir(base, tmp_path) == randomwalks.sft_model_dir(make_task(n_walks=100), tmp_path)
    assert randomwalks.sft_model_dir(task, tmp_path, **sft_changes) != randomwalks.sft_model_dir(base, tmp_path)


@pytest.mark.slow
def test_sft_model_builds_then_hits_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = make_task()
    start = time.perf_counter()
    path = randomwalks.sft_model(task, cache_dir=tmp_path)
    build_seconds = time.perf_counter() - start
    report = json.loads((path / "sft_eval.json").read_text())
    assert report["sampled_optimality"] >= 0.6, report
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary directory may remain"

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert 0.7e6 < sum(p.numel() for p in model.parameters()) < 0.9e6
    measured = randomwalks.evaluate(model, tokenizer, task, n_per_prompt=50, seed=123)
    assert measured["optimality"] == pytest.approx(report["sampled_optimality"], abs=1e-9)

    def no_retraining(*args, **kwargs):
        raise AssertionError("sft_model retrained although the model was cached")

    monkeypatch.setattr(randomwalks, "sft", no_retraining)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert randomwalks.sft_model(task, cache_dir=tmp_path) == path
    assert time.perf_counter() - start < 0.05 * build_seconds
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
