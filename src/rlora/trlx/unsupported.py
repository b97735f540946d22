"""trlx's names for what rlora does not implement: ILQL, RFT, the SFT trainer and NeMo.

A trlx script imports them at its top (`from trlx.data.default_configs import ILQLConfig`), so
they import here too; calling one raises `NotImplementedError` saying what rlora offers instead.
The refusal comes where the script uses the name, not as a bare `ImportError` at its import.
"""

from __future__ import annotations

from typing import Any, Callable, NoReturn

ILQL = ("rlora implements online PPO only, not trlx's ILQL. Score samples online with a reward_fn and use "
        "default_ppo_config(), or train a reward adapter from preference pairs with `rlora rm`")
RFT = ("rlora does not implement trlx's RFT (rejection-sampling fine-tuning: generate, keep the best-scored "
       "samples, fine-tune on them). Its online counterpart here is a group method, which learns from several "
       "scored completions per prompt: method.name GRPOConfig (README, Methods); or fine-tune on samples you "
       "filtered with `rlora sft`")
SFT = ("rlora's supervised fine-tuning is not a trlx.train trainer; run `rlora sft --model DIR --data texts.jsonl "
       "--out DIR` (rlora.sft.sft from Python), then PPO from its output")
NEMO = ("rlora does not implement trlx's NeMo-Megatron trainers; it trains Hugging Face transformers models, in one "
        "process or several (`accelerate launch`). Use default_ppo_config() with a model directory")


def refused_class(name: str, reason: str, module: str) -> type:
    """A class named `name` whose construction raises `NotImplementedError(f"{name}: {reason}")`."""

    def __new__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"{name}: {reason}")

    return type(name, (), {"__new__": __new__, "__module__": module, "__doc__": f"Not available: {reason}."})


def refused_function(name: str, reason: str, module: str) -> Callable[..., NoReturn]:
    """A function named `name` that raises `NotImplementedError(f"{name}: {reason}")` when called."""

    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"{name}: {reason}")

    refused.__name__ = refused.__qualname__ = name
    refused.__module__, refused.__doc__ = module, f"Not available: {reason}."
    return refused


__all__ = ["ILQL", "RFT", "SFT", "NEMO", "refused_class", "refused_function"]
