"""The `rlora` command: `rlora train CONFIG.yaml key=value ...`, `rlora demo`."""

from __future__ import annotations

import argparse
import sys


def demo_roles() -> int:
    """Build every role on one tiny base and show the reference/policy invariants."""
    import torch
    from peft import LoraConfig
    from rich.console import Console
    from rich.table import Table

    from rlora.config import ModelConfig
    from rlora.models import build_policy, position_ids_from_mask
    from rlora.tiny import char_tokenizer, tiny_config

    console = Console()
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    enc = tokenizer(["hello there", "one frozen base"], padding=True, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc.input_ids, enc.attention_mask
    table = Table(title="one frozen base, every role")
    for column in ("model", "mode", "trainable / total params", "reference == base (bitwise)",
                   "policy != reference", "adapter on after reference"):
        table.add_column(column)
    for arch in ("gpt2", "llama"):
        config = tiny_config(arch, vocab_size=len(tokenizer))
        for mode, kwargs in (("LoRA", {"peft_config": LoraConfig(r=8, lora_alpha=32, init_lora_weights=False)}),
                             ("hydra", {"num_layers_unfrozen": 1})):
            torch.manual_seed(0)
            policy = build_policy(ModelConfig(model_path=config, **kwargs), tokenizer).eval()
            with torch.no_grad():
                base = policy.base_model
                if mode == "LoRA":
                    with policy.lm.disable_adapter():
                        expected = base(input_ids=ids, attention_mask=mask,
                                        position_ids=position_ids_from_mask(mask)).logits
                else:
                    expected = policy(ids, mask).logits  # before any update the policy is the base
                    with torch.no_grad():  # move the trainable top so that policy and reference differ
                        for p in policy.trainable_parameters():
                            p.add_(0.05 * torch.randn_like(p))
                ref = policy.reference_logits(ids, mask)
                logits = policy(ids, mask).logits
            n_train = sum(p.numel() for p in policy.trainable_parameters())
            n_all = sum(p.numel() for p in policy.parameters())
            adapter_on = "yes" if mode != "LoRA" or not policy.lm._adapters_disabled else "NO"
            table.add_row(arch, mode, f"{n_train:,} / {n_all:,}", str(torch.equal(ref, expected)),
                          str(not torch.equal(logits, ref)), adapter_on)
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlora", description="PPO / RLHF with LoRA adapters on one frozen base")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in demo end to end")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo_roles()
    return 2


if __name__ == "__main__":
    sys.exit(main())
