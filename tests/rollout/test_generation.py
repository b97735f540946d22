"""Generation cuts responses at EOS, applies stop sequences, and pads on the right."""

from __future__ import annotations

import torch

from rlora.rollout.generation import apply_stop_sequences, cut_at_eos, generate_rollouts
from rlora.rollout.store import Experience, concat_rollouts


class ScriptedPolicy(torch.nn.Module):
    """Stands in for a policy: `generate` appends fixed continuations to the prompts."""

    def __init__(self, continuations: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids, attention_mask, **kwargs):
        assert kwargs["max_new_tokens"] >= max(len(c) for c in self.continuations)
        width = max(len(c) for c in self.continuations)  # rows that stopped early are padded, as HF does
        tail = torch.tensor([c + [kwargs["pad_token_id"]] * (width - len(c)) for c in self.continuations])
        return torch.cat([input_ids, tail], dim=1)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_response_ends_at_first_eos_and_padding_is_masked(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    conts = [ids(tokenizer, "ab") + [eos, pad, pad], ids(tokenizer, "abcde"), ids(tokenizer, "a") + [eos] + ids(tokenizer, "bc")]
    out = generate_rollouts(ScriptedPolicy(conts), tokenizer, [ids(tokenizer, "hi"), ids(tokenizer, "x"), ids(tokenizer, "yo")],
                            {"max_new_tokens": 5})
    assert out.response_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] * 2 + [False] * 3]
    assert out.response_ids[0, 2] == eos and out.response_ids[2, 1] == eos  # EOS is a real token
    assert (out.response_ids[~out.response_mask] == pad).all()
    assert out.outputs == ["ab", "abcde", "a"]
    assert out.prompts == ["hi", "x", "yo"]
    assert out.query_mask.tolist() == [[True, True], [False, True], [True, True]]


def test_stop_sequence_cuts_output_and_appends_eos(tokenizer):
    eos = tokenizer.eos_token_id
    conts = [ids(tokenizer, "ab. cd"), ids(tokenizer, "abcdef")]
    out = generate_rollouts(ScriptedPolicy(conts), tokenizer, [ids(tokenizer, "q"), ids(tokenizer, "r")],
                            {"max_new_tokens": 6}, stop_sequences=["."])
    assert out.outputs == ["ab", "abcdef"]
    assert out.response_ids[0, :3].tolist() == ids(tokenizer, "ab") + [eos]
    assert out.response_mask.sum(1).tolist() == [3, 6]  # the uncut row ran to max_new_tokens
    assert out.samples == ["qab", "rabcdef"]


def test_helpers():
    assert cut_at_eos([5, 2, 7], eos_id=2) == [5, 2]
    assert cut_at_eos([5, 7], eos_id=2) == [5, 7]
    assert apply_stop_sequences("hello\nworld", ["\n", "wor"]) == "hello"
    assert apply_stop_sequences("hello", ["x"]) is None


def test_concat_and_select_drop_all_padding_columns(tokenizer):
    eos = tokenizer.eos_token_id
    a = generate_rollouts(ScriptedPolicy([[5, eos]]), tokenizer, [[7, 8, 9]], {"max_new_tokens": 4})
    b = generate_rollouts(ScriptedPolicy([[5, 6, 7, 8]]), tokenizer, [[7]], {"max_new_tokens": 4})
    both = concat_rollouts([a, b], tokenizer.pad_token_id)
    assert both.query_ids.shape == (2, 3) and both.response_ids.shape == (2, 4)
    zeros = torch.zeros(2, 4)
    exp = Experience(both.query_ids, both.query_mask, both.response_ids, both.response_mask,
                     zeros, zeros, zeros, zeros)
    second = exp.select(torch.tensor([1]))
    assert second.query_ids.tolist() == [[7]] and second.response_ids.shape == (1, 4)
    first = exp.select(torch.tensor([0]))
    assert first.query_ids.shape == (1, 3) and first.response_ids.tolist() == [[5, eos]]
