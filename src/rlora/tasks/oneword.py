"""A chat task with a verifiable reward: "Name a fruit. Answer in one word."

Each prompt is a conversation for a chat model: one worked example (a user asks for a member of
another category, the assistant answers in one word), then the question. The answer is checked
by code: it must be one word (`one_word`, the format) and name a member of the asked category
(`in_category`, the correctness; word lists below). Both are written for TRL's `GRPOTrainer`
(`fn(completions, **kwargs)`) and combined with weights in `task.reward_weights`.

What the policy could hack, and what stops it:
- any single word ("Steroid") earns the format reward only: it is worth a quarter of a correct
  answer, so the best policy is still a right one;
- copying the worked example's answer is wrong: the example is always of another category, and
  no example word belongs to another category's list;
- one word for every question: the ten categories' lists overlap only in real double members
  (orange, lime, olive, peach, plum: fruit and color; tomato, squash, salmon, turkey), so no
  word is right for more than two of the ten;
- the category's own name ("Fruit."), lists, sentences or an empty answer score 0 for correctness.
A right answer missing from a list counts wrong: the lists are generous but finite.

How far PPO and GRPO take the base SmolLM2-135M-Instruct on the held-out questions is in the
README ("A chat task with a verifiable reward"). Under shared cores run it on one thread
(`RLORA_NUM_THREADS=1`): two threads beside another busy process run much slower than one.

    python -m rlora.tasks.oneword               # PPO on SmolLM2-135M-Instruct, prints before -> after
    python -m rlora.tasks.oneword --method grpo # GRPO, 8 completions per question, the same 10 phases
    python -m rlora.tasks.oneword --steps 8 optimizer.kwargs.lr=5e-4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import time
from collections.abc import Sequence
from typing import Any

from rlora.tasks.presets import GRPO_METHOD, METHODS, phase_steps, unknown_method

CATEGORIES: dict[str, tuple[str, frozenset[str]]] = {
    # name: (the phrase a question uses, the accepted answers, lowercase)
    "fruit": ("a fruit", frozenset(
        "apple apricot avocado banana blackberry blueberry cantaloupe cherry coconut cranberry currant date "
        "dragonfruit durian elderberry fig gooseberry grape grapefruit guava honeydew jackfruit kiwi kumquat lemon "
        "lime lychee mandarin mango mangosteen melon mulberry nectarine olive orange papaya passionfruit peach pear "
        "persimmon pineapple plum pomegranate pomelo quince raspberry starfruit strawberry tangerine tomato "
        "watermelon".split())),
    "vegetable": ("a vegetable", frozenset(
        "artichoke arugula asparagus bean beet beetroot broccoli cabbage carrot cauliflower celery chard chickpea "
        "cucumber eggplant aubergine fennel garlic kale leek lentil lettuce okra onion parsnip pea pepper potato "
        "pumpkin radish rhubarb rutabaga shallot spinach squash tomato turnip yam zucchini courgette corn "
        "sweetcorn".split())),
    "animal": ("an animal", frozenset(
        "aardvark alligator ant antelope ape baboon badger bat bear beaver bee bird bison buffalo butterfly camel "
        "cat cheetah chicken chimpanzee cow coyote crab crocodile crow deer dingo dog dolphin donkey duck eagle eel "
        "elephant elk ferret fish flamingo fox frog gazelle giraffe goat goose gorilla hamster hare hedgehog hippo "
        "hippopotamus horse hyena iguana jaguar jellyfish kangaroo koala lemur leopard lion lizard llama lobster "
        "lynx meerkat mole monkey moose mouse octopus orangutan ostrich otter owl ox panda panther parrot peacock "
        "pelican penguin pig pigeon platypus porcupine rabbit raccoon rat raven rhino rhinoceros salmon seal shark "
        "sheep skunk sloth snail snake sparrow spider squirrel swan tiger toad tortoise turkey turtle walrus wasp "
        "weasel whale wolf wombat yak zebra".split())),
    "color": ("a color", frozenset(
        "amber aqua azure beige black blue bronze brown burgundy charcoal coral crimson cyan emerald fuchsia gold "
        "golden gray grey green indigo ivory khaki lavender lilac lime magenta maroon mauve navy ochre olive orange "
        "peach pink plum purple red rose ruby salmon scarlet silver tan teal turquoise violet white yellow".split())),
    "country": ("a country", frozenset(
        "afghanistan albania algeria andorra angola argentina armenia australia austria azerbaijan bahamas bahrain "
        "bangladesh barbados belarus belgium belize benin bhutan bolivia botswana brazil brunei bulgaria burundi "
        "cambodia cameroon canada chad chile china colombia comoros congo croatia cuba cyprus czechia denmark "
        "djibouti dominica ecuador egypt eritrea estonia eswatini ethiopia fiji finland france gabon gambia georgia "
        "germany ghana greece grenada guatemala guinea guyana haiti honduras hungary iceland india indonesia iran "
        "iraq ireland israel italy jamaica japan jordan kazakhstan kenya kiribati kosovo kuwait kyrgyzstan laos "
        "latvia lebanon lesotho liberia libya liechtenstein lithuania luxembourg madagascar malawi malaysia "
        "maldives mali malta mauritania mauritius mexico micronesia moldova monaco mongolia montenegro morocco "
        "mozambique myanmar namibia nauru nepal netherlands nicaragua niger nigeria norway oman pakistan palau "
        "panama paraguay peru philippines poland portugal qatar romania russia rwanda samoa senegal serbia "
        "seychelles singapore slovakia slovenia somalia spain sudan suriname sweden switzerland syria taiwan "
        "tajikistan tanzania thailand togo tonga tunisia turkey turkmenistan tuvalu uganda ukraine uruguay usa "
        "uzbekistan vanuatu venezuela vietnam yemen zambia zimbabwe england scotland wales holland".split())),
    "planet": ("a planet", frozenset("mercury venus earth mars jupiter saturn uranus neptune".split())),
    "month": ("a month", frozenset(
        "january february march april may june july august september october november december".split())),
    "day": ("a day of the week", frozenset("monday tuesday wednesday thursday friday saturday sunday".split())),
    "sport": ("a sport", frozenset(
        "archery badminton baseball basketball biathlon bowling boxing canoeing cricket croquet curling cycling "
        "darts diving fencing football golf gymnastics handball hockey hurling judo karate kayaking lacrosse "
        "netball polo rowing rugby running sailing skateboarding skating skiing snooker snowboarding soccer "
        "softball squash surfing swimming taekwondo tennis triathlon volleyball wrestling weightlifting".split())),
    "instrument": ("a musical instrument", frozenset(
        "accordion bagpipes banjo bass bassoon bongo cello clarinet cymbal cymbals drum drums dulcimer flute "
        "glockenspiel gong guitar harmonica harp harpsichord horn kazoo keyboard lute lyre mandolin marimba oboe "
        "organ piano piccolo recorder saxophone sitar tambourine timpani triangle trombone trumpet tuba ukulele "
        "viola violin xylophone".split())),
}
# The worked example's answer per category: what the assistant says when the example asks for it
EXAMPLE_ANSWERS = {"fruit": "Apple", "vegetable": "Carrot", "animal": "Dog", "color": "Blue", "country": "France",
                   "planet": "Mars", "month": "April", "day": "Monday", "sport": "Tennis", "instrument": "Guitar"}
PHRASINGS = ("Name {}. Answer in one word.", "Name {}. Reply with a single word.", "Tell me {}. One word only.",
             "Give me the name of {}. Answer with one word.")
SYSTEM = "You are a helpful assistant."  # shorter than SmolLM2's default system prompt: 10 fewer tokens to score
HELD_OUT_PER_CATEGORY = 5  # held-out questions per category: 50 in all, never trained on
SPLIT_SEED = 0  # fixes which (category, phrasing, example) combinations are held out
REWARD_WEIGHTS = (1.0, 0.25)  # in_category, one_word

_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def _content(completion: Any, index: int) -> str:
    """The text of one completion: a string, or TRL's `[{"role": "assistant", "content": text}]`."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict) \
            and isinstance(completion[-1].get("content"), str):
        return completion[-1]["content"]
    raise TypeError(f"completions[{index}] = {completion!r:.80} is neither text nor a list of chat messages; "
                    "give each completion as text or [{'role': 'assistant', 'content': text}]")


def answer_word(text: str) -> str | None:
    """The one word `text` answers with, lowercase, or None when it is not a one-word answer.

    Around the word: whitespace, quotes or `*` emphasis, and one final `.` or `!` are allowed.
    A word is letters with inner hyphens ("dragon-fruit"); digits, spaces, commas are not.
    """
    word = text.strip().strip("\"'*`").strip()
    if word[-1:] in (".", "!"):
        word = word[:-1]
    word = word.strip("\"'*`").lower()
    return word if _WORD.fullmatch(word) else None


def names_member(word: str | None, category: str) -> bool:
    """True when `word` (from `answer_word`) is a member of `category`, singular or plural (+s, +es)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; the categories are {', '.join(CATEGORIES)}")
    if word is None:
        return False
    members = CATEGORIES[category][1]
    return word in members or (word.endswith("s") and word[:-1] in members) or \
        (word.endswith("es") and word[:-2] in members)


# ---------------------------------------------------------------------------------------------
# Reward functions (TRL's signature) and the metric (rlora's)
# ---------------------------------------------------------------------------------------------


def in_category(completions: Sequence[Any], category: Sequence[str], **kwargs) -> list[float]:
    """Correctness: 1.0 when the completion is one word naming a member of its prompt's category."""
    if len(completions) != len(category):
        raise ValueError(f"{len(completions)} completions but {len(category)} categories; give one category per "
                         "completion (the prompts' 'category' metadata)")
    return [float(names_member(answer_word(_content(c, i)), cat)) for i, (c, cat) in enumerate(zip(completions,
                                                                                                  category))]


def one_word(completions: Sequence[Any], **kwargs) -> list[float]:
    """Format: 1.0 when the completion is a single word (see `answer_word`), right or wrong."""
    return [float(answer_word(_content(c, i)) is not None) for i, c in enumerate(completions)]


def metric_fn(samples: Sequence[str] = (), prompts: Sequence[Any] = (), outputs: Sequence[str] = (),
              category: Sequence[str] = (), **_) -> dict[str, list[float]]:
    """`correct` (the held-out success rate when averaged) and `one_word`, per output."""
    return {"correct": in_category(list(outputs), category), "one_word": one_word(list(outputs))}


REWARD_FNS = [in_category, one_word]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def question(category: str, phrasing: int, example: str) -> dict[str, Any]:
    """A prompt: the worked example (category `example`), then the question for `category`."""
    if category == example:
        raise ValueError(f"the worked example asks for the same category as the question ({category!r}); "
                         "choose another example category, or copying its answer would be right")
    template = PHRASINGS[phrasing]
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": template.format(CATEGORIES[example][0])},
                {"role": "assistant", "content": EXAMPLE_ANSWERS[example]},
                {"role": "user", "content": template.format(CATEGORIES[category][0])}]
    return {"prompt": messages, "category": category}


def split() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) prompts: every (category, phrasing, example category) combination, 360 in
    all; `HELD_OUT_PER_CATEGORY` combinations of each category (seeded) are held out."""
    rng = random.Random(SPLIT_SEED)
    train, held_out = [], []
    for category in CATEGORIES:
        combos = [(p, e) for p, e in itertools.product(range(len(PHRASINGS)), CATEGORIES) if e != category]
        rng.shuffle(combos)
        held_out += [question(category, p, e) for p, e in combos[:HELD_OUT_PER_CATEGORY]]
        train += [question(category, p, e) for p, e in combos[HELD_OUT_PER_CATEGORY:]]
    return train, held_out


# ---------------------------------------------------------------------------------------------
# Config and run
# ---------------------------------------------------------------------------------------------


ROLLOUTS = 32  # completions per phase, either method (GRPO: 4 prompts x 8)
PHASES = 10  # the demo's default budget, in rollout phases: the same completions for either method
EVAL_PHASES = 4  # phases between held-out evaluations (and one at the start and the end)


def method_settings(method: str) -> dict[str, Any]:
    """What PPO and GRPO do differently on this task; `make_config` shares the rest.

    - ppo: two epochs of two batches of 16 a phase (4 optimizer steps), AdamW at 1e-3, a fixed
      KL coefficient of 0.01, the value head on the policy's trunk.
    - grpo: 4 prompts x 8 completions a phase; one iteration, one optimizer step over all 32
      (microbatches of 16: whole groups for `shared_prefix`), so every step is on-policy (ratio 1)
      as TRL's defaults; loss_type dapo, beta 0 (no reference pass), epsilon 0.2; AdamW at 1e-3
      (chosen over 3e-3 on held-out correctness; BENCHMARKS.md, one-off measurements).
    Returns `batch_size`, `minibatch_size`, `lr` and the `method` section's keys.
    """
    if method == "ppo":
        return {"batch_size": 16, "minibatch_size": 16, "lr": 1e-3,
                "method": {"ppo_epochs": 2, "init_kl_coef": 0.01, "target": None, "gamma": 1.0, "lam": 0.95,
                           "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.5, "scale_reward": "ignored",
                           "cliprange_reward": 10.0}}
    if method == "grpo":
        return {"batch_size": ROLLOUTS, "minibatch_size": 16, "lr": 1e-3,
                "method": dict(GRPO_METHOD)}
    raise unknown_method(method)


def steps_per_phase(method: str) -> int:
    """Optimizer steps a phase takes with `method` (PPO 4, GRPO 1); the demo's budget is
    `PHASES` phases (PPO 40 steps, GRPO 10)."""
    return phase_steps(method_settings(method), ROLLOUTS)


def make_config(model_path: str, total_steps: int | None = None, run_dir: str | None = None, seed: int = 0,
                eval_interval: int | None = None, method: str = "ppo") -> dict:
    """PPO or GRPO (`method`, see `method_settings`) + LoRA (r=8 on every linear layer) for
    SmolLM2-135M-Instruct on this task.

    One phase: 32 completions of at most 6 new tokens at temperature 1; `total_steps` counts
    optimizer steps (default: `PHASES` phases), `eval_interval` too (default: every `EVAL_PHASES`).
    """
    settings, per_phase = method_settings(method), steps_per_phase(method)
    return {
        "train": {"seq_length": 80, "batch_size": settings["batch_size"], "minibatch_size": settings["minibatch_size"],
                  "total_steps": PHASES * per_phase if total_steps is None else total_steps,
                  "eval_interval": EVAL_PHASES * per_phase if eval_interval is None else eval_interval,
                  "checkpoint_interval": 10**9, "run_dir": run_dir, "seed": seed, "save_best": False},
        "model": {"model_path": model_path,
                  "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                                  "lora_dropout": 0.0, "target_modules": "all-linear"}},
        "tokenizer": {"tokenizer_path": model_path},
        "optimizer": {"name": "adamw", "kwargs": {"lr": settings["lr"], "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 1e-6}},
        "scheduler": {"name": "constant", "kwargs": {}},
        "method": {"num_rollouts": ROLLOUTS, "chunk_size": ROLLOUTS,
                   "gen_kwargs": {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                  "do_sample": True}, **settings["method"]},
        "task": {"reward_weights": list(REWARD_WEIGHTS)},
    }


def run(total_steps: int | None = None, run_dir: str | None = None, model_path: str | None = None, seed: int = 0,
        eval_interval: int | None = None, overrides: Sequence[str] = (), verbose: bool = True,
        method: str = "ppo") -> dict[str, Any]:
    """Train on the task with `method` ("ppo" or "grpo") and return (and write to
    `run_dir/summary.json`) the held-out success rate before and after, with timings.
    `model_path` defaults to SmolLM2-135M-Instruct (`rlora.fetch`)."""
    import rlora
    from rlora.fetch import fetch
    from rlora.tracking import group_signals, mean_phase_seconds, phase_seconds

    t0 = time.perf_counter()
    method_settings(method)  # an unknown method fails before the fetch
    model_path = model_path or fetch("smollm2-135m-instruct")
    run_dir = run_dir or os.path.join("runs", f"oneword-{method}-" + time.strftime("%Y%m%d-%H%M%S"))
    train_prompts, held_out = split()
    trainer = rlora.train(reward_fn=REWARD_FNS, prompts=train_prompts, eval_prompts=held_out, metric_fn=metric_fn,
                          config=make_config(model_path, total_steps, run_dir, seed, eval_interval, method),
                          overrides=list(overrides), verbose=verbose)
    evals = [r for r in trainer.history if r.get("eval")]
    phases = phase_seconds(trainer.history)
    summary = {
        "method": method,
        "correct": [evals[0]["metrics/correct"], evals[-1]["metrics/correct"]],
        "one_word": [evals[0]["metrics/one_word"], evals[-1]["metrics/one_word"]],
        "curve": [(r["step"], round(r["metrics/correct"], 4)) for r in evals],
        "held_out_prompts": len(held_out), "optimizer_steps": trainer.step, "rollout_phases": trainer.phase,
        "s_per_phase": sum(mean_phase_seconds(trainer.history).values()),
        "s_rollout": [round(r["rollout"], 2) for r in phases],
        "s_update": [round(r["rollout_pass"] + r["update"], 2) for r in phases],
        "wall_seconds": time.perf_counter() - t0, "run_dir": trainer.run_dir, **group_signals(trainer.history),
    }
    with open(os.path.join(trainer.run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    if verbose:
        print(f"{method}: held-out correct {summary['correct'][0]:.3f} -> {summary['correct'][1]:.3f}, one word "
              f"{summary['one_word'][0]:.3f} -> {summary['one_word'][1]:.3f} ({len(held_out)} questions); "
              f"{trainer.phase} phases / {trainer.step} steps, {summary['s_per_phase']:.1f} s per phase, "
              f"{summary['wall_seconds']:.0f} s in all; {trainer.run_dir}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlora.tasks.oneword", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="ppo", help="ppo (default) or grpo")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default 10 phases: ppo 40, 4 per phase; grpo 10, 1 per phase)")
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct, fetched)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-interval", type=int, default=None, help="optimizer steps (default: every 4 phases)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optimizer.kwargs.lr=1e-3")
    args = parser.parse_args(argv)
    run(args.steps, args.run_dir, args.model, args.seed, args.eval_interval, args.overrides, method=args.method)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
