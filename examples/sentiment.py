"""Positive movie reviews, in the shape of trlx's `ppo_sentiments` example: a causal LM trained
with PPO + LoRA against a sentiment classifier used as the reward.

    python examples/sentiment.py                      # hub models (needs network or a warm cache)
    python examples/sentiment.py --model DIR --classifier DIR --prompts prompts.txt

The default models are trlx's: `lvwerra/gpt2-imdb` and `lvwerra/distilbert-imdb`. Any local
directories written by `save_pretrained` work the same way.
"""

from __future__ import annotations

import argparse

from transformers import pipeline

import rlora
from rlora.data import load_prompts

DEFAULT_PROMPTS = ["This movie was", "I watched this film and", "The acting in this", "What a", "Honestly, the plot",
                   "My friends and I", "The ending", "From the first scene"]


def positive_score(classifier):
    """reward_fn: the classifier's probability of the positive label for each full sample."""
    def reward_fn(samples, prompts, outputs, tokenizer, **_):
        results = classifier(samples, top_k=None, truncation=True)
        return [next(r["score"] for r in result if r["label"].upper() in ("POSITIVE", "LABEL_1")) for result in results]

    return reward_fn


def main(argv=None) -> rlora.PPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lvwerra/gpt2-imdb")
    parser.add_argument("--classifier", default="lvwerra/distilbert-imdb")
    parser.add_argument("--prompts", default=None, help="a .txt file, one prompt per line")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.total_steps=100")
    args = parser.parse_args(argv)
    classifier = pipeline("text-classification", model=args.classifier, device=-1)
    prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    config = {
        "train": {"seq_length": 64, "batch_size": 32, "minibatch_size": 16, "total_steps": 400, "eval_interval": 40},
        "model": {"model_path": args.model, "peft_config": {"peft_type": "LORA", "r": 8, "lora_alpha": 32,
                                                            "lora_dropout": 0.1}},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-6}},
        "method": {"num_rollouts": 64, "chunk_size": 32, "init_kl_coef": 0.05, "target": 6, "horizon": 10000,
                   "gen_kwargs": {"max_new_tokens": 24, "top_k": 0, "top_p": 1.0, "do_sample": True}},
    }
    return rlora.train(reward_fn=positive_score(classifier), prompts=prompts, eval_prompts=prompts, config=config,
                       overrides=args.overrides)


if __name__ == "__main__":
    main()
