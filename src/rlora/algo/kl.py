"""Per-token KL estimators and the KL-coefficient controllers.

Notation: `b` batch, `t` time (response tokens). Log-probabilities are of the sampled
tokens, so every estimator here is a single-sample Monte-Carlo estimate at each token,
with samples drawn from the policy π.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "kl_k1",
    "kl_k3",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Naive unbiased estimator of KL(π ‖ π_ref): `log π − log π_ref` (can be negative).

    Schulman 2020, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html), k1.
    This is the estimator inside the reward penalty `r_t = −β k1_t`.

    Shape: logp, ref_logp (b, t) -> (b, t).
    """
    return logp - ref_logp  # Schulman 2020, k1 = −log r, r = π_ref/π


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Unbiased, non-negative, low-variance estimator of KL(π ‖ π_ref).

    Schulman 2020, "Approximating KL Divergence", k3 = (r − 1) − log r with r = π_ref/π,
    i.e. `exp(ref − logp) − 1 − (ref − logp)` (computed with `expm1` for accuracy near 0).

    Shape: logp, ref_logp (b, t) -> (b, t).
    """
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r  # Schulman 2020, k3 = (r − 1) − log r


class FixedKLController:
    """A constant KL coefficient β (trlx `FixedKLController`); `update` does nothing."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if set(state) != {"value"}:
            raise ValueError(f"FixedKLController state has keys {sorted(state)}; expected only 'value'")
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", §2.2: steer the measured KL towards `target` over `horizon` samples."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if not (target > 0 and math.isfinite(target)):
            raise ValueError(
                f"adaptive KL target must be a positive number, got {target}; set method.target=None for a fixed β"
            )
        if not horizon > 0:
            raise ValueError(f"adaptive KL horizon must be positive, got {horizon}; trlx's default is 10000")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update β from the KL measured over the last `n_steps` samples.

        `current_kl` may be a float or a 0-dim tensor; non-finite values raise `ValueError`.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"KL controller got a non-finite KL {current_kl}")
        # Ziegler et al. 2019 §2.2: e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        # Ziegler et al. 2019 §2.2: β_{t+1} = β_t (1 + K_β e_t), K_β = n_steps / horizon
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if "value" not in state or not set(state) <= {"value", "target", "horizon"}:
            raise ValueError(f"AdaptiveKLController state has keys {sorted(state)}; expected value, target, horizon")
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


def make_kl_controller(
    init_kl_coef: float, target: float | None, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """`FixedKLController(init_kl_coef)` when `target` is None, else the adaptive one (as trlx)."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)
