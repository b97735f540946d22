"""Prompts, SFT texts and reward-model texts open with the tokenizer's own special tokens (a BOS
for Llama / Mistral tokenizers, none for GPT-2), unless `tokenizer.add_special_tokens` is off."""

from __future__ import annotations

import pytest
from tokenizers import processors

from rlora.config import load_config
from rlora.models import build_policy, load_tokenizer
from rlora.reward_model import encode_scored, rollout_rows
from rlora.rollout.prompts import encode, normalize_prompts
from rlora.sft import encode_texts
from rlora.tiny import BOS, EOS, char_tokenizer, tiny_model, tiny_ppo_config
from rlora.trainer import PPOTrainer


def bos_tokenizer(append_eos: bool = False):
    """A character tokenizer whose encoding opens with BOS, as Llama's (and ends in EOS with `append_eos`)."""
    tok = char_tokenizer()
    template = f"{BOS} $A" + (f" {EOS}" if append_eos else "")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(BOS, tok.bos_token_id), (EOS, tok.eos_token_id)])
    return tok


def test_encode_follows_the_tokenizer_and_never_ends_in_an_appended_eos():
    tok = bos_tokenizer()
    plain = tok("ab", add_special_tokens=False).input_ids
    assert encode(tok, ["ab"]) == [[tok.bos_token_id] + plain]
    assert encode(tok, ["ab"], add_special_tokens=False) == [plain]
    assert encode(bos_tokenizer(append_eos=True), ["ab"]) == [[tok.bos_token_id] + plain]
    assert encode(char_tokenizer(), ["ab"]) == [plain]  # a tokenizer that adds nothing


@pytest.mark.parametrize("add", [True, False], ids=["tokenizer-default", "switched-off"])
def test_rollout_prompts_open_with_bos(tmp_path, add):
    tok = bos_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model("llama", tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = load_config(tiny_ppo_config(str(model_dir), str(tmp_path / "run"),
                                         tokenizer={"add_special_tokens": add}))
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    prompts = normalize_prompts(["hello", "ab"])
    trainer = PPOTrainer(config, build_policy(config.model, tokenizer), tokenizer, lambda samples, **_: [0.0] *
                         len(samples), prompts, prompts, verbose=False)
    assert [ids[0] == tok.bos_token_id for ids in trainer.prompt_ids] == [add, add]
    rollouts = trainer.sampler.generate([0, 1], config.method.gen_kwargs, trainer.prompt_ids, trainer.prompts)
    assert rollouts.prompts == ["hello", "ab"]  # the text as given; the BOS is in the ids only
    assert (rollouts.query_ids[rollouts.query_mask.cumsum(1) == 1] == tok.bos_token_id).tolist() == [add, add]


def test_sft_and_reward_texts_open_with_bos_and_match_rollouts():
    tok = bos_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    plain = tok("abc", add_special_tokens=False).input_ids
    ids, _, _ = encode_texts(tok, ["abc"])
    assert ids[0].tolist() == [bos] + plain + [eos]
    scored, mask = encode_scored(tok, ["ab"], ["c"], max_length=16)
    assert scored[0].tolist() == [bos] + plain + [eos]
    import torch

    query = torch.tensor([encode(tok, ["ab"])[0]])
    response = torch.tensor([tok("c", add_special_tokens=False).input_ids + [eos]])
    rows, row_mask = rollout_rows(query, query != tok.pad_token_id, response, torch.ones_like(response).bool(), eos,
                                  tok.pad_token_id)
    assert torch.equal(rows, scored) and torch.equal(row_mask, mask)
