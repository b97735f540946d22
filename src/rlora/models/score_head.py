"""The reward adapter's score head: `Linear(h, 1)` in fp32 on the trunk's last hidden state at a
row's last real token, with how it is saved in a reward adapter directory and loaded from one.

A text is scored as its prompt tokens, its completion tokens and EOS, read at that EOS:
`rlora rm` (`rlora.reward_model`) trains so and the policy's reward adapter scores rollouts so.

Notation: `b` batch, `t` time (tokens), `h` hidden size.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlora.models.trunk import last_hidden_state

SCORE_HEAD = "score_head.safetensors"  # its file in a reward adapter directory


class ScoreHead(nn.Module):
    """`Linear(h, 1)` in fp32 on the last real token's hidden state, as Hugging Face's
    sequence-classification `score` layer with one label (plus a bias)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shape: hidden (b, h) in any dtype -> scores (b,) in fp32, under autocast too."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.linear(hidden.float()).squeeze(-1)


def sequence_scores(model, head: ScoreHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores of right-padded rows read at each row's last real token, with whichever adapters
    `model` (a peft causal LM) has active. Shape: (b, t) -> (b,)."""
    hidden = last_hidden_state(model, input_ids, attention_mask)  # (b, t, h)
    last = attention_mask.sum(1) - 1
    return head(hidden[torch.arange(len(last), device=last.device), last])


def save_score_head(head: ScoreHead, directory: str) -> None:
    """Write `head`'s weights to `directory/score_head.safetensors`."""
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              os.path.join(directory, SCORE_HEAD))


def load_score_head(path: str, hidden_size: int, device: torch.device | str = "cpu") -> ScoreHead:
    """The score head saved in the reward adapter directory `path`, frozen; `hidden_size` is the
    width of the base's last hidden state (`rlora.models.trunk.hidden_width`)."""
    file = os.path.join(path, SCORE_HEAD)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"model.reward_adapter={path!r} has no {SCORE_HEAD}: give a directory written by "
                                "`rlora rm` (a peft adapter plus its score head)")
    state = load_file(file)
    width = state["linear.weight"].shape[1] if "linear.weight" in state else None
    if width != hidden_size:
        raise ValueError(f"model.reward_adapter={path!r}: its score head reads hidden size {width}, but the base "
                         f"model's last hidden state has {hidden_size}; train the reward adapter on this base "
                         "(rlora rm --model ...)")
    head = ScoreHead(hidden_size)
    head.load_state_dict(state)
    return head.to(device).requires_grad_(False).eval()
