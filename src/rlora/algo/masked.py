"""Masked statistics: every mean, variance and whitening in rlora goes through here.

Notation: `b` batch, `t` time (response tokens). `mask` is a boolean tensor of the same
shape as the values, True on real response tokens (the `response_mask` convention), False
on padding. Padding values are selected away with `torch.where`, never multiplied by 0, so
even `inf`/`nan` garbage in padding cannot leak into a statistic or its gradient.

Empty masks: `masked_mean` / `masked_sum` never synchronise with the device; a mean over
zero real tokens is `nan` (0/0), like `torch.mean` of an empty tensor. `masked_var`
(unbiased) raises for fewer than 2 real tokens; `masked_whiten` falls back to the biased
variance for a single real token (see its docstring).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "zero_padding",
    "masked_sum",
    "masked_mean",
    "token_mean",
    "masked_var",
    "masked_whiten",
    "check_right_padded",
    "TokenSelection",
    "RunningMoments",
]


def _check(x: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True on real tokens), got dtype {mask.dtype}; pass mask.bool()")
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(x.shape)}")


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` with 0 wherever `mask` is False (selected, not multiplied: nan/inf padding is cleared).

    Gradients flow to the real positions only. Shape: x, mask (b, t) -> (b, t).
    """
    _check(x, mask)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over the positions where `mask` is True.

    Shape: x, mask (b, t) (any equal shapes) -> () if dim is None, else x's shape without `dim`.
    """
    x = zero_padding(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is True (nan where there are none).

    Shape: x, mask (b, t) -> () if dim is None, else x's shape without `dim`
    (e.g. dim=1 gives the per-row mean, (b,)).
    """
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the real positions, counting at least one (TRL's `clamp(min=1)`): 0, not
    nan, where there are none, as for a microbatch whose completions were all truncated and
    masked out of the loss. For logged statistics. Shape: x, mask (b, t) -> ()."""
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the real positions (all of them together).

    `unbiased=True` applies Bessel's correction n/(n-1); it is undefined for n < 2 real
    tokens, and this raises `ValueError` then (pass `unbiased=False` for the biased
    variance, which is 0 for a single token). The check synchronises with the device.

    Shape: x, mask (b, t) -> ().
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)  # biased (population) variance
    if unbiased:
        n = int(mask.sum())
        if n < 2:
            raise ValueError(
                f"unbiased masked_var needs at least 2 real tokens, got {n}; pass unbiased=False for the biased variance"
            )
        var = var * (n / (n - 1))  # Bessel's correction
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Whiten `x` with the mean and unbiased variance of its real positions (as trlx `whiten`),
    or with `moments = (mean, var)` measured elsewhere (over every process, say).

    `(x - mean) / sqrt(var + eps)`, plus `mean` again when `shift_mean=False`. The result is
    exactly 0 at padding (in both modes), and padding values never affect real ones.

    A single real token has no unbiased variance: the biased variance (0) is used, so the
    whitened token is 0 (or `mean` with `shift_mean=False`) instead of nan. With no real
    token at all the result is all zeros. No device synchronisation.

    Shape: x, mask (b, t) -> (b, t).
    """
    x = zero_padding(x, mask)  # padding garbage stays out of the values and the gradient
    if moments is None:
        n = mask.sum()
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)  # biased
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)  # Bessel's correction where defined
    else:
        mean, var = (m.to(x.dtype) for m in moments)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)


class TokenSelection:
    """The tokens of each row where `mask` is True, moved to the left in their order: a right-padded
    view of scattered tokens, and back.

    A multi-turn episode's response holds the model's tokens with the environment's between them;
    GAE and the KL rewards run over the model's tokens as one sequence (an environment turn is no
    time step), so they take `TokenSelection(action_mask).take(x)` and put their results back with
    `put`. Where `mask` is already right-padded, `take` and `put` return the same values.

    Shape: mask (b, t); take: (b, t) -> (b, m), m = most selected tokens in a row; put: (b, m) -> (b, t).
    """

    def __init__(self, mask: torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"mask must be a (b, t) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        counts = mask.sum(1)  # (b,)
        width = int(counts.max()) if mask.numel() else 0
        # a stable sort of "not selected" puts each row's selected positions first, in order
        self.index = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (b, m)
        self.mask = torch.arange(width, device=mask.device)[None, :] < counts[:, None]  # (b, m), right-padded
        self.shape = mask.shape

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The selected values of `x`, left-aligned; 0 after each row's last. Shape: (b, t) -> (b, m)."""
        return zero_padding(x.gather(1, self.index), self.mask)

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """`x`'s values back at the selected positions, 0 elsewhere. Shape: (b, m) -> (b, t)."""
        out = torch.zeros(self.shape, dtype=x.dtype, device=x.device)
        return out.scatter(1, self.index, zero_padding(x, self.mask))


def check_right_padded(mask: torch.Tensor, name: str = "response_mask") -> None:
    """Raise `ValueError` unless each row of `mask` is a prefix of Trues followed by Falses.

    Synchronises with the device (one `.any()`); call it once per rollout, not per step.

    Shape: mask (b, t).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}; pass {name}.bool()")
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape (b, t), got {tuple(mask.shape)}")
    gaps = mask[:, 1:] & ~mask[:, :-1]  # (b, t-1): a real token after a padding one
    if bool(gaps.any()):
        row = int(gaps.any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"{name} row {row} is not right-padded ({mask[row].int().tolist()}); "
            "real response tokens must come first, padding after"
        )


class RunningMoments:
    """Running mean and standard deviation of per-sample scalars (e.g. reward sums), as trlx.

    Batches are merged with the parallel-variance update of Chan, Golub & LeVeque (1979),
    "Updating formulae and a pairwise algorithm for computing sample variances" (their
    pairwise combination of sums of squares, in the mean-difference form
    `M2 = M2_a + M2_b + δ² n_a n_b / n`, δ = mean_b - mean_a). State is plain Python floats (exact in float64),
    so `state_dict()` is JSON-serialisable.

    `std` is the unbiased (n-1) standard deviation of everything seen so far; while fewer than
    2 values have been seen it is 1.0 (trlx's initial value), so dividing by it is a no-op.
    """

    def __init__(self) -> None:
        self.mean: float = 0.0
        self.var: float = 1.0  # biased (population) variance of all values seen; 1.0 before any
        self.count: int = 0

    @property
    def std(self) -> float:
        """Unbiased standard deviation of all values seen; 1.0 while fewer than 2."""
        if self.count < 2:
            return 1.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Merge a batch of scalars; return the batch's `(mean, unbiased std)`.

        The batch std of a single value is undefined and returned as nan.

        Shape: xs (b,) (any shape; all elements are samples).
        """
        xs = xs.detach().to(device="cpu", dtype=torch.float64).flatten()
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty batch; pass at least one value")
        if not bool(torch.isfinite(xs).all()):
            raise ValueError(f"RunningMoments.update got non-finite values: {xs.tolist()}")
        batch_mean = float(xs.mean())
        batch_var = float(((xs - batch_mean) ** 2).mean())  # biased
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, n
        else:
            total = self.count + n
            delta = batch_mean - self.mean
            # Chan et al. 1979, pairwise update: M2 = M2_a + M2_b + δ² n_a n_b / n
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
            self.mean += delta * n / total
            self.var = m2 / total
            self.count = total
        batch_std = math.sqrt(batch_var * n / (n - 1)) if n > 1 else math.nan
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float]:
        return {"mean": float(self.mean), "var": float(self.var), "count": int(self.count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        missing = {"mean", "var", "count"} - set(state)
        extra = set(state) - {"mean", "var", "count"}
        if missing or extra:
            raise ValueError(f"RunningMoments state has keys {sorted(state)}; expected mean, var, count")
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def nan_moments(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and (unbiased) std of the non-NaN entries of `x` (NaN marks a missing value: a sample a
    reward function did not judge); both NaN when there are none. Shape: (n,) -> {"mean": (), "std": ()}."""
    present = ~torch.isnan(x)
    if not present.any():
        return {"mean": torch.tensor(math.nan), "std": torch.tensor(math.nan)}
    values = x[present].double()
    std = values.std() if values.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return {"mean": values.mean().float(), "std": std.float()}
