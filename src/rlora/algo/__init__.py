"""The maths of PPO/RLHF and the group methods as pure functions of explicit tensors: masked
statistics, GAE, reward shaping, KL estimators and controllers, losses, log-probabilities, group
advantages and aggregations (`group`).

Notation: `b` batch, `t` time (response tokens), `v` vocabulary; `response_mask` (b, t) is
True on real response tokens (a prefix of each row), False on padding.
"""

from rlora.algo.advantages import gae
from rlora.algo.kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k3, make_kl_controller
from rlora.algo.group import aggregate_loss, clipped_token_loss, group_advantages, overlong_penalty
from rlora.algo.logprobs import logprobs_and_entropy, logprobs_of_labels, token_entropy
from rlora.algo.losses import policy_loss, value_loss
from rlora.algo.masked import (
    RunningMoments,
    TokenSelection,
    check_right_padded,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    nan_moments,
    token_mean,
    zero_padding,
)
from rlora.algo.shaping import scale_and_clip_scores, token_rewards

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "TokenSelection",
    "aggregate_loss",
    "check_right_padded",
    "clipped_token_loss",
    "gae",
    "group_advantages",
    "kl_k1",
    "kl_k3",
    "logprobs_and_entropy",
    "logprobs_of_labels",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "nan_moments",
    "overlong_penalty",
    "policy_loss",
    "scale_and_clip_scores",
    "token_entropy",
    "token_mean",
    "token_rewards",
    "value_loss",
    "zero_padding",
]
