"""Prompts: text or chat messages, normalisation, rendering with the chat template, tokenisation
with truncation, and a resumable shuffled loader."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Prompt:
    """One prompt exactly as the user gave it, and the metadata passed with it to `reward_fn` /
    `metric_fn`. `prompt` is text, or a list of chat messages (`{"role": ..., "content": ...}`)
    that `render_prompt` turns into text with the tokenizer's chat template."""

    prompt: str | list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def _check_messages(messages: list, where: str) -> list[dict[str, Any]]:
    if not messages:
        raise TypeError(f"{where} is an empty list of messages; give at least one {{'role': ..., 'content': ...}}")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TypeError(f"{where}[{j}] = {m!r:.80} is not a chat message; give each message as "
                            "{'role': 'user' | 'assistant' | 'system', 'content': text}")
    return messages


def normalize_prompts(prompts: Sequence[str | list | dict], what: str = "prompts") -> list[Prompt]:
    """Accept strings, lists of chat messages, or dicts whose "prompt" is either (other keys are
    metadata), as TRL's standard and conversational datasets."""
    if isinstance(prompts, (str, dict)) or prompts is None:
        raise TypeError(f"{what} must be a list of prompts (strings, message lists or dicts), got "
                        f"{type(prompts).__name__}; wrap a single prompt in a list")
    out = []
    for i, p in enumerate(prompts):
        value, metadata = (p.get("prompt"), {k: v for k, v in p.items() if k != "prompt"}) if isinstance(p, dict) \
            else (p, {})
        if isinstance(value, str):
            out.append(Prompt(value, metadata))
        elif isinstance(value, (list, tuple)):
            out.append(Prompt(_check_messages(list(value), f"{what}[{i}]"), metadata))
        else:
            raise TypeError(f"{what}[{i}] = {p!r:.80} is neither text, a list of chat messages, nor a dict whose "
                            "'prompt' is one of those; give each prompt as text, [{'role': ..., 'content': ...}, "
                            "...] or {'prompt': ..., **metadata}")
    if not out:
        raise ValueError(f"{what} is empty; give at least one prompt")
    keys = set(out[0].metadata)
    for i, p in enumerate(out):
        if set(p.metadata) != keys:
            raise ValueError(f"{what}[{i}] has metadata keys {sorted(p.metadata)} but {what}[0] has {sorted(keys)}; "
                             "give every prompt the same metadata keys")
    return out


def render_prompt(prompt: Prompt, tokenizer, where: str = "prompt") -> str:
    """The text a prompt stands for: itself, or its messages through the tokenizer's chat template
    with the generation prompt (`apply_chat_template(..., add_generation_prompt=True)`)."""
    if not prompt.is_chat:
        return prompt.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where} is a list of chat messages, but the tokenizer has no chat template; set "
                         "tokenizer.chat_template (a Jinja template) or give the prompt as text")
    return tokenizer.apply_chat_template(prompt.prompt, tokenize=False, add_generation_prompt=True)


def bind_template_variables(tokenizer, variables: dict[str, Any]) -> None:
    """Every `tokenizer.apply_chat_template` call from now on renders with the template variables
    `variables` (a call's own keyword arguments win); empty: the tokenizer's own method again.
    Bound on the instance, so prompts, episodes and the user's reward functions that render with
    this tokenizer all see one template."""
    tokenizer.__dict__.pop("apply_chat_template", None)  # binding again replaces, never nests
    if variables:
        tokenizer.apply_chat_template = functools.partial(type(tokenizer).apply_chat_template, tokenizer,
                                                          **variables)


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template ends an assistant turn with (ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`): the first special token after an assistant message's text. None without a
    template, or when the template puts no special token there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "rlora-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant",
                                              "content": mark}], tokenize=False)
    except Exception:  # templates may insist on other conversations; then there is none to find
        return None
    tail = text[text.find(mark) + len(mark):] if mark in text else ""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return next((i for i in tokenizer(tail, add_special_tokens=False).input_ids if i in special), None)


def _encode_parts(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[tuple[list[int], list[int]]]:
    """(leading special tokens, text tokens) of each text. The leading tokens are those the
    tokenizer itself puts in front (a BOS for Llama / Mistral, none for GPT-2); one it would
    append (an EOS) is dropped, since a response or an EOS of rlora's follows."""
    plain = tokenizer(list(texts), add_special_tokens=False).input_ids
    if not add_special_tokens:
        return [([], p) for p in plain]
    out = []
    for full, p in zip(tokenizer(list(texts), add_special_tokens=True).input_ids, plain):
        if full and full[-1] == tokenizer.eos_token_id and full[-1 - len(p):-1] == p and len(full) > len(p):
            full = full[:-1]  # an EOS the tokenizer appended
        n_lead = len(full) - len(p)
        out.append((full[:n_lead], p) if full[n_lead:] == p else ([], full))
    return out


def encode(tokenizer, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text, opened by the tokenizer's own special tokens when
    `add_special_tokens` (see `_encode_parts`); never ending in an EOS the tokenizer appended."""
    return [lead + ids for lead, ids in _encode_parts(tokenizer, texts, add_special_tokens)]


def tokenize_prompts(prompts: list[Prompt], tokenizer, max_length: int, what: str = "prompts",
                     add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each prompt, at most `max_length` of them.

    Text is encoded with `encode` and cut from the tokenizer's truncation side (trlx's way),
    keeping leading special tokens (a BOS). Chat messages are rendered with the chat template,
    which places every special token itself (none is added); a conversation over the limit keeps
    its end, the generation prompt the model continues from: its earliest messages are dropped
    whole (`fit_conversation`), and one still too long is cut from the left. Each kind of cut is
    warned about once per call, naming how many prompts it touched.
    """
    texts = [render_prompt(p, tokenizer, f"{what}[{i}]") for i, p in enumerate(prompts)]
    chat = [i for i, p in enumerate(prompts) if p.is_chat]
    plain = [i for i, p in enumerate(prompts) if not p.is_chat]
    parts: list = [None] * len(prompts)  # (leading special tokens, text tokens) of each prompt
    if plain:
        for i, part in zip(plain, _encode_parts(tokenizer, [texts[i] for i in plain], add_special_tokens)):
            parts[i] = part
    if chat:
        for i, ids in zip(chat, tokenizer([texts[i] for i in chat], add_special_tokens=False).input_ids):
            parts[i] = ([], ids)
    ids = [lead + x for lead, x in parts]
    too_long = [i for i in plain if len(ids[i]) > max_length]
    if too_long:
        warnings.warn(
            f"{len(too_long)} of {len(ids)} {what} are longer than {max_length} tokens (train.seq_length minus "
            f"max_new_tokens), e.g. {what}[{too_long[0]}] has {len(ids[too_long[0]])}; they are truncated from the "
            f"{tokenizer.truncation_side}. Raise train.seq_length or shorten the prompts.", stacklevel=3)
        keep_left = tokenizer.truncation_side == "right"
        for i in too_long:
            lead, x = parts[i]
            room = max(0, max_length - len(lead))
            ids[i] = (lead + x)[:max_length] if keep_left else lead[:max_length] + (x[len(x) - room:] if room else [])
    long_chats = [i for i in chat if len(ids[i]) > max_length]
    dropped, cut = [], []
    for i in long_chats:
        ids[i], whole = fit_conversation(prompts[i].prompt, tokenizer, max_length)
        (dropped if whole else cut).append(i)
    if long_chats:
        warnings.warn(
            f"{len(long_chats)} of {len(ids)} {what} are conversations longer than {max_length} tokens "
            f"(train.seq_length minus max_new_tokens), e.g. {what}[{long_chats[0]}]. Each keeps its end and "
            f"generation prompt: {len(dropped)} lost their earliest messages, {len(cut)} (a last message alone too "
            "long) were cut from the left. Raise train.seq_length or shorten the conversations.", stacklevel=3)
    empty = [i for i, (lead, x) in enumerate(parts) if not x]
    if empty:
        raise ValueError(f"{what}[{empty[0]}] is empty after tokenisation; every prompt needs at least one token")
    return ids


def fit_conversation(messages: list[dict[str, Any]], tokenizer, max_length: int) -> tuple[list[int], bool]:
    """The rendered ids of the latest part of a conversation that fits in `max_length` tokens.

    Earliest messages go first, whole, and the kept part starts at a user message (chat
    templates expect one there); a leading system message stays while a fit with it exists.
    When not even the last user turn fits, the rendering of that turn is cut from the left,
    so the generation prompt at its end survives. Returns the ids and whether whole messages
    sufficed.
    """
    system = messages[:1] if messages[0].get("role") == "system" else []
    rest = messages[len(system):]
    starts = [k for k, m in enumerate(rest) if m.get("role") == "user"] or list(range(len(rest)))
    tried = [system + rest[k:] for k in starts if k > 0 or not system] + [rest[k:] for k in starts[-1:]]
    last = None
    for kept in tried:
        try:
            text = tokenizer.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that refuses this shape of conversation: try a shorter one
            continue
        last = tokenizer(text, add_special_tokens=False).input_ids
        if len(last) <= max_length:
            return last, True
    if last is None:
        last = tokenizer(render_prompt(Prompt(messages), tokenizer), add_special_tokens=False).input_ids
    return last[len(last) - max_length:], False


class PromptLoader:
    """Endless chunks of prompt indices: a fresh seeded permutation each pass over the prompts.

    Its position (`state_dict`) is two integers, so a resumed run draws the same prompts.
    """

    def __init__(self, n_prompts: int, seed: int):
        self.n_prompts, self.seed = n_prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n_prompts, generator=generator).tolist()

    def next_chunk(self, size: int) -> list[int]:
        """The next `size` indices, wrapping into a new permutation when one runs out."""
        chunk: list[int] = []
        while len(chunk) < size:
            if self.position == self.n_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(size - len(chunk), self.n_prompts - self.position)
            chunk += self._order[self.position:self.position + take]
            self.position += take
        return chunk

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
