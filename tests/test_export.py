"""Export: a checkpoint as a plain model that generates as the policy did, or as its peft adapter."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from peft import PeftModel
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import rlora
from rlora.export import export, export_main
from rlora.models.activations import fuse_activations
from rlora.tiny import BOS, DEFAULT_ALPHABET, EOS, UNK, tiny_model, tiny_ppo_config

PROMPTS = ["hello", "abc", "xyz", "the "]
KINDS = {  # name: (architecture, model section); the no-pad base's tokenizer has no pad token (as GPT-2's)
    "lora-gpt2": ("gpt2", {}),
    "lora-llama": ("llama", {}),
    "lora-no-pad": ("llama", {}),
    "prompt": ("gpt2", {"peft_config": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}}),
    "full": ("gpt2", {"peft_config": None, "num_layers_unfrozen": -1}),
    "qlora": ("llama", {"quantization": "nf4"}),
}


def count_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


def tiny_run_config(model_path: str, run_dir: str, **model) -> dict:
    """One rollout phase of 8 samples, 2 optimizer steps."""
    return tiny_ppo_config(model_path, run_dir, train={"total_steps": 2}, method={"num_rollouts": 8}, model=model)


def tokenizer_without_pad() -> PreTrainedTokenizerFast:
    """The characters of `DEFAULT_ALPHABET` plus bos, eos and unk: no pad token."""
    vocab = {BOS: 0, EOS: 1, **{ch: i + 2 for i, ch in enumerate(DEFAULT_ALPHABET)}}
    vocab[UNK] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK)


def base_dir(kind: str, tiny_model_dir, tmp_path_factory) -> str:
    arch = KINDS[kind][0]
    if kind != "lora-no-pad":
        return tiny_model_dir(arch)
    path = str(tmp_path_factory.mktemp("no-pad-base"))
    tokenizer = tokenizer_without_pad()
    tiny_model(arch, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """`run(kind)` -> (trainer, its final checkpoint, base model directory), trained once per module.

    "continued" trains on from the "lora-gpt2" checkpoint's adapter (model.model_path=.../adapter).
    """
    made: dict[str, tuple] = {}  # kind: (trainer, checkpoint, base model directory)

    def make(kind: str):
        if kind not in made:
            torch.manual_seed(0)
            run_dir = str(tmp_path_factory.mktemp(kind))
            if kind == "continued":
                base = make("lora-gpt2")[2]
                config = tiny_run_config(os.path.join(make("lora-gpt2")[1], "adapter"), run_dir, peft_config=None)
            else:
                base = base_dir(kind, tiny_model_dir, tmp_path_factory)
                config = tiny_run_config(base, run_dir, **KINDS[kind][1])
            with torch.enable_grad():  # the first test to ask may run under no_grad
                trainer = rlora.train(count_s, PROMPTS, config=config, verbose=False)
            made[kind] = trainer, os.path.join(run_dir, "ckpts", f"step_{trainer.step}"), base
        return made[kind]

    return make


def encode(tokenizer):
    """A few left-padded prompts of different lengths: `(input_ids, attention_mask)`, each (3, t)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(["hello", "ab", "the s"], padding=True, return_tensors="pt", add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def greedy(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["lora-gpt2", "lora-llama", "lora-no-pad", "continued", "full"])
def test_exported_model_is_plain_and_generates_as_the_policy(run, tmp_path, kind):
    trainer, checkpoint, base_path = run(kind)
    out = export(checkpoint, str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    policy_lm = trainer.policy.lm.eval()
    ids, mask = encode(AutoTokenizer.from_pretrained(out))
    assert not isinstance(model, PeftModel)
    assert not [name for name, _ in model.named_parameters() if "lora_" in name]
    assert torch.equal(greedy(model, ids, mask), greedy(policy_lm, ids, mask))
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, policy_lm(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=0)
    assert model.get_input_embeddings().num_embeddings == len(AutoTokenizer.from_pretrained(out))
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    base_logits = base(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask).logits  # no pad id in base
    assert base_logits.shape == logits.shape  # padding adds no token: the export has the base's vocabulary
    assert (logits - base_logits).abs().max() > 1e-2  # training moved it


@torch.no_grad()
@pytest.mark.parametrize("kind", ["lora-gpt2", "prompt"])
def test_adapter_only_export_loads_with_peft_and_gives_the_policy_logits(run, tmp_path, kind):
    trainer, checkpoint, base_path = run(kind)
    out = export(checkpoint, str(tmp_path / "adapter"), adapter_only=True)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    fuse_activations(base)  # the kernels the policy ran (model.fused_activations), for a bitwise-tight match
    model = PeftModel.from_pretrained(base, out).eval()
    ids, mask = encode(AutoTokenizer.from_pretrained(out))
    expected = trainer.policy.lm.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
    with model.disable_adapter():  # the adapter matters (prompt tuning adds virtual-token positions in front)
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert (plain - expected[:, -ids.shape[1]:]).abs().max() > 1e-2


def test_export_main_round_trip_into_an_empty_directory(run, tmp_path, capsys):
    _, checkpoint, _ = run("lora-gpt2")
    out = tmp_path / "exported"
    out.mkdir()  # an empty directory may be the target
    assert export_main([checkpoint, str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert export_main([checkpoint, str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(
        os.listdir(tmp_path / "adapter"))
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


ERRORS = {  # name: (checkpoint kind, path inside the run's checkpoint or run dir, extra args, message)
    "missing": ("lora-gpt2", "no_such_step", [], "does not exist"),
    "run-dir": ("lora-gpt2", "../..", [], r"has no adapter/ or model/: not an rlora checkpoint \(pick a directory"),
    "adapter-dir": ("lora-gpt2", "adapter", [], "is a peft adapter directory; give the checkpoint directory"),
    "non-empty-out": ("lora-gpt2", ".", [], "exists and is not empty"),
    "prompt-merge": ("prompt", ".", [], "PROMPT_TUNING adapter.*export with --adapter-only"),
    "full-adapter-only": ("full", ".", ["--adapter-only"], "not an adapter; export it without --adapter-only"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_export_main_errors_name_the_fix(run, tmp_path, capsys, case):
    kind, inside, extra, message = ERRORS[case]
    checkpoint = os.path.normpath(os.path.join(run(kind)[1], inside))
    out = tmp_path / "out"
    if case == "non-empty-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert export_main([checkpoint, str(out), *extra]) == 2
    assert re.search(message, capsys.readouterr().err), case
    assert os.listdir(tmp_path) == (["out"] if case == "non-empty-out" else [])  # nothing half-written
    if case == "non-empty-out":
        assert os.listdir(out) == ["keep.txt"]


def test_export_raises_for_a_missing_tokenizer(run, tmp_path):
    _, checkpoint, _ = run("lora-gpt2")
    partial = shutil.copytree(checkpoint, tmp_path / "step_2", ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ValueError, match="has no tokenizer/: not a complete rlora checkpoint"):
        export(str(partial), str(tmp_path / "out"))


@torch.no_grad()
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 0.15)], ids=["float32", "bfloat16"])
def test_a_quantized_run_merges_into_the_dequantized_base(run, tmp_path, dtype, tolerance):
    """The export of a 4-bit run is a plain model in `dtype` whose logits are the 4-bit policy's:
    to float rounding in float32, since the dequantized weights are exactly those the 4-bit layers
    multiply by (the quantization error is the run's own, not added again); to bf16 rounding
    (8 bits of mantissa over logits of a few units, ~0.02-0.1) in bfloat16."""
    from rlora.models.trunk import position_ids_from_mask

    trainer, checkpoint, _ = run("qlora")
    out = export(checkpoint, str(tmp_path / "out"), dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {type(m).__name__ for m in model.modules()}.isdisjoint({"Linear4bit", "Params4bit"})
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == getattr(torch, dtype)
    ids, mask = encode(trainer.tokenizer)
    policy = trainer.policy.eval()
    expected = policy(ids, mask).logits
    got = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float()
    real = mask.bool()
    assert (got - expected)[real].abs().max() <= tolerance
    # measured: 5e-6 (float32) and 0.07 (bfloat16), while the adapter moved the logits by ~1
    assert (policy.reference_logits(ids, mask) - expected)[real].abs().max() > 3 * tolerance
