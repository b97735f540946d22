# trlx's PEFT sentiment example, written against trlx's documented API; the only changes from a
# trlx script are the imports of rlora.trlx, and a word-count scorer and a few fixed prompts in
# place of the hub's sentiment classifier and IMDB dataset (the model comes from `hparams`), and
# TaskType imported from peft itself (newer peft has no `peft.utils.config`).
import json
import sys
from typing import List

from peft import LoraConfig, TaskType

import rlora.trlx as trlx
from rlora.trlx.data.default_configs import TRLConfig, default_ppo_config

POSITIVE = ("good", "great", "fun", "nice")


def sentiment_fn(samples):
    """Stands in for the sentiment pipeline: a positive score per sample."""
    return [sum(s.count(w) for w in POSITIVE) / max(1, len(s.split())) for s in samples]


def main(hparams={}):
    # Merge sweep config with default config if given
    config = TRLConfig.update(default_ppo_config().to_dict(), hparams)

    # Just insert your peft config here (the type must be an instance of peft.PeftConfig or a dict).
    config.model.peft_config = LoraConfig(
        r=8,
        task_type=TaskType.CAUSAL_LM,
        lora_alpha=32,
        lora_dropout=0.1,
    )

    def reward_fn(samples: List[str], **kwargs) -> List[float]:
        return sentiment_fn(samples)

    prompts = ["this film was", "the plot is", "i think the acting", "a movie that"] * 4

    return trlx.train(
        reward_fn=reward_fn,
        prompts=prompts,
        eval_prompts=["i don't know much about it"] * 8,
        config=config,
    )


if __name__ == "__main__":
    hparams = {} if len(sys.argv) == 1 else json.loads(sys.argv[1])
    main(hparams)
