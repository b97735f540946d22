"""trlx's `trlx.data`: `configs` (TRLConfig and its sections) and `default_configs`."""

from rlora.trlx.data import configs, default_configs

__all__ = ["configs", "default_configs"]
