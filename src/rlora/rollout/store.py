"""The experience of one rollout phase, as padded tensors indexed by sample.

Notation: `n` samples in the phase, `p` prompt length (left-padded), `r` response length
(right-padded). Every per-token tensor is aligned with `response_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from rlora.rollout.generation import Rollouts
from rlora.rollout.rewards import concat_scores


def select_rollouts(rollouts: Rollouts, rows: list[int]) -> Rollouts:
    """The samples at `rows`, in that order (padding columns kept)."""
    index = torch.as_tensor(rows, dtype=torch.long)
    return Rollouts(rollouts.query_ids[index], rollouts.query_mask[index], rollouts.response_ids[index],
                    rollouts.response_mask[index], [rollouts.prompts[i] for i in rows],
                    [rollouts.outputs[i] for i in rows], [rollouts.prompt_texts[i] for i in rows],
                    rollouts.truncated[index], rollouts.action_mask[index],
                    None if rollouts.episodes is None else [rollouts.episodes[i] for i in rows])


@dataclass
class Scored:
    """Rollouts with their scores: the chunks a phase is built from."""

    rollouts: Rollouts
    scores: torch.Tensor  # (n,) or (n, r)
    values: dict[str, torch.Tensor]  # each reward function's own value per sample (n,), NaN where it abstained

    def __len__(self) -> int:
        return len(self.rollouts.prompts)

    def select(self, rows: list[int]) -> "Scored":
        index = torch.as_tensor(rows, dtype=torch.long)
        return Scored(select_rollouts(self.rollouts, rows), self.scores[index],
                      {name: v[index] for name, v in self.values.items()})

    @staticmethod
    def concat(parts: list["Scored"], pad_id: int) -> "Scored":
        rollouts = concat_rollouts([p.rollouts for p in parts], pad_id)
        return Scored(rollouts, concat_scores([p.scores for p in parts], rollouts.response_ids.shape[1]),
                      {name: torch.cat([p.values[name] for p in parts]) for name in parts[0].values})


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """One `Rollouts` from several chunks: prompts left-padded and responses right-padded to
    the longest of any chunk."""
    p = max(x.query_ids.shape[1] for x in parts)
    r = max(x.response_ids.shape[1] for x in parts)

    def pad(t: torch.Tensor, length: int, left: bool, value) -> torch.Tensor:
        extra = length - t.shape[1]
        return F.pad(t, (extra, 0) if left else (0, extra), value=value)

    return Rollouts(
        query_ids=torch.cat([pad(x.query_ids, p, True, pad_id) for x in parts]),
        query_mask=torch.cat([pad(x.query_mask, p, True, False) for x in parts]),
        response_ids=torch.cat([pad(x.response_ids, r, False, pad_id) for x in parts]),
        response_mask=torch.cat([pad(x.response_mask, r, False, False) for x in parts]),
        prompts=[s for x in parts for s in x.prompts],
        outputs=[s for x in parts for s in x.outputs],
        prompt_texts=[s for x in parts for s in x.prompt_texts],
        truncated=torch.cat([x.truncated for x in parts]),
        action_mask=torch.cat([pad(x.action_mask, r, False, False) for x in parts]),
        episodes=None if any(x.episodes is None for x in parts) else [e for x in parts for e in x.episodes],
    )


@dataclass
class Experience:
    """What the PPO update reads: tokens, masks, and the rollout pass's per-token numbers."""

    query_ids: torch.Tensor  # (n, p)
    query_mask: torch.Tensor  # (n, p) bool
    response_ids: torch.Tensor  # (n, r)
    response_mask: torch.Tensor  # (n, r) bool
    logprobs: torch.Tensor  # (n, r) log pi_old of each response token
    values: torch.Tensor  # (n, r) V_old before each response token
    advantages: torch.Tensor  # (n, r) PPO: whitened GAE advantages; group methods: the completion's, 0 on padding
    returns: torch.Tensor  # (n, r) A + V (unwhitened A), 0 on padding
    ref_logprobs: torch.Tensor  # (n, r) log pi_ref of each response token (0 when no reference pass ran)
    loss_mask: torch.Tensor  # (n, r) bool, the tokens the loss counts: action_mask, less truncated rows
    # when the group methods' mask_truncated_completions is set
    # (n, r) bool, the model's own tokens: response_mask less a multi-turn episode's environment and tool
    # tokens, which every pass reads as context and no loss, KL or advantage counts
    action_mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.action_mask is None:  # single-turn experience (and checkpoints written before episodes)
            self.action_mask = self.response_mask.clone()

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Experience":
        """The samples at `index`, with columns that are padding in every selected row dropped."""
        picked = {f.name: getattr(self, f.name)[index] for f in fields(self)}
        p_keep = int(picked["query_mask"].any(0).long().argmax()) if picked["query_mask"].any() else 0
        r_keep = int(picked["response_mask"].any(0).sum())
        for name, value in picked.items():
            picked[name] = value[:, p_keep:] if name.startswith("query") else value[:, :r_keep]
        return Experience(**picked)

    def to(self, device: torch.device | str) -> "Experience":
        return Experience(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
