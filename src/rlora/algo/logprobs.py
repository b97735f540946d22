"""Log-probabilities of chosen tokens and entropies, from logits.

Notation: `b` batch, `t` time (response tokens), `v` vocabulary. Callers align logits and
labels first (logits at position i predict token i + 1: `logits[:, :-1]`, `ids[:, 1:]`).
"""

from __future__ import annotations

import torch

from rlora.algo.masked import masked_mean

__all__ = ["logprobs_of_labels", "entropy_from_logits"]


def logprobs_of_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`log softmax(logits)[labels]`, as `gather(logits, labels) − logsumexp(logits)`.

    Memory-lean: no (b, t, v) log-softmax tensor is kept. `log_softmax(...).gather(...)`
    stores its (b, t, v) output for backward; here autograd keeps only the logits (alive
    anyway) and (b, t) results, and the (b, t, v) work inside `logsumexp` is transient.
    float32/float64 logits are used as they are; half-precision logits (bf16/fp16) are
    upcast to float32 one row at a time (a full-size float32 copy would cost more memory
    than it saves, and bf16 keeps only ~3 significant digits), returning float32.

    Shape: logits (b, t, v), labels (b, t) integer -> (b, t).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (b, t, v) and labels {tuple(labels.shape)} (b, t); "
            "align them first (logits[:, :-1] with ids[:, 1:])"
        )
    labels = labels.long().unsqueeze(-1)  # (b, t, 1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, labels).squeeze(-1)  # (b, t)
        return picked - torch.logsumexp(logits, dim=-1)  # (b, t)
    rows = []
    for row_logits, row_labels in zip(logits, labels):  # (t, v), (t, 1): one row in float32 at a time
        row_logits = row_logits.float()
        picked = torch.gather(row_logits, -1, row_labels).squeeze(-1)  # (t,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)  # (b, t)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens of the entropy of softmax(logits).

    Per token `H = logsumexp(z) − Σ_i softmax(z)_i z_i` (= −Σ p log p), computed in at
    least float32; −inf logits (banned tokens) count as p = 0. Keeps the graph (usable as a bonus); detach it to log it.

    Shape: logits (b, t, v), mask (b, t) -> ().
    """
    if logits.dim() != 3 or mask.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (b, t, v) and mask {tuple(mask.shape)} (b, t)")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # (b, t, v)
    p_z = torch.where(probs > 0, probs * logits, torch.zeros((), dtype=probs.dtype, device=probs.device))  # 0·(−inf) := 0
    entropy = torch.logsumexp(logits, dim=-1) - p_z.sum(-1)  # (b, t)
    return masked_mean(entropy, mask)
