"""Activation functions of a Hugging Face model, run cheaper: fused where torch has one kernel
for the same function, recomputed in backward where a Python-composed one would keep much.

Both replace modules in place (`setattr` on their parents) and leave the model's config alone, so
what is saved or exported is the model as loaded.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

RECOMPUTE_MIN_ELEMENTS = 1 << 20  # elements of activation input


def _transformers_activations() -> tuple[type, ...]:
    from transformers import activations

    return tuple(c for c in vars(activations).values()
                 if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == activations.__name__)


def _single_kernel(act: nn.Module) -> bool:
    """Whether a transformers activation module is one torch kernel, keeping only its input for
    backward: its GELU with torch's `gelu` (exact or tanh), its SiLU and Mish, and the identity."""
    from transformers import activations

    if isinstance(act, (activations.SiLUActivation, activations.LinearActivation)):
        return True
    if isinstance(act, (activations.GELUActivation, activations.GELUTanh, activations.MishActivation)):
        return getattr(act.act, "__self__", None) is not act  # not a Python method of its own
    return False


def _replace(module: nn.Module, wanted, make) -> int:
    """Swap each child of any module inside `module` for which `wanted(child)` holds with `make(child)`."""
    targets = [(parent, name, child) for parent in module.modules()
               for name, child in parent.named_children() if wanted(child)]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)


def fuse_activations(module: nn.Module) -> int:
    """Run each tanh-approximated GELU that transformers composes of Python ops (`gelu_new`, as
    GPT-2 and GPT-J use, and `gelu_fast`) as torch's one kernel, `gelu(approximate="tanh")`
    (transformers' `GELUTanh`, its `gelu_pytorch_tanh`); returns how many.

    The same function, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), to float rounding (at
    most 2.4e-7 apart on N(0, 1) inputs in fp32), as transformers' own docs say of `GELUTanh`.
    `gelu_new` is eight elementwise ops forward and more backward, and keeps four tensors of the
    MLP's width for it; the kernel keeps its input. Swapped before the frozen copies are made
    (hydra, full fine-tuning), every role computes the same function.
    """
    from transformers import activations

    python_tanh_gelu = (activations.NewGELUActivation, activations.FastGELUActivation)
    return _replace(module, lambda child: type(child) in python_tanh_gelu, lambda child: activations.GELUTanh())


class Recomputed(nn.Module):
    """An activation function that keeps only its input for backward and recomputes itself there
    (`torch.utils.checkpoint`): the same values and gradients, bitwise.

    Inputs under `RECOMPUTE_MIN_ELEMENTS` run as usual: what they would keep is small and the
    checkpoint's overhead is not (a randomwalks step's are under it, a GPT-2-124M microbatch's
    over it; BENCHMARKS.md, one-off measurements).
    """

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and x.numel() >= RECOMPUTE_MIN_ELEMENTS:
            return checkpoint(self.act, x, use_reentrant=False)
        return self.act(x)  # no-grad passes (generation, rollout pass, reference) and small inputs


def recompute_activations(module: nn.Module) -> int:
    """Wrap each Hugging Face activation module inside `module` that is composed of several
    elementwise ops in `Recomputed`; returns how many.

    Each of its ops keeps a full-size tensor for backward: GPT-2's `gelu_new` (with
    `model.fused_activations` off) keeps four (b, t, 4h) tensors per block, the largest share of
    a small model's activation memory. Recomputing them costs a few elementwise ops. Hugging Face's gradient
    checkpointing cannot do this here: it recomputes whole blocks, and only in train mode, while
    PPO runs in eval mode. Single kernels (torch's own modules, and transformers' that
    `_single_kernel` names) keep only their input anyway and stay as they are.
    """
    classes = _transformers_activations()

    def wanted(child: nn.Module) -> bool:
        return (isinstance(child, classes) and not _single_kernel(child)
                and not any(True for _ in child.parameters())
                and not any(True for _ in child.buffers()))  # wrapping would rename their weights

    already = {id(m.act) for m in module.modules() if isinstance(m, Recomputed)}
    return _replace(module, lambda child: wanted(child) and id(child) not in already, Recomputed)
