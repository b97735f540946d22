"""TRL's reward models on rlora: a sequence-classification model (a path or a loaded model)
scored as TRL scores it, or an `rlora rm` reward adapter scored on the policy's own base.

TRL's rule: the prompt and the completion as text (a conversation rendered with the reward
model's chat template), tokenized without special tokens and right-padded, and the score is the
model's first logit (`num_labels=1`) at the last real token.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rlora.models.loading import ADAPTER_CONFIG
from rlora.models.score_head import SCORE_HEAD


def is_reward_adapter(path: Any) -> bool:
    """Whether `path` is a directory `rlora rm` wrote: a LoRA adapter and its score head."""
    return isinstance(path, str) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and \
        os.path.isfile(os.path.join(path, SCORE_HEAD))


class SequenceClassifierReward:
    """A TRL-style reward function (`fn(prompts, completions, **kwargs)`) that scores with a
    sequence-classification model, as TRL's `GRPOTrainer` scores a reward model. Its name is the
    model's, as TRL logs it (`rewards/<name>/mean`)."""

    def __init__(self, model, tokenizer, model_kwargs: dict | None = None, device: Any = None, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_kwargs = dict(model_kwargs or {})  # TRL's model_init_kwargs, as TRL loads a reward model with them
        if isinstance(model, str):
            model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, **model_kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path,
                                                      trust_remote_code=model_kwargs.get("trust_remote_code", False))
        if device is not None:
            model = model.to(device)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # it scores the last non-pad token
        self.model, self.tokenizer, self.batch_size = model.eval().requires_grad_(False), tokenizer, batch_size
        self.__name__ = str(model.config._name_or_path).rstrip("/").split("/")[-1] or type(model).__name__

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = [self.tokenizer.apply_chat_template(p + c, tokenize=False) if not isinstance(p, str) else p + c
                 for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(text=texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                    padding_side="right", add_special_tokens=False).to(device)
            scores += self.model(**inputs).logits[:, 0].float().tolist()
        return scores
