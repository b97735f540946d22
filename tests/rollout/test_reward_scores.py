"""reward_fn output is validated with errors that name the sample and the value; per-token scores
over the re-tokenized output (trlx's dense form) are placed on the sampled tokens by character."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from rlora.rollout.rewards import (
    RewardFunctions,
    ScoreBatch,
    _incremental_ends,
    _prefix_ends,
    character_ends,
    validate_scores,
)

LENGTHS = [3, 2, 4]


@pytest.mark.parametrize("scores", [[1, 2.5, -3], (0.0, 1.0, 2.0), np.array([1.0, 2.0, 3.0]),
                                    torch.tensor([1.0, 2.0, 3.0])], ids=["list", "tuple", "numpy", "tensor"])
def test_terminal_scores_accepted(scores):
    out = validate_scores(scores, LENGTHS)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert out.tolist() == [float(x) for x in list(scores)]


@pytest.mark.parametrize("scores", [[True, False, 2], np.array([True, False, True]), [np.bool_(True), 0, 1.5]],
                         ids=["list", "numpy", "numpy-scalars"])
def test_bool_scores_count_one_and_zero_as_in_trl(scores):
    assert validate_scores(scores, LENGTHS).tolist() == [1.0, 0.0, float(scores[2])]


def test_dense_scores_padded_to_the_longest_response():
    out = validate_scores([[1, 2, 3], [4], []], LENGTHS)
    assert out.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "scores, match",
    [
        ([1.0, 2.0], r"returned 2 scores for 3 samples; return one score per sample"),
        ([1.0, math.nan, 2.0], r"returned nan for sample 1; every score must be a finite number"),
        ([1.0, 2.0, math.inf], r"returned inf for sample 2"),
        ([1.0, "good", 2.0], r"returned 'good' for sample 1"),
        ([1.0, None, 2.0], r"returned None for sample 1"),
        ([1.0, np.array([1.0, 2.0]), 2.0], r"returned array\(\[1., 2.\]\) for sample 1"),
        ([[1.0, 2.0, 3.0, 4.0], [1.0], [1.0]], r"4 per-token scores for sample 0, whose response has 3 tokens"),
        ([[1.0], 2.0, [1.0]], r"but 2.0 for sample 1"),
        ([[1.0], [float("nan")], [1.0]], r"nan at token 0 of sample 1"),
    ],
    ids=["count", "nan", "inf", "string", "none", "array", "dense-too-long", "mixed", "dense-nan"],
)
def test_bad_scores_name_the_sample_and_value(scores, match):
    with pytest.raises(ValueError, match=match):
        validate_scores(scores, LENGTHS)


def test_non_list_is_a_type_error():
    with pytest.raises(TypeError, match="returned float; return a list"):
        validate_scores(1.0, LENGTHS)


# trlx's dense contract (examples/ppo_dense_sentiments.py): one score per token of
# tokenizer(output), the output re-tokenized, which need not be the tokens that were sampled.
@pytest.fixture(scope="module")
def bpe(gpt2_bpe_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_bpe_dir)


def sampled(bpe, pieces: list[str], eos: bool = False) -> list[int]:
    """Token ids as a policy may sample them: each piece encoded on its own (a non-canonical split)."""
    ids = [i for piece in pieces for i in bpe.encode(piece, add_special_tokens=False)]
    return ids + [bpe.eos_token_id] * eos


def bpe_batch(bpe, completions: list[list[int]]) -> ScoreBatch:
    outputs = [bpe.decode(ids, skip_special_tokens=True) for ids in completions]  # as generation decodes
    return ScoreBatch(["p"] * len(outputs), ["p"] * len(outputs), outputs, completions, [{}] * len(outputs))


def scores_per_retokenized_token(scores: list[float]):
    def dense(samples, prompts, outputs, tokenizer, **kwargs):
        return [scores[:len(tokenizer(o).input_ids)] for o in outputs]

    return dense


def test_more_scores_than_sampled_tokens_are_placed_by_character(bpe):
    ids = sampled(bpe, [" Yes", "\n\n", "No"])  # "\n\n" is one sampled token, two when re-tokenized
    b = bpe_batch(bpe, [ids])
    assert len(ids) == 3 and bpe.convert_ids_to_tokens(bpe(b.outputs[0]).input_ids) == ["ĠYes", "Ċ", "Ċ", "No"]
    total, values = RewardFunctions(scores_per_retokenized_token([10.0, 20.0, 30.0, 40.0]))(b, bpe)
    # " Yes" ends at character 4 (sampled token 0); both "\n" within "\n\n" (token 1); "No" at 8 (token 2)
    assert total.tolist() == [[10.0, 50.0, 40.0]] and values["dense"].tolist() == [100.0]


def test_fewer_scores_than_sampled_tokens_land_on_the_token_completing_each(bpe):
    ids = sampled(bpe, [" hel", "lo", " wor", "ld", " caf"], eos=True)
    ids[-1:-1] = bpe.convert_tokens_to_ids(["Ã", "©"])  # the two bytes of "é" as two tokens
    b = bpe_batch(bpe, [ids])
    assert b.outputs == [" hello world café"] and len(ids) == 8 and len(bpe(b.outputs[0]).input_ids) == 3
    total, _ = RewardFunctions(scores_per_retokenized_token([1.0, 2.0, 4.0]))(b, bpe)
    # " hello" ends with "lo" (token 1), " world" with "ld" (3), " café" with the second byte of "é" (6)
    assert total.tolist() == [[0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 4.0, 0.0]]


def test_trlx_dense_example_places_its_two_scores(bpe):
    def dense_reward_fn(samples, prompts, outputs, tokenizer, **kwargs):  # trlx's example, sentiment fixed
        tok_scores = []
        for response in outputs:
            toks = tokenizer(response).input_ids
            tok_score = [0] * len(toks)
            tok_score[len(tok_score) // 2] = 0.25
            tok_score[-1] = 0.5
            tok_scores.append(tok_score)
        return tok_scores

    b = bpe_batch(bpe, [sampled(bpe, [" Yes", "\n\n", "No"]),  # 3 sampled tokens, 4 re-tokenized
                        sampled(bpe, [" hel", "lo", " wor", "ld", " good"], eos=True),  # 6 sampled, 3 re-tokenized
                        sampled(bpe, [" good"])])  # 1 and 1: one token, both scores on it (the last wins)
    total, _ = RewardFunctions(dense_reward_fn)(b, bpe)
    assert total.tolist() == [[0.0, 0.25, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.25, 0.5, 0.0],
                              [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]]


def test_scores_of_the_sampled_tokens_stay_aligned_from_the_first(bpe):
    b = bpe_batch(bpe, [sampled(bpe, [" Yes", "\n\n", "No"])])  # 3 sampled tokens, 4 re-tokenized

    def per_sampled(completion_ids, **kwargs):
        return [[float(k) for k in range(len(ids))] for ids in completion_ids]

    assert RewardFunctions(per_sampled)(b, bpe)[0].tolist() == [[0.0, 1.0, 2.0]]


def test_a_count_matching_neither_form_names_both(bpe):
    b = bpe_batch(bpe, [sampled(bpe, [" hel", "lo", " world"], eos=True)])  # 4 sampled, 2 re-tokenized

    with pytest.raises(ValueError, match=r"reward_fn returned 3 per-token scores for sample 0, whose response has "
                                         r"4 sampled tokens and whose output re-tokenizes to 2; return one score per "
                                         r"sampled token \(completion_ids\) or one per token of "
                                         r"tokenizer\(output\).input_ids \(trlx's form\)"):
        RewardFunctions(lambda samples, outputs, **kw: [[1.0, 2.0, 3.0]])(b, bpe)


class SlowView:
    """`bpe` seen as a tokenizer without offsets (a slow one): placement falls back to decoding."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("view", ["offsets", "decoded-prefixes"])
def test_special_tokens_the_tokenizer_adds_go_to_the_first_and_last_tokens(view):
    from tokenizers import processors

    from rlora.tiny import char_tokenizer

    tok = char_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(  # adds BOS ... EOS, as some tokenizers do
        single="<bos> $A <eos>", special_tokens=[("<bos>", tok.bos_token_id), ("<eos>", tok.eos_token_id)])
    tok = tok if view == "offsets" else SlowView(tok)
    b = ScoreBatch(["p", "p"], ["p", "p"], ["abc", "abc"], [tok.encode("abc", add_special_tokens=False) + [2],
                                                            tok.encode("abc", add_special_tokens=False)], [{}, {}])
    assert tok("abc").input_ids[0] == tok.bos_token_id and len(tok("abc").input_ids) == 5
    total, _ = RewardFunctions(lambda samples, **kw: [[10.0, 1.0, 2.0, 3.0, 20.0]] * 2)(b, tok)
    # BOS to the first token; the added EOS where a terminal score goes: the sampled EOS, else the last token
    assert total.tolist() == [[11.0, 2.0, 3.0, 20.0], [11.0, 2.0, 23.0, 0.0]]


@pytest.mark.parametrize("view", ["offsets", "decoded-prefixes"])
def test_placement_without_offsets_matches_placement_with_them(bpe, view):
    ids = sampled(bpe, [" hel", "lo", "\n\n", "wor", "ld", " caf"], eos=True)
    ids[-1:-1] = bpe.convert_tokens_to_ids(["Ã", "©"])
    tok = bpe if view == "offsets" else SlowView(bpe)
    b = bpe_batch(bpe, [ids])
    assert bpe.convert_ids_to_tokens(ids) == ["Ġhel", "lo", "ĊĊ", "w", "or", "ld", "Ġcaf", "Ã", "©", "<|endoftext|>"]
    assert bpe.convert_ids_to_tokens(bpe(b.outputs[0]).input_ids) == ["Ġhello", "Ċ", "Ċ", "world", "ĠcafÃ©"]
    total, _ = RewardFunctions(scores_per_retokenized_token([1.0, 2.0, 4.0, 8.0, 16.0]))(b, tok)
    assert total.tolist() == [[0.0, 1.0, 6.0, 0.0, 0.0, 8.0, 0.0, 0.0, 16.0, 0.0]]


@pytest.mark.parametrize("seed", [0, 1])
def test_incremental_character_ends_agree_with_decoded_prefixes(bpe, seed):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_token = bytes_to_unicode()  # GPT-2's token for each single byte
    rng = random.Random(seed)
    for _ in range(200):  # texts of 1-, 2-, 3- and 4-byte characters, each sampled whole or byte by byte
        ids = []
        for ch in rng.choices("ab é€😀\n,中", k=rng.randrange(1, 12)):
            whole = rng.random() < 0.5
            ids += bpe.encode(ch) if whole else bpe.convert_tokens_to_ids([byte_token[b] for b in ch.encode()])
        text = bpe.decode(ids)
        assert _incremental_ends(ids, text, bpe) == _prefix_ends(ids, text, bpe) == character_ends(ids, text, bpe)


def test_an_undecodable_byte_counts_where_it_is_sampled(bpe):
    ids = bpe.convert_tokens_to_ids(["a", "©", "b"])  # "©" alone is a continuation byte: "\ufffd" in the text
    text = bpe.decode(ids)
    assert text == "a\ufffdb" and character_ends(ids, text, bpe) == [1, 2, 3]
