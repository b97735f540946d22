"""Supervised fine-tuning of a causal LM on plain texts, and the `rlora sft` command.

Used to build starting policies (the randomwalks model) before PPO, or to warm up a LoRA
adapter on demonstrations. Any Hugging Face causal LM works; given a peft model only the
parameters with `requires_grad` (the adapter) are trained.

Notation: `b` batch, `t` time (tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlora.rollout.prompts import encode


def forked_rng(device: torch.device):
    """A context in which the torch RNG of the CPU (and of `device` if CUDA) may be reseeded freely."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def encode_texts(tokenizer, texts: Sequence[str], add_special_tokens: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of each text followed by eos, right-padded into one batch.

    Each text opens with the tokenizer's own special tokens (a BOS for Llama / Mistral) unless
    `add_special_tokens` is off, as prompts are encoded in rollouts (`rlora.rollout.prompts.encode`).
    Labels are the ids with -100 on padding, so the loss covers the text and its eos only.

    Shape: returns `input_ids`, `attention_mask`, `labels`, each (b, t) with t the longest text + 1.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token so SFT can teach the model to stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [ids + [tokenizer.eos_token_id] for ids in encode(tokenizer, texts, add_special_tokens)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (b, t)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (b, t)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # by the mask, not the id: pad may equal eos
    return input_ids, attention_mask, labels


def linear_decay_adamw(params: list[torch.nn.Parameter], lr: float, total_steps: int):
    """AdamW without weight decay and a schedule taking its learning rate linearly from `lr` to 0
    over `total_steps` steps (supervised fine-tuning and reward-model training)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)


def sft(model, tokenizer, texts: Sequence[str], epochs: int, batch_size: int, lr: float, seed: int = 0,
        log: Callable[[dict], None] | None = None, add_special_tokens: bool = True) -> list[dict]:
    """Train `model` in place to predict each of `texts` followed by eos; return per-epoch stats.

    AdamW (no weight decay) with the learning rate decayed linearly from `lr` to 0 over all
    steps; minibatches drawn by a shuffle seeded from `seed`. The global torch RNG is forked,
    so the caller's random state is left as it was. `log`, when given, receives each epoch's
    stats as they are produced: `epoch`, `loss` (mean over predicted tokens), `seconds`. Texts are
    encoded by `encode_texts`.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("sft got no texts; give at least one training text")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"sft needs epochs >= 1 and batch_size >= 1, got epochs={epochs}, batch_size={batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; unfreeze them or attach a LoRA adapter")
    device = params[0].device
    input_ids, attention_mask, labels = (x.to(device) for x in encode_texts(tokenizer, texts, add_special_tokens))
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    optimizer, schedule = linear_decay_adamw(params, lr, epochs * steps_per_epoch)

    was_training = model.training
    model.train()
    history = []
    start = time.perf_counter()
    with forked_rng(device):
        torch.manual_seed(seed)  # also drives dropout (e.g. LoRA dropout)
        for epoch in range(epochs):
            order = torch.randperm(len(texts))
            loss_sum, token_count = 0.0, 0
            for first in range(0, len(texts), batch_size):
                idx = order[first : first + batch_size].to(device)
                out = model(input_ids=input_ids[idx], attention_mask=attention_mask[idx], labels=labels[idx])
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                schedule.step()
                n_targets = int((labels[idx, 1:] != -100).sum())  # the model predicts positions 1..t-1
                loss_sum += out.loss.item() * n_targets
                token_count += n_targets
            stats = {"epoch": epoch, "loss": loss_sum / max(token_count, 1),
                     "seconds": time.perf_counter() - start}
            history.append(stats)
            if log is not None:
                log(stats)
    model.train(was_training)
    return history


def load_texts(path: str | Path) -> list[str]:
    """Texts of a `.jsonl` file (field "text" of each line) or a `.txt` file (one per line; blanks skipped)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"data file {path} has suffix {path.suffix!r}; "
                         "use .jsonl (field \"text\") or .txt (one text a line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".txt":
        texts = [line for line in lines if line.strip()]
    else:
        texts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err.msg}); "
                                 "write one JSON object a line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number} has no string field \"text\"; "
                                 "write {\"text\": \"...\"} on each line")
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"data file {path} holds no texts")
    return texts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlora sft",
        description="Supervised fine-tuning of a causal LM (or of a LoRA adapter on it) on plain texts.")
    parser.add_argument("--model", required=True,
                        help="model directory or hub id to start from (its tokenizer is used too)")
    parser.add_argument("--data", required=True,
                        help=".jsonl file with a \"text\" field per line, or .txt with one text a line")
    parser.add_argument("--out", required=True,
                        help="directory to write the fine-tuned model (or adapter) and tokenizer to")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per optimizer step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="peak AdamW learning rate, decayed linearly to 0 (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle and dropout (default 0)")
    parser.add_argument("--lora-r", type=int, default=None,
                        help="train only a LoRA adapter of this rank (alpha 4r, dropout 0.1); saved in peft format")
    parser.add_argument("--no-special-tokens", action="store_true",
                        help="do not open texts with the tokenizer's special tokens (its BOS); match the PPO run's "
                             "tokenizer.add_special_tokens")
    return parser


def sft_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rlora sft`; returns the exit status (argument errors exit with status 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.lora_r is not None and args.lora_r < 1:
        parser.error(f"--lora-r {args.lora_r} must be a positive rank, e.g. --lora-r 8")
    try:
        texts = load_texts(args.data)
    except (OSError, ValueError) as err:
        parser.error(str(err))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.lora_r is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_r, lora_alpha=4 * args.lora_r, lora_dropout=0.1, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as err:  # peft knows no default target modules for this architecture
            parser.error(f"cannot attach a LoRA adapter to {args.model}: {err}")

    def log(stats: dict) -> None:
        print(f"epoch {stats['epoch'] + 1}/{args.epochs}  loss {stats['loss']:.4f}  {stats['seconds']:.1f}s",
              flush=True)

    try:
        sft(model, tokenizer, texts, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            log=log, add_special_tokens=not args.no_special_tokens)
    except ValueError as err:
        parser.error(str(err))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    kind = f"LoRA adapter (r={args.lora_r})" if args.lora_r is not None else "model"
    print(f"saved {kind} and tokenizer to {args.out}")
    return 0
