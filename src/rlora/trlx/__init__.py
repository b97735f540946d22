"""A stand-in for CarperAI trlx's PPO surface: `import rlora.trlx as trlx`.

`trlx.train(...)` keeps trlx 0.7's signature and online semantics; `rlora.trlx.data.configs` and
`rlora.trlx.data.default_configs` hold `TRLConfig`, the section classes and
`default_ppo_config()`; `rlora.trlx.models.modeling_ppo` holds `PPOConfig`. A trlx config is an
`rlora.Config`; the README's "Coming from trlx" section lists what differs on purpose and what is
not supported. ILQL, RFT, SFT and NeMo names import from their trlx modules and refuse with the
reason when used (`rlora.trlx.unsupported`).
"""

from rlora.trlx import data
from rlora.trlx.api import train

__all__ = ["train", "data"]
