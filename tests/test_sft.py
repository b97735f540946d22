"""Supervised fine-tuning: loss falls, texts are learnt, LoRA trains only the adapter, CLI round trip."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlora.sft import encode_texts, load_texts, sft, sft_main
from rlora.tiny import char_tokenizer, tiny_model

TEXTS = ["abcd", "bcd", "cd"]  # each letter has one successor (or eos): greedy decoding can reproduce all


@pytest.fixture
def small_tok():
    return char_tokenizer("abcd")


def test_encode_texts_appends_eos_and_masks_padding(small_tok):
    input_ids, attention_mask, labels = encode_texts(small_tok, ["ab", "c"])
    eos, pad = small_tok.eos_token_id, small_tok.pad_token_id
    assert input_ids.tolist() == [[3, 4, eos], [5, eos, pad]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[3, 4, eos], [5, eos, -100]]


def test_sft_lowers_loss_and_learns_the_texts(small_tok):
    model = tiny_model("gpt2", small_tok)
    rng_before = torch.random.get_rng_state()
    seen = []
    history = sft(model, small_tok, TEXTS, epochs=20, batch_size=2, lr=1e-2, seed=0, log=seen.append)
    assert seen == history and [h["epoch"] for h in history] == list(range(20))
    assert history[-1]["loss"] < 0.3 * history[0]["loss"], [h["loss"] for h in history]  # measured 0.07-0.15
    assert torch.equal(torch.random.get_rng_state(), rng_before), "sft must not move the caller's RNG"

    prompts = torch.tensor([[small_tok.convert_tokens_to_ids(t[0])] for t in TEXTS])  # (4, 1)
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=6, pad_token_id=small_tok.pad_token_id, eos_token_id=small_tok.eos_token_id)
    assert small_tok.batch_decode(out, skip_special_tokens=True) == TEXTS
    ends = [len(t) for t in TEXTS]
    assert (out[torch.arange(len(TEXTS)), ends] == small_tok.eos_token_id).all(), "each text must end with eos"


def test_sft_is_reproducible_from_its_seed(small_tok):
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        model = tiny_model("gpt2", small_tok)
        losses.append([h["loss"] for h in sft(model, small_tok, TEXTS, epochs=3, batch_size=3, lr=1e-2, seed=5)])
    assert losses[0] == losses[1]


def test_sft_with_lora_changes_only_the_adapter(small_tok):
    base = tiny_model("gpt2", small_tok)
    lora = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = sft(model, small_tok, TEXTS, epochs=5, batch_size=2, lr=1e-2, seed=0)
    assert history[-1]["loss"] < history[0]["loss"]
    after = dict(model.named_parameters())
    lora_names = [name for name in before if "lora_" in name]
    assert len(lora_names) == 2 * 2 * 1  # A and B, 2 layers, 1 target module each
    for name, old in before.items():
        if name in lora_names:
            assert not torch.equal(after[name], old), f"{name} did not train"
        else:
            assert torch.equal(after[name], old), f"{name} changed but is not part of the adapter"


@pytest.mark.parametrize("bad, message", [
    ({"texts": []}, "no texts"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
], ids=["no-texts", "no-epochs", "empty-batch"])
def test_sft_rejects_bad_arguments(small_tok, bad, message):
    kwargs = dict(texts=TEXTS, epochs=1, batch_size=2, lr=1e-3) | bad
    with pytest.raises(ValueError, match=message):
        sft(tiny_model("gpt2", small_tok), small_tok, **kwargs)


def write_data(path, texts):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    else:
        path.write_text("\n".join(texts) + "\n\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"], ids=["jsonl", "txt"])
def test_load_texts(tmp_path, suffix):
    assert load_texts(write_data(tmp_path / f"d{suffix}", ["hello there", "abc"])) == ["hello there", "abc"]


@pytest.mark.parametrize("name, content, message", [
    ("d.csv", "a\n", "suffix"),
    ("d.jsonl", '{"txt": "a"}\n', 'd.jsonl:1 has no string field "text"'),
    ("d.jsonl", '{"text": "a"}\nnot json\n', "d.jsonl:2 is not valid JSON"),
    ("d.txt", "\n\n", "no texts"),
], ids=["unknown-suffix", "missing-field", "bad-json", "empty"])
def test_load_texts_names_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_texts(tmp_path / name)


@pytest.mark.parametrize("lora_r", [None, 2], ids=["full-model", "lora-adapter"])
def test_sft_main_round_trip(tmp_path, tiny_model_dir, capsys, lora_r):
    base_dir = tiny_model_dir("gpt2")
    data = write_data(tmp_path / "data.jsonl", ["hello there", "abc", "the cat sat"])
    out = tmp_path / "out"
    argv = ["--model", base_dir, "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "2",
            "--lr", "1e-2", "--seed", "3"]
    if lora_r is not None:
        argv += ["--lora-r", str(lora_r)]
    assert sft_main(argv) == 0
    assert "epoch 2/2" in capsys.readouterr().out

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_state = {name: p.clone() for name, p in base.state_dict().items()}
    AutoTokenizer.from_pretrained(out)
    if lora_r is None:
        assert (out / "model.safetensors").is_file()
        tuned = AutoModelForCausalLM.from_pretrained(out)
        assert not torch.equal(tuned.state_dict()["lm_head.weight"], base_state["lm_head.weight"])
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 8, 0.1)
        tuned = PeftModel.from_pretrained(base, out)
        lora_b = [p for name, p in tuned.named_parameters() if "lora_B" in name]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "lora_B starts at zero; it must have trained"
        with tuned.disable_adapter():
            for name, p in tuned.get_base_model().state_dict().items():
                if "lora_" not in name:
                    key = name.replace("base_layer.", "")
                    assert torch.equal(p, base_state[key]), f"{name} changed"


def test_sft_main_rejects_bad_data(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(SystemExit) as exit_info:
        sft_main(["--model", tiny_model_dir("gpt2"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert 'no string field "text"' in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
