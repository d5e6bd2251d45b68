"""Reasoning cache (RC): solve a problem in turns, carrying only a summary from one turn to the next.

Turn t prompts the policy with the problem and the summary so far; a summarizer (the policy itself
or a separate frozen model) rewrites the summary from the problem, the old summary and the turn's
reasoning (its tokens before its last `</think>`). The answer is the last turn's text after its
last `</think>`, as the judge reads a completion.

Token contract. Prompts are composed from token buffers, never from re-tokenized text: a prompt
template is split at its placeholders and each literal piece (the chat template's wrappers
included) is tokenized once on the host; a prompt is the concatenation of the literal pieces and
the placeholders' ids: the problem's own tokenization (at most P tokens), the summary's generated
ids (at most S) and the reasoning's generated ids (at most H_R). Buffers are fixed-size with
per-row lengths and composed by a gather on the device, so the whole T-turn loop of a batch is one
compiled call whose shapes depend only on (batch, P, S, H_R, H_S, max_turns), never on T.

Shapes: B batch, P problem tokens, S summary tokens, H_R reasoning tokens per turn, H_S summarizer
tokens, C turn capacity (max_turns).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import types
from collections.abc import Sequence
from functools import cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qed_jax.config import (ConfigError, check_seed, check_temperature_and_filters, is_rc_template, is_whole_number,
                            load_template, require_at_least_one)
from qed_jax.model import Qwen3
from qed_jax.sampling import (DEFAULT_BUCKETS, FINISH_LENGTH, FINISH_REASONS, FINISH_STOP, SamplingParams,
                              bucket_length, cache_shards, cache_slots, check_buckets, check_token_ids, checked_row_ids,
                              decode_loop, fetch, mesh_context, new_kv_cache, prefill, put_rows, wave_row_ids)
from qed_jax.sharding import DEFAULT_RULES
from qed_jax.tokenizer import render_chat

REASONING_SLOTS = ("problem", "summary")
SUMMARIZE_SLOTS = ("problem", "summary", "reasoning")
# Stands for the user message while the chat template is rendered, to find its wrappers.
_CONTENT_MARK = "\u2063QED_JAX_CONTENT\u2063"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RCParams:
    """The RC loop's settings. `reasoning_tokens` (H_R) caps each turn, `summary_tokens` (S) each
    summary; `max_turns` is the turn capacity of the compiled loop (a shape), `turns` how many run.
    `no_summary` fills the summary of the first turn (None: an empty summary, as in training).
    Without a separate summarizer the policy summarizes with these sampling settings, thinking,
    within `summarizer_tokens` (H_S; default: summary_tokens)."""

    turns: int = 3
    reasoning_tokens: int = 16384
    summary_tokens: int = 2048
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    summarizer_tokens: int | None = None
    summarize_last: bool = False  # training needs the summary after the last turn as a state
    no_summary: str | None = "None: this is the first attempt."
    problem_tokens: int | None = None  # P; default: the bucket of the call's longest problem
    max_turns: int = 16
    batch_size: int | None = None  # rows per compiled call; default: all problems at once
    reasoning_template: str = "rc_reasoning"  # a file in configs/prompts/ (without .txt) or a path
    summarize_template: str = "rc_summarize"
    seed: int = 0

    def __post_init__(self):
        check_seed(self.seed, "RCParams.seed")
        require_at_least_one(self, ("turns", "reasoning_tokens", "summary_tokens", "max_turns", "summarizer_tokens",
                                    "problem_tokens", "batch_size"), "RCParams.")
        check_temperature_and_filters(self, "RCParams.")
        if self.turns > self.max_turns:
            raise ConfigError(f"RCParams.turns ({self.turns}) exceeds max_turns ({self.max_turns}); "
                              "raise max_turns (the turn capacity of the compiled loop)")


@dataclasses.dataclass
class Summarizer:
    """A separate frozen summarizer: its model, its sampling (max_new_tokens is H_S) and whether
    it thinks (then the summary is its text after its last `</think>`). Its vocabulary must be the
    policy's, since the reasoning's ids go into its prompt as they are; `tokenizer` (default:
    the policy's) gives its chat template. The defaults are the recipe's RL summarizer."""

    model: Qwen3
    sampling: SamplingParams = SamplingParams(max_new_tokens=2048, temperature=0.7, top_k=20, top_p=0.8)
    thinking: bool = False
    tokenizer: object | None = None


@dataclasses.dataclass
class Turn:
    """One turn of one problem. Ids exclude stop tokens; texts are decoded at the host edge."""

    reasoning_ids: list[int]  # the turn's tokens before its last `</think>` (all when there is none)
    answer_ids: list[int]  # its tokens after the last `</think>` (none when there is none)
    num_tokens: int  # tokens the policy generated in the turn, a stop token included
    finish_reason: str  # "stop" or "length"
    summary_ids: list[int] | None = None  # the summary written after the turn, if one was
    summary_cut: bool = False  # longer than S tokens, or the summarizer's budget ran out while it wrote it
    summarizer_num_tokens: int = 0  # tokens the summarizer generated, a stop token included
    summarizer_finish_reason: str | None = None
    reasoning: str | None = None
    answer: str | None = None  # None when the turn did not close its thinking
    summary: str | None = None

    @property
    def finished_thinking(self) -> bool:
        return self.num_tokens > len(self.reasoning_ids) + (self.finish_reason == "stop")


@dataclasses.dataclass
class RCResult:
    problem: str
    turns: list[Turn]

    @property
    def answer(self) -> str | None:
        """The last turn's text after its last `</think>` (None without one); no fallback to earlier turns."""
        return self.turns[-1].answer


# --------------------------------------------------------------------------------------------
# Prompt templates as token pieces


@partial(jax.tree_util.register_dataclass, data_fields=["literals"], meta_fields=["slots"])
@dataclasses.dataclass(frozen=True, eq=False)
class PromptPieces:
    """A tokenized prompt template: literals[i] [W_i] comes before slots[i]; the last literal
    ends the prompt. A pytree (the slot names are static), so the loop takes it as an argument."""

    literals: tuple  # len(slots) + 1 int32 arrays
    slots: tuple[str, ...]

    def ids(self, **fills: list[int]) -> list[int]:
        """The prompt's ids on the host: the literals with each slot's ids between them."""
        out = list(self.literals[0].tolist())
        for slot, literal in zip(self.slots, self.literals[1:]):
            out += list(fills[slot]) + literal.tolist()
        return out

    @property
    def literal_tokens(self) -> int:
        return sum(x.shape[0] for x in self.literals)


def load_rc_template(name_or_path: str) -> str:
    """An RC prompt template (trailing whitespace dropped: the chat wrapper follows it)."""
    return load_template(name_or_path, "RC prompt template", fits=is_rc_template).rstrip()


def split_template(text: str, slots: tuple[str, ...], where: str = "template") -> tuple[list[str], tuple[str, ...]]:
    """Literal texts and the placeholder names between them, in the template's order. Each of
    `slots` must appear exactly once as {name}; other braces are literal text."""
    doubled = re.search(r"\{\{(" + "|".join(slots) + r")\}\}", text)
    if doubled:  # the judge's and benchmark's templates spell placeholders so; here the outer braces would stay
        raise ConfigError(f"{where}: {doubled.group()} has doubled braces; an RC template writes its placeholders "
                          f"with single ones ({', '.join('{%s}' % s for s in slots)})")
    parts = re.split(r"\{(" + "|".join(slots) + r")\}", text)
    literals, found = parts[0::2], tuple(parts[1::2])
    for slot in slots:
        if found.count(slot) != 1:
            raise ConfigError(f"{where}: placeholder {{{slot}}} must appear exactly once, found "
                              f"{found.count(slot)} times (placeholders: {', '.join('{%s}' % s for s in slots)})")
    return literals, found


def chat_wrappers(tokenizer, thinking: bool = True) -> tuple[str, str]:
    """The chat template's text before and after a user message, generation prompt included.
    `enable_thinking` reaches templates that switch thinking (Qwen3 hybrids); others ignore it."""
    text = render_chat(tokenizer, [{"role": "user", "content": _CONTENT_MARK}], add_generation_prompt=True,
                       enable_thinking=thinking)
    if text.count(_CONTENT_MARK) != 1:
        raise ValueError("the chat template does not render the user message once, as given")
    head, tail = text.split(_CONTENT_MARK)
    return head, tail


def tokenize_template(tokenizer, text: str, slots: tuple[str, ...], thinking: bool = True,
                      where: str = "template") -> PromptPieces:
    """Split `text` at its placeholders, wrap it in the chat template and tokenize each literal
    piece once (special tokens such as <|im_start|> are recognized)."""
    literals, found = split_template(text, slots, where)
    head, tail = chat_wrappers(tokenizer, thinking)
    literals[0], literals[-1] = head + literals[0], literals[-1] + tail
    ids = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], np.int32) for t in literals]
    return PromptPieces(tuple(ids), found)


class RCPrompts(NamedTuple):
    reasoning: PromptPieces  # slots problem, summary
    summarize: PromptPieces  # slots problem, summary, reasoning


def build_prompts(tokenizer, params: RCParams, summarizer_tokenizer=None, summarizer_thinking: bool = True) -> RCPrompts:
    reasoning = tokenize_template(tokenizer, load_rc_template(params.reasoning_template), REASONING_SLOTS,
                                  thinking=True, where=params.reasoning_template)
    summarize = tokenize_template(summarizer_tokenizer or tokenizer, load_rc_template(params.summarize_template),
                                  SUMMARIZE_SLOTS, thinking=summarizer_thinking, where=params.summarize_template)
    return RCPrompts(reasoning, summarize)


# --------------------------------------------------------------------------------------------
# Pure device pieces


def compose(pieces: PromptPieces, batch: int, fills: dict, pad_id: int = 0):
    """A batch of prompts from token buffers: each slot's fill is (ids [B, W], lengths [B]), its
    first `lengths` ids used. Returns right-padded tokens [B, ΣW] (literals and fill widths) and
    lengths [B]. Output position j of row b takes its id from the piece whose span holds j."""
    buffers, lengths = [], []
    for i, literal in enumerate(pieces.literals):
        literal = jnp.asarray(literal, jnp.int32)
        buffers.append(jnp.broadcast_to(literal, (batch, literal.shape[0])))
        lengths.append(jnp.full((batch,), literal.shape[0], jnp.int32))
        if i < len(pieces.slots):
            ids, n = fills[pieces.slots[i]]
            buffers.append(ids.astype(jnp.int32))
            lengths.append(n.astype(jnp.int32))
    source = jnp.concatenate(buffers, axis=1)  # [B, ΣW]
    starts = jnp.asarray(np.cumsum([0] + [b.shape[1] for b in buffers[:-1]]), jnp.int32)  # [m], in source
    n = jnp.stack(lengths, axis=1)  # [B, m]
    ends = jnp.cumsum(n, axis=1)  # [B, m], in the prompt
    width = source.shape[1]
    j = jnp.arange(width)
    piece = jnp.sum(j[None, :, None] >= ends[:, None, :], axis=-1)  # [B, ΣW]; m past the prompt's end
    inside = piece < len(buffers)
    piece = jnp.minimum(piece, len(buffers) - 1)
    offset = j[None] - jnp.take_along_axis(ends - n, piece, axis=1)
    index = jnp.clip(starts[piece] + offset, 0, width - 1)
    tokens = jnp.where(inside, jnp.take_along_axis(source, index, axis=1), pad_id)
    return tokens, ends[:, -1]


def last_index(tokens, lengths, token_id):
    """Per row, the index of the last `token_id` among its first `lengths` tokens, and whether
    there is one. tokens [B, N], lengths [B]. The last, as the judge splits a completion
    (`judge.extract_proof`) and Qwen's own parsers do: a stray `</think>` inside the reasoning
    stays reasoning, and the answer recorded is the text that is graded."""
    hit = (tokens == token_id) & (jnp.arange(tokens.shape[1])[None] < lengths[:, None])
    from_end = jnp.argmax(hit[:, ::-1], axis=1)
    return (tokens.shape[1] - 1 - from_end).astype(jnp.int32), jnp.any(hit, axis=1)


def text_lengths(lengths, finish):
    """Generated lengths without a final stop token."""
    return lengths - (finish == FINISH_STOP).astype(lengths.dtype)


def reasoning_lengths(tokens, lengths, finish, think_end):
    """How many of each row's generated tokens come before the last `</think>` (all text when none)."""
    text = text_lengths(lengths, finish)
    index, found = last_index(tokens, text, think_end)
    return jnp.where(found, index, text)


def extract_summary(tokens, lengths, finish, think_end, summary_tokens: int, thinking: bool):
    """The summary in a summarizer's output [B, N]: its text after the last `</think>` when it thinks
    (none when it never closes its thinking), else all its text; cut to S = summary_tokens.
    Returns ids [B, S], lengths [B] and whether each was cut [B]: longer than S, or ended by the
    summarizer's budget while it wrote it (with the budget at S, as the recipe's, only that)."""
    text = text_lengths(lengths, finish)
    start = jnp.zeros_like(text)
    if thinking:
        index, found = last_index(tokens, text, think_end)
        start = jnp.where(found, index + 1, text)
    available = text - start
    j = jnp.arange(summary_tokens)
    index = jnp.clip(start[:, None] + j[None], 0, tokens.shape[1] - 1)
    n = jnp.minimum(available, summary_tokens)
    ids = jnp.where(j[None] < n[:, None], jnp.take_along_axis(tokens, index, axis=1), 0)
    ran_out = (finish == FINISH_LENGTH) & (available > 0)
    return ids, n, (available > summary_tokens) | ran_out


# --------------------------------------------------------------------------------------------
# The compiled loop


@dataclasses.dataclass(frozen=True)
class LoopShape:
    """What the compiled loop is specialized on, besides the shapes of its inputs."""

    reasoning_tokens: int  # H_R
    summary_tokens: int  # S
    summarizer_tokens: int  # H_S
    max_turns: int  # C
    summarizer_thinking: bool


class LoopInputs(NamedTuple):
    problems: jax.Array  # [B, P] right-padded problem ids
    problem_lengths: jax.Array  # [B]
    summary: jax.Array  # [B, S] the first turn's summary (the no-summary marker, or empty)
    summary_lengths: jax.Array  # [B]
    live: jax.Array  # [B] bool; dummy rows that pad a batch generate nothing
    row_ids: jax.Array  # [B] each row's randomness stream, independent of the batching


class Controls(NamedTuple):
    """Traced scalars and small arrays: changing them never recompiles."""

    turns: jax.Array  # int32
    summaries: jax.Array  # int32: turns 0..summaries-1 are followed by a summary
    key: jax.Array
    policy: tuple  # (temperature, top_k, top_p)
    summarizer: tuple
    policy_stop_ids: jax.Array  # [K]
    summarizer_stop_ids: jax.Array  # [K']
    think_end: jax.Array  # int32


def _sample(graphdef, max_new_tokens, state, cache, tokens, lengths, key, settings, live, stop_ids, row_ids):
    """The sampler's prefill and decode loop on composed prompts [B, W]; tokens [B, N], lengths
    and finish reasons [B], and the cache."""
    batch = tokens.shape[0]
    temperature, top_k, top_p = (jnp.broadcast_to(x, (batch,)) for x in settings)
    logits, cache = prefill(graphdef, state, tokens, lengths, cache)
    budgets = jnp.where(live, max_new_tokens, 0).astype(jnp.int32)
    out, _, n, finish, cache = decode_loop(graphdef, max_new_tokens, state, logits, lengths, cache, key,
                                           temperature, top_k, top_p, budgets, stop_ids, row_ids)
    return out, n, finish, cache


def _record(history: dict, t, **values) -> dict:
    return {**history, **{name: history[name].at[t].set(v) for name, v in values.items()}}


@partial(jax.jit, static_argnames=("policy_def", "summarizer_def", "shape"), donate_argnames="caches")
def rc_loop(policy_def, summarizer_def, shape: LoopShape, policy_state, summarizer_state, prompts: RCPrompts,
            inputs: LoopInputs, caches: tuple, controls: Controls):
    """Run `controls.turns` RC turns (≤ C) for a batch. With `summarizer_def` None the policy
    summarizes with its own weights and one cache (`caches` of one) serves both roles; else
    `caches` holds the policy's and the summarizer's. Turn t samples with fold_in(key, 2t), its
    summary with fold_in(key, 2t + 1). Returns the per-turn outputs [C, B, ...] and the caches."""
    B = inputs.problems.shape[0]
    C, H_R, H_S, S = shape.max_turns, shape.reasoning_tokens, shape.summarizer_tokens, shape.summary_tokens
    if summarizer_def is None:
        summarizer_def, summarizer_state = policy_def, policy_state
    summarizer_cache = len(caches) - 1
    problem = (inputs.problems, inputs.problem_lengths)
    per_row = jnp.zeros((C, B), jnp.int32)
    history = dict(  # row t holds turn t
        tokens=jnp.zeros((C, B, H_R), jnp.int32), lengths=per_row, finish=per_row, reasoning_lengths=per_row,
        summaries=jnp.zeros((C, B, S), jnp.int32), summary_lengths=per_row, summary_cut=per_row.astype(bool),
        summarizer_lengths=per_row, summarizer_finish=per_row,
    )

    def summarize(t, summary, summary_len, reasoning, reasoning_len, caches, history):
        tokens, lengths = compose(prompts.summarize, B, dict(problem=problem, summary=(summary, summary_len),
                                                             reasoning=(reasoning, reasoning_len)))
        key = jax.random.fold_in(controls.key, 2 * t + 1)
        out, n, finish, cache = _sample(summarizer_def, H_S, summarizer_state, caches[summarizer_cache], tokens,
                                        lengths, key, controls.summarizer, inputs.live, controls.summarizer_stop_ids,
                                        inputs.row_ids)
        caches = caches[:summarizer_cache] + (cache,)
        summary, summary_len, cut = extract_summary(out, n, finish, controls.think_end, S, shape.summarizer_thinking)
        history = _record(history, t, summaries=summary, summary_lengths=summary_len, summary_cut=cut,
                          summarizer_lengths=n, summarizer_finish=finish)
        return summary, summary_len, caches, history

    def turn(t, carry):
        summary, summary_len, caches, history = carry
        tokens, lengths = compose(prompts.reasoning, B, dict(problem=problem, summary=(summary, summary_len)))
        out, n, finish, cache = _sample(policy_def, H_R, policy_state, caches[0], tokens, lengths,
                                        jax.random.fold_in(controls.key, 2 * t), controls.policy, inputs.live,
                                        controls.policy_stop_ids, inputs.row_ids)
        caches = (cache,) + caches[1:]
        reasoning_len = reasoning_lengths(out, n, finish, controls.think_end)
        history = _record(history, t, tokens=out, lengths=n, finish=finish, reasoning_lengths=reasoning_len)
        # Only the turns that a summary follows pay for the summarizer.
        return jax.lax.cond(t < controls.summaries, partial(summarize, t),
                            lambda s, s_len, _r, _rl, c, h: (s, s_len, c, h),
                            summary, summary_len, out, reasoning_len, caches, history)

    carry = (inputs.summary, inputs.summary_lengths, tuple(caches), history)
    _, _, caches, history = jax.lax.fori_loop(0, controls.turns, turn, carry)
    return history, caches


def turn_parts(prompts: RCPrompts, problem_tokens: int, shape: LoopShape, separate_summarizer: bool
               ) -> tuple[dict[str, int], ...]:
    """What the longest turn of the policy and of the summarizer is made of (one model when the
    policy summarizes itself: its longer role): the template's own tokens, the problem, the
    summary and the budgets, each role's widest prompt plus its budget."""
    reasoning = {"template": prompts.reasoning.literal_tokens, "problem": problem_tokens,
                 "summary": shape.summary_tokens, "reasoning": shape.reasoning_tokens}
    summarize = {**reasoning, "template": prompts.summarize.literal_tokens, "summarizer": shape.summarizer_tokens}
    if separate_summarizer:
        return reasoning, summarize
    return (max(reasoning, summarize, key=lambda parts: sum(parts.values())),)


def turn_lengths(prompts: RCPrompts, problem_tokens: int, shape: LoopShape, separate_summarizer: bool
                 ) -> tuple[int, ...]:
    """The most positions a turn of the policy and of the summarizer takes (`turn_parts` added up)."""
    return tuple(sum(parts.values()) for parts in turn_parts(prompts, problem_tokens, shape, separate_summarizer))


def cache_lengths(prompts: RCPrompts, problem_tokens: int, shape: LoopShape, separate_summarizer: bool
                  ) -> tuple[int, ...]:
    """KV slots of the policy's and the summarizer's cache: `turn_lengths` rounded up as
    `cache_slots` does."""
    return tuple(cache_slots(n) for n in turn_lengths(prompts, problem_tokens, shape, separate_summarizer))


@cache  # once per turn and model limit, not at every call
def _warn_past_trained_positions(role: str, parts: tuple[tuple[str, int], ...], limit: int) -> None:
    log.warning("a reasoning-cache turn of the %s takes up to %d positions (%s), past the model's "
                "max_position_embeddings (%d): positions beyond it were never trained; lower the reasoning cache's "
                "token budgets for this model (the rc section's, or generate's --max-new-tokens, --summary-tokens "
                "and --summarizer-max-new-tokens)", role, sum(n for _, n in parts),
                ", ".join(f"{name} {n}" for name, n in parts), limit)


# --------------------------------------------------------------------------------------------
# Host side


class ReasoningCache:
    """Holds the policy (and summarizer) split for jit, the tokenized prompt pieces and the KV
    caches, reused while their shapes hold. `run_ids` takes problems as token ids, `run` as text.
    On a `mesh`, a call's rows and the caches split over its batch axes (like the sampler's);
    the weights stay as the caller laid them out."""

    def __init__(self, model: Qwen3, tokenizer, params: RCParams = RCParams(), summarizer: Summarizer | None = None,
                 buckets=DEFAULT_BUCKETS, mesh=None, rules=DEFAULT_RULES):
        from qed_jax import tokenizer as tok

        self.tokenizer, self.params, self.buckets = tokenizer, params, check_buckets(buckets)
        self.mesh, self.rules = mesh, rules
        self.batch_shards = cache_shards(model.config, mesh, rules)[0]
        self.policy_def, self.policy_state = nnx.split(model)
        self.policy_config = model.config
        tok.check_vocab(tokenizer, model.config.vocab_size, "the policy")
        vocab = tokenizer.get_vocab()
        if tok.THINK_END not in vocab:
            raise ConfigError(f"the tokenizer has no {tok.THINK_END} token; RC needs a thinking model's tokenizer")
        self.think_end = vocab[tok.THINK_END]
        self.stop_ids = tok.stop_ids(tokenizer)
        if summarizer is None:
            self.summarizer_def = self.summarizer_state = self.summarizer_config = None
            self.summarizer_sampling = SamplingParams(max_new_tokens=params.summarizer_tokens or params.summary_tokens,
                                                      temperature=params.temperature, top_k=params.top_k,
                                                      top_p=params.top_p)
            self.summarizer_thinking, self.summarizer_stop_ids = True, self.stop_ids
            summarizer_tokenizer = tokenizer
        else:
            self.summarizer_def, self.summarizer_state = nnx.split(summarizer.model)
            self.summarizer_config = summarizer.model.config
            self.summarizer_sampling, self.summarizer_thinking = summarizer.sampling, summarizer.thinking
            summarizer_tokenizer = summarizer.tokenizer or tokenizer
            tok.check_vocab(summarizer_tokenizer, self.summarizer_config.vocab_size, "the summarizer")
            if self.summarizer_config.vocab_size != model.config.vocab_size:
                raise ConfigError(f"the summarizer's vocab_size ({self.summarizer_config.vocab_size}) is not the "
                                  f"policy's ({model.config.vocab_size}): the policy's sampled ids go into its prompt "
                                  "and its summary's into the policy's, where an id past the embedding reads as NaN; "
                                  "use a summarizer with the policy's embedding rows")
            if summarizer_tokenizer.get_vocab() != vocab:
                raise ConfigError("the summarizer's tokenizer has another vocabulary than the policy's; RC passes "
                                  "the policy's token ids to the summarizer, so both must share one vocabulary")
            self.summarizer_stop_ids = tok.stop_ids(summarizer_tokenizer)
            if not summarizer.thinking and chat_wrappers(summarizer_tokenizer, thinking=False)[1].rstrip().endswith(
                    "<think>"):
                log.warning("the summarizer's chat template opens <think> although its thinking is off (a thinking "
                            "model's template): each summary will hold its reasoning and </think>; turn its thinking "
                            "on (generate --summarizer-thinking, eval rc.summarizer_thinking, GRPO "
                            "rc.summarizer.thinking) so that a summary is its text after </think>")
        self.prompts = build_prompts(tokenizer, params, summarizer_tokenizer, self.summarizer_thinking)
        self.first_summary = [] if params.no_summary is None else \
            tokenizer(params.no_summary, add_special_tokens=False)["input_ids"]
        if len(self.first_summary) > params.summary_tokens:
            n = len(self.first_summary)
            raise ConfigError(f"the no-summary marker takes {n} tokens, more than RCParams.summary_tokens "
                              f"({params.summary_tokens}): raise RCParams.summary_tokens to at least {n} or shorten "
                              "RCParams.no_summary")
        self._caches: tuple | None = None

    def update_weights(self, state) -> None:
        """Run the policy with new weights (same structure) without recompiling."""
        self.policy_state = state

    def release(self) -> None:
        """Free the policy's weights and the caches (e.g. while a trainer updates the policy);
        `update_weights` brings weights back, and the next call allocates caches again."""
        self.policy_state, self._caches = None, None

    def shape(self) -> LoopShape:
        p = self.params
        return LoopShape(p.reasoning_tokens, p.summary_tokens, self.summarizer_sampling.max_new_tokens,
                         p.max_turns, self.summarizer_thinking)

    def cache_lengths(self, problem_tokens: int) -> tuple[int, ...]:
        return cache_lengths(self.prompts, problem_tokens, self.shape(), self.summarizer_def is not None)

    def _take_caches(self, batch: int, problem_tokens: int) -> tuple:
        caches, self._caches = self._caches, None
        lengths = self.cache_lengths(problem_tokens)
        if caches is not None and tuple((c.batch, c.max_len) for c in caches) == tuple((batch, n) for n in lengths):
            return caches
        del caches
        return tuple(new_kv_cache(config, batch, n, config.dtype, self.mesh, self.rules)
                     for (_, config), n in zip(self.roles(), lengths))

    def roles(self) -> tuple[tuple[str, object], ...]:
        """(role, model config) of each model the loop runs, in `cache_lengths`' order: the policy,
        and a separate summarizer if there is one."""
        policy = ("policy", self.policy_config)
        return (policy,) if self.summarizer_def is None else (policy, ("summarizer", self.summarizer_config))

    def problem_width(self, problems: list[list[int]]) -> int:
        longest = max(len(p) for p in problems)
        if not self.params.problem_tokens and longest > self.buckets[-1]:
            raise ConfigError(f"a problem takes {longest} tokens, more than the largest prompt bucket "
                              f"({self.buckets[-1]}); set RCParams.problem_tokens to at least {longest}, "
                              "or shorten the problem")
        width = self.params.problem_tokens or bucket_length(longest, self.buckets)
        if longest > width:
            raise ConfigError(f"a problem takes {longest} tokens, more than problem_tokens ({width}); "
                              "raise RCParams.problem_tokens or shorten the problem")
        return width

    def run_ids(self, problems: list[list[int]], turns: int | None = None, key=None,
                row_ids: Sequence[int] | None = None) -> list[list[Turn]]:
        """Run the loop on problems given as ids; per problem, its turns (texts not decoded).
        Problem i draws its randomness as row `row_ids[i]` (default i): a share of a larger batch
        samples what that batch would."""
        p = self.params
        turns = p.turns if turns is None else turns
        # A bool or a fraction would run (the loop takes its own int32), then fail or mislead.
        if not is_whole_number(turns) or not 1 <= turns <= p.max_turns:
            raise ConfigError(f"turns must be a whole number from 1 to max_turns ({p.max_turns}), got {turns!r}")
        if self.policy_state is None:
            raise RuntimeError("the policy's weights were released; call update_weights before running again")
        check_token_ids(problems, self.policy_config.vocab_size, "problem")
        row_ids = checked_row_ids(row_ids, len(problems))
        key = jax.random.key(p.seed) if key is None else key
        width = self.problem_width(problems)
        longest = turn_parts(self.prompts, max(map(len, problems)), self.shape(), self.summarizer_def is not None)
        for (role, config), parts in zip(self.roles(), longest):
            if sum(parts.values()) > config.max_position_embeddings:
                _warn_past_trained_positions(role, tuple(parts.items()), config.max_position_embeddings)
        rows = p.batch_size or len(problems)
        rows = -(-rows // self.batch_shards) * self.batch_shards  # rows split evenly over the mesh
        summaries = turns if p.summarize_last else turns - 1
        # NumPy values: jit takes them as traced arguments without compiling eager conversions.
        s = self.summarizer_sampling
        controls = Controls(
            turns=np.int32(turns), summaries=np.int32(summaries), key=key,
            policy=(np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p)),
            summarizer=(np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p)),
            policy_stop_ids=np.asarray(self.stop_ids, np.int32),
            summarizer_stop_ids=np.asarray(self.summarizer_stop_ids, np.int32), think_end=np.int32(self.think_end))
        caches = self._take_caches(rows, width)
        results = []
        for start in range(0, len(problems), rows):
            chunk = problems[start: start + rows]
            inputs = LoopInputs(*(put_rows(x, self.mesh, self.rules)
                                  for x in self._inputs(chunk, wave_row_ids(row_ids, start, rows), rows, width)))
            with mesh_context(self.mesh):  # the attention kernels find the mesh here
                history, caches = rc_loop(self.policy_def, self.summarizer_def, self.shape(), self.policy_state,
                                          self.summarizer_state, self.prompts, inputs, caches, controls)
            results += _turns(fetch(history), len(chunk), turns, summaries)
        self._caches = caches
        return results

    def _inputs(self, chunk: list[list[int]], row_ids: np.ndarray, rows: int, width: int) -> LoopInputs:
        S = self.params.summary_tokens
        problems = np.zeros((rows, width), np.int32)
        problem_lengths = np.ones((rows,), np.int32)  # dummy rows: one pad token
        for row, ids in enumerate(chunk):
            problems[row, : len(ids)] = ids
            problem_lengths[row] = len(ids)
        summary = np.zeros((rows, S), np.int32)
        summary[:, : len(self.first_summary)] = self.first_summary
        return LoopInputs(problems, problem_lengths, summary, np.full((rows,), len(self.first_summary), np.int32),
                          np.arange(rows) < len(chunk), row_ids)

    def run(self, problems: list[str] | str, turns: int | None = None, key=None,
            row_ids: Sequence[int] | None = None) -> list[RCResult]:
        """Run the loop on problem texts; every turn's reasoning, answer and summary decoded.
        Problem i draws its randomness as row `row_ids[i]` (default i), as in `run_ids`. One
        string alone is a list of one problem (as `sampling.generate` takes it), not of its
        characters."""
        if isinstance(problems, str):
            problems = [problems]
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in problems]
        decode = partial(self.tokenizer.decode, skip_special_tokens=False)
        results = []
        for problem, turn_list in zip(problems, self.run_ids(ids, turns, key, row_ids)):
            for t in turn_list:
                t.reasoning = decode(t.reasoning_ids)
                t.answer = decode(t.answer_ids) if t.finished_thinking else None  # none: not an empty one
                t.summary = None if t.summary_ids is None else decode(t.summary_ids)
            results.append(RCResult(problem, turn_list))
        return results


def _turns(history: dict, count: int, turns: int, summaries: int) -> list[list[Turn]]:
    """Per row of the first `count`, its first `turns` turns, from the loop's outputs [C, B, ...]."""
    h = history
    out = []
    for b in range(count):
        row = []
        for t in range(turns):
            n, finish, r = int(h["lengths"][t, b]), int(h["finish"][t, b]), int(h["reasoning_lengths"][t, b])
            text = n - (finish == FINISH_STOP)
            tokens = h["tokens"][t, b]
            turn = Turn(reasoning_ids=tokens[:r].tolist(), answer_ids=tokens[r + 1: text].tolist() if r < text else [],
                        num_tokens=n, finish_reason=FINISH_REASONS[finish])
            if t < summaries:
                turn.summary_ids = h["summaries"][t, b, : h["summary_lengths"][t, b]].tolist()
                turn.summary_cut = bool(h["summary_cut"][t, b])
                turn.summarizer_num_tokens = int(h["summarizer_lengths"][t, b])
                turn.summarizer_finish_reason = FINISH_REASONS[int(h["summarizer_finish"][t, b])]
            row.append(turn)
        out.append(row)
    return out


def reasoning_cache(model: Qwen3, tokenizer, problems: list[str] | str, params: RCParams = RCParams(),
                    summarizer: Summarizer | None = None) -> list[RCResult]:
    """Solve each problem (one string alone is one problem) in `params.turns` RC turns; per
    problem, each turn's reasoning, summary and answer texts with token counts and finish reasons."""
    return ReasoningCache(model, tokenizer, params, summarizer).run(problems)


# --------------------------------------------------------------------------------------------
# RC states for GRPO


def training_states(summaries: list[list[int]]) -> list[list[int]]:
    """A trajectory's states: the empty summary, then the summary after each turn (with the
    summary after the last turn, T turns give T + 1 states; the last exists only as a state)."""
    return [[]] + [list(s) for s in summaries]


def draw_states(rng: np.random.Generator, num_states: int, count: int) -> list[int]:
    """`count` distinct state indices out of `num_states`, uniformly without replacement."""
    if not 1 <= count <= num_states:
        raise ConfigError(f"cannot draw {count} distinct states out of {num_states}; draw between 1 and "
                          f"{num_states} (the turns + 1 states of a trajectory)")
    return rng.choice(num_states, size=count, replace=False).tolist()


def state_prompt_ids(prompts: RCPrompts, problem_ids: list[int], summary_ids: list[int]) -> list[int]:
    """The reasoning prompt's ids for a (problem, state) pair, by the loop's token contract."""
    return prompts.reasoning.ids(problem=problem_ids, summary=summary_ids)


class _CallableModule(types.ModuleType):
    """`qed_jax.reasoning_cache` names both this module and its main function; once the module is
    imported, the package attribute is the module, so calling it calls the function."""

    def __call__(self, *args, **kwargs):
        return reasoning_cache(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
