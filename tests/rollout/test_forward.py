"""The scoring pass computes the LM head on response positions only, and gives the same
logprobs, values and reference logprobs as a plain full-logits computation."""

from __future__ import annotations

import pytest
import torch
from peft import PromptTuningConfig

from rlora.config import ModelConfig
from rlora.models import build_policy
from rlora.rollout.generation import left_pad, right_pad
from rlora.rollout.forward import forward_responses, pack_sequences
from rlora.tiny import char_tokenizer

MODES = {"lora": {"peft_config": {"peft_type": "LORA", "r": 4, "init_lora_weights": False}},
         "prompt": {"peft_config": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)},
         "hydra": {"num_layers_unfrozen": 1}}


@pytest.mark.parametrize("mode", list(MODES))
def test_lean_scoring_equals_full_logits(tiny_model_dir, mode):
    tokenizer = char_tokenizer()
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("llama"), **MODES[mode]), tokenizer).eval()
    query_ids, query_mask = left_pad([[5, 6, 7], [8], [9, 10]], tokenizer.pad_token_id)
    response_ids, response_mask = right_pad([[11, 12, 2], [13, 14, 15, 16], [17]], tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, values, ref_logprobs, _ = forward_responses(policy, query_ids, query_mask, response_ids, response_mask,
                                                           with_reference=True)
        ids, mask, starts = pack_sequences(query_ids, query_mask, response_ids, response_mask)
        full = policy(ids, mask.long())
        ref_full = policy.reference_logits(ids, mask.long())
    for i in range(3):
        for j in range(int(response_mask[i].sum())):
            pos, token = int(starts[i]) - 1 + j, response_ids[i, j]
            assert torch.allclose(logprobs[i, j], torch.log_softmax(full.logits[i, pos], -1)[token], atol=1e-6)
            assert torch.allclose(ref_logprobs[i, j], torch.log_softmax(ref_full[i, pos], -1)[token], atol=1e-6)
            assert values[i, j] == full.values[i, pos]
