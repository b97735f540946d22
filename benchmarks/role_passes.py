"""Benchmark: the rollout pass with a critic adapter, as separate passes or one mixed-adapter batch.

With `model.value_adapter` the rollout pass needs three views of each batch: the policy
(policy adapter on), the critic (value adapter on) and the reference (no adapter). rlora runs
them as three passes. peft can also run one forward over the three copies of the batch stacked,
choosing the adapter per row (`adapter_names=[...]`, its mixed-adapter batches). This script
times both, no-grad, on the randomwalks shape and the GPT-2-124M shape, and checks that they
agree.

    .venv/bin/python benchmarks/role_passes.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_of, record  # noqa: E402

from rlora.config import ModelConfig  # noqa: E402
from rlora.models import build_policy  # noqa: E402
from rlora.models.policy import VALUE  # noqa: E402
from rlora.models.trunk import last_hidden_state, position_ids_from_mask  # noqa: E402

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "init_lora_weights": False}
SHAPES = {  # name: (GPT-2 config kwargs, batch, sequence length, response length)
    "randomwalks (0.8 M params)": (dict(n_embd=144, n_layer=6, n_head=6, vocab_size=30), 64, 10, 9),
    "GPT-2-124M": (dict(), 8, 48, 32),
}


def separate(policy, ids, mask, keep):
    """rlora's way: policy pass (LM head on `keep`), critic trunk pass, reference pass."""
    pos = position_ids_from_mask(mask)
    logits = policy.lm(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
    with policy.use_adapter(VALUE):
        values = policy.value_head(last_hidden_state(policy.lm, ids, mask, pos))
    ref = policy.reference_logits(ids, mask, pos, logits_to_keep=keep)
    return logits, values, ref


def mixed(policy, ids, mask, keep):
    """One forward over [policy rows; critic rows; reference rows] with per-row adapters."""
    b = len(ids)
    names = ["default"] * b + [VALUE] * b + ["__base__"] * b
    ids3, mask3 = ids.repeat(3, 1), mask.repeat(3, 1)
    out = policy.lm(input_ids=ids3, attention_mask=mask3, position_ids=position_ids_from_mask(mask3),
                    logits_to_keep=keep, output_hidden_states=True, adapter_names=names)
    return out.logits[:b], policy.value_head(out.hidden_states[-1][b:2 * b]), out.logits[2 * b:]


def main() -> None:
    from transformers import GPT2Config

    from rlora.tiny import char_tokenizer

    torch.set_num_threads(2)
    rows = ["| shape | batch × tokens | separate passes s | mixed-adapter batch s | mixed / separate | max abs diff |",
            "|---|---|---|---|---|---|"]
    for name, (kwargs, b, t, r) in SHAPES.items():
        torch.manual_seed(0)
        policy = build_policy(ModelConfig(model_path=GPT2Config(**kwargs), peft_config=LORA, value_adapter=LORA),
                              char_tokenizer()).eval()
        ids = torch.randint(3, policy.base_model.config.vocab_size, (b, t))
        mask = torch.ones_like(ids)
        keep = torch.arange(t - r - 1, t - 1)
        with torch.no_grad():
            a, m = separate(policy, ids, mask, keep), mixed(policy, ids, mask, keep)
            diff = max((x - y).abs().max().item() for x, y in zip(a, m))
            t_sep = best_of(lambda: separate(policy, ids, mask, keep), repeats=5)
            t_mix = best_of(lambda: mixed(policy, ids, mask, keep), repeats=5)
        rows.append(f"| {name} | {b} × {t} | {t_sep:.4f} | {t_mix:.4f} | {t_mix / t_sep:.2f} | {diff:.1e} |")
    table = "\n".join(rows)
    print(table)
    record("role_passes", "Rollout pass with a critic adapter: separate passes vs one mixed-adapter batch",
           "CPU, 2 threads; no-grad; LoRA r=8 on c_attn for policy and critic; best of 5", table)


if __name__ == "__main__":
    main()
