"""Log-probabilities of chosen tokens and entropies, from logits.

Notation: `b` batch, `t` time (response tokens), `v` vocabulary. Callers align logits and
labels first (logits at position i predict token i + 1: `logits[:, :-1]`, `ids[:, 1:]`).
"""

from __future__ import annotations

import torch

__all__ = ["logprobs_of_labels", "logprobs_and_entropy", "token_entropy"]


# Elements of (t, v) logits handled at once: 2**22 float32 temporaries per chunk.
CHUNK_ELEMENTS = 1 << 22


class _LabelLogprobs(torch.autograd.Function):
    """`z.gather(labels) − logsumexp(z)` for `z = logits / temperature`, with lean memory in
    both directions (no tempered copy of the logits is made), and with `with_entropy` the
    entropy of softmax(z) at each position from the same chunks (no gradient: it is logged).

    Forward and backward run over chunks of rows, so the only full-size (b, t, v) tensors are
    the logits themselves (saved for backward, alive anyway as the LM head's output) and, in
    backward, their gradient, written in place as `(onehot(labels) − softmax(logits)) · grad`.
    Autograd's composition (gather + logsumexp) would instead hold up to three full-size
    temporaries at the start of backward (exp, the gather's scatter, their sum).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out_dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
        lse = torch.empty(flat.shape[0], dtype=out_dtype, device=logits.device)
        entropy = torch.empty(flat.shape[0] if with_entropy else 0, dtype=out_dtype, device=logits.device)
        rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
        for start in range(0, flat.shape[0], rows):
            part = slice(start, start + rows)
            z = _tempered(flat[part], out_dtype, temperature)
            lse[part] = torch.logsumexp(z, -1)
            if with_entropy:  # H = −Σ p log p, log p = z − lse (no cancellation), 0·(−inf) := 0; nan stays nan
                logp = z - lse[part, None]
                entropy[part] = -logp.exp().mul_(logp.nan_to_num_(neginf=0.0)).sum(-1)
        picked = _tempered(flat.gather(-1, flat_labels).squeeze(-1), out_dtype, temperature)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        entropy = entropy.reshape(labels.shape) if with_entropy else entropy
        ctx.mark_non_differentiable(entropy)
        return (picked - lse).reshape(labels.shape), entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, _entropy_grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        temperature = ctx.temperature
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
        grad = grad.reshape(-1, 1).to(lse.dtype) / temperature  # d(z)/d(logits) = 1 / T
        out = torch.empty_like(flat)
        rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
        for start in range(0, flat.shape[0], rows):
            part = slice(start, start + rows)
            probs = (_tempered(flat[part], lse.dtype, temperature) - lse[part, None]).exp_()  # softmax of these rows
            probs.mul_(grad[part].neg()).scatter_add_(-1, flat_labels[part], grad[part])
            out[part] = probs
        return out.reshape(logits.shape), None, None, None


def _tempered(x: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """`x / temperature` in `dtype` (no division at temperature 1, so those results stay bitwise)."""
    x = x.to(dtype)
    return x if temperature == 1.0 else x / temperature


def logprobs_of_labels(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`log softmax(logits / temperature)[labels]`, as `gather(z, labels) − logsumexp(z)`.

    `temperature` is the sampling temperature of the responses, so that the log-probs are those
    of the distribution they were drawn from (`generate` samples from softmax(logits / T); TRL
    and verl score with the same division).

    Memory-lean: no (b, t, v) log-softmax tensor is made. Autograd keeps only the logits
    (alive anyway) and (b, t) results; for logits over `CHUNK_ELEMENTS`, the (b, t, v) work runs
    a chunk of rows at a time in forward and backward, so backward adds one (b, t, v) tensor,
    the logits' gradient.
    float32/float64 logits are used as they are; half-precision logits (bf16/fp16) are
    upcast to float32 a chunk of rows at a time (a full-size float32 copy would cost more memory
    than it saves, and bf16 keeps only ~3 significant digits), returning float32.

    Shape: logits (b, t, v), labels (b, t) integer -> (b, t).
    """
    return _logprobs(logits, labels, temperature, with_entropy=False)[0]


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_of_labels` and `token_entropy` of the same logits in one pass over them: the
    entropy reuses each chunk's float32 copy and logsumexp, cheaper than the two calls (BENCHMARKS.md,
    one-off measurements). The log-probs are those of
    `logprobs_of_labels`, bitwise; the entropy, as `token_entropy`'s, carries no gradient.

    Shape: logits (b, t, v), labels (b, t) integer -> (b, t), (b, t).
    """
    return _logprobs(logits, labels, temperature, with_entropy=True)


def _logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (b, t, v) and labels {tuple(labels.shape)} (b, t); "
            "align them first (logits[:, :-1] with ids[:, 1:])"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0; it is the sampling temperature of the responses")
    labels = labels.long()
    if logits.numel() > CHUNK_ELEMENTS or logits.dtype not in (torch.float32, torch.float64):
        logprobs, entropy = _LabelLogprobs.apply(logits, labels, float(temperature), with_entropy)
        return logprobs, entropy.float() if with_entropy else None
    # small enough that autograd's temporaries are bounded by one chunk anyway, and its fused
    # kernels beat the chunked Function there
    z = logits if temperature == 1.0 else logits / temperature
    logprobs = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return logprobs, token_entropy(logits, temperature) if with_entropy else None


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The entropy of `softmax(logits / temperature)` at each position, for logging (no graph),
    a chunk of rows at a time in float32 so no full-size temporary is made.

    Shape: logits (b, t, v) -> (b, t) float32.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], rows):
        z = _tempered(flat[start:start + rows], torch.float32, temperature)
        logp = torch.log_softmax(z, -1)
        out[start:start + rows] = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    return out.reshape(logits.shape[:2])
