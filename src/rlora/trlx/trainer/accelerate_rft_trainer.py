"""trlx's `trlx.trainer.accelerate_rft_trainer`: `RFTConfig` imports, and refuses when built (`unsupported.RFT`)."""

from rlora.trlx.unsupported import RFT, refused_class

RFTConfig = refused_class("RFTConfig", RFT, __name__)

__all__ = ["RFTConfig"]
