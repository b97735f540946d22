"""Loading: tokenizer padding, continuing from a saved adapter, errors that name the fix."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlora.config import ModelConfig, TokenizerConfig
from rlora.models import build_policy, load_tokenizer
from rlora.tiny import tiny_model, tiny_ppo_config


def tokenizer_without_pad() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "a": 1, "b": 2, "c": 3, "<unk>": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_missing_pad_token_pads_with_eos_and_keeps_the_base_vocabulary(tmp_path):
    source = tokenizer_without_pad()
    assert source.pad_token is None
    tiny_model("gpt2", source).save_pretrained(tmp_path)
    source.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(TokenizerConfig(), str(tmp_path))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # an existing id: masks decide what is real
    assert len(tokenizer) == len(source) == 5
    assert tokenizer.padding_side == "left"
    policy = build_policy(ModelConfig(model_path=str(tmp_path), peft_config={"peft_type": "LORA", "r": 2}),
                          tokenizer)
    assert policy.base_model.get_input_embeddings().num_embeddings == 5
    assert policy.base_model.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([[1, 2, tokenizer.pad_token_id]])
    out = policy(ids, torch.tensor([[1, 1, 0]]))
    assert out.logits.shape == (1, 3, 5)


def test_real_gpt2_tokenizer_keeps_50257_tokens(gpt2_bpe_model_dir):
    path = gpt2_bpe_model_dir("gpt2")
    tokenizer = load_tokenizer(TokenizerConfig(), path)
    assert len(tokenizer) == 50257 and tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    policy = build_policy(ModelConfig(model_path=path, peft_config={"peft_type": "LORA", "r": 2}), tokenizer)
    assert policy.base_model.get_input_embeddings().num_embeddings == 50257


def test_missing_tokenizer_dir_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"tokenizer.tokenizer_path='/no/such/dir'.*no such directory"):
        load_tokenizer(TokenizerConfig(tokenizer_path="/no/such/dir"), None)


def test_config_object_needs_a_tokenizer_path():
    from rlora.tiny import tiny_config

    with pytest.raises(ValueError, match="set tokenizer.tokenizer_path"):
        load_tokenizer(TokenizerConfig(), tiny_config("gpt2", 40))


# ---------------------------------------------------------------- continuing from a saved adapter

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.5}
PROMPT_TUNING = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}


def count_s(samples, prompts, outputs, tokenizer, **_):
    return [o.count("s") / max(1, len(o)) for o in outputs]


def tiny_run_config(model_path: str, run_dir: str, peft_config: dict | None) -> dict:
    """One rollout phase of 8 samples, 2 optimizer steps."""
    return tiny_ppo_config(model_path, run_dir, train={"total_steps": 2}, method={"num_rollouts": 8},
                           model={"peft_config": peft_config})


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """`trained(peft_type)` -> (trainer, final checkpoint directory) of a tiny GPT-2 run, once per module."""
    made: dict[str, tuple] = {}

    def make(peft_type: str):
        if peft_type not in made:
            import rlora

            torch.manual_seed(0)
            run_dir = str(tmp_path_factory.mktemp(peft_type))
            peft_config = {"LORA": LORA, "PROMPT_TUNING": PROMPT_TUNING}[peft_type]
            with torch.enable_grad():
                trainer = rlora.train(count_s, ["hello", "abc", "xyz", "the "], verbose=False,
                                      config=tiny_run_config(tiny_model_dir("gpt2"), run_dir, peft_config))
            made[peft_type] = trainer, os.path.join(run_dir, "ckpts", f"step_{trainer.step}")
        return made[peft_type]

    return make


def adapter_path(checkpoint: str, source: str, tmp_path) -> str:
    """The checkpoint's own adapter/ (tokenizer beside it), or an `rlora export --adapter-only` copy."""
    if source == "checkpoint":
        return os.path.join(checkpoint, "adapter")
    from rlora.export import export

    return export(checkpoint, str(tmp_path / "exported"), adapter_only=True)


def trainable(policy) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("source", ["checkpoint", "exported"])
@pytest.mark.parametrize("peft_type", ["LORA", "PROMPT_TUNING"])
def test_saved_adapter_continues_trainable_from_its_weights(trained, tiny_model_dir, batch, tmp_path, source,
                                                             peft_type):
    trainer, checkpoint = trained(peft_type)
    path = adapter_path(checkpoint, source, tmp_path)
    tokenizer = load_tokenizer(TokenizerConfig(), path)  # the checkpoint's tokenizer/, or the export's own
    assert tokenizer.get_vocab() == trainer.tokenizer.get_vocab()
    policy = build_policy(ModelConfig(model_path=path), tokenizer)
    fresh = build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"),
                                     peft_config={"LORA": LORA, "PROMPT_TUNING": PROMPT_TUNING}[peft_type]),
                         tokenizer)
    assert policy.mode == fresh.mode == ("adapter" if peft_type == "LORA" else "prompt")
    assert trainable(policy) == trainable(fresh) and len(trainable(policy)) > 1  # adapter + value head
    base_before = {n: p.clone() for n, p in policy.base_model.named_parameters() if "lora_" not in n}

    ids, mask = batch
    trainer.policy.eval()
    with torch.no_grad():
        expected = trainer.policy(ids, mask).logits
        start = policy.eval()(ids, mask).logits
    torch.testing.assert_close(start, expected, atol=1e-6, rtol=0)

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        loss = -policy(ids, mask).logits.log_softmax(-1)[..., 5].mean()  # raise one token's probability
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert (policy(ids, mask).logits - start).abs().max() > 1e-3
    for name, p in policy.base_model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name  # only the adapter moved


def test_rlora_train_continues_from_a_checkpoint_adapter(trained, batch, tmp_path):
    from safetensors.torch import load_file

    import rlora

    _, checkpoint = trained("LORA")
    path = os.path.join(checkpoint, "adapter")
    config = tiny_run_config(path, str(tmp_path / "run"), peft_config=None)
    trainer = rlora.train(count_s, ["hello", "abc"], config=config, verbose=False)
    assert trainer.policy.mode == "adapter"
    before = load_file(os.path.join(path, "adapter_model.safetensors"))
    after = load_file(os.path.join(tmp_path, "run", "ckpts", f"step_{trainer.step}", "adapter",
                                   "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4


def test_saved_adapter_with_a_peft_config_too_is_an_error(trained, tokenizer):
    _, checkpoint = trained("LORA")
    with pytest.raises(ValueError, match="is a saved peft adapter.*drop model.peft_config"):
        build_policy(ModelConfig(model_path=os.path.join(checkpoint, "adapter"), peft_config=LORA), tokenizer)


def test_saved_adapter_with_a_missing_base_names_the_fix(trained, tokenizer, tmp_path):
    _, checkpoint = trained("LORA")
    path = shutil.copytree(os.path.join(checkpoint, "adapter"), tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/no/such/base"}))
    with pytest.raises(FileNotFoundError, match=r"base_model_name_or_path \(in .*adapter_config.json\)="
                                                r"'/no/such/base': no such directory"):
        build_policy(ModelConfig(model_path=str(path)), tokenizer)


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_model_dtype_loads_the_frozen_base_in_that_precision(tiny_model_dir, tmp_path, dtype):
    """The base in bf16 (or the checkpoint's own precision), the adapter and value head in fp32; PPO steps run."""
    import rlora

    config = tiny_ppo_config(tiny_model_dir("llama"), str(tmp_path), model={"dtype": dtype}, train={"total_steps": 2})
    trainer = rlora.build_trainer(lambda samples, **_: [float(len(s)) for s in samples], ["ab", "cd"], config=config,
                                  verbose=False)
    base = {p.dtype for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    trained = {p.dtype for p in trainer.policy.trainable_parameters()}
    assert base == ({torch.bfloat16} if dtype == "bfloat16" else {torch.float32}) and trained == {torch.float32}
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    trainer.learn()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.policy.trainable_parameters()))


def test_low_precision_base_without_an_adapter_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match=r"model.dtype='bfloat16' loads the base in torch.bfloat16, but without a peft"):
        build_policy(ModelConfig(model_path=tiny_model_dir("gpt2"), dtype="bfloat16"), load_tokenizer(
            TokenizerConfig(), tiny_model_dir("gpt2")))
