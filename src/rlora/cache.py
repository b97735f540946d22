"""Where rlora keeps what it downloads or builds once (`rlora fetch`'s models, the demo's SFT model)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """rlora's cache directory: `$RLORA_CACHE`, else `$XDG_CACHE_HOME/rlora`, else `~/.cache/rlora`."""
    if os.environ.get("RLORA_CACHE"):
        return Path(os.environ["RLORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlora"
