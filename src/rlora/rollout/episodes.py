"""Multi-turn episodes: the model's turns sampled in lockstep batches, with what the environment
and its tools say between them, as one token sequence per episode (docs/design.md §11).

An episode's tokens are its opening (the query, left-padded like any prompt) and then, in the
response, the model's replies with the environment's messages between them. `action_mask` marks
the model's own tokens: every pass reads the environment's as context, and no loss, KL or
advantage counts them. An environment message is the chat template's rendering of the
conversation with it, less the rendering without it, so the template must render a growing
conversation as a prefix of itself (`rlora.tools.check_prefix_preserving`); the reply's tokens
are always the sampled ones, never re-encoded.

Each turn continues from the conversation's KV cache: the cache of the last turn, rows of ended
episodes dropped, takes the last reply's final token and the environment's message, which is
left-padded so each row ends on a real token (its pads, like those after a reply that ended
early, are holes the attention mask skips; positions count real tokens only, as the scoring pass
counts them). The first turn of a group keeps its shared prompt prefill (`Policy.generate`).

Notation: `b` episodes of a chunk, `p` opening length, `r` response length.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from rlora.environments import Agent, Episode
from rlora.rollout.generation import Rollouts, cut_at_eos, left_pad, right_pad, sampling_settings
from rlora.rollout.prompts import Prompt, end_of_turn_id
from rlora.tools import check_prefix_preserving, require_tool_template, tool_schemas

ENDINGS = ("environment", "max_turns", "max_tool_calling_iterations", "budget", "truncated")


@dataclass
class _Row:
    """One episode's tokens as they grow."""

    episode: Episode
    where: str
    opening: list[int]
    response: list[int] = field(default_factory=list)
    action: list[bool] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.opening) + len(self.response)


def check_turns_agree(agent, world: int, weights_sharded: bool) -> None:
    """Refuse multi-turn episodes where each process would need the others in every forward: an
    episode ends on its process by itself, so processes run different numbers of turns, while
    sharded weights (FSDP2, ZeRO-3) are gathered with every process taking part."""
    if agent.max_turns > 1 and world > 1 and weights_sharded:
        raise ValueError(f"method.max_turns={agent.max_turns}: episodes end on each process by themselves, but "
                         "with the weights sharded (train.fsdp, or DeepSpeed ZeRO stage 3) every process must join "
                         "each forward; run multi-turn episodes with DDP or ZeRO stage 2, which keep the weights "
                         "whole, or set method.max_turns: 1")


class EpisodeRunner:
    """Runs a chunk's episodes with the policy: the model's side of `rlora.environments.Agent`."""

    def __init__(self, agent: Agent, tokenizer, seq_length: int, keep_cache: bool = True):
        self.agent, self.tokenizer, self.seq_length = agent, tokenizer, seq_length
        self.keep_cache = keep_cache  # False: each turn runs the whole conversation again (for comparison)
        self.end_of_turn = end_of_turn_id(tokenizer)
        if self.end_of_turn is None:
            raise ValueError("multi-turn episodes need a chat template whose assistant turns end in a special token "
                             "(ChatML's <|im_end|>); set tokenizer.chat_template (e.g. rlora.tools.HERMES_TOOL_TEMPLATE)")
        self.end_text = tokenizer.decode([self.end_of_turn])
        if agent.may_call_tools:
            require_tool_template(tokenizer)
        check_prefix_preserving(tokenizer, tool_schemas(agent.tools) if agent.tools else None)

    def render(self, episode: Episode, generation_prompt: bool, messages: list[dict] | None = None) -> str:
        """The chat template's text of `messages` (default: the episode's), with its tools."""
        return self.tokenizer.apply_chat_template(episode.messages if messages is None else messages,
                                                  tools=episode.schemas, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    @torch.no_grad()
    def run(self, policy, prompts: list[Prompt], index: list[int], gen_kwargs: dict, num_generations: int = 1,
            share_prompt: bool = False, extra: dict | None = None) -> Rollouts:
        """`num_generations` episodes for each prompt at `index`, the rows of a prompt contiguous.
        `extra` holds further `Policy.generate` arguments (merged or recast weights)."""
        rows = []
        for i in index:
            for _ in range(num_generations):
                where = f"prompt {i} ({_record(prompts[i])})"
                episode = self.agent.start(prompts[i], where)
                rows.append(_Row(episode, where, self.tokenizer(self.render(episode, True),
                                                                add_special_tokens=False).input_ids))
                if len(rows[-1].opening) >= self.seq_length:
                    raise ValueError(f"the opening of the episode of {rows[-1].where} has {len(rows[-1].opening)} "
                                     f"tokens, no fewer than train.seq_length={self.seq_length}; raise "
                                     "train.seq_length or shorten the opening")
        shared = share_prompt and num_generations > 1
        if shared:
            for g in range(0, len(rows), num_generations):
                if any(r.opening != rows[g].opening for r in rows[g:g + num_generations]):
                    raise ValueError(f"the {num_generations} episodes of {rows[g].where} open differently (their "
                                     "environments' reset() differ), but method.shared_prefix runs a group's "
                                     "opening once; set method.shared_prefix: false, or open every episode of a "
                                     "record alike and let the environment differ later")
        config, arguments, stops = sampling_settings(policy, self.tokenizer, gen_kwargs)
        if self.end_of_turn not in stops:  # a turn ends at the template's end of turn
            config.eos_token_id = stops = [*stops, self.end_of_turn]
        config.return_dict_in_generate = True  # the sequences and the KV cache the next turn continues from
        arguments = {**arguments, **(extra or {})}
        max_new = int(gen_kwargs["max_new_tokens"])
        device = next(policy.parameters()).device

        live = list(range(len(rows)))  # the rows of the batch, in order
        unique = rows[::num_generations] if shared else rows
        ids, mask = left_pad([r.opening for r in unique], self.tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        cache = None
        for turn in range(1, self.agent.max_turns + 1):
            budgets = [self.seq_length - rows[k].length for k in live]
            settings = copy.deepcopy(config)
            settings.max_new_tokens = min(max_new, max(budgets))
            group = {"num_generations": num_generations} if shared and turn == 1 else {}
            past = {"past_key_values": cache} if cache is not None else {}
            out = policy.generate(ids, mask.long(), generation_config=settings, **arguments, **group, **past)
            if group:
                mask = mask.repeat_interleave(num_generations, 0)
            width = mask.shape[1]
            sequences, cache = out.sequences, (out.past_key_values if self.keep_cache else None)
            new = sequences[:, width:].tolist()
            replies, last, kept = [], [], []
            for k, tokens, budget in zip(live, new, budgets):
                reply = cut_at_eos(tokens, stops)[:budget]
                ended = bool(reply) and reply[-1] in stops
                row = rows[k]
                row.response += reply
                row.action += [True] * len(reply)
                kept.append(len(reply))
                text = self.tokenizer.decode(reply[:-1] if ended else reply, skip_special_tokens=True)
                row.replies.append(text)
                replies.append(text)
                full = row.length >= self.seq_length
                if not (ended and reply[-1] == self.end_of_turn):
                    row.episode.ended_by = "budget" if full else "truncated"
                elif full:
                    row.episode.ended_by = "budget"
                last.append(turn == self.agent.max_turns or bool(row.episode.ended_by))
            said = self.agent.respond([rows[k].episode for k in live], replies, last, [rows[k].where for k in live])
            going, blocks = [], []
            for position, (k, following) in enumerate(zip(live, said)):
                if following is None:
                    continue
                message = self._message_tokens(rows[k], following)
                if rows[k].length + len(message) + 1 > self.seq_length:  # no room for the message and a reply
                    del rows[k].episode.messages[-len(following):]
                    rows[k].episode.ended_by = "budget"
                    continue
                rows[k].response += message
                rows[k].action += [False] * len(message)
                going.append(position)
                blocks.append(message)
            if not going:
                break
            # the next turn's batch: each going row's sequence so far (holes where a reply ended
            # early) and its message, left-padded so that the row ends on a real token
            reply_mask = torch.arange(len(new[0]) if new else 0, device=device)[None, :] < \
                torch.tensor(kept, device=device)[:, None]
            mask = torch.cat([mask, reply_mask], 1)
            chosen = torch.tensor(going, device=device)
            message_ids, message_mask = left_pad(blocks, self.tokenizer.pad_token_id)
            ids = torch.cat([sequences[chosen], message_ids.to(device)], 1)
            mask = torch.cat([mask[chosen], message_mask.to(device)], 1)
            if cache is not None and len(going) < len(live):
                cache.batch_select_indices(chosen)
            live = [live[position] for position in going]
        for row in rows:
            row.episode.ended_by = row.episode.ended_by or "max_turns"
        self.agent.finish([r.episode for r in rows], [r.where for r in rows])
        return self._rollouts(rows)

    def _message_tokens(self, row: _Row, following: list[dict[str, Any]]) -> list[int]:
        """The tokens that follow the reply's end-of-turn token: the template's rendering of the
        conversation with `following` (and the next generation prompt) less its rendering
        without it."""
        episode = row.episode
        before = self.render(episode, False, episode.messages[:len(episode.messages) - len(following)])
        after = self.render(episode, True)
        if not after.startswith(before):
            at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
            raise ValueError("the chat template renders a conversation differently once a message is appended "
                             f"(from character {at}: {before[at:at + 40]!r} became {after[at:at + 40]!r}), so an "
                             "episode's earlier tokens would change; set tokenizer.chat_template to one that renders "
                             "each message on its own (rlora.tools.HERMES_TOOL_TEMPLATE)")
        end = before.rfind(self.end_text)
        tail = before[end + len(self.end_text):] if end >= 0 else ""
        return self.tokenizer(tail + after[len(before):], add_special_tokens=False).input_ids

    def _rollouts(self, rows: list[_Row]) -> Rollouts:
        pad = self.tokenizer.pad_token_id
        query_ids, query_mask = left_pad([r.opening for r in rows], pad)
        response_ids, response_mask = right_pad([r.response for r in rows], pad)
        action_mask = torch.zeros_like(response_mask)
        for k, row in enumerate(rows):
            action_mask[k, :len(row.action)] = torch.tensor(row.action, dtype=torch.bool)
        episodes = [r.episode for r in rows]
        return Rollouts(query_ids, query_mask, response_ids, response_mask,
                        prompts=[e.messages[:e.opening] for e in episodes],
                        outputs=["\n".join(r.replies) for r in rows],
                        prompt_texts=[self.tokenizer.decode(r.opening) for r in rows],
                        truncated=torch.tensor([e.ended_by in ("budget", "truncated") for e in episodes]),
                        action_mask=action_mask, episodes=episodes)


def episode_stats(rollouts: Rollouts, dist) -> dict[str, float]:
    """What is logged of a phase's episodes, over every process (none for single-turn rollouts):
    turns, tool calls and their failures (TRL's names), how episodes ended, the environment's tokens."""
    if rollouts.episodes is None:
        return {}
    episodes = rollouts.episodes
    env_tokens = (rollouts.response_mask & ~rollouts.action_mask).sum(1).float()
    columns = torch.tensor([[e.turns, e.tool_calls, e.tool_errors, *(e.ended_by == x for x in ENDINGS)]
                            for e in episodes], dtype=torch.float32)
    turns, calls, errors, *ended, env_tokens = dist.all_values(torch.cat([columns, env_tokens[:, None]], 1)).T
    stats = {"episodes/turns_mean": turns.mean(), "episodes/turns_max": turns.max(),
             "tools/call_frequency": calls.mean(),
             "tools/failure_frequency": errors.sum() / calls.sum() if calls.sum() > 0 else torch.tensor(0.0),
             "episodes/environment_tokens_mean": env_tokens.mean()}
    stats.update({f"episodes/ended_by_{ending}": share.mean() for ending, share in zip(ENDINGS, ended)})
    return stats


def environment_rewards(rollouts) -> torch.Tensor | None:
    """Each episode's `get_reward()` (NaN where its environment has none), or None where no
    episode has one (single-turn rollouts included). Shape: -> (b,)."""
    if rollouts.episodes is None:
        return None
    rewards = torch.tensor([e.reward for e in rollouts.episodes], dtype=torch.float32)
    return None if bool(torch.isnan(rewards).all()) else rewards


def with_environment_rewards(fn_scores: torch.Tensor | None, values: dict[str, torch.Tensor],
                             env: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The reward functions' weighted sum plus the environments' rewards (unweighted), as TRL
    adds `get_reward` as one more function of weight 1: NaN only where neither judged a sample.
    `values` gains "environment". Shape: fn_scores (b,) or None, env (b,) or None -> (b,)."""
    if env is None:
        return fn_scores, values
    if fn_scores is not None and fn_scores.dim() == 2:
        raise ValueError("reward_fn returned per-token scores, but an environment's get_reward() gives one per "
                         "episode; return one number per episode")
    if fn_scores is None:
        return env, {**values, "environment": env}
    both = torch.stack([fn_scores.float(), env])  # (2, b)
    total = torch.where(torch.isnan(both).all(0), torch.nan, torch.nan_to_num(both, nan=0.0).sum(0))
    return total, {**values, "environment": env}


def _record(prompt: Prompt) -> str:
    text = prompt.prompt if isinstance(prompt.prompt, str) else prompt.prompt[-1]["content"]
    return f"{text[:60]!r}" + (f", {prompt.metadata}" if prompt.metadata else "")
