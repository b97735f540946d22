"""One object per method family, chosen once by `method.name` (docs/design.md §6): what the
loop in `rlora.trainer` asks of a method is `rlora.methods.base.Method`; `PPO` and the group
methods (`GroupMethod`) answer it. A new loss of the group family is a row of
`rlora.algo.loss_types`; a new family is a `Method` here and a config section."""

from rlora.methods.base import Layout, Method, Passes
from rlora.methods.draws import DynamicSampling, EveryDraw
from rlora.methods.group import GroupMethod
from rlora.methods.ppo import PPO

FAMILIES = {"ppoconfig": PPO, "grpoconfig": GroupMethod}  # method.name (any case) -> its object


def build_method(section, batch_size: int) -> Method:
    """The method object of a config's method section; `batch_size` is the global `train.batch_size`."""
    return FAMILIES[section.name.lower()](section, batch_size)


__all__ = ["DynamicSampling", "EveryDraw", "FAMILIES", "GroupMethod", "Layout", "Method", "PPO", "Passes",
           "build_method"]
