"""trlx's `trlx.models.modeling_ilql`: `ILQLConfig` imports, and refuses when built (`unsupported.ILQL`)."""

from rlora.trlx.unsupported import ILQL, refused_class

ILQLConfig = refused_class("ILQLConfig", ILQL, __name__)

__all__ = ["ILQLConfig"]
