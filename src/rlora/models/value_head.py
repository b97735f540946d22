"""The value head: a small MLP on the trunk's last hidden state, kept in fp32.

Notation: `b` batch, `t` time, `h` hidden size.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """`Linear(h, 2h) -> ReLU -> Linear(2h, 1)` in fp32, as trlx's `make_head(h, 1)`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 1)
        ).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shape: hidden (b, t, h) in any dtype -> values (b, t) in fp32, under autocast too."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.net(hidden.float()).squeeze(-1)
