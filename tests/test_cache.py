"""rlora's cache directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlora.cache import cache_root


@pytest.mark.parametrize("env, expected", [({"RLORA_CACHE": "/x/rl"}, "/x/rl"),
                                           ({"XDG_CACHE_HOME": "/x/xdg"}, "/x/xdg/rlora"),
                                           ({"HOME": "/x/home"}, "/x/home/.cache/rlora")],
                         ids=["rlora-cache", "xdg", "home"])
def test_cache_root(monkeypatch, env, expected):
    for name in ("RLORA_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cache_root() == Path(expected)
