"""Tiny models and a character tokenizer built in code: no downloads, seconds to create.

Used by the tests, the demo and the benchmarks. A real Hugging Face model replaces them by
passing `model.model_path` / `tokenizer.tokenizer_path` in the config.
"""

from __future__ import annotations

import string

from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
DEFAULT_ALPHABET = string.ascii_lowercase + " .,!?"
# "opt_proj" is OPT with `word_embed_proj_dim != hidden_size` (the opt-350m shape: project_in/out)
ARCHITECTURES = ("gpt2", "llama", "gpt_neox", "opt", "opt_proj", "bloom", "qwen2", "gemma")


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of `alphabet`.

    Ids: 0 pad, 1 bos, 2 eos, then the characters in order, then unk for anything else.
    Encoding adds no special tokens; decoding joins characters with nothing between them.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet {alphabet!r} repeats characters; give each character once")
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    vocab[UNK] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, BOS, EOS, UNK])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
    )


def agent_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer for chat and tool calls: letters, digits and JSON's punctuation, ChatML's
    `<|im_start|>` / `<|im_end|>` as special tokens, and rlora's tool-rendering ChatML template."""
    from rlora.tools import HERMES_TOOL_TEMPLATE

    tok = char_tokenizer(string.ascii_letters + string.digits + " .,!?\n{}\":<>_/[]'-=()")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = HERMES_TOOL_TEMPLATE
    return tok


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4,
                max_positions: int = 128, pad_token_id: int | None = 0, bos_token_id: int = 1,
                eos_token_id: int = 2, initializer_range: float = 0.3) -> PretrainedConfig:
    """A small random-init config of one of the `ARCHITECTURES`, dropout off unless set later.

    `initializer_range` is larger than Hugging Face's 0.02: at hidden size 32 that default gives
    logits within about ±0.5, a nearly uniform model that no adapter can move far (with tied
    embeddings, LoRA on the attention cannot lift one token above p ~ 0.06). Trained models have
    logits spread over several units; 0.3 gives a random model a comparable spread.
    """
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
               initializer_range=initializer_range)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers,
                          n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                           max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             max_position_embeddings=max_positions, **ids)
    if arch in ("opt", "opt_proj"):
        return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=max_positions,
                         word_embed_proj_dim=hidden if arch == "opt" else hidden // 2,
                         do_layer_norm_before=arch == "opt", dropout=0.0, attention_dropout=0.0, **ids)
    if arch == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=hidden, n_layer=layers, n_head=heads,
                           hidden_dropout=0.0, attention_dropout=0.0, **ids)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                           max_position_embeddings=max_positions, tie_word_embeddings=True, **ids)
    if arch == "gemma":
        return GemmaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                           head_dim=hidden // heads, max_position_embeddings=max_positions, **ids)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def tiny_model(arch: str = "gpt2", tokenizer: PreTrainedTokenizerFast | None = None, **config_kwargs):
    """A random-init causal LM of `arch` sized for `tokenizer` (a `char_tokenizer()` by default)."""
    tokenizer = tokenizer or char_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_kwargs)
    return AutoModelForCausalLM.from_config(config)


def tiny_ppo_config(model_dir: str, run_dir: str, **sections: dict) -> dict:
    """A config for seconds-long PPO runs on a tiny model: 16 rollouts per phase from chunks
    of 8, batch 8 in microbatches of 4, 2 PPO epochs (4 optimizer steps a phase), 6 new tokens,
    LoRA r=4. `sections` update the sections, e.g. `train={"total_steps": 8}`."""
    config = {
        "train": {"seq_length": 32, "batch_size": 8, "minibatch_size": 4, "total_steps": 4, "eval_interval": 1000,
                  "checkpoint_interval": 1000, "run_dir": run_dir, "seed": 7},
        "model": {"model_path": model_dir, "peft_config": {"peft_type": "LORA", "r": 4, "lora_alpha": 16,
                                                           "lora_dropout": 0.5}},
        "method": {"num_rollouts": 16, "chunk_size": 8, "ppo_epochs": 2, "init_kl_coef": 0.05,
                   "gen_kwargs": {"max_new_tokens": 6, "top_k": 0, "top_p": 1.0, "do_sample": True}},
        "optimizer": {"name": "adamw", "kwargs": {"lr": 1e-2}},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def tiny_group_config(model_dir: str, run_dir: str, **sections: dict) -> dict:
    """`tiny_ppo_config` for the group methods: 16 completions a phase as 4 prompts × 4
    (num_generations), generated at once; batch 8 in microbatches of 4, 2 epochs (4 optimizer
    steps a phase), 6 new tokens, LoRA r=4, GRPO's advantages with DAPO's loss."""
    config = tiny_ppo_config(model_dir, run_dir)
    config["method"] = {"name": "GRPOConfig", "num_rollouts": 16, "num_generations": 4, "chunk_size": 16,
                        "ppo_epochs": 2, "gen_kwargs": {"max_new_tokens": 6, "top_k": 0, "top_p": 1.0,
                                                        "do_sample": True}}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def random_experience(n: int, prompt_len: int, response_len: int, vocab_size: int, seed: int = 1):
    """A fixed PPO batch with every token real (equal lengths), for timing and invariance checks:
    random token ids in [3, vocab_size), old logprobs in (-3, 0], normal values/advantages/returns."""
    import torch

    from rlora.rollout.store import Experience

    g = torch.Generator().manual_seed(seed)
    n, p, r = n, prompt_len, response_len
    return Experience(torch.randint(3, vocab_size, (n, p), generator=g), torch.ones(n, p, dtype=torch.bool),
                      torch.randint(3, vocab_size, (n, r), generator=g), torch.ones(n, r, dtype=torch.bool),
                      logprobs=-torch.rand(n, r, generator=g) * 3, values=torch.randn(n, r, generator=g),
                      advantages=torch.randn(n, r, generator=g), returns=torch.randn(n, r, generator=g),
                      ref_logprobs=-torch.rand(n, r, generator=g) * 3, loss_mask=torch.ones(n, r, dtype=torch.bool))
