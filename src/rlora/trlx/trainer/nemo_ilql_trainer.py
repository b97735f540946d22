"""trlx's `trlx.trainer.nemo_ilql_trainer`: its names import, and refuse when used (`unsupported.NEMO`)."""

from rlora.trlx.unsupported import NEMO, refused_class, refused_function

ILQLGPT = refused_class("ILQLGPT", NEMO, __name__)
megatron_trainer = refused_function("megatron_trainer", NEMO, __name__)

__all__ = ["ILQLGPT", "megatron_trainer"]
