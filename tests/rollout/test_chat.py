"""Chat prompts: lists of messages rendered with the tokenizer's chat template, alone or as the
`prompt` of a dict with metadata; generation stops at the template's end-of-turn token."""

from __future__ import annotations

import json

import pytest

from rlora.config import TokenizerConfig, load_config
from rlora.data import load_prompts
from rlora.models import build_policy, load_tokenizer
from rlora.rollout.prompts import (bind_template_variables, end_of_turn_id, normalize_prompts, render_prompt,
                                   tokenize_prompts)
from rlora.tiny import char_tokenizer, tiny_model, tiny_ppo_config
from rlora.trainer import PPOTrainer

# a ChatML-like template over the character tokenizer: "<|bos|>" opens a turn, "<|end|>" ends it
TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'][0] }}:{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>a:{% endif %}")
CHAT = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi there"}]


@pytest.fixture
def chat_tokenizer():
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def test_messages_are_rendered_exactly_as_apply_chat_template(chat_tokenizer):
    prompts = normalize_prompts([{"prompt": CHAT, "answer": "y"}, {"prompt": CHAT[1:], "answer": "x"},
                                 {"prompt": "plain text", "answer": "z"}])
    assert [p.is_chat for p in prompts] == [True, True, False]
    assert prompts[1].metadata == {"answer": "x"} and prompts[0].prompt == CHAT
    expected = chat_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # a BatchEncoding in transformers 5
    assert tokenize_prompts(prompts[:1], chat_tokenizer, 100)[0] == list(expected)
    assert render_prompt(prompts[0], chat_tokenizer) == "<|bos|>s:be kind<|end|><|bos|>u:hi there<|end|><|bos|>a:"
    assert render_prompt(prompts[2], chat_tokenizer) == "plain text"


def test_end_of_turn_is_the_first_special_token_after_the_assistant_text(chat_tokenizer):
    assert end_of_turn_id(chat_tokenizer) == chat_tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_of_turn_id(char_tokenizer()) is None  # no template
    plain_end = char_tokenizer()
    plain_end.chat_template = TEMPLATE.replace("<|end|>", "!")
    assert end_of_turn_id(plain_end) is None  # a turn that ends in ordinary text has no such token


@pytest.mark.parametrize("bad, match", [
    ([{"role": "user"}], r"prompts\[0\]\[0\] = \{'role': 'user'\} is not a chat message"),
    ([{"content": "hi"}], r"prompts\[0\]\[0\] = \{'content': 'hi'\} is not a chat message"),
    ([{"role": "user", "content": 3}], r"prompts\[0\]\[0\]"),
    ([], r"prompts\[0\] is an empty list of messages"),
    (["hi"], r"prompts\[0\]\[0\] = 'hi' is not a chat message"),
], ids=["no-content", "no-role", "content-not-text", "empty", "string-in-list"])
def test_malformed_messages_name_the_prompt_and_message(bad, match):
    with pytest.raises(TypeError, match=match):
        normalize_prompts([bad])


def test_messages_without_a_chat_template_name_the_prompt_and_the_fix():
    prompts = normalize_prompts(["fine", CHAT])
    with pytest.raises(ValueError, match=r"prompts\[1\] is a list of chat messages, but the tokenizer has no chat "
                                         r"template; set tokenizer.chat_template"):
        tokenize_prompts(prompts, char_tokenizer(), 100)


def test_chat_template_override_from_the_config(tiny_model_dir):
    tokenizer = load_tokenizer(TokenizerConfig(chat_template=TEMPLATE), tiny_model_dir("gpt2"))
    assert render_prompt(normalize_prompts([CHAT])[0], tokenizer).endswith("<|bos|>a:")


def test_jsonl_with_a_messages_column_loads_as_chat_prompts(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": CHAT, "answer": str(i)}) for i in range(3)) + "\n")
    prompts = normalize_prompts(load_prompts(str(path)))
    assert [p.prompt for p in prompts] == [CHAT] * 3 and [p.metadata["answer"] for p in prompts] == ["0", "1", "2"]


def test_a_chat_run_stops_at_end_of_turn_and_gives_reward_fn_the_messages(tmp_path, chat_tokenizer):
    model_dir = tmp_path / "model"
    tiny_model("gpt2", chat_tokenizer).save_pretrained(model_dir)
    chat_tokenizer.save_pretrained(model_dir)
    config = load_config(tiny_ppo_config(str(model_dir), str(tmp_path / "run"), train={"seq_length": 64},
                                         method={"gen_kwargs": {"max_new_tokens": 12, "do_sample": True, "top_k": 0}}))
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    seen = []

    def reward_fn(samples, prompts, outputs, **meta):
        seen.append((samples, prompts, outputs, meta))
        return [0.0] * len(samples)

    items = normalize_prompts([{"prompt": CHAT, "tag": i} for i in range(8)])
    trainer = PPOTrainer(config, build_policy(config.model, tokenizer), tokenizer, reward_fn, items, items,
                         verbose=False)
    rollouts = trainer.sampler.generate(list(range(8)), {**config.method.gen_kwargs, "max_new_tokens": 40},
                                 trainer.prompt_ids, trainer.prompts)
    bang = tokenizer.convert_tokens_to_ids("<|end|>")
    for ids, n in zip(rollouts.response_ids.tolist(), rollouts.response_mask.sum(1).tolist()):
        assert bang not in ids[:n - 1]  # the turn's end is where a response ends
    assert any(ids[n - 1] == bang for ids, n in zip(rollouts.response_ids.tolist(),
                                                    rollouts.response_mask.sum(1).tolist()))
    trainer.total_steps = 1
    trainer.learn()
    samples, prompts, outputs, meta = seen[-1]
    assert all(p == CHAT for p in prompts) and sorted(meta["tag"]) == sorted(meta["tag"])
    assert all(s == render_prompt(items[0], tokenizer) + o for s, o in zip(samples, outputs))


# a template that reads a variable, as Qwen3's reads enable_thinking
THINKING = TEMPLATE.replace("<|bos|>a:{% endif %}", "<|bos|>a:{% if enable_thinking is defined and not "
                            "enable_thinking %} no thoughts{% endif %}{% endif %}")


def test_template_variables_reach_every_rendering_and_a_call_s_own_win(chat_tokenizer):
    chat_tokenizer.chat_template = THINKING
    plain = render_prompt(normalize_prompts([CHAT])[0], chat_tokenizer)
    assert plain.endswith("<|bos|>a:")
    bind_template_variables(chat_tokenizer, {"enable_thinking": False})
    assert render_prompt(normalize_prompts([CHAT])[0], chat_tokenizer) == plain + " no thoughts"
    assert chat_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True,
                                              enable_thinking=True) == plain
    bind_template_variables(chat_tokenizer, {"enable_thinking": False})  # again: replaced, not nested
    assert chat_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == plain + \
        " no thoughts"
    bind_template_variables(chat_tokenizer, {})
    assert render_prompt(normalize_prompts([CHAT])[0], chat_tokenizer) == plain


def test_tokenizer_chat_template_kwargs_render_the_trained_prompts(tmp_path, chat_tokenizer):
    chat_tokenizer.chat_template = THINKING
    model_dir = tmp_path / "model"
    tiny_model("gpt2", chat_tokenizer).save_pretrained(model_dir)
    chat_tokenizer.save_pretrained(model_dir)
    config = load_config(tiny_ppo_config(str(model_dir), str(tmp_path / "run"), train={"seq_length": 64},
                                         tokenizer={"chat_template_kwargs": {"enable_thinking": False}}))
    tokenizer = load_tokenizer(config.tokenizer, config.model.model_path)
    items = normalize_prompts([CHAT] * 2)
    trainer = PPOTrainer(config, build_policy(config.model, tokenizer), tokenizer, lambda samples, **k: [0.0] * 2,
                         items, items, verbose=False)
    assert tokenizer.decode(trainer.prompt_ids[0]).endswith(" no thoughts")


def test_a_saved_datasets_dataset_with_a_messages_column_loads_as_chat_prompts(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": CHAT, "answer": str(i)} for i in range(3)]).save_to_disk(tmp_path / "d")
    prompts = normalize_prompts(load_prompts(f"datasets:{tmp_path / 'd'}"))
    assert [p.prompt for p in prompts] == [CHAT] * 3 and [p.metadata for p in prompts] == [{"answer": "0"},
                                                                                          {"answer": "1"},
                                                                                          {"answer": "2"}]


def test_a_long_conversation_keeps_its_end_and_drops_its_earliest_messages(chat_tokenizer):
    """A rendered conversation over the limit keeps its generation prompt: whole earliest messages
    go first (the system message stays while it can), and the warning says so."""
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the quick brown fox " * 3},
            {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "over what?"}]
    text = "plain text that is long enough to be cut on the right, as trlx cuts it"
    prompts = normalize_prompts([chat, text])
    with pytest.warns(UserWarning, match=r"earliest messages"):
        ids = tokenize_prompts(prompts, chat_tokenizer, 40)
    kept = chat_tokenizer.apply_chat_template([chat[0], chat[3]], add_generation_prompt=True, tokenize=False)
    assert kept.endswith("<|bos|>a:") and "over what?" in kept and "be kind" in kept
    assert ids[0] == chat_tokenizer(kept, add_special_tokens=False).input_ids and len(ids[0]) <= 40
    assert chat_tokenizer.decode(ids[1]) == text[:40]  # plain text keeps trlx's truncation side


def test_a_single_message_too_long_is_cut_from_the_left(chat_tokenizer):
    chat = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 3}]
    with pytest.warns(UserWarning, match=r"cut from the left"):
        ids = tokenize_prompts(normalize_prompts([chat]), chat_tokenizer, 24)
    full = chat_tokenizer(render_prompt(normalize_prompts([chat])[0], chat_tokenizer), add_special_tokens=False)
    assert ids[0] == full.input_ids[-24:]  # the end, generation prompt included
