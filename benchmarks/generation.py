"""Benchmark: sampling one group-method chunk on SmolLM2-135M-Instruct with a LoRA adapter.

16 rollouts x 32 sampled tokens: 2 chat prompts (46 and 36 tokens with the template's system
prompt) x 8 generations each, LoRA r=8 on every linear layer (peft's "all-linear", random
non-zero weights), pure sampling (temperature 1, no top-k / top-p), fp32, one thread. Every
variant samples from the same `GenerationConfig` (`rollout_generation_config`) and must run the
full 32 steps. Variants:

- plain HF generate: the peft model's `generate` on the 16 repeated rows (the baseline; on a copy
  of the model without rlora's contiguous-input hook on the LM head, as a transformers user has it);
- the base model alone (adapter disabled): what the adapter costs;
- shared prefill: `Policy.generate(num_generations=8)`, with transformers' own draw
  (`torch.multinomial`) and with rlora's (`DrawToken`, what `generate_rollouts` does by default);
- HF's static KV cache (`cache_implementation="static"`), alone and filled from the shared prefill;
- HF's static cache with `torch.compile` of the decode step (`compile_config`; its first call,
  compiling into an empty inductor cache, is reported apart);
- the adapter merged into the base (`merge_adapter_for_generation`);
- bf16: plain HF generate on the merged model cast to bf16 (the same-precision baseline), and
  rlora's bf16 sampler (`model.generation_dtype: bfloat16`: the merged bf16 copy is made inside
  each timed call, as in training);
- `torch.inference_mode` instead of `no_grad`.

`generate_rollouts` keeps the shared prefill (exact: the same `generate` continues from the
shared cache) and draws the tokens itself (the same distribution; one uniform per row instead
of one exponential variate per vocabulary entry). It does not take the static cache: alone it
gains nothing measurable, with the shared prefill from nothing to 5% across runs here; it
attends over the whole `prompt + max_new_tokens` every step (a cost that grows with
`max_new_tokens` while responses often stop early), and on CUDA it makes transformers compile
the decode step by itself. Nor torch.compile (no gain on this CPU after its compile), nor
`inference_mode` (none either). Merging stays the opt-in `merge_adapter_for_generation`; the
bf16 sampler the opt-in `model.generation_dtype`, since it samples from the bf16 model's
distribution, a rounding away from the float32 one that is scored.

Rounds run every variant once, in turn, so a busy shared machine slows them alike; the figures
are the median and the best seconds over rounds and the median of each round's ratio to plain
generate. Then a torch.profiler table of the default path shows where its time goes, beside the
time the bare weight matmuls of its decode steps take on their own.

    .venv/bin/python benchmarks/generation.py [--rounds 7] [--no-compile] [--no-record]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record  # noqa: E402

from rlora.fetch import fetch  # noqa: E402
from rlora.models import Policy  # noqa: E402
from rlora.models.shared_prefix import repeated_prompt_cache  # noqa: E402
from rlora.rollout.generation import drawn_here, left_pad, rollout_generation_config, stop_token_ids  # noqa: E402

MESSAGES = [[{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a "
                                         "bottle."}],
            [{"role": "user", "content": "Explain how rainbows form."}]]
GROUP, NEW_TOKENS = 8, 32
PLAIN = "plain HF generate (LoRA, 16 repeated rows)"
SHARED = "rlora shared prefill (2 prompts x 8) + rlora's draw, the default"
BF16 = "rlora bf16 sampler: shared prefill + rlora's draw on a merged bf16 copy"
COMPILED = "HF static KV cache + torch.compile decode"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)


def load():
    """The policy (SmolLM2 + LoRA), the same peft model as plain Hugging Face (a copy, without
    what rlora's `Policy` adds), its tokenizer and the two prompts' token ids."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                        LoraConfig(task_type="CAUSAL_LM", **LORA))
    prompts = [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False).input_ids for m in MESSAGES]
    plain = copy.deepcopy(lm)
    return Policy(lm, "adapter", value_head=False).eval(), plain, tokenizer, prompts


def variants(policy, plain, tokenizer, prompts, compile_decode: bool) -> dict:
    """name -> a call that samples the 16 x 32 rollouts and returns the sequences (16, p + 32)."""
    from transformers import CompileConfig

    gen = {"do_sample": True, "max_new_tokens": NEW_TOKENS}
    config, _ = rollout_generation_config(gen, tokenizer, stop_token_ids(gen, tokenizer))
    drawn, draw = drawn_here(config, {})  # rlora's draw: a greedy config + DrawToken as the last processor
    static = copy.deepcopy(config)
    static.cache_implementation = "static"
    q, m = left_pad(prompts, tokenizer.pad_token_id)  # (2, p): each prompt once
    rows, row_mask = q.repeat_interleave(GROUP, 0), m.long().repeat_interleave(GROUP, 0)  # (16, p)

    def hf(generation_config):
        return lambda: plain.generate(input_ids=rows, attention_mask=row_mask, generation_config=generation_config)

    def base_only():
        with plain.disable_adapter():
            return plain.generate(input_ids=rows, attention_mask=row_mask, generation_config=config)

    def shared_static():
        """Shared prefill into HF's StaticCache: the trunk fills rlora's repeated prompt cache for
        the 2 prompts (16 rows), whose layers are written into a static cache through its `update`."""
        from transformers import StaticCache

        base = policy.base_model
        dynamic, _ = repeated_prompt_cache(base.base_model, q[:, :-1], m.long()[:, :-1], GROUP, base.config)
        cache = StaticCache(config=base.config, max_cache_len=rows.shape[1] + NEW_TOKENS - 1)
        for i, layer in enumerate(dynamic.layers):
            cache.update(layer.keys, layer.values, i)
        return policy.lm.generate(input_ids=rows, attention_mask=row_mask, past_key_values=cache,
                                  generation_config=config)

    bf16_model = copy.deepcopy(plain).merge_and_unload().to(torch.bfloat16)

    def inference_mode():
        with torch.inference_mode():
            return hf(config)()

    calls = {
        PLAIN: hf(config),
        "base model alone (adapter disabled)": base_only,
        "rlora shared prefill, transformers' draw": lambda: policy.generate(
            q, m.long(), generation_config=config, num_generations=GROUP),
        SHARED: lambda: policy.generate(q, m.long(), generation_config=drawn, num_generations=GROUP, **draw),
        "HF static KV cache": hf(static),
        "rlora shared prefill + HF static KV cache": shared_static,
        "rlora shared prefill + rlora's draw + merged adapter": lambda: policy.generate(
            q, m.long(), generation_config=drawn, num_generations=GROUP, merged=True, **draw),
        "torch.inference_mode": inference_mode,
        "plain HF generate, merged model cast to bf16": lambda: bf16_model.generate(
            input_ids=rows, attention_mask=row_mask, generation_config=config),
        BF16: lambda: policy.generate(q, m.long(), generation_config=drawn, num_generations=GROUP,
                                      dtype=torch.bfloat16, **draw),
    }
    if compile_decode:
        compiled = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        compiled._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless told
        static_compiled = copy.deepcopy(static)
        static_compiled.compile_config = compiled
        calls[COMPILED] = hf(static_compiled)
    return calls


def timed(call, length: int, seed: int) -> float:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - t0
    if out.shape != (2 * GROUP, length + NEW_TOKENS):
        raise RuntimeError(f"a variant returned {tuple(out.shape)}, not {(2 * GROUP, length + NEW_TOKENS)}: every "
                           "row stopped early; change the prompts or the seed so the 32 steps are all run")
    return seconds


def profile_table(call, top: int = 8) -> tuple[str, float, float]:
    """The `top` ops by own CPU time of one call, as markdown rows; the mm share and the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = [f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / 1e6 / total:.0%} |"
            for e in events[:top]]
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / 1e6
    return "\n".join(rows), mm / total, total


def matmul_floor(policy, rows: int, steps: int) -> tuple[float, float]:
    """Seconds for `steps` decode steps' worth of the bare base-weight matmuls (every linear
    layer and the LM head on `rows` rows), nothing else; and the GB of weights each step reads."""
    weights = [p for name, p in policy.base_model.named_parameters() if p.dim() == 2 and "lora_" not in name
               and "embed" not in name] + [policy.base_model.get_output_embeddings().weight]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    t0 = time.perf_counter()
    for _ in range(steps):
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
    return time.perf_counter() - t0, sum(w.numel() * w.element_size() for w in weights) / 1e9


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each variant (median reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (about a minute)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rlora-inductor-"))
    policy, plain, tokenizer, prompts = load()
    length = max(len(p) for p in prompts)
    calls = variants(policy, plain, tokenizer, prompts, compile_decode=not args.no_compile)
    first = {name: timed(call, length, seed=0) for name, call in calls.items()}  # warm-up (and the compile)
    times = {name: [] for name in calls}
    for r in range(args.rounds):
        for name, call in calls.items():
            times[name].append(timed(call, length, seed=r + 1))
    plain = times[PLAIN]
    lines = ["| generation | median s | best s | / plain HF generate (median of rounds) |", "|---|---|---|---|"]
    ratio = {name: statistics.median(t / p for t, p in zip(ts, plain)) for name, ts in times.items()}
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {ratio[name]:.2f} |")
    notes = []
    if COMPILED in first:
        notes.append(f"The compiled variant's first call took {first[COMPILED]:.0f} s (compiling, into an empty "
                     "inductor cache directory).")
    verdict = lambda r: "met" if r <= 0.5 else "missed"  # noqa: E731
    ops, mm_share, total = profile_table(calls[SHARED])
    floor, gigabytes = matmul_floor(policy, 2 * GROUP, NEW_TOKENS - 1)
    notes.append(f"Target 0.5x plain: {verdict(ratio[BF16])} by the bf16 sampler ({ratio[BF16]:.2f}x), "
                 f"{verdict(ratio[SHARED])} in float32 ({ratio[SHARED]:.2f}x). Where the float32 default's time "
                 f"goes (torch.profiler, one call, {total:.2f} s of own CPU time, `aten::mm` {mm_share:.0%}): the "
                 f"bare base-weight matmuls of its {NEW_TOKENS - 1} decode steps on 16 rows take {floor:.2f} s on "
                 f"their own ({floor / min(plain):.2f}x plain's best), each step reading the {gigabytes:.2f} GB of "
                 "fp32 weights once: no float32 path can reach 0.5x here.")
    bf16_ops, bf16_mm, bf16_total = profile_table(calls[BF16])
    header = ["| op | calls | seconds | share |", "|---|---|---|---|"]
    markdown = "\n\n".join(["\n".join(lines), *notes, "float32 default:", "\n".join([*header, ops]),
                             f"bf16 sampler ({bf16_total:.2f} s of own CPU time, `aten::mm` {bf16_mm:.0%}):",
                             "\n".join([*header, bf16_ops])])
    print(markdown)
    if not args.no_record:
        record("generation", "Sampling a group chunk: 16 rollouts x 32 tokens, SmolLM2-135M + LoRA",
               f"CPU, 1 thread; fp32; LoRA r=8 all-linear; 2 chat prompts ({' and '.join(str(len(p)) for p in prompts)}"
               f" tokens) x {GROUP}, temperature 1; median of {args.rounds} interleaved rounds", markdown)


if __name__ == "__main__":
    main()
