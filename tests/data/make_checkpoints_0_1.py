"""Writes the checkpoints of `tests/data/checkpoints-0.1/`, run once with rlora at commit 3d533dd
(the release before the run state became `rlora.state.RunState`), so that today's code is tested
against checkpoints an older rlora wrote:

    git worktree add /tmp/old 3d533dd
    PYTHONPATH=/tmp/old/src python tests/data/make_checkpoints_0_1.py tests/data/checkpoints-0.1

Each run stops mid-phase (a pending phase with its experience); the dynamic-sampling one also holds
groups drawn beyond its phase's need, which that version kept for the next phase.
"""

import os
import shutil
import sys
import tempfile

import torch

import rlora
from rlora.tiny import char_tokenizer, tiny_group_config, tiny_model, tiny_ppo_config

PROMPTS = ["hello", "abc", "xyz", "the "]


def reward(samples, prompts, outputs, tokenizer, **_):
    return [1.0 if p == "abc" else o.count("s") + len(o) / 10 for p, o in zip(prompts, outputs)]


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = tempfile.mkdtemp()
    tokenizer = char_tokenizer()
    torch.manual_seed(1234)  # as tests/conftest.py's tiny_model_dir("gpt2")
    tiny_model("gpt2", tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    runs = {"ppo": tiny_ppo_config(model, "", train={"total_steps": 6}),
            "dapo": tiny_group_config(model, "", train={"total_steps": 3},
                                      method={"dynamic_sampling": True, "chunk_size": 16, "beta": 0.1})}
    for name, config in runs.items():
        run_dir = tempfile.mkdtemp()
        config["train"]["run_dir"] = run_dir
        trainer = rlora.train(reward, PROMPTS, config=config, verbose=False)
        shutil.copytree(os.path.join(run_dir, "ckpts", f"step_{trainer.step}"), os.path.join(out, name))
        shutil.rmtree(os.path.join(out, name, "tokenizer"))  # the tests' own tokenizer is the same


if __name__ == "__main__":
    main(sys.argv[1])
