"""The language-model head run a chunk of positions at a time (`rlora.models.lm_head`): the same
log-probs, entropies and gradients as the model's own logits, no (b, t, v) tensor kept for
backward, and the model's own head where it is not plain."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config

from rlora.config import ModelConfig
from rlora.models import build_policy, lm_head
from rlora.models.lm_head import head_is_plain, label_logprobs
from rlora.rollout.forward import forward_group_responses, forward_responses
from rlora.rollout.generation import left_pad, right_pad
from rlora.tiny import ARCHITECTURES, char_tokenizer

TEMPERATURE = 0.7
TOL = 1e-5
# LoRA on the head too, so the chunks' recomputation must give the head's adapter its gradient
LORA = {"peft_type": "LORA", "r": 4, "init_lora_weights": False, "target_modules": "all-linear"}
LORA_HEAD = {**LORA, "target_modules": ["c_attn", "c_fc", "lm_head"]}


def make_policy(tiny_model_dir, arch: str = "gpt2", mode: str = "lora", peft_config=None):
    kwargs = {"lora": {"peft_config": peft_config or LORA}, "full": {}}[mode]
    return build_policy(ModelConfig(model_path=tiny_model_dir(arch), **kwargs), char_tokenizer(),
                        value_head=False).eval()


def batch(num_generations: int = 2):
    torch.manual_seed(0)
    queries = [p for p in [[5, 6, 7, 8, 9, 10], [8], [9, 10, 11]] for _ in range(num_generations)]
    lengths = torch.randint(1, 12, (len(queries),)).tolist()
    lengths[0] = 12
    query_ids, query_mask = left_pad(queries, 0)
    response_ids, response_mask = right_pad([torch.randint(3, 30, (n,)).tolist() for n in lengths], 0)
    return query_ids, query_mask, response_ids, response_mask


def scores_and_grads(policy, forward, data, weights):
    policy.zero_grad(set_to_none=True)
    out = forward(policy, data)
    (out.logprobs * weights * data[3]).sum().backward()
    return out, {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def whole_head(policy):
    """The policy made to use the model's own logits, as for a head that is not plain."""
    policy._plain_head = False
    return policy


PASSES = {
    "plain": lambda policy, data: forward_responses(policy, *data, with_reference=True, temperature=TEMPERATURE,
                                                    with_entropy=True),
    "shared": lambda policy, data: forward_group_responses(policy, *data, 2, with_reference=True,
                                                           temperature=TEMPERATURE, with_entropy=True),
}


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("arch, mode, peft", [("gpt2", "lora", LORA), ("gpt2", "lora", LORA_HEAD),
                                              ("llama", "lora", LORA), ("llama", "full", None)],
                         ids=["gpt2-lora", "gpt2-lora-on-head", "llama-lora", "llama-full"])
def test_chunks_equal_the_whole_head(tiny_model_dir, monkeypatch, arch, mode, peft, pass_):
    data = batch()
    weights = torch.randn(data[2].shape)
    policy = make_policy(tiny_model_dir, arch, mode, peft)
    vocab = policy.base_model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(lm_head, "HEAD_CHUNK_ELEMENTS", 5 * vocab)  # 5 positions a chunk: many chunks, a ragged last
    assert policy.chunked_head()
    chunked, chunked_grads = scores_and_grads(policy, PASSES[pass_], data, weights)
    whole, whole_grads = scores_and_grads(whole_head(policy), PASSES[pass_], data, weights)
    mask = data[3]
    for field in ("logprobs", "ref_logprobs", "entropy"):
        torch.testing.assert_close(getattr(chunked, field)[mask], getattr(whole, field)[mask], rtol=0, atol=TOL,
                                   msg=field)
    if mode == "lora":  # the adapter acts (a full fine-tune starts as its reference)
        assert not torch.allclose(chunked.logprobs[mask], chunked.ref_logprobs[mask], atol=1e-3)
    assert chunked_grads.keys() == whole_grads.keys() and whole_grads
    if peft is LORA_HEAD:
        assert any("lm_head.lora_" in n for n in whole_grads)
    for name, g in whole_grads.items():
        scale = g.abs().max()
        assert scale > 0, name
        assert (chunked_grads[name] - g).abs().max() <= TOL * scale, name


@pytest.mark.parametrize("pass_", PASSES)
def test_no_tensor_of_every_positions_logits_is_kept_for_backward(tiny_model_dir, monkeypatch, pass_):
    data = batch()
    policy = make_policy(tiny_model_dir)
    vocab = policy.base_model.get_output_embeddings().weight.shape[0]
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    monkeypatch.setattr(lm_head, "HEAD_CHUNK_ELEMENTS", 5 * vocab)
    rows = {}  # the most positions' logits any tensor kept for backward holds
    for name in ("chunked", "whole"):
        p = policy if name == "chunked" else whole_head(policy)
        kept = []

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:
                kept.append(t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            PASSES[pass_](p, data).logprobs.sum().backward()
        rows[name] = max(kept, default=0)
    assert rows["whole"] >= data[2].numel() // 2  # the whole head keeps the logits of the responses
    # checkpointed chunks keep none (backward makes them again); the shared prefix's prompt pass keeps its
    # logits at the 3 prompts' last positions (lengths 1 to 6: positions 0..5), which predict the first tokens
    assert rows["chunked"] <= {"plain": 0, "shared": 3 * 6}[pass_]


def test_a_head_within_one_chunk_runs_once_without_recomputation(tiny_model_dir):
    policy = make_policy(tiny_model_dir)
    head = policy.base_model.get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda m, args, out: calls.append(tuple(out.shape)))
    hidden = torch.randn(3, 4, head.weight.shape[1], requires_grad=True)
    labels = torch.randint(0, head.weight.shape[0], (3, 4))
    label_logprobs(head, hidden, labels)[0].sum().backward()
    assert calls == [(3, 4, head.weight.shape[0])] and hidden.grad is not None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_tiny_architectures_have_a_plain_head(tiny_model_dir, arch):
    assert make_policy(tiny_model_dir, arch).chunked_head()


def _softcapped():
    return AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2))


def _scaled():
    return AutoModelForCausalLM.from_config(CohereConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        logit_scale=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2))


@pytest.mark.parametrize("make", [_softcapped, _scaled], ids=["gemma2-softcap", "cohere-logit-scale"])
def test_a_head_with_more_after_it_is_run_by_the_model(tmp_path, make):
    torch.manual_seed(0)
    model = make().eval()
    assert not head_is_plain(model)  # Gemma 2's soft-cap at 30 changes small random logits only slightly
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    policy = build_policy(ModelConfig(model_path=str(tmp_path), peft_config=LORA), char_tokenizer(),
                          value_head=False).eval()
    assert not policy.chunked_head()
    data = batch()
    out = forward_responses(policy, *data, temperature=TEMPERATURE)
    query_ids, query_mask, response_ids, response_mask = data
    for i in range(2):  # the first row's log-probs from the model's own logits, unpadded
        q = query_ids[i][query_mask[i].bool()]
        r = response_ids[i][response_mask[i].bool()]
        with torch.no_grad():
            logits = policy.lm(input_ids=torch.cat([q, r])[None]).logits[0, len(q) - 1:-1] / TEMPERATURE
        expected = logits.log_softmax(-1).gather(-1, r[:, None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs[i][response_mask[i].bool()], expected, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="head=False"):
        policy(data[0], data[1], head=False)


def test_the_check_runs_in_eval_mode_and_leaves_modes_and_random_stream_as_they_were(tiny_model_dir):
    """A training-mode model with LoRA dropout (and an adapter that acts) is plain: the check runs
    without dropout, restores every module's mode and draws nothing from the random stream."""
    policy = make_policy(tiny_model_dir, peft_config={**LORA, "lora_dropout": 0.5}).train()
    policy.lm.base_model.model.transformer.h[0].eval()  # a mixed state, restored as it was
    modes = [m.training for m in policy.modules()]
    state = torch.get_rng_state()
    assert policy.chunked_head()
    assert [m.training for m in policy.modules()] == modes
    assert torch.equal(torch.get_rng_state(), state)
