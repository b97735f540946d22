"""Generation cuts responses at their stop ids and stop strings, applies stop sequences at token
boundaries, keeps prompts as given, and pads on the right."""

from __future__ import annotations

import torch

from rlora.rollout.generation import cut_at_eos, generate_rollouts, stop_token_ids
from rlora.rollout.store import Experience, concat_rollouts


class ScriptedPolicy(torch.nn.Module):
    """Stands in for a policy: `generate` appends fixed continuations to the prompts."""

    def __init__(self, continuations: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        assert generation_config.max_new_tokens >= max(len(c) for c in self.continuations)
        width = max(len(c) for c in self.continuations)  # rows that stopped early are padded, as HF does
        pad = generation_config.pad_token_id
        tail = torch.tensor([c + [pad] * (width - len(c)) for c in self.continuations])
        return torch.cat([input_ids, tail], dim=1)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def rollouts_for(tokenizer, continuations, prompts, gen_kwargs, **kwargs):
    return generate_rollouts(ScriptedPolicy(continuations), tokenizer, prompts, [ids(tokenizer, p) for p in prompts],
                             gen_kwargs, **kwargs)


def test_response_ends_at_first_eos_and_padding_is_masked(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    conts = [ids(tokenizer, "ab") + [eos, pad, pad], ids(tokenizer, "abcde"), ids(tokenizer, "a") + [eos] + ids(tokenizer, "bc")]
    out = rollouts_for(tokenizer, conts, ["hi", "x", "yo"], {"max_new_tokens": 5})
    assert out.response_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] * 2 + [False] * 3]
    assert out.response_ids[0, 2] == eos and out.response_ids[2, 1] == eos  # EOS is a real token
    assert (out.response_ids[~out.response_mask] == pad).all()
    assert out.outputs == ["ab", "abcde", "a"]
    assert out.prompts == ["hi", "x", "yo"]
    assert out.query_mask.tolist() == [[True, True], [False, True], [True, True]]


def test_stop_sequence_cuts_output_and_appends_eos(tokenizer):
    eos = tokenizer.eos_token_id
    conts = [ids(tokenizer, "ab. cd"), ids(tokenizer, "abcdef")]
    out = rollouts_for(tokenizer, conts, ["q", "r"], {"max_new_tokens": 6}, stop_sequences=["."])
    assert out.outputs == ["ab", "abcdef"]
    assert out.response_ids[0, :3].tolist() == ids(tokenizer, "ab") + [eos]
    assert out.response_mask.sum(1).tolist() == [3, 6]  # the uncut row ran to max_new_tokens
    assert out.samples == ["qab", "rabcdef"]


def test_helpers(tokenizer):
    assert cut_at_eos([5, 2, 7], 2) == [5, 2]
    assert cut_at_eos([5, 7], 2) == [5, 7]
    assert cut_at_eos([5, 9, 2, 7], [2, 9]) == [5, 9]
    assert stop_token_ids({}, tokenizer) == [tokenizer.eos_token_id]
    assert stop_token_ids({"eos_token_id": [7, 2, 7]}, tokenizer) == [7, 2]
    assert stop_token_ids({"eos_token_id": 9}, tokenizer) == [9]

    class Model:  # a checkpoint's generation_config with Llama-3 style end-of-turn ids
        eos_token_id = [tokenizer.eos_token_id, 11]
    assert stop_token_ids({}, tokenizer, Model()) == [tokenizer.eos_token_id, 11]


def test_several_stop_ids_cut_at_the_first_of_any(tokenizer):
    pad = tokenizer.pad_token_id
    a, b = ids(tokenizer, "a")[0], ids(tokenizer, "b")[0]
    conts = [ids(tokenizer, "xy") + [b, pad, pad], ids(tokenizer, "x") + [a] + ids(tokenizer, "zz"),
             ids(tokenizer, "xyzzy")]
    out = rollouts_for(tokenizer, conts, ["p", "q", "r"], {"max_new_tokens": 5, "eos_token_id": [a, b]})
    assert out.response_mask.sum(1).tolist() == [3, 2, 5]
    assert out.response_ids[0, 2] == b and out.response_ids[1, 1] == a  # the stop token is real
    assert (out.response_ids[~out.response_mask] == pad).all()


def test_stop_strings_keep_the_string_and_nothing_after(tokenizer):
    pad = tokenizer.pad_token_id
    conts = [ids(tokenizer, "ab!cd") + [pad], ids(tokenizer, "abcdef")]  # transformers pads after "!"
    out = rollouts_for(tokenizer, conts, ["p", "q"], {"max_new_tokens": 6, "stop_strings": ["!"]})
    assert out.outputs == ["ab!", "abcdef"]
    assert out.response_mask.sum(1).tolist() == [3, 6]


def test_prompts_reach_the_rollouts_exactly_as_given(tokenizer):
    prompts = ["<|bos|>system: be brief", "ab"]  # a special token that decoding would drop
    out = rollouts_for(tokenizer, [[5, 6], [7]], prompts, {"max_new_tokens": 2})
    assert out.prompts == prompts
    assert out.samples[0].startswith("<|bos|>system: be brief")


def test_stop_sequence_cut_keeps_the_sampled_tokens_of_a_real_bpe(gpt2_bpe_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_bpe_dir)
    tok.pad_token = tok.eos_token
    # "Hi world." sampled as four pieces (re-encoding it gives three), then "\n"
    pieces = [tok.convert_tokens_to_ids(t) for t in ["Hi", "Ġwor", "ld", ".", "Ċ", "By"]]
    assert tok.eos_token_id not in pieces and tok("Hi world.").input_ids != pieces[:4]
    g = torch.Generator().manual_seed(0)
    random_rows = [torch.randint(0, 50000, (12,), generator=g).tolist() for _ in range(32)]
    conts = [pieces] + random_rows
    width = max(len(c) for c in conts)
    out = rollouts_for(tok, conts, ["Q:"] * len(conts), {"max_new_tokens": width}, stop_sequences=["\n", "e"])
    assert out.outputs[0] == "Hi world."
    assert out.response_ids[0, :5].tolist() == pieces[:4] + [tok.eos_token_id]
    cut = 0
    for i, sampled in enumerate(conts):
        n = int(out.response_mask[i].sum())
        scored = out.response_ids[i, :n].tolist()
        full = tok.decode(sampled)
        if "\n" in full or "e" in full:
            cut += 1
            assert scored[:-1] == sampled[:n - 1] and scored[-1] == tok.eos_token_id  # a prefix of what was sampled
            assert out.outputs[i] == tok.decode(scored[:-1]) and "e" not in out.outputs[i]
            assert full.startswith(out.outputs[i])
        else:
            assert scored == sampled
    assert cut >= 16


def test_concat_and_select_drop_all_padding_columns(tokenizer):
    eos = tokenizer.eos_token_id
    a = generate_rollouts(ScriptedPolicy([[5, eos]]), tokenizer, ["p"], [[7, 8, 9]], {"max_new_tokens": 4})
    b = generate_rollouts(ScriptedPolicy([[5, 6, 7, 8]]), tokenizer, ["q"], [[7]], {"max_new_tokens": 4})
    both = concat_rollouts([a, b], tokenizer.pad_token_id)
    assert both.query_ids.shape == (2, 3) and both.response_ids.shape == (2, 4)
    zeros = torch.zeros(2, 4)
    exp = Experience(both.query_ids, both.query_mask, both.response_ids, both.response_mask,
                     zeros, zeros, zeros, zeros, zeros, both.response_mask)
    second = exp.select(torch.tensor([1]))
    assert second.query_ids.tolist() == [[7]] and second.response_ids.shape == (1, 4)
    first = exp.select(torch.tensor([0]))
    assert first.query_ids.shape == (1, 3) and first.response_ids.tolist() == [[5, eos]]


def test_pad_equal_to_eos_keeps_a_generated_eos_real(gpt2_bpe_dir):
    """GPT-2's tokenizer pads with EOS: the first EOS is a real, rewarded response token; the
    EOS ids after it (transformers' padding of a finished row) are padding."""
    from transformers import AutoTokenizer

    from rlora.algo import token_rewards

    tok = AutoTokenizer.from_pretrained(gpt2_bpe_dir)
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    conts = [ids(tok, " Hello") + [eos, eos, eos], ids(tok, " a b c d")]
    out = rollouts_for(tok, conts, ["Q:", "R:"], {"max_new_tokens": 5})
    assert tok("Q:").input_ids == ids(tok, "Q:")  # GPT-2 adds no BOS
    n = len(ids(tok, " Hello"))
    assert out.response_mask.sum(1).tolist() == [n + 1, 4]
    assert out.response_ids[0, n] == eos and out.outputs == [" Hello", " a b c d"]
    zeros = torch.zeros(out.response_ids.shape)
    rewards, _ = token_rewards(zeros, zeros, out.response_mask, 0.1, torch.tensor([1.0, 2.0]))
    assert rewards[0, n] == 1.0 and rewards[0].sum() == 1.0  # the score lands on the generated EOS


def test_unpadded_prompts_sample_without_the_padding_warning_and_padding_changes_nothing(tiny_model_dir, tokenizer):
    """transformers' `generate` drops an all-ones attention mask and then feeds rows that finished
    their pad id, which its padding check takes for unmasked padding. No pass of rlora's runs padded
    ids without a mask, so sampling says nothing; greedy outputs are those of each prompt alone."""
    import logging

    from rlora.config import ModelConfig
    from rlora.models import build_policy

    policy = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), peft_config={"peft_type": "LORA", "r": 4}),
                          tokenizer).eval()
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        prompts = ["ab", "cd", "ef"]
        greedy = {"max_new_tokens": 6, "do_sample": False}
        free = generate_rollouts(policy, tokenizer, prompts, [ids(tokenizer, p) for p in prompts], greedy)
        stop = int(free.response_ids[0, 0])  # the first row ends at once; the others go on (checked below)
        out = generate_rollouts(policy, tokenizer, prompts, [ids(tokenizer, p) for p in prompts],
                                {**greedy, "eos_token_id": stop})
    finally:
        logger.removeHandler(handler)
    lengths = out.response_mask.sum(1)
    assert lengths[0] == 1 and lengths.max() >= 3  # pad ids followed the first row's stop for 2+ steps
    assert not [r for r in records if "attention_mask" in r.getMessage()]
    greedy = {"max_new_tokens": 6, "do_sample": False}
    alone = generate_rollouts(policy, tokenizer, ["ab"], [ids(tokenizer, "ab")], greedy)
    padded = generate_rollouts(policy, tokenizer, ["ab", "a longer prompt"],
                               [ids(tokenizer, "ab"), ids(tokenizer, "a longer prompt")], greedy)
    assert padded.outputs[0] == alone.outputs[0]
    assert torch.equal(padded.response_ids[0][padded.response_mask[0]], alone.response_ids[0][alone.response_mask[0]])
