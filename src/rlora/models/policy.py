"""The policy: one frozen base model serving every PPO role.

| mode     | policy                                  | reference (KL)                          |
|----------|-----------------------------------------|-----------------------------------------|
| adapter  | base + trainable peft adapter (LoRA...) | same module, adapters disabled          |
| prompt   | base + virtual tokens (prompt/prefix)   | base without virtual tokens             |
| hydra    | top N blocks (+ norm, lm_head) trained  | frozen copy of the top, fed from h[-(N+1)] |
| full     | whole model trained                     | a separate frozen copy                  |

The value head sits on the trunk's last hidden state in every mode. In adapter mode two more
roles can share the base as named peft adapters beside the policy's ("default"):
- a critic adapter (`VALUE`): the value head reads the trunk run with only that adapter on;
- a reward adapter (`REWARD`) with a score head: frozen, it scores finished rollouts.

Notation: `b` batch, `t` time, `h` width of the hidden states (`hidden_width`), `v` vocabulary.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from rlora.models.activations import recompute_activations
from rlora.models.hydra import HydraBranch, find_decoder_blocks
from rlora.models.lm_head import head_is_plain
from rlora.models.quantization import is_quantized
from rlora.models.score_head import sequence_scores
from rlora.models.shared_prefix import can_share_prefix, repeated_prompt_cache
from rlora.models.trunk import hidden_width, last_hidden_state, position_ids_from_mask
from rlora.models.value_head import ValueHead

MODES = ("adapter", "prompt", "hydra", "full")
POLICY, VALUE, REWARD, REFERENCE = "default", "value", "reward", "reference"  # peft adapter names of the roles


@dataclass
class PolicyOutput:
    """What one policy forward gives: logits, values and the trunk's hidden states."""

    logits: torch.Tensor | None  # (b, t, v), virtual-token positions removed; (b, k, v) with `logits_to_keep`;
    # None with `head=False`
    values: torch.Tensor | None  # (b, t), fp32; None without a value head (group methods)
    hidden_states: tuple[torch.Tensor, ...]  # each (b, t, h) of the policy's pass


def _mergeable(layer: nn.Module, shared: set[int]) -> bool:
    """Whether merging the policy adapter into the peft `layer` leaves the model's function
    unchanged: not when its base holds a parameter in `shared` (ids of tied parameters), nor
    with a LoRA bias over a base without one."""
    base = layer.get_base_layer()
    lora_bias = getattr(layer, "lora_bias", {}).get(POLICY, False)
    return not ({id(p) for p in base.parameters()} & shared) and not (lora_bias and getattr(base, "bias", None) is None)


def contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """A forward pre-hook for the language-model head: its input made contiguous.

    transformers feeds the head `hidden[:, -1:, :]` on a prompt's first decode step, a strided
    view, and torch's CPU `linear` on a strided 3-D input expands the weight to a batched
    matmul, a copy of the whole head's weight per call (BENCHMARKS.md, one-off measurements).
    The copy made here is of the few rows the head reads."""
    return (args[0].contiguous(), *args[1:]) if args else args


@contextmanager
def no_padding_check(model: nn.Module) -> Iterator[None]:
    """transformers' padding check off in `model`'s submodules while it samples.

    `generate` drops an attention mask of all ones (unpadded prompts) and feeds each row that has
    finished its pad id; the check (`warn_if_padding_and_no_attention_mask`) then takes those for
    padding run without a mask and warns, although nothing is padded. Every pass of rlora's gives
    its mask, so the check has nothing to find there either."""
    from transformers import PreTrainedModel

    modules = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for m in modules:
        m.warn_if_padding_and_no_attention_mask = _no_check
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("warn_if_padding_and_no_attention_mask", None)


def _no_check(*args, **kwargs) -> None:
    return None


class Policy(nn.Module):
    """A causal LM plus value head with a reference view, all on one base.

    Build it with `rlora.models.build_policy` from a config; this class only wires roles.
    """

    def __init__(self, lm: nn.Module, mode: str, num_layers_unfrozen: int = -1, value_head: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown policy mode {mode!r}; expected one of {MODES}")
        self.lm = lm
        self.mode = mode
        head = self.base_model.get_output_embeddings()
        if head is not None:  # before the frozen copies below, which keep it
            head.register_forward_pre_hook(contiguous_input)
        # group methods have no critic: no value head, and `values` is None
        self.value_head = ValueHead(hidden_width(self.base_model)).to(self.base_model.device) if value_head else None
        self.reward_head: nn.Module | None = None  # a ScoreHead, set with a reward adapter
        self.hydra: HydraBranch | None = None
        self.ref_model: nn.Module | None = None
        self._plain_head: bool | None = None  # `head_is_plain(lm)`, found at the first `chunked_head()`
        if mode == "hydra":
            self._unfreeze_top(num_layers_unfrozen)
            self.hydra = HydraBranch(self.lm, num_layers_unfrozen)
        elif mode == "full":
            self.lm.requires_grad_(True)
            self.ref_model = copy.deepcopy(self.lm).requires_grad_(False).eval()
        recompute_activations(self.lm)  # after the frozen copies above, which never run backward

    @property
    def base_model(self) -> nn.Module:
        """The plain Hugging Face model underneath (shared by every role)."""
        return self.lm.get_base_model() if self.is_peft else self.lm

    @property
    def is_peft(self) -> bool:
        return self.mode in ("adapter", "prompt")

    @property
    def has_value_adapter(self) -> bool:
        return self.mode == "adapter" and VALUE in self.lm.peft_config

    @property
    def has_reference_adapter(self) -> bool:
        """Whether the reference is a frozen copy of the starting adapter (`model.reference: adapter`)."""
        return self.mode == "adapter" and REFERENCE in self.lm.peft_config

    @property
    def has_reward_adapter(self) -> bool:
        return self.mode == "adapter" and REWARD in self.lm.peft_config and self.reward_head is not None

    @contextmanager
    def use_adapter(self, name: str) -> Iterator[None]:
        """Within this block only the peft adapter `name` acts; the policy's is active again on
        exit, also when the block raises.

        peft's `set_adapter` also makes the chosen adapter trainable and the others frozen; the
        `requires_grad` of every parameter is restored here, so switching never changes what
        trains.
        """
        with self._keeping_requires_grad():
            self.lm.set_adapter(name)
            try:
                yield
            finally:
                self.lm.set_adapter(POLICY)

    @contextmanager
    def _keeping_requires_grad(self) -> Iterator[None]:
        """Every parameter's `requires_grad` as it was on entry, on exit (also when raising).

        peft's adapter toggles reset them: `set_adapter` and leaving `disable_adapter` make the
        active adapter trainable and every other adapter (the critic's too) frozen.
        """
        trainable = [p.requires_grad for p in self.lm.parameters()]
        try:
            yield
        finally:
            for p, flag in zip(self.lm.parameters(), trainable):
                p.requires_grad_(flag)

    def _unfreeze_top(self, n: int) -> None:
        """Hydra: train the top `n` blocks, the final norm beside them and an untied lm_head."""
        self.lm.requires_grad_(False)
        decoder, _, blocks = find_decoder_blocks(self.lm)
        blocks[-n:].requires_grad_(True)
        for name, child in decoder.named_children():
            # LayerNorm, LlamaRMSNorm, ...; not one on the input embeddings (Bloom's
            # word_embeddings_layernorm), which acts below the frozen bottom
            if "norm" in type(child).__name__.lower() and "emb" not in name:
                child.requires_grad_(True)
        head = self.lm.get_output_embeddings()
        if head is not None and head.weight is not self.lm.get_input_embeddings().weight:
            head.requires_grad_(True)

    def chunked_head(self) -> bool:
        """Whether a pass over responses may run the language-model head itself, a chunk of
        positions at a time (`rlora.models.lm_head`): in adapter and full modes, on a model whose
        head is plain (`head_is_plain`, found once by running the model: call this first on the
        whole model, or inside a pass under sharding). Not under ZeRO-3, which gathers a module's
        weights at each call: the processes, whose completions differ in length, would run
        different numbers of chunks, and so of gathers."""
        weight = getattr(self.base_model.get_output_embeddings(), "weight", None)
        if self.mode not in ("adapter", "full") or hasattr(weight, "ds_tensor"):  # ds_tensor: ZeRO-3's partition
            return False
        if self._plain_head is None:
            self._plain_head = head_is_plain(self.lm)
        return self._plain_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, logits_to_keep: torch.Tensor | None = None,
                head: bool = True) -> PolicyOutput:
        """Policy logits and values in one pass.

        `logits_to_keep` (k,) names the positions whose logits are needed: the language-model
        head then runs on those only (Hugging Face's `logits_to_keep`), not on every position.
        `head=False` runs it nowhere (logits None): the caller applies it to `hidden_states[-1]`
        (`chunked_head`).
        Shape: input_ids, attention_mask (b, t) -> logits (b, t or k, v), values (b, t).
        """
        if not head and not self.chunked_head():
            raise ValueError(f"head=False in {self.mode} mode or on a model whose logits are not its head applied to "
                             "its last hidden state; run the head (head=True)")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      use_cache=False)
        if not head:
            logits_to_keep = torch.empty(0, dtype=torch.long, device=input_ids.device)
        if self.mode != "prompt":  # peft's prompt learning builds its own positions
            kwargs["position_ids"] = position_ids
            if logits_to_keep is not None:
                kwargs["logits_to_keep"] = logits_to_keep
        out = self.lm(**kwargs)
        n_virtual = out.hidden_states[-1].shape[1] - input_ids.shape[1]  # prompt tuning prepends virtual tokens
        hidden_states = tuple(h[:, n_virtual:] for h in out.hidden_states)
        logits = out.logits if head else None
        if self.mode == "prompt":
            logits = logits[:, n_virtual:] if logits_to_keep is None else logits[:, n_virtual + logits_to_keep]
        if self.value_head is None:
            return PolicyOutput(logits=logits, values=None, hidden_states=hidden_states)
        if self.has_value_adapter:  # the critic's own pass: only the value adapter on, no LM head
            with self.use_adapter(VALUE):
                value_hidden = last_hidden_state(self.lm, input_ids, attention_mask, position_ids)
        else:
            value_hidden = hidden_states[-1]
        return PolicyOutput(logits=logits, values=self.value_head(value_hidden), hidden_states=hidden_states)

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Within this block, the yielded module is the frozen reference model.

        Adapter and prompt modes disable the adapters of the one shared module and enable them
        again on exit, also when the block raises; with a reference adapter (a frozen copy of the
        starting adapter) that adapter acts instead. Hydra yields nothing callable on its own (use
        `reference_logits`); full mode yields the frozen copy.
        """
        if self.has_reference_adapter:
            with self.use_adapter(REFERENCE):
                yield self.lm
        elif self.is_peft:
            with self._keeping_requires_grad(), self.lm.disable_adapter():
                yield self.lm
        else:
            yield self.ref_model if self.mode == "full" else self.lm

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor | None = None,
                         policy_output: PolicyOutput | None = None,
                         logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the frozen reference model, at `logits_to_keep` positions when given.

        Hydra reuses `policy_output.hidden_states` when given (else runs the shared trunk).
        Shape: input_ids, attention_mask (b, t) -> (b, t or k, v).
        """
        keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        if self.mode == "hydra":
            if policy_output is None:
                policy_output = self.forward(input_ids, attention_mask, position_ids)
            hidden = policy_output.hidden_states[-(self.hydra.num_layers + 1)]
            return self.hydra(hidden, attention_mask, position_ids, **keep)
        with self.reference() as ref:
            return ref(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **keep).logits

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters PPO updates: adapter (+ modules_to_save) or unfrozen blocks, the value
        head, and the critic adapter when there is one."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward adapter's score of each right-padded row, read at its last real token.

        Shape: input_ids, attention_mask (b, t) -> (b,) fp32.
        """
        if not self.has_reward_adapter:
            raise RuntimeError("this policy has no reward adapter; set model.reward_adapter")
        with self.use_adapter(REWARD):
            return sequence_scores(self.lm, self.reward_head, input_ids, attention_mask)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config=None,
                 merged: bool = False, num_generations: int = 1, dtype: torch.dtype | None = None,
                 **kwargs) -> torch.Tensor:
        """Sample continuations with the policy. Shape: (b, t) -> (b * num_generations, t + new).

        - `generation_config` is the whole of the settings: while it runs it stands in for the
          model's own `generation_config`, which transformers would otherwise draw unset values
          from (a checkpoint's temperature, repetition_penalty, top_k, ...).
        - `merged` generates with the adapter merged into the base weights, `dtype` with the
          weights in that precision (`generation_weights`); the model trains on its own after.
        - `num_generations` G samples each row G times; the G rows of a prompt are contiguous.
          Where `rlora.models.shared_prefix.can_share_prefix` allows it, every prompt token but
          the last runs once through the trunk (no language-model head) into a KV cache repeated
          to the G rows, and `generate` continues from it: it runs the last prompt token and
          samples exactly as on repeated rows (the same logits processors, stop ids and padding;
          positions come from the full attention mask). Otherwise each row is repeated G times
          before `generate`.
        - Prompt tuning puts the virtual tokens after each row's left padding, `[pad | virtual |
          prompt]`, so that positions count as in the scoring passes (`[virtual | prompt | ...]`,
          see `rlora.rollout.forward.pack_sequences`); peft's own generate would give
          `[virtual | pad | prompt]`.
        """
        if num_generations < 1:
            raise ValueError(f"num_generations={num_generations}; sample at least one continuation per prompt "
                             "(num_generations >= 1)")
        if (merged or dtype is not None) and kwargs.get("synced_gpus"):
            raise ValueError("merged or recast generation weights (merge_adapter_for_generation, "
                             f"model.generation_dtype={dtype}) cannot run on ZeRO-3's sharded parameters; turn them "
                             "off under ZeRO stage 3")
        shared = can_share_prefix(self, num_generations, input_ids, generation_config=generation_config,
                                  generate_kwargs=kwargs)
        if num_generations > 1 and not shared:
            input_ids = input_ids.repeat_interleave(num_generations, 0)  # (b * G, t)
            attention_mask = attention_mask.repeat_interleave(num_generations, 0)
        base = self.base_model
        saved = base.generation_config
        if generation_config is not None:
            base.generation_config = generation_config
        try:
            with self.generation_weights(merged, dtype), no_padding_check(base):
                if shared:  # all but the last prompt token through the trunk once; generate runs the last
                    cache, _ = repeated_prompt_cache(base.base_model, input_ids[:, :-1], attention_mask[:, :-1],
                                                     num_generations, base.config.get_text_config(decoder=True))
                    return self.lm.generate(input_ids=input_ids.repeat_interleave(num_generations, 0),
                                            attention_mask=attention_mask.repeat_interleave(num_generations, 0),
                                            past_key_values=cache, generation_config=generation_config, **kwargs)
                if self.mode == "prompt" and not self.lm.active_peft_config.peft_type == "PREFIX_TUNING":
                    return self._generate_after_virtual_tokens(input_ids, attention_mask, generation_config, **kwargs)
                return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        generation_config=generation_config, **kwargs)
        finally:
            base.generation_config = saved

    def _shared_parameters(self) -> set[int]:
        """ids of the parameters that more than one module of the language model holds (tied)."""
        seen, shared = set(), set()
        for _, p in self.lm.named_parameters(remove_duplicate=False):
            (shared if id(p) in seen else seen).add(id(p))
        return shared

    def _generate_after_virtual_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                       generation_config, **kwargs) -> torch.Tensor:
        """Prompt tuning's generate with rows laid out `[pad | virtual | prompt]`, from peft's own
        virtual-token embeddings. Shape: (b, t) -> (b, t + new)."""
        b, t = input_ids.shape
        embeds = self.lm.word_embeddings(input_ids)  # (b, t, h)
        virtual = self.lm.get_prompt(batch_size=b).to(embeds.dtype)  # (b, n, h)
        n = virtual.shape[1]
        n_pad = (t - attention_mask.sum(1))[:, None]  # (b, 1)
        j = torch.arange(n + t, device=input_ids.device)[None, :]  # (1, n + t) positions of the new rows
        # index into cat([virtual, embeds]): padding first, then the virtual tokens, then the prompt
        index = torch.where(j < n_pad, n + j, torch.where(j < n_pad + n, j - n_pad, j))  # (b, n + t)
        rows = torch.cat([virtual, embeds], 1).gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        mask = (j >= n_pad).long()  # (b, n + t)
        new = self.base_model.generate(inputs_embeds=rows, attention_mask=mask, generation_config=generation_config,
                                       **kwargs)  # new tokens only: no ids were given
        return torch.cat([input_ids, new], 1)

    @contextmanager
    def generation_weights(self, merge: bool = False, dtype: torch.dtype | None = None) -> Iterator[None]:
        """Within this block the language model samples on other weights than it trains on; on
        exit every parameter gets its own tensor back, bitwise.

        - `merge` (adapter mode): the policy's adapter is merged into its base layers, one matmul
          per layer instead of three. Each merged layer works on a copy of its base weight, so the
          frozen base is not unmerged by subtraction (whose round-off would break "reference ==
          base").
        - `dtype`: every parameter of the language model in `dtype` (the adapter merged in, as a
          copy is made anyway), e.g. a bfloat16 sampler over a float32 model: each decode step
          reads half the bytes, and CPUs with AVX-512 BF16 (and GPUs) multiply bf16 faster. A
          merged weight is formed in the model's precision and rounded once. Sampling then draws
          from the bf16 model's distribution, while the scoring passes give the float32 model's
          log-probs of the tokens drawn (as with a vLLM sampler).

        A layer whose merge would change the model stays unmerged and runs its adapter as usual:
        one whose base weight is tied to another module (an adapted `lm_head` or input embedding
        of a tied model, where merging would put the delta into both), or one with a LoRA bias
        over a base without a bias (which peft cannot merge). Extra memory inside the block: one
        base-layer copy at a time while merging, and the whole model once more in `dtype`.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        params = list(self.lm.parameters())  # each once: tied embeddings are one parameter
        cast = dtype is not None and self.base_model.dtype != dtype  # the adapters' own fp32 does not count
        if (merge or cast) and is_quantized(self.base_model):
            raise ValueError("merged or recast generation weights (merge_adapter_for_generation, generation_dtype) "
                             "would round the merged weights back to the quantized base's 4 (or 8) bits; turn them "
                             "off: the unmerged adapter samples on the quantized base")
        layers = []
        if (merge or cast) and self.mode == "adapter":
            shared = self._shared_parameters()
            layers = [m for m in self.lm.modules() if isinstance(m, BaseTunerLayer) and not m.merged
                      and any(POLICY in getattr(m, name) for name in m.adapter_layer_names)  # not critic/reward-only
                      and _mergeable(m, shared)]
        originals = [(p, p.data) for p in params]
        try:
            for layer in layers:
                base_params = list(layer.get_base_layer().parameters())
                for p in base_params:
                    p.data = p.data.clone()  # merge writes into this copy, not the frozen base
                layer.merge()
                for p in base_params if cast else ():
                    p.data = p.data.to(dtype)
            for p in params if cast else ():
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            yield
        finally:
            for p, data in originals:
                p.data = data
            for layer in layers:
                layer.merged_adapters.clear()
