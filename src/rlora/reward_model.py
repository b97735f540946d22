"""Reward models as adapters: a LoRA adapter plus a score head (`rlora.models.score_head`) on the
frozen base, trained from preference pairs (Bradley–Terry) by `rlora rm`, then used in PPO on the
same base (`model.reward_adapter`).

A reward adapter directory holds:
  adapter_config.json, adapter_model.safetensors   the LoRA adapter in peft's format (causal LM)
  score_head.safetensors                           the score head: Linear(h, 1), fp32
  reward_model.json                                hidden size, held-out accuracy, data sizes
  tokenizer files                                  the tokenizer it was trained with

A text is scored as its prompt tokens, its completion tokens and EOS, read at that EOS (the
last real token): `rlora rm` trains exactly so and PPO scores rollouts exactly so, a response
without a generated EOS getting one appended for scoring.

Notation: `b` batch, `t` time (tokens), `h` hidden size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlora.models.score_head import ScoreHead, save_score_head, sequence_scores

INFO = "reward_model.json"


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str


def load_pairs(source: str) -> list[Pair]:
    """Preference pairs from a .jsonl file or `datasets:NAME[:SPLIT]` (a hub name or a
    `save_to_disk` directory): fields `chosen` and `rejected`, and optionally `prompt` (the
    shared beginning; without it each side is a whole text)."""
    from rlora.data import load_rows

    rows = load_rows(source, "--data")
    pairs = []
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("chosen", "rejected")):
            raise ValueError(f"{where}: needs string fields 'chosen' and 'rejected' (and optionally 'prompt'); "
                             f"got {sorted(row) if isinstance(row, dict) else type(row).__name__}")
        prompt = row.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        pairs.append(Pair(prompt, row["chosen"], row["rejected"]))
    if not pairs:
        raise ValueError(f"{source} holds no preference pairs")
    return pairs


def encode_scored(tokenizer, prompts: Sequence[str], completions: Sequence[str],
                  max_length: int, add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of prompt + completion + EOS for each text, right-padded; the prompt opens with
    the tokenizer's special tokens (a BOS) unless `add_special_tokens` is off, as rollout prompts
    do. An over-long text keeps its end (the EOS the score is read at). Shape: -> ids, mask (b, t)."""
    from rlora.rollout.generation import right_pad

    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a token and the EOS; give at least 2")
    from rlora.rollout.prompts import encode

    prompt_ids = encode(tokenizer, prompts, add_special_tokens)  # opened as rollout prompts are (a BOS)
    completion_ids = encode(tokenizer, completions, add_special_tokens=False)
    rows = [(p + c)[-(max_length - 1):] + [tokenizer.eos_token_id] for p, c in zip(prompt_ids, completion_ids)]
    ids, mask = right_pad(rows, tokenizer.pad_token_id)
    return ids, mask.long()


def rollout_rows(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollouts laid out as the reward model was trained: prompt, response, one EOS (appended
    where none was generated), right-padded. Shape: query (b, p), response (b, r) -> (b, t)."""
    from rlora.rollout.generation import right_pad

    rows = []
    for q, qm, r, rm in zip(query_ids.tolist(), query_mask.tolist(), response_ids.tolist(), response_mask.tolist()):
        response = [t for t, m in zip(r, rm) if m]
        if response and response[-1] == eos_id:
            response = response[:-1]
        rows.append([t for t, m in zip(q, qm) if m] + response + [eos_id])
    ids, mask = right_pad(rows, pad_id)
    return ids, mask.long()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log σ(r_chosen - r_rejected), averaged over pairs (Bradley & Terry 1952; Ouyang et al.
    2022, eq. 1). Shape: (b,), (b,) -> ()."""
    return -F.logsigmoid(chosen - rejected).mean()


@torch.no_grad()
def pairwise_accuracy(model, head: ScoreHead, tokenizer, pairs: Sequence[Pair], batch_size: int,
                      max_length: int, add_special_tokens: bool = True) -> float:
    """The fraction of pairs whose chosen text scores strictly higher than the rejected one."""
    device = head.linear.weight.device
    wins = 0
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        prompts = [p.prompt for p in part] * 2
        ids, mask = encode_scored(tokenizer, prompts, [p.chosen for p in part] + [p.rejected for p in part],
                                  max_length, add_special_tokens)
        scores = sequence_scores(model, head, ids.to(device), mask.to(device))
        wins += int((scores[:len(part)] > scores[len(part):]).sum())
    return wins / len(pairs)


def train_reward_model(model, head: ScoreHead, tokenizer, pairs: Sequence[Pair], eval_pairs: Sequence[Pair],
                       epochs: int, batch_size: int, lr: float, max_length: int = 512, seed: int = 0,
                       log: Callable[[dict], None] | None = None, add_special_tokens: bool = True) -> list[dict]:
    """Train the active adapter of `model` and `head` with the Bradley–Terry loss; return per-epoch
    stats (`epoch`, `loss`, `train_accuracy`, `eval_accuracy`, `seconds`).

    Chosen and rejected texts of a batch go through the model together. AdamW (no weight decay),
    learning rate decayed linearly to 0; dropout (e.g. `lora_dropout`) on while training. Texts
    are laid out by `encode_scored`.
    """
    from rlora.sft import forked_rng, linear_decay_adamw

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"reward-model training needs epochs >= 1 and batch_size >= 1, got epochs={epochs}, "
                         f"batch_size={batch_size}")
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    device = head.linear.weight.device
    optimizer, schedule = linear_decay_adamw(params, lr, epochs * math.ceil(len(pairs) / batch_size))
    order_rng = random.Random(seed)
    history, start = [], time.perf_counter()
    with forked_rng(device):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            model.train()
            order = list(range(len(pairs)))
            order_rng.shuffle(order)
            loss_sum, wins = 0.0, 0
            for first in range(0, len(order), batch_size):
                part = [pairs[i] for i in order[first:first + batch_size]]
                ids, mask = encode_scored(tokenizer, [p.prompt for p in part] * 2,
                                          [p.chosen for p in part] + [p.rejected for p in part], max_length,
                                          add_special_tokens)
                scores = sequence_scores(model, head, ids.to(device), mask.to(device))
                chosen, rejected = scores[:len(part)], scores[len(part):]
                loss = bradley_terry_loss(chosen, rejected)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(part)
                wins += int((chosen > rejected).sum())
            model.eval()
            stats = {"epoch": epoch, "loss": loss_sum / len(pairs), "train_accuracy": wins / len(pairs),
                     "eval_accuracy": pairwise_accuracy(model, head, tokenizer, eval_pairs, batch_size, max_length,
                                                        add_special_tokens) if eval_pairs else float("nan"),
                     "seconds": time.perf_counter() - start}
            history.append(stats)
            if log is not None:
                log(stats)
    return history


def save_reward_adapter(model, head: ScoreHead, tokenizer, out: str, info: dict) -> None:
    """Write the active adapter, the score head, the tokenizer and `info` to `out`."""
    model.save_pretrained(out)
    save_score_head(head, out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, INFO), "w", encoding="utf-8") as f:
        json.dump({"hidden_size": head.linear.in_features, **info}, f, indent=2)


def split_pairs(pairs: list[Pair], eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A seeded shuffle of `pairs` cut into (train, held-out)."""
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    n_eval = round(len(shuffled) * eval_fraction)
    if eval_fraction > 0 and (n_eval == 0 or n_eval == len(shuffled)):
        raise ValueError(f"--eval-fraction {eval_fraction} of {len(pairs)} pairs leaves an empty split; give more "
                         "pairs, another fraction, or --eval-data")
    return shuffled[n_eval:], shuffled[:n_eval]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlora rm",
        description="Train a reward model as a LoRA adapter plus score head on a frozen base, from preference "
                    "pairs (Bradley-Terry loss). Use the result in PPO as model.reward_adapter.")
    parser.add_argument("--model", required=True, help="base model directory or hub id (its tokenizer is used too)")
    parser.add_argument("--data", required=True,
                        help=".jsonl with 'chosen', 'rejected' (and optional 'prompt') per line, or "
                             "datasets:NAME[:SPLIT] (a hub dataset or a save_to_disk directory)")
    parser.add_argument("--out", required=True, help="directory to write the reward adapter to")
    parser.add_argument("--eval-data", default=None, help="held-out pairs (default: --eval-fraction of --data)")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="share of --data held out when --eval-data is not given (default 0.1)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training pairs (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate, decayed linearly to 0")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha 2r, dropout 0.05; default 8)")
    parser.add_argument("--target-modules", default=None,
                        help="comma-separated module names for LoRA (default: peft's for the architecture)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text, EOS included (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, shuffle, dropout and init")
    parser.add_argument("--no-special-tokens", action="store_true",
                        help="do not open prompts with the tokenizer's special tokens (its BOS); match the PPO "
                             "run's tokenizer.add_special_tokens")
    return parser


def rm_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rlora rm`; returns the exit status (argument errors exit with status 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.lora_r < 1:
        parser.error(f"--lora-r {args.lora_r} must be a positive rank, e.g. --lora-r 8")
    if not 0 <= args.eval_fraction < 1:
        parser.error(f"--eval-fraction {args.eval_fraction} must be in [0, 1), e.g. 0.1")
    if args.max_length < 2:
        parser.error(f"--max-length {args.max_length} must be at least 2 (a token and the EOS)")
    try:
        pairs = load_pairs(args.data)
        if args.eval_data is not None:
            train_pairs, eval_pairs = pairs, load_pairs(args.eval_data)
        else:
            train_pairs, eval_pairs = split_pairs(pairs, args.eval_fraction, args.seed)
    except (OSError, ValueError, ImportError) as err:
        parser.error(str(err))

    from peft import LoraConfig, get_peft_model

    from rlora.config import ModelConfig, TokenizerConfig
    from rlora.models.loading import fit_to_tokenizer, load_base_model, load_tokenizer
    from rlora.models.trunk import hidden_width

    torch.manual_seed(args.seed)
    try:
        tokenizer = load_tokenizer(TokenizerConfig(), args.model)
        base = fit_to_tokenizer(load_base_model(ModelConfig(model_path=args.model)), tokenizer)
    except (OSError, ValueError) as err:
        parser.error(str(err).replace("model.model_path", "--model"))
    base.requires_grad_(False)
    targets = args.target_modules.split(",") if args.target_modules else None
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=targets)
    try:
        model = get_peft_model(base, lora)
    except ValueError as err:  # no default target modules for this architecture, or a bad name
        parser.error(f"cannot attach a LoRA adapter to {args.model}: {err}; name them with --target-modules")
    head = ScoreHead(hidden_width(base)).to(base.device)
    print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held out", flush=True)
    if eval_pairs:
        model.eval()
        before = pairwise_accuracy(model, head, tokenizer, eval_pairs, args.batch_size, args.max_length,
                                   not args.no_special_tokens)
        print(f"held-out accuracy before training {before:.3f}", flush=True)

    def log(stats: dict) -> None:
        print(f"epoch {stats['epoch'] + 1}/{args.epochs}  loss {stats['loss']:.4f}  "
              f"train accuracy {stats['train_accuracy']:.3f}  held-out accuracy {stats['eval_accuracy']:.3f}  "
              f"{stats['seconds']:.1f}s", flush=True)

    history = train_reward_model(model, head, tokenizer, train_pairs, eval_pairs, args.epochs, args.batch_size,
                                 args.lr, args.max_length, args.seed, log, not args.no_special_tokens)
    save_reward_adapter(model, head, tokenizer, args.out, {
        "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
        "eval_accuracy": history[-1]["eval_accuracy"] if eval_pairs else None, "history": history})
    print(f"saved reward adapter to {args.out} (use it as model.reward_adapter)")
    return 0
