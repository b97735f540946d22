"""trlx 0.7's PPO example scripts run on rlora, changed only as the README's "Coming from trlx"
says: imports, hub names pointed at local models, and local stand-ins for what they download.

The copies live in `tests/trlx_scripts/examples/`, laid out as in trlx's repository (so
`from examples.randomwalks import generate_random_walks` runs as it is); every changed line
carries a `# rlora:` comment. Models and hub datasets are tiny ones built here.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

import rlora.trlx
from rlora import fetch as fetch_module
from rlora.trlx import api as trlx_api

SCRIPTS = os.path.join(os.path.dirname(__file__), "trlx_scripts")


@pytest.fixture
def trlx_examples(monkeypatch):
    """trlx's `examples` package importable as trlx users import it, and the trainers that
    `trlx.train` returns (trlx's scripts drop them) collected in the returned list."""
    ours = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "examples"}
    for name in ours:
        del sys.modules[name]
    monkeypatch.syspath_prepend(SCRIPTS)
    trainers = []
    original = rlora.trlx.train

    def train(*args, **kwargs):
        trainers.append(original(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(rlora.trlx, "train", train)
    monkeypatch.setattr(trlx_api, "_wandb_installed", lambda: False)  # trlx's tracker: wandb, absent here
    yield trainers
    for name in [name for name in sys.modules if name.split(".")[0] == "examples"]:
        del sys.modules[name]
    sys.modules.update(ours)


# ---------------------------------------------------------------------------------------------
# randomwalks: the stand-in for CarperAI/randomwalks is built on the graph the example draws
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1000, 1002])
def test_rlora_s_randomwalks_task_is_trlx_s_helper(trlx_examples, seed):
    import numpy as np

    from examples.randomwalks import generate_random_walks
    from rlora.tasks.randomwalks import make_task

    metric_fn, prompts, walks, _ = generate_random_walks(seed=seed)
    task = make_task(seed=seed)
    assert (task.prompts, task.walks) == (prompts, walks)
    assert np.allclose(task.metric_fn(walks)["optimality"], metric_fn(walks)["optimality"])


def test_fetch_randomwalks_builds_the_stand_in_on_the_example_s_graph(trlx_examples, tmp_path, monkeypatch, capsys):
    from examples.randomwalks import ppo_randomwalks
    from rlora.cli import main
    from rlora.tasks import randomwalks

    monkeypatch.setenv("RLORA_CACHE", str(tmp_path))
    trained = []
    monkeypatch.setattr(randomwalks, "sft", lambda model, tokenizer, texts, **kwargs:
                        trained.append(texts) or [{"loss": 0.0}])  # the SFT itself: test_randomwalks.py
    monkeypatch.setattr(randomwalks, "evaluate", lambda *args, **kwargs: {"optimality": 0.0, "samples": []})
    assert main(["fetch", "randomwalks"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "models" / "randomwalks") and os.path.isfile(os.path.join(path, fetch_module.DONE))
    with open(os.path.join(path, "sft_eval.json")) as f:
        assert json.load(f)["task"]["seed"] == ppo_randomwalks.default_config.train.seed == 1000
    assert trained == [randomwalks.make_task(seed=1000).walks]  # the walks of the graph the example draws
    assert fetch_module.fetch("randomwalks") == path and len(trained) == 1  # cached

    assert main(["fetch", "randomwalks", "--seed", "3"]) == 0  # for a run with train.seed 3
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / "randomwalks-seed3")
    assert trained[-1] == randomwalks.make_task(seed=3).walks
    (tmp_path / "models" / "randomwalks" / fetch_module.DONE).write_text("0ld built by an older recipe\n")
    assert fetch_module.fetch("randomwalks") == path and len(trained) == 3  # rebuilt
    with pytest.raises(ValueError, match="--seed .* randomwalks"):
        fetch_module.fetch("smollm2-135m-instruct", seed=3)


def local_model(path: str) -> dict:
    """The hparams that point a trlx example's hub names at a local model, as a user passes them."""
    return {"model.model_path": path, "tokenizer.tokenizer_path": path}


def test_ppo_randomwalks_runs(trlx_examples, tiny_model_dir, tmp_path):
    from examples.randomwalks import ppo_randomwalks

    hparams = {**local_model(tiny_model_dir("gpt2")), "train.total_steps": 2, "train.batch_size": 8,
               "method.num_rollouts": 16, "method.chunk_size": 16, "method.ppo_epochs": 1,
               "train.run_dir": str(tmp_path)}
    with pytest.warns(UserWarning, match="wandb is not installed"):
        ppo_randomwalks.main(hparams)
    (trainer,) = trlx_examples
    config = trainer.config
    assert trainer.step == 2 and config.train.tracker is None
    # the script's own values, kept through TRLConfig.update
    assert (config.train.seq_length, config.method.vf_coef, config.method.cliprange_reward, config.method.init_kl_coef,
            config.optimizer.kwargs["lr"], config.scheduler.kwargs["T_max"]) == (10, 1.2, 1.0, 0.0, 3e-4, 10000)
    assert ppo_randomwalks.default_config.train.batch_size == 100  # update() left the module's config alone
    evals = [r for r in trainer.history if "metrics/optimality" in r]
    assert len(evals) == 2 and all(0.0 <= r["metrics/optimality"] <= 1.0 for r in evals)  # baseline and final


@pytest.mark.slow
def test_ppo_randomwalks_learns_on_the_fetched_stand_in(trlx_examples, tmp_path, monkeypatch, capsys):
    """As a trlx user runs it: `rlora fetch randomwalks` (SFT, tens of seconds), then the example
    with that directory as its model, 40 steps (5 phases of 128 rollouts)."""
    from examples.randomwalks import ppo_randomwalks
    from rlora.cli import main

    monkeypatch.setenv("RLORA_CACHE", str(tmp_path / "cache"))
    assert main(["fetch", "randomwalks"]) == 0
    model = capsys.readouterr().out.strip()
    hparams = {**local_model(model), "train.total_steps": 40, "train.run_dir": str(tmp_path / "run")}
    with pytest.warns(UserWarning, match="wandb is not installed"):
        ppo_randomwalks.main(hparams)
    (trainer,) = trlx_examples
    optimality = [r["metrics/optimality"] for r in trainer.history if "metrics/optimality" in r]
    assert len(optimality) == 3  # steps 0, 20, 40 (eval_interval 20)
    # the SFT model imitates random walks, most of which miss the shortest path, so it starts low;
    # on a stand-in for another graph (the demo's, seed 1002) the optimality stayed at its first value
    assert optimality[0] < 0.6 and optimality[-1] > 0.8 and optimality[-1] > optimality[0] + 0.3, optimality


# ---------------------------------------------------------------------------------------------
# sentiments: the hub's classifier and IMDB stand in as a tiny local classifier and dataset
# ---------------------------------------------------------------------------------------------


def save_tiny(path, model_class, tokenizer, layers: int = 2, **attributes) -> str:
    """A tiny random GPT-2 `model_class` (config `attributes` set) saved with `tokenizer` in `path`."""
    import torch

    from rlora.tiny import tiny_config

    config = tiny_config("gpt2", vocab_size=len(tokenizer), layers=layers)
    for name, value in attributes.items():
        setattr(config, name, value)
    torch.manual_seed(1234)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def char_policy(tmp_path_factory, tokenizer):
    """A tiny GPT-2 of 3 blocks, so that trlx's default `num_layers_unfrozen: 2` leaves one block
    frozen below the hydra branch."""
    from transformers import GPT2LMHeadModel

    return save_tiny(tmp_path_factory.mktemp("policy"), GPT2LMHeadModel, tokenizer, layers=3)


@pytest.fixture(scope="module")
def sentiment_classifier(tmp_path_factory, tokenizer):
    """A tiny random sequence classifier labelled as lvwerra/distilbert-imdb is (NEGATIVE,
    POSITIVE): what `pipeline("sentiment-analysis", ...)` loads."""
    from transformers import GPT2ForSequenceClassification

    return save_tiny(tmp_path_factory.mktemp("sentiment-classifier"), GPT2ForSequenceClassification, tokenizer,
                     id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})


def write_dataset(path, splits: dict[str, list[dict]]) -> str:
    """A local dataset directory that `load_dataset(path)` reads: one JSON-lines file per split."""
    path.mkdir()
    for split, rows in splits.items():
        (path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """Datasets load offline and cache under `tmp_path`; hub names that are not redirected fail fast."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def imdb(tmp_path):
    """IMDB's `text` column, as rlora's review openings (train and test split, as IMDB's)."""
    from rlora.tasks.sentiment import openings

    reviews = [{"text": text} for text in openings()[:24]]
    return write_dataset(tmp_path / "imdb", {"train": reviews[:16], "test": reviews[16:]})


# 8 rollouts a phase, 2 phases; chunk_size stays trlx's 128, so the script's 256 eval prompts take 2 batches
SENTIMENT_HPARAMS = {"train.seq_length": 64, "train.batch_size": 8, "train.total_steps": 2, "method.num_rollouts": 8,
                     "method.ppo_epochs": 1, "method.gen_kwargs.max_new_tokens": 6}


@pytest.mark.parametrize("script", ["ppo_sentiments", "ppo_sentiments_peft"])
def test_ppo_sentiments_runs(trlx_examples, local_hub, sentiment_classifier, imdb, char_policy, tmp_path, monkeypatch,
                             script):
    import importlib

    from rlora.tasks.sentiment import openings

    monkeypatch.setenv("SENTIMENT_MODEL", sentiment_classifier)
    monkeypatch.setenv("IMDB_DATASET", imdb)
    module = importlib.import_module(f"examples.{script}")
    module.main({**local_model(char_policy), **SENTIMENT_HPARAMS, "train.run_dir": str(tmp_path)})
    (trainer,) = trlx_examples
    assert trainer.step == 2
    assert {p.prompt for p in trainer.prompts} == {" ".join(text.split()[:4]) for text in openings()[:24]}
    scores = [r["rollout_scores/mean"] for r in trainer.history if "rollout_scores/mean" in r]
    assert scores and all(0.0 < s < 1.0 for s in scores)  # the classifier's POSITIVE probability
    config = trainer.config
    assert (config.train.project_name, config.method.init_kl_coef, config.model.num_layers_unfrozen) == \
        ("trlx", 0.001, 2)  # default_ppo_config's
    if script == "ppo_sentiments_peft":
        peft_config = trainer.policy.lm.peft_config["default"]
        assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (8, 32, 0.1)
    else:
        assert config.model.peft_config is None  # trlx's hydra: the top 2 blocks train, the rest are frozen


# ---------------------------------------------------------------------------------------------
# hh: GPT-J, its reward model and Anthropic's HH stand in as tiny local models and a few dialogues
# ---------------------------------------------------------------------------------------------

HH_ROWS = [
    ("How do I keep basil alive indoors?", "Give it a sunny window and water it when the soil feels dry."),
    ("What is a good first programming language?", "Python is a friendly start: its syntax is short and clear."),
    ("Can you suggest a quick breakfast?", "Oatmeal with fruit takes five minutes and keeps you full."),
    ("How far away is the moon?", "About 384,000 kilometres on average."),
    ("Why is the sky blue?", "Air scatters blue light more than red, so the sky looks blue."),
    ("How do I fall asleep faster?", "Keep a regular bedtime and put screens away an hour before."),
]


@pytest.fixture
def hh(tmp_path, gpt2_bpe_dir, monkeypatch):
    """The hub pieces of ppo_hh.py as local stand-ins, in the environment the script reads: a
    tiny GPT-2 (GPT-2's tokenizer, 3 blocks) as the policy and the reward model's base, a
    checkpoint of the reward head, and Dahoas/rm-static's columns. Returns the policy's path."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    bpe = AutoTokenizer.from_pretrained(gpt2_bpe_dir, model_max_length=1024)  # as the hub's "gpt2"
    bpe.save_pretrained(tmp_path / "gpt2")
    policy = save_tiny(tmp_path / "policy", GPT2LMHeadModel, bpe, layers=3, pad_token_id=None,
                       bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id)
    checkpoint = tmp_path / "rm-checkpoint"
    checkpoint.mkdir()
    torch.manual_seed(0)
    torch.save({"v_head.weight": torch.randn(1, 32)}, checkpoint / "pytorch_model.bin")
    rows = [{"prompt": f"\n\nHuman: {question}\n\nAssistant:", "chosen": f" {answer}"} for question, answer in HH_ROWS]
    for name, value in (("REWARD_BASE_MODEL", policy), ("REWARD_TOKENIZER", str(tmp_path / "gpt2")),
                        ("REWARD_CHECKPOINT_DIR", str(checkpoint)),
                        ("HH_DATASET", write_dataset(tmp_path / "rm-static", {"train": rows[:4], "test": rows[4:]}))):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRITON_HOST", raising=False)
    monkeypatch.delenv("CONFIG_NAME", raising=False)
    return policy


def test_ppo_hh_runs(trlx_examples, local_hub, hh, tmp_path):
    from examples.hh import ppo_hh

    hparams = {**local_model(hh), "train.seq_length": 48, "train.total_steps": 2, "train.run_dir": str(tmp_path),
               "method.num_rollouts": 8, "method.chunk_size": 8, "method.ppo_epochs": 1,
               "method.gen_kwargs.max_new_tokens": 8}
    ppo_hh.main(hparams)
    (trainer,) = trlx_examples
    assert trainer.step == 2
    config = trainer.config
    assert (config.train.batch_size, config.method.scale_reward, config.method.target, config.tokenizer.truncation_side,
            config.train.checkpoint_dir) == (4, "running", 6.0, "left", "checkpoints/ppo_hh")  # the script's own
    # each prompt's `original_output` (the chosen answer) reached the reward, which is the reward
    # model's score of the sample minus its score of the chosen answer: finite, and not all zero
    scores = [r["rollout_scores/mean"] for r in trainer.history if "rollout_scores/mean" in r]
    assert scores and all(abs(s) < 100 for s in scores) and any(s != 0 for s in scores)
    assert os.path.isdir(os.path.join(str(tmp_path), "checkpoints", "ppo_hh"))


# ---------------------------------------------------------------------------------------------
# dense_sentiments: trlx's per-token rewards over tokenizer(output), on a real BPE vocabulary
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_policy(tmp_path_factory, gpt2_bpe_dir):
    """A tiny random GPT-2 of 3 blocks on GPT-2's real BPE vocabulary: its samples often split words
    as the tokenizer would not, so re-tokenizing an output gives other tokens than were sampled."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(gpt2_bpe_dir)
    return save_tiny(tmp_path_factory.mktemp("bpe-policy"), GPT2LMHeadModel, tokenizer, layers=3, pad_token_id=None,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def short_classifier(tmp_path_factory):
    """The sentiment classifier, its tokenizer truncating at the model's 128 positions (a BPE
    policy's 16 new tokens are often more characters than that) and opening each text with a BOS,
    as distilbert's opens it with [CLS]: trlx's dense reward classifies the text before a sample's
    middle '.', empty when it has none."""
    from tokenizers.processors import TemplateProcessing
    from transformers import GPT2ForSequenceClassification

    from rlora.tiny import BOS, char_tokenizer

    tokenizer = char_tokenizer(model_max_length=128)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.bos_token_id)])
    return save_tiny(tmp_path_factory.mktemp("short-classifier"), GPT2ForSequenceClassification, tokenizer,
                     id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})


def test_ppo_dense_sentiments_runs_with_rewards_over_the_retokenized_output(
        trlx_examples, local_hub, short_classifier, imdb, bpe_policy, tmp_path, monkeypatch):
    import importlib

    from rlora.rollout import rewards

    monkeypatch.setenv("SENTIMENT_MODEL", short_classifier)
    monkeypatch.setenv("IMDB_DATASET", imdb)
    placed = []

    def spy(*args, real=rewards.place_by_character, **kwargs):
        placed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rewards, "place_by_character", spy)
    module = importlib.import_module("examples.ppo_dense_sentiments")
    hparams = {**SENTIMENT_HPARAMS, "method.gen_kwargs.max_new_tokens": 16, "train.total_steps": 4}
    module.main({**local_model(bpe_policy), **hparams, "train.run_dir": str(tmp_path)})
    (trainer,) = trlx_examples
    assert trainer.step == 4
    assert placed  # some samples' scores were over re-tokenized outputs, and were placed by character
    scores = [r["rollout_scores/mean"] for r in trainer.history if "rollout_scores/mean" in r]
    assert scores and all(0.0 <= s <= 2.0 for s in scores)  # two classifier probabilities a sample at most
