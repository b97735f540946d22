"""Group generation shares each prompt's prefill: the prompt runs once and its KV cache serves the
`num_generations` rows of its group. The tokens are what repeating the prompt would give (greedy,
token for token), the scored distribution is the sampled one, and the rows of a group are
contiguous with their prompts repeated beside them.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig

from rlora.config import ModelConfig
from rlora.models import build_policy
from rlora.models.shared_prefix import can_share_prefix
from rlora.rollout.forward import forward_responses
from rlora.rollout.generation import generate_rollouts, sampling_temperature

PROMPTS = ["hello there", "ab", "the cat sat", "x"]  # unequal lengths: the batch is left-padded
LORA = {"peft_config": {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": "all-linear",
                        "init_lora_weights": False}}  # an adapter that changes the logits
POLICIES = {"lora": LORA, "hydra": {"num_layers_unfrozen": 1}, "full": {"num_layers_unfrozen": -1},
            "prompt_tuning": {"peft_config": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)},
            "prefix_tuning": {"peft_config": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}}


def make_policy(model_dir: str, tokenizer, kind: str = "lora"):
    torch.manual_seed(0)  # the adapter's random init, whichever test made the model directory first
    return build_policy(ModelConfig(model_path=model_dir, **POLICIES[kind]), tokenizer, value_head=False).eval()


def encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]


@contextmanager
def trunk_batches(policy):
    """Record `(rows, tokens)` of every pass through the policy's trunk (prefill and decode steps)."""
    trunk = policy.base_model.base_model
    original = trunk.forward
    shapes: list[tuple[int, int]] = []

    def forward(*args, **kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        ids = ids if ids is not None else kwargs["inputs_embeds"]
        shapes.append(tuple(ids.shape[:2]))
        return original(*args, **kwargs)

    trunk.forward = forward
    try:
        yield shapes
    finally:
        del trunk.forward


def rollouts(policy, tokenizer, gen_kwargs, share_prompt=True, num_generations=3, prompts=PROMPTS, **kwargs):
    return generate_rollouts(policy, tokenizer, prompts, encode(tokenizer, prompts), gen_kwargs,
                             num_generations=num_generations, share_prompt=share_prompt, **kwargs)


@pytest.mark.parametrize("kind, merged, bf16", [("lora", False, False), ("lora", True, False), ("lora", False, True),
                                               ("hydra", False, False), ("full", False, False)],
                         ids=["lora", "lora_merged", "lora_bf16_autocast", "hydra", "full"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_shared_equals_repeated_token_for_token(tiny_model_dir, tokenizer, arch, kind, merged, bf16):
    policy = make_policy(tiny_model_dir(arch), tokenizer, kind)
    greedy = {"do_sample": False, "max_new_tokens": 8}
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()  # as the trainer's bf16 runs
    with precision, trunk_batches(policy) as shapes:
        shared = rollouts(policy, tokenizer, greedy, merged=merged)
    p = max(len(ids) for ids in encode(tokenizer, PROMPTS))
    assert shapes[0] == (len(PROMPTS), p - 1), "each prompt but its last token runs once"
    assert all(s == (3 * len(PROMPTS), 1) for s in shapes[1:]), "then one token at a time for every row"
    with precision:
        repeated = rollouts(policy, tokenizer, greedy, share_prompt=False, merged=merged)
    assert torch.equal(shared.response_ids, repeated.response_ids)
    assert torch.equal(shared.response_mask, repeated.response_mask)
    assert torch.equal(shared.query_ids, repeated.query_ids) and torch.equal(shared.query_mask, repeated.query_mask)
    assert shared.outputs == repeated.outputs and torch.equal(shared.truncated, repeated.truncated)
    assert len(set(shared.outputs)) > 1, "prompts that all give one output would not test the cache's rows"


@pytest.mark.parametrize("setting", ["plain", "temperature"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scored_distribution_is_the_shared_path_sampled_one(tiny_model_dir, tokenizer, arch, setting,
                                                             recorded_sampling):
    policy = make_policy(tiny_model_dir(arch), tokenizer)
    gen = {"do_sample": True, "top_k": 0, "top_p": 1.0, "max_new_tokens": 6,
           "temperature": 0.7 if setting == "temperature" else 1.0}
    with recorded_sampling(policy) as record, trunk_batches(policy) as shapes:
        out = rollouts(policy, tokenizer, gen, num_generations=4)
        scored = forward_responses(policy, out.query_ids, out.query_mask, out.response_ids, out.response_mask,
                                   temperature=sampling_temperature(gen)).logprobs
    assert shapes[0][0] == len(PROMPTS), "the shared path ran"
    (scores,) = record
    r = out.response_ids.shape[1]
    sampled = scores[:, :r].gather(-1, out.response_ids[..., None]).squeeze(-1)  # (b * G, r)
    mask = out.response_mask
    assert mask.any(1).all()
    torch.testing.assert_close(scored[mask], sampled[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_samples_are_a_valid_draw(tiny_model_dir, tokenizer, arch):
    policy = make_policy(tiny_model_dir(arch), tokenizer)
    stops, max_new, g = {2, 3, 4}, 6, 4  # EOS and the first two letters: some rows stop early
    gen = {"do_sample": True, "top_k": 0, "top_p": 1.0, "max_new_tokens": max_new, "eos_token_id": sorted(stops)}
    out = rollouts(policy, tokenizer, gen, num_generations=g, prompts=PROMPTS * 2)
    lengths = out.response_mask.sum(1).tolist()
    for i, (ids, n) in enumerate(zip(out.response_ids.tolist(), lengths)):
        assert not stops & set(ids[:n - 1]), f"row {i}: a stop id inside the response"
        ended = ids[n - 1] in stops
        assert bool(out.truncated[i]) == (not ended), f"row {i}: truncated says {bool(out.truncated[i])}"
        assert ended or n == max_new, f"row {i} ended after {n} tokens without a stop id"
    assert out.truncated.any() and not out.truncated.all(), "the draw should hold both kinds of rows"
    groups = out.response_ids.view(-1, g, out.response_ids.shape[1])  # (prompts, G, r)
    for k, group in enumerate(groups):
        assert len({tuple(row.tolist()) for row in group}) > 1, f"the {g} rows of prompt {k} are all the same draw"
    assert (out.response_ids[~out.response_mask] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("kind", ["lora", "prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "repeated"])
def test_group_rows_are_contiguous_with_their_prompts(tiny_model_dir, tokenizer, kind, share_prompt):
    policy = make_policy(tiny_model_dir("llama"), tokenizer, kind)
    g, texts = 3, [f"<{p}>" for p in PROMPTS]
    gen = {"do_sample": True, "top_k": 0, "top_p": 1.0, "max_new_tokens": 5}
    out = rollouts(policy, tokenizer, gen, share_prompt=share_prompt, num_generations=g, prompt_texts=texts)
    assert out.prompts == [p for p in PROMPTS for _ in range(g)]
    assert out.prompt_texts == [t for t in texts for _ in range(g)]
    assert out.samples == [t + o for t, o in zip(out.prompt_texts, out.outputs)]
    assert len(out.outputs) == out.response_ids.shape[0] == out.truncated.shape[0] == g * len(PROMPTS)
    for i, ids in enumerate(encode(tokenizer, PROMPTS)):
        for j in range(g):
            row = i * g + j
            assert out.query_ids[row][out.query_mask[row]].tolist() == ids, f"row {row} holds another prompt"


@pytest.mark.parametrize("kind, gen, extra, shares", [
    ("lora", {}, {}, True),
    ("hydra", {}, {}, True),
    ("prompt_tuning", {}, {}, False),
    ("prefix_tuning", {}, {}, False),
    ("lora", {}, {"synced_gpus": True}, False),
    ("lora", {"num_beams": 2}, {}, False),
    ("lora", {"use_cache": False}, {}, False),
    ("lora", {"cache_implementation": "static"}, {}, False),
], ids=["lora", "hydra", "prompt_tuning", "prefix_tuning", "synced_gpus", "beam_search", "no_cache", "static_cache"])
def test_where_the_prompt_is_shared(tiny_model_dir, tokenizer, kind, gen, extra, shares):
    from transformers import GenerationConfig

    policy = make_policy(tiny_model_dir("gpt2"), tokenizer, kind)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    config = GenerationConfig(max_new_tokens=2, **gen)
    assert can_share_prefix(policy, 2, ids, generation_config=config, generate_kwargs=extra) is shares
    assert not can_share_prefix(policy, 2, ids[:, -1:], generation_config=config, generate_kwargs=extra), \
        "a one-token prompt has nothing to share"


def test_fallback_repeats_rows_and_keeps_the_group_order(tiny_model_dir, tokenizer):
    policy = make_policy(tiny_model_dir("gpt2"), tokenizer, "prompt_tuning")
    with trunk_batches(policy) as shapes:
        out = rollouts(policy, tokenizer, {"do_sample": False, "max_new_tokens": 4}, num_generations=2)
    assert shapes[0][0] == 2 * len(PROMPTS), "prompt tuning generates on repeated rows"
    groups = out.response_ids.view(len(PROMPTS), 2, -1)
    assert torch.equal(groups[:, 0], groups[:, 1]), "greedy rows of one prompt are equal"


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "repeated"])
def test_num_generations_below_one_is_refused(tiny_model_dir, tokenizer, share_prompt):
    policy = make_policy(tiny_model_dir("gpt2"), tokenizer)
    with pytest.raises(ValueError, match=r"num_generations=0; .*num_generations >= 1"):
        rollouts(policy, tokenizer, {"max_new_tokens": 2}, share_prompt=share_prompt, num_generations=0)
