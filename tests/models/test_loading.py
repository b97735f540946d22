"""Loading: tokenizer padding, errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlora.config import ModelConfig, TokenizerConfig
from rlora.models import build_policy, load_tokenizer
from rlora.tiny import tiny_model


def tokenizer_without_pad() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "a": 1, "b": 2, "c": 3, "<unk>": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_missing_pad_token_gets_its_own_token_not_eos(tmp_path):
    source = tokenizer_without_pad()
    assert source.pad_token is None
    tiny_model("gpt2", source).save_pretrained(tmp_path)
    source.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(TokenizerConfig(), str(tmp_path))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    policy = build_policy(ModelConfig(model_path=str(tmp_path), peft_config={"peft_type": "LORA", "r": 2}),
                          tokenizer)
    assert policy.base_model.get_input_embeddings().num_embeddings == len(tokenizer) == 6
    assert policy.base_model.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([[1, 2, tokenizer.pad_token_id]])
    out = policy(ids, torch.tensor([[1, 1, 0]]))
    assert out.logits.shape == (1, 3, 6)


def test_missing_tokenizer_dir_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"tokenizer.tokenizer_path='/no/such/dir'.*no such directory"):
        load_tokenizer(TokenizerConfig(tokenizer_path="/no/such/dir"), None)


def test_config_object_needs_a_tokenizer_path():
    from rlora.tiny import tiny_config

    with pytest.raises(ValueError, match="set tokenizer.tokenizer_path"):
        load_tokenizer(TokenizerConfig(), tiny_config("gpt2", 40))
