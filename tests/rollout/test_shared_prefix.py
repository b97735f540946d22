"""`forward_group_responses` runs each prompt once per group and gives what `forward_responses`
gives: the same log-probs, reference log-probs, entropies and LoRA gradients; where sharing does
not apply it is `forward_responses`, bitwise."""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig

from rlora.config import ModelConfig
from rlora.models import build_policy
from rlora.models.shared_prefix import shares_prompts
from rlora.rollout.forward import forward_group_responses, forward_responses
from rlora.rollout.generation import left_pad, right_pad
from rlora.tiny import ARCHITECTURES, char_tokenizer

LORA = {"peft_type": "LORA", "r": 4, "init_lora_weights": False}  # B != 0: the adapter acts from the start
PROMPTS = [[5, 6, 7, 8, 9, 10], [8], [9, 10, 11]]  # three lengths: left padding 0, 5 and 3
TEMPERATURE = 0.7
TOL = 1e-5  # measured: at most 3e-6 in log-probs, 1e-6 relative in gradients (fp32)


def make_policy(tiny_model_dir, arch: str, mode: str = "lora", value_head: bool = False):
    kwargs = {"lora": {"peft_config": LORA}, "full": {}}[mode]
    return build_policy(ModelConfig(model_path=tiny_model_dir(arch), **kwargs), char_tokenizer(),
                        value_head=value_head).eval()


def group_batch(num_generations: int, responses: str, n_prompts: int = 3):
    """Prompts of `PROMPTS` left-padded, each repeated `num_generations` times in contiguous rows, and
    right-padded random responses: of 1 to 6 tokens ("ragged", the longest 6) or one token each."""
    queries = [p for p in PROMPTS[:n_prompts] for _ in range(num_generations)]
    b = len(queries)
    lengths = torch.randint(1, 7, (b,)).tolist() if responses == "ragged" else [1] * b
    if responses == "ragged":
        lengths[0], lengths[-1] = 6, 1
    query_ids, query_mask = left_pad(queries, 0)
    response_ids, response_mask = right_pad([torch.randint(3, 30, (n,)).tolist() for n in lengths], 0)
    return query_ids, query_mask, response_ids, response_mask


def embedding_shapes(policy) -> list[tuple[int, ...]]:
    """Records the (rows, tokens) of every input that reaches the token embeddings from now on;
    the one-time check of the model's head (`chunked_head`) runs first, before recording."""
    policy.chunked_head()
    shapes: list[tuple[int, ...]] = []
    policy.base_model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(
        tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("num_generations", [2, 4], ids=["G2", "G4"])
@pytest.mark.parametrize("responses", ["ragged", "one-token"])
@pytest.mark.parametrize("arch", ARCHITECTURES)  # absolute, rotary, ALiBi, OPT's offset positions
def test_scores_equal_forward_responses(tiny_model_dir, arch, responses, num_generations):
    policy = make_policy(tiny_model_dir, arch)
    batch = group_batch(num_generations, responses)
    mask = batch[3]
    shapes = embedding_shapes(policy)
    with torch.no_grad():
        shared = forward_group_responses(policy, *batch, num_generations, with_reference=True, temperature=TEMPERATURE,
                                         with_entropy=True)
        r = batch[2].shape[1]
        # the prompts ran once per group (policy, then reference); the last response token not at all
        assert shapes == ([(3, 6), (3 * num_generations, r - 1)] * 2 if r > 1 else [(3, 6)] * 2)
        plain = forward_responses(policy, *batch, with_reference=True, temperature=TEMPERATURE, with_entropy=True)
    assert shared.values is None and plain.values is None
    for field in ("logprobs", "ref_logprobs", "entropy"):
        a, b = getattr(shared, field), getattr(plain, field)
        assert a.shape == b.shape == mask.shape
        torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=TOL, msg=field)
    assert not torch.allclose(shared.logprobs[mask], shared.ref_logprobs[mask], atol=1e-3)  # the adapter acts


@pytest.mark.parametrize("num_generations", [2, 4], ids=["G2", "G4"])
@pytest.mark.parametrize("arch, mode", [("gpt2", "lora"), ("llama", "lora"), ("llama", "full")],
                         ids=["gpt2-lora", "llama-lora", "llama-full"])
def test_gradients_equal_forward_responses(tiny_model_dir, arch, mode, num_generations):
    policy = make_policy(tiny_model_dir, arch, mode)
    batch = group_batch(num_generations, "ragged")
    weights = torch.randn(batch[2].shape)
    grads = {}
    for name, scores in [("shared", lambda: forward_group_responses(policy, *batch, num_generations,
                                                                    with_reference=True, temperature=TEMPERATURE)),
                         ("plain", lambda: forward_responses(policy, *batch, with_reference=True,
                                                             temperature=TEMPERATURE))]:
        policy.zero_grad(set_to_none=True)
        (scores().logprobs * weights * batch[3]).sum().backward()
        grads[name] = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert grads["shared"].keys() == grads["plain"].keys()
    if mode == "lora":
        assert all("lora_" in n for n in grads["plain"]) and len(grads["plain"]) > 0
    for name, plain in grads["plain"].items():
        shared = grads["shared"][name]
        scale = plain.abs().max()
        if mode == "lora":
            assert scale > 0, name  # every LoRA matrix gets a gradient, so the comparison means something
        assert (shared - plain).abs().max() <= TOL * scale, name


def test_reference_only_pass_equals_forward_responses(tiny_model_dir):
    policy = make_policy(tiny_model_dir, "llama", value_head=True)  # the value head is not needed here
    batch = group_batch(4, "ragged")
    shapes = embedding_shapes(policy)
    shared = forward_group_responses(policy, *batch, 4, with_reference=True, with_policy=False)
    assert shapes[0] == (3, 6)
    plain = forward_responses(policy, *batch, with_reference=True, with_policy=False)
    assert shared.logprobs is shared.values is shared.entropy is None
    torch.testing.assert_close(shared.ref_logprobs[batch[3]], plain.ref_logprobs[batch[3]], rtol=0, atol=TOL)


FALLBACKS = {  # name: (policy config, group size, rows of the batch reordered so groups break)
    "value-head": ({"peft_config": LORA, "value_head": True}, 2, None),
    "prompt-tuning": ({"peft_config": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)}, 2, None),
    "prefix-tuning": ({"peft_config": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)}, 2, None),
    "hydra": ({"num_layers_unfrozen": 1}, 2, None),
    "group-size-1": ({"peft_config": LORA}, 1, None),
    "prompts-differ": ({"peft_config": LORA}, 2, [0, 2, 1, 3, 4, 5]),
    "rows-not-whole-groups": ({"peft_config": LORA}, 4, None),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_fallbacks_are_forward_responses_exactly(tiny_model_dir, name):
    config, num_generations, order = FALLBACKS[name]
    config = dict(config)
    value_head = config.pop("value_head", False)
    policy = build_policy(ModelConfig(model_path=tiny_model_dir("llama"), **config), char_tokenizer(),
                          value_head=value_head).eval()
    batch = group_batch(2, "ragged")  # 6 rows: 3 groups of 2, not whole groups of 4
    if order is not None:
        batch = tuple(x[order] for x in batch)
    shapes = embedding_shapes(policy)
    shared = forward_group_responses(policy, *batch, num_generations, with_reference=True, with_entropy=True)
    assert all(s[0] == 6 for s in shapes)  # every pass ran all rows
    plain = forward_responses(policy, *batch, with_reference=True, with_entropy=True)
    assert (plain.values is not None) == value_head
    for field in ("logprobs", "values", "ref_logprobs", "entropy"):
        a, b = getattr(shared, field), getattr(plain, field)
        assert (a is None and b is None) or torch.equal(a, b), field


@pytest.mark.parametrize("ids, mask, expected", [
    ([[0, 5, 6], [0, 5, 6]], [[0, 1, 1], [0, 1, 1]], True),
    ([[0, 5, 6], [7, 5, 6]], [[0, 1, 1], [0, 1, 1]], True),  # pad ids may differ
    ([[0, 5, 6], [0, 5, 7]], [[0, 1, 1], [0, 1, 1]], False),
    ([[5, 5, 6], [5, 5, 6]], [[0, 1, 1], [1, 1, 1]], False),
], ids=["same", "pads-differ", "tokens-differ", "masks-differ"])
def test_shares_prompts(ids, mask, expected):
    assert shares_prompts(torch.tensor(ids), torch.tensor(mask).bool(), 2) is expected


@pytest.mark.parametrize("num_generations", [0, 2.0], ids=["zero", "float"])
def test_bad_num_generations_names_the_value(tiny_model_dir, num_generations):
    policy = make_policy(tiny_model_dir, "gpt2")
    with pytest.raises(ValueError, match=f"num_generations={num_generations!r}; give the number of completions"):
        forward_group_responses(policy, *group_batch(2, "ragged"), num_generations)


@pytest.mark.parametrize("shared", [False, True], ids=["forward_responses", "forward_group_responses"])
def test_entropy_from_the_logprob_chunks_equals_token_entropy(tiny_model_dir, monkeypatch, shared):
    """With logits over `CHUNK_ELEMENTS` the entropy comes from the log-prob pass's own chunks
    (`logprobs_and_entropy`); below it, from `token_entropy`: the same values either way, and
    the log-probs and their gradients bitwise those of the pass without entropy."""
    import rlora.algo.logprobs as module

    policy = make_policy(tiny_model_dir, "llama")
    batch = group_batch(2, "ragged")
    mask = batch[3]

    def scores(with_entropy: bool):
        policy.zero_grad()
        out = forward_group_responses(policy, *batch, 2, temperature=TEMPERATURE, with_entropy=with_entropy) \
            if shared else forward_responses(policy, *batch, temperature=TEMPERATURE, with_entropy=with_entropy)
        out.logprobs[mask].sum().backward()
        return out, [p.grad.clone() for p in policy.trainable_parameters()]

    small, _ = scores(True)  # these logits are below one chunk: token_entropy
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 50)  # now the chunked Function, a row or two at a time
    fused, fused_grads = scores(True)
    plain, plain_grads = scores(False)
    assert plain.entropy is None and not fused.entropy.requires_grad
    assert torch.equal(fused.logprobs, plain.logprobs)
    assert all(torch.equal(a, b) for a, b in zip(fused_grads, plain_grads))
    torch.testing.assert_close(fused.entropy[mask], small.entropy[mask], rtol=0, atol=1e-5)
    assert (fused.entropy[mask] > 0.1).all()  # a random model's entropies are far from 0
