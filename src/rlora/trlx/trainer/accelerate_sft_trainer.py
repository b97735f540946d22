"""trlx's `trlx.trainer.accelerate_sft_trainer`: `SFTConfig` imports, and refuses when built (`unsupported.SFT`)."""

from rlora.trlx.unsupported import SFT, refused_class

SFTConfig = refused_class("SFTConfig", SFT, __name__)

__all__ = ["SFTConfig"]
