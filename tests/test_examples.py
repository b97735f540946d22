"""The sentiment example's code path, on tiny locally saved models of the same kinds
(a GPT-2 causal LM and a DistilBERT sequence classifier)."""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from rlora.tiny import char_tokenizer

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sentiment_example_runs_on_local_models(tiny_model_dir, tmp_path):
    tokenizer = char_tokenizer()
    classifier_dir = tmp_path / "classifier"
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, hidden_dim=64, n_layers=1, n_heads=2,
                              max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                              id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    DistilBertForSequenceClassification(config).save_pretrained(classifier_dir)
    tokenizer.save_pretrained(classifier_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("this movie was\nwhat a\n")
    example = load_example("sentiment")
    trainer = example.main(["--model", tiny_model_dir("gpt2"), "--classifier", str(classifier_dir),
                            "--prompts", str(prompts), "train.total_steps=4", "train.batch_size=8",
                            "train.minibatch_size=4", "method.num_rollouts=8", "method.chunk_size=8",
                            "method.gen_kwargs.max_new_tokens=6", f"train.run_dir={tmp_path / 'run'}"])
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    scores = [r["rollout_scores/mean"] for r in records if "phase" in r]
    assert trainer.step == 4 and len(scores) == 1
    assert 0.0 < scores[0] < 1.0  # a probability from the classifier
