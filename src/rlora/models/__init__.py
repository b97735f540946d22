"""Roles on one base: policy, reference, value head, the reward adapter's score head
(docs/design.md §1)."""

from rlora.models.hydra import HydraBranch, find_decoder_blocks
from rlora.models.loading import build_policy, load_base_model, load_tokenizer, resolve_peft_config
from rlora.models.policy import MODES, Policy, PolicyOutput
from rlora.models.score_head import ScoreHead
from rlora.models.trunk import position_ids_from_mask
from rlora.models.value_head import ValueHead

__all__ = [
    "MODES", "HydraBranch", "Policy", "PolicyOutput", "ScoreHead", "ValueHead", "build_policy", "find_decoder_blocks",
    "load_base_model", "load_tokenizer", "position_ids_from_mask", "resolve_peft_config",
]
