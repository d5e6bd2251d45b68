"""Jitted sampling: prefill a prompt batch into a fixed-size KV cache, then a `lax.while_loop`
that decodes one token per step for the whole batch.

Static shapes: prompts are right-padded to a length bucket, the cache holds bucket +
max_new_tokens slots (rounded up to whole blocks of TPU's decode kernel: `cache_slots`), and
sampling controls (temperature, top-k, top-p, stop ids, per-row budgets) are traced arrays, so
changing their values never recompiles (a different number of stop ids does). Each row keeps
its own positions, so prompts of different lengths decode exactly.

Bounded memory: a call's requests run in waves of at most `max_concurrent` rows (set directly or
derived from a KV-cache budget per device), all through one donated cache of [L, wave, S, K, H]
that is reused wave after wave; a short wave is padded with dummy rows of budget 0. Each row
draws its randomness from (key, request index, step), so samples do not depend on the waves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Collection, Sequence
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qed_jax.attention import KV_CACHE_AXES
from qed_jax.config import ConfigError, ModelConfig, check_sampling
from qed_jax.errors import DeviceCallInterrupted
from qed_jax.model import KVCache, Qwen3, unstacked_layers
from qed_jax.sharding import DEFAULT_RULES, logical_to_spec

log = logging.getLogger(__name__)

# Prompt lengths compiled for, up to the 262,144-token context of Qwen3's 2507 models.
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
FINISH_STOP, FINISH_LENGTH = 1, 2
FINISH_REASONS = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_sampling(self)


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated ids, the stop token included when the row stopped
    # log-prob of each token under log_softmax(logits / temperature), before top-k / top-p
    # filtering; under log_softmax(logits) when greedy (temperature 0)
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"
    text: str | None = None  # decoded at the host edge, stop token excluded

    @property
    def text_tokens(self) -> list[int]:
        """The tokens that make the text: all but a final stop token."""
        return self.tokens[:-1] if self.finish_reason == "stop" else self.tokens


# --------------------------------------------------------------------------------------------
# Pure sampling math


def filter_logits(logits, top_k, top_p):
    """Mask (to -inf) tokens outside the top-k, then outside the top-p nucleus of what is left.
    logits [B, V] already divided by the temperature; top_k [B] (0 = off); top_p [B]. Tokens
    tied at either cut are kept or dropped together: top-k keeps every token as likely as the
    k-th, and the nucleus is taken over all of them."""
    vocab = logits.shape[-1]
    desc = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    desc = jnp.where(desc < kth, -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1)  # 1 is off: a float32 cumsum may pass 1 short of the tail
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_tokens(logits, keys, temperature, top_k, top_p):
    """One token per row and its log-prob under log_softmax(logits / temperature) (temperature
    1 for greedy rows). logits [B, V] float32; keys [B], one per row, so a row's draw does not
    depend on which other rows share its batch; temperature/top_k/top_p [B]."""
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

    def draw(scaled):
        # The filters sort the vocabulary, which is slow on some backends: skip them when unused.
        filtered = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), filter_logits, lambda x, *_: x,
                                scaled, top_k, top_p)
        return jax.vmap(jax.random.categorical)(keys, filtered)

    # One maximum serves the greedy token (greedy rows are scaled by 1) and the normalizer.
    top = jnp.max(scaled, axis=-1, keepdims=True)
    best = first_argmax(scaled, top)
    sampled = jax.lax.cond(jnp.all(greedy), lambda x: best, draw, scaled)
    tokens = jnp.where(greedy, best, sampled)
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    log_normalizer = shift[:, 0] + jnp.log(jnp.sum(jnp.exp(scaled - shift), axis=-1))
    return tokens.astype(jnp.int32), chosen - log_normalizer


def first_argmax(x, top=None):
    """jnp.argmax over the last axis (the first index of the maximum) as two plain reductions:
    XLA:CPU runs the value-and-index reduction of argmax 3-4x slower (4.4 ms against 1.2 for
    [64, 32000]). `top`: x's maximum over that axis (keepdims), when already computed. A row
    holding NaN gets an index in range (which one, the backend's rules for NaN in max decide)."""
    top = jnp.max(x, axis=-1, keepdims=True) if top is None else top
    index = jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)
    return jnp.where(index == x.shape[-1], 0, index)


# --------------------------------------------------------------------------------------------
# Jitted prefill and decode loop (model weights are arguments: graphdef static, state traced)


@partial(jax.jit, static_argnums=0, donate_argnames="cache")
def prefill(graphdef, state, tokens, lengths, cache: KVCache):
    """Run right-padded prompts [B, P] through the model; returns the logits at each row's last
    prompt token [B, V] and the filled cache."""
    return nnx.merge(graphdef, state).prefill(tokens, cache, logits_at=lengths - 1)


@partial(jax.jit, static_argnums=(0, 1), donate_argnames="cache")
def decode_loop(graphdef, max_new_tokens: int, state, logits, lengths, cache: KVCache, key,
                temperature, top_k, top_p, budgets, stop_ids, row_ids=None):
    """Sample until every row has stopped or spent its budget (≤ max_new_tokens). Row b's token
    at step t is drawn with fold_in(fold_in(key, row_ids[b]), t); row_ids [B] defaults to 0..B-1.
    Returns tokens [B, N], logprobs [B, N], lengths [B], finish reasons [B], cache."""
    model = nnx.merge(graphdef, state)
    batch = logits.shape[0]
    weights = None
    if unstacked_layers():
        weights, cache = model.decode_weights(), cache.unstacked()
    if row_ids is None:
        row_ids = jnp.arange(batch, dtype=jnp.int32)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)  # [B]

    def draw(s, logits):
        """Sample step s["step"]'s token from `logits` [B, V] and record it; the token and its
        position are what the next forward feeds."""
        step = s["step"]
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        token, logprob = sample_tokens(logits, keys, temperature, top_k, top_p)
        live = ~s["done"]
        token = jnp.where(live, token, 0)
        stopped = live & jnp.isin(token, stop_ids)
        return dict(
            s, step=step + 1, token=token, token_positions=s["positions"],
            positions=s["positions"] + live,
            tokens=s["tokens"].at[:, step].set(token),
            logprobs=s["logprobs"].at[:, step].set(jnp.where(live, logprob, 0.0)),
            lengths=jnp.where(live, step + 1, s["lengths"]),
            finish=jnp.where(stopped, FINISH_STOP, s["finish"]),
            done=s["done"] | stopped | (step + 1 >= budgets),
        )

    def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):  # one forward of the last drawn tokens, then the next draw: no forward after the last
        logits, cache = model.decode(s["token"][:, None], s["token_positions"][:, None], s["cache"], weights=weights)
        return draw(dict(s, cache=cache), logits[:, 0])

    s = dict(
        step=jnp.int32(0), cache=cache,
        positions=lengths.astype(jnp.int32),
        tokens=jnp.zeros((batch, max_new_tokens), jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
        finish=jnp.full((batch,), FINISH_LENGTH, jnp.int32),
        done=budgets <= 0,
    )
    if max_new_tokens > 0:  # the first token comes from the prefill's logits
        s = jax.lax.while_loop(cond, body, draw(s, logits))
    cache = s["cache"] if weights is None else s["cache"].stacked()
    return s["tokens"], s["logprobs"], s["lengths"], s["finish"], cache


# --------------------------------------------------------------------------------------------
# Host side


# KV caches hold a whole number of blocks of TPU's decode kernel (`attention.decode_kernel_block`:
# 128-1,024 slots; XLA's chunk loop serves other caches): a multiple of 128 slots, and past
# LONG_CACHE slots a multiple of 1,024, so that a long cache is read in large blocks (the 4B's
# bfloat16 cache in 1,024-slot blocks) for at most 1,023 more slots (6.2 %).
LONG_CACHE = 16384


def cache_slots(tokens: int) -> int:
    """Slots of a KV cache for `tokens` tokens (a prompt bucket and a budget of new tokens):
    rounded up to a multiple of 128, or of 1,024 past LONG_CACHE."""
    multiple = 1024 if tokens > LONG_CACHE else 128
    return -(-tokens // multiple) * multiple


def check_buckets(buckets) -> tuple[int, ...]:
    """The prompt buckets as a tuple; ConfigError unless they are whole token counts of at least
    1 in increasing order (`bucket_length` takes the first that holds a prompt, and names the last
    as the largest)."""
    buckets = tuple(buckets)
    if not buckets or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in buckets) \
            or any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise ConfigError(f"prompt buckets must be one or more token counts of at least 1 in increasing order, "
                          f"e.g. (64, 128, 256); got {buckets}")
    return buckets


def bucket_length(length: int, buckets=DEFAULT_BUCKETS) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ConfigError(f"a prompt of {length} tokens is longer than the sampler's largest prompt bucket "
                      f"({buckets[-1]} tokens); shorten it")


def kv_bytes_per_token(config: ModelConfig, dtype) -> int:
    """Bytes of KV cache one token takes over all layers: keys and values, K heads of H each."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def wave_size(config: ModelConfig, cache_len: int, kv_cache_bytes_per_device: float, cache_dtype,
              batch_shards: int = 1, kv_head_shards: int = 1) -> int:
    """The most sequences whose KV cache of `cache_len` slots fits in the budget on every device,
    a multiple of `batch_shards` so rows split evenly over the mesh's batch axes. A device holds
    wave / batch_shards rows of 1 / kv_head_shards of the kv heads each."""
    per_sequence = cache_len * kv_bytes_per_token(config, cache_dtype) / kv_head_shards  # on one device
    rows_per_device = int(kv_cache_bytes_per_device // per_sequence)
    if rows_per_device < 1:
        gib = 2 ** 30
        raise ConfigError(
            f"the KV cache of one sequence ({cache_len} slots x {kv_bytes_per_token(config, cache_dtype)} "
            f"bytes per token in {jnp.dtype(cache_dtype).name}, over {kv_head_shards} kv-head shard(s)) "
            f"takes {per_sequence / gib:.2f} GiB per device, more than the budget of "
            f"{kv_cache_bytes_per_device / gib:.2f} GiB per device: raise the KV-cache budget (kv_cache_gib), "
            "shorten max_new_tokens or the prompts, split the kv heads over more devices (tensor axis) "
            "or store the cache in a narrower dtype")
    return rows_per_device * batch_shards


def rows_per_wave(num_requests: int, batch_shards: int, cap: int | None) -> int:
    """Rows of every wave of a call: `cap` (None: no cap), or the call's own size when smaller,
    rounded up to the batch shards so that rows split evenly."""
    rows = -(-num_requests // batch_shards) * batch_shards
    return rows if cap is None else min(cap, rows)


def pad_wave(prompts: list[list[int]], budgets: np.ndarray, rows: int, width: int):
    """Right-padded tokens [rows, width], lengths [rows] and budgets [rows] for one wave; rows past
    the prompts are dummies (one token, budget 0) that keep the wave's shape fixed."""
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones((rows,), np.int32)
    padded_budgets = np.zeros((rows,), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
        lengths[row] = len(p)
    padded_budgets[: len(prompts)] = budgets
    return tokens, lengths, padded_budgets


@cache  # once per budget and model limit (and fix), whatever the prompts' lengths, not at every call
def _warn_past_trained_positions(max_new_tokens: int, limit: int, prompt_alone: bool) -> None:
    fix = "a prompt alone reaches it: shorten the prompts" if prompt_alone else "lower max_new_tokens for this model"
    log.warning("prompts plus max_new_tokens (%d) pass the model's max_position_embeddings (%d): positions "
                "beyond it were never trained; %s", max_new_tokens, limit, fix)


class Sampler:
    """Holds the model split for jit and one donated KV cache, reused while its shape holds.

    `max_concurrent` caps the rows decoded at once; `kv_cache_gib` (per device) derives that cap
    from the cache length of each call instead (see `wave_size`). With neither, a call is one
    wave of all its requests.
    """

    def __init__(self, model: Qwen3, mesh=None, rules=DEFAULT_RULES, buckets=DEFAULT_BUCKETS,
                 cache_dtype: str | None = None, max_concurrent: int | None = None,
                 kv_cache_gib: float | None = None, progress: bool = True):
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.mesh, self.rules, self.buckets = mesh, rules, check_buckets(buckets)
        self.cache_dtype = cache_dtype or model.config.dtype
        self.progress = progress
        if max_concurrent is not None and kv_cache_gib is not None:
            raise ConfigError("set max_concurrent or kv_cache_gib, not both")
        shards = self.cache_shards()[0]
        if max_concurrent is not None and (max_concurrent < 1 or max_concurrent % shards):
            raise ConfigError(f"max_concurrent must be a positive multiple of the mesh's {shards} batch "
                              f"shard(s), so rows split evenly; got {max_concurrent}")
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
        self.max_concurrent, self.kv_cache_gib = max_concurrent, kv_cache_gib
        self._kv_cache: KVCache | None = None

    def update_weights(self, state) -> None:
        """Sample from new weights (an nnx.State or pure dict of the same structure, e.g. the
        trainer's params cast to the sampling dtype) without recompiling."""
        self.state = state

    def release(self) -> None:
        """Free the weights and the KV cache (e.g. while a trainer updates the policy); the next
        `update_weights` brings weights back, and the next call allocates a cache again."""
        self.state, self._kv_cache = None, None

    def cache_shards(self) -> tuple[int, int]:
        return cache_shards(self.config, self.mesh, self.rules)

    def wave_rows(self, num_requests: int, cache_len: int) -> int:
        """Rows of every wave of a call: the cap (set or derived from the KV budget at this
        cache length), or the call's own size when smaller, rounded up to the batch shards."""
        batch_shards, kv_head_shards = self.cache_shards()
        cap = self.max_concurrent
        if self.kv_cache_gib is not None:
            cap = wave_size(self.config, cache_len, self.kv_cache_gib * 2 ** 30, self.cache_dtype,
                            batch_shards, kv_head_shards)
        return rows_per_wave(num_requests, batch_shards, cap)

    def _mesh_context(self):
        return mesh_context(self.mesh)

    def _put(self, array: np.ndarray):
        return put_rows(array, self.mesh, self.rules)

    def _cache(self, batch: int, max_len: int) -> KVCache:
        """The held cache when its shape fits, else a new one; the old one is dropped first, so
        at most one cache lives at a time."""
        cache, self._kv_cache = self._kv_cache, None
        if cache is not None and (cache.batch, cache.max_len) == (batch, max_len):
            return cache
        del cache
        return new_kv_cache(self.config, batch, max_len, self.cache_dtype, self.mesh, self.rules)

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams, key, stop_ids: Collection[int],
                     budgets: list[int] | None = None, row_ids: Sequence[int] | None = None) -> list[Completion]:
        """Sample a completion for each prompt (token ids), in waves of `wave_rows` rows.
        `budgets` caps new tokens per row. All waves of a call share one prompt bucket (the
        call's longest prompt), so one compiled prefill and decode loop serve them all. Prompt i
        draws its randomness as row `row_ids[i]` (default i): a process sampling its share of a
        larger batch passes its prompts' places in it and makes the same random draws as one
        process would. The arithmetic may still differ in the last bits (the share's bucket, so
        its prefill width and cache length, follow its own longest prompt), so a near-tie may
        sample another token."""
        if self.state is None:
            raise RuntimeError("the sampler's weights were released; call update_weights before sampling again")
        check_token_ids(prompts, self.config.vocab_size)
        if budgets is not None and len(budgets) != len(prompts):
            raise ValueError(f"got {len(budgets)} budgets for {len(prompts)} prompts; give one per prompt")
        if budgets is not None and min(budgets) < 0:
            raise ValueError(f"prompts[{int(np.argmin(budgets))}] has a budget of {min(budgets)} new tokens; "
                             "give 0 or more")
        stops = jnp.asarray(checked_stop_ids(stop_ids), jnp.int32)
        row_ids = checked_row_ids(row_ids, len(prompts))
        n = params.max_new_tokens
        longest = max(len(p) for p in prompts)
        budgets = np.minimum(np.array(budgets if budgets is not None else [n] * len(prompts), np.int32), n)
        limit = self.config.max_position_embeddings
        if max(len(p) + int(b) for p, b in zip(prompts, budgets)) > limit:  # a row's own budget, not n
            _warn_past_trained_positions(n, limit, longest >= limit)
        width = bucket_length(longest, self.buckets)
        cache_len = cache_slots(width + n)
        rows = self.wave_rows(len(prompts), cache_len)
        cache = self._cache(rows, cache_len)

        def per_row(value, dtype):
            return self._put(np.full((rows,), value, dtype))

        controls = (per_row(params.temperature, np.float32), per_row(params.top_k, np.int32),
                    per_row(params.top_p, np.float32))
        starts = range(0, len(prompts), rows)
        completions = []
        for start in tqdm(starts, desc="sampling waves", unit="wave", leave=False,
                          disable=not self.progress or len(starts) == 1 or jax.process_index() != 0):
            wave = prompts[start: start + rows]
            tokens, lengths, wave_budgets = pad_wave(wave, budgets[start: start + rows], rows, width)
            lengths = self._put(lengths)
            with self._mesh_context():  # the attention kernels find the mesh here
                logits, cache = prefill(self.graphdef, self.state, self._put(tokens), lengths, cache)
                *out, cache = decode_loop(self.graphdef, n, self.state, logits, lengths, cache, key, *controls,
                                          self._put(wave_budgets), stops,
                                          self._put(wave_row_ids(row_ids, start, rows)))
            completions += _completions(*fetch(out), count=len(wave))
        self._kv_cache = cache
        return completions


def check_token_ids(prompts: list[list[int]], vocab_size: int, what: str = "prompt") -> None:
    """ValueError unless there is a prompt (a list, or a 2-D array, of them), each a flat sequence
    of at least one int, and every id is in [0, vocab_size): the embedding lookup would read NaN
    for an id outside it, not fail."""
    if len(prompts) == 0:  # len: a 2-D array of ids is refused by `not` as ambiguous
        raise ValueError(f"no {what}s given")
    for i, ids in enumerate(prompts):
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise ValueError(f"{what}s[{i}] is of type {type(ids).__name__}, not token ids: give one list of ints per "
                             f"{what} (a single {what} too: [ids])")
        if len(ids) == 0:
            raise ValueError(f"every {what} needs at least one token; {what}s[{i}] has none")
        try:
            array = np.asarray(ids)
        except ValueError:  # ragged
            array = None
        if array is None or array.ndim != 1 or array.dtype.kind not in "iu":  # floats were cut to ints
            held = "ragged rows" if array is None else f"{array.dtype}, shape {array.shape}"
            raise ValueError(f"{what}s[{i}] is not a flat sequence of ints ({type(ids).__name__} of {held}): "
                             f"give one list of token ids per {what}")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{what}s[{i}] holds token id {low if low < 0 else high}, outside the model's vocabulary "
                             f"[0, {vocab_size}) (another model's tokenizer?)")


def checked_stop_ids(stop_ids) -> np.ndarray:
    """The token ids that end a completion as a flat int array: a list, tuple, set or array of
    ints, may be empty."""
    if stop_ids is None:
        raise ValueError("stop_ids is None: give the token ids that end a completion (a list, may be empty)")
    if isinstance(stop_ids, (set, frozenset)):
        stop_ids = sorted(stop_ids)
    try:
        ids = np.asarray(stop_ids) if not isinstance(stop_ids, (str, bytes)) else None
    except ValueError:  # ragged
        ids = None
    if ids is None or ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"stop_ids is {stop_ids!r}; give a flat list of token ids (ints, may be empty)")
    return ids.astype(np.int32)


def checked_row_ids(row_ids: Sequence[int] | None, count: int) -> np.ndarray:
    """The randomness rows of `count` prompts: `row_ids` (one per prompt), or 0..count-1."""
    if row_ids is None:
        return np.arange(count, dtype=np.int32)
    ids = np.asarray(row_ids, np.int32)
    if ids.shape != (count,):
        raise ValueError(f"row_ids has shape {ids.shape}; give a flat sequence of {count} ints, one per prompt")
    return ids


def wave_row_ids(row_ids: np.ndarray, start: int, rows: int) -> np.ndarray:
    """`row_ids[start: start + rows]`, padded with zeros to `rows` (padding rows' draws are dropped)."""
    wave = np.zeros((rows,), np.int32)
    part = row_ids[start: start + rows]
    wave[: len(part)] = part
    return wave


def fetch(tree):
    """`jax.device_get(tree)` that Ctrl-C interrupts while the device is still computing it.
    Blocked inside device_get, the main thread runs no Python signal handler until the call
    ends (a decode loop at the recipe's lengths: minutes); polling keeps it in the interpreter.
    Ctrl-C raises DeviceCallInterrupted (a KeyboardInterrupt); a signal handler that does not
    raise (a trainer's, which finishes its step) runs at once, too."""
    leaves = jax.tree.leaves(tree)
    pause = 0.001
    try:
        while not all(leaf.is_ready() for leaf in leaves if isinstance(leaf, jax.Array)):
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
    except KeyboardInterrupt:
        raise DeviceCallInterrupted() from None
    return jax.device_get(tree)


def mesh_context(mesh):
    """Where jitted sampling runs: inside `mesh` (the attention kernels find it there), if any."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def cache_shards(config: ModelConfig, mesh=None, rules=DEFAULT_RULES) -> tuple[int, int]:
    """How many ways the mesh splits a KV cache's batch axis and its kv-head axis."""
    if mesh is None:
        return 1, 1
    # The spec of a cache whose batch the batch axes divide says how the kv heads split.
    spec = kv_cache_spec(config, _ways(rules.get("batch"), mesh), 1, mesh, rules)
    axis = KV_CACHE_AXES.index
    return _ways(spec[axis("batch")], mesh), _ways(spec[axis("kv_heads")], mesh)


def kv_cache_spec(config: ModelConfig, batch: int, max_len: int, mesh, rules=DEFAULT_RULES):
    """The partition spec of a KV cache's keys (and values) on `mesh`."""
    return logical_to_spec(KV_CACHE_AXES, KVCache.shape(config, batch, max_len), mesh, rules)


def put_rows(array: np.ndarray, mesh=None, rules=DEFAULT_RULES):
    """A host array [B, ...] on the devices, its rows split over the mesh's batch axes."""
    if mesh is None:
        return jnp.asarray(array)
    spec = logical_to_spec(("batch",) + (None,) * (array.ndim - 1), array.shape, mesh, rules)
    return jax.device_put(array, jax.sharding.NamedSharding(mesh, spec))


def new_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype, mesh=None, rules=DEFAULT_RULES) -> KVCache:
    """A zero KV cache [L, batch, max_len, K, H], created in place in its shards on `mesh`."""
    if mesh is None:
        return KVCache.zeros(config, batch, max_len, dtype)
    sharding = jax.sharding.NamedSharding(mesh, kv_cache_spec(config, batch, max_len, mesh, rules))
    return _sharded_zeros(config, batch, max_len, dtype, sharding)()


@cache  # one jitted fill per cache shape and layout: a new function each time compiled at every allocation
def _sharded_zeros(config: ModelConfig, batch: int, max_len: int, dtype, sharding):
    return jax.jit(partial(KVCache.zeros, config, batch, max_len, dtype), out_shardings=KVCache(sharding, sharding))


def _ways(axes, mesh) -> int:
    """How many shards mesh axes (a name, a tuple of names or None, as in a PartitionSpec entry
    or a rule) make on `mesh`; axes the mesh lacks count once."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape.get(name, 1) for name in names)


def _completions(tokens, logprobs, lengths, finish, count: int) -> list[Completion]:
    """The first `count` rows of a wave's outputs (tokens/logprobs [B, N], lengths/finish [B])."""
    return [
        Completion(tokens=tokens[r, : lengths[r]].tolist(), logprobs=logprobs[r, : lengths[r]].tolist(),
                   finish_reason=FINISH_REASONS[int(finish[r])])
        for r in range(count)
    ]


def generate(model: Qwen3, tokenizer, prompts_or_messages, params: SamplingParams = SamplingParams(),
             seed: int = 0, stop_ids: Collection[int] | None = None, sampler: Sampler | None = None) -> list[Completion]:
    """Generate for a list of prompts: each a string (tokenized as is) or a list of chat messages
    (formatted with the tokenizer's chat template and generation prompt). One string or one
    conversation alone is a list of one prompt; a message alone (a dict) is refused."""
    from qed_jax import tokenizer as tok

    tok.check_vocab(tokenizer, model.config.vocab_size)
    if isinstance(prompts_or_messages, dict):  # listing it would sample its keys as prompts
        raise ConfigError("generate: a message alone is no prompt; pass a conversation, a list of messages: [message]")
    items = [prompts_or_messages] if isinstance(prompts_or_messages, str) else list(prompts_or_messages)
    if items and all(isinstance(m, dict) for m in items):  # one conversation
        items = [items]
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            prompts.append(tokenizer(item, add_special_tokens=False)["input_ids"])
        elif isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item):
            try:
                prompts.append(tok.chat_prompt(tokenizer, item))
            except ValueError as e:  # the chat template refuses this conversation
                raise ConfigError(f"generate: prompts[{i}]: {e}") from None
        else:
            raise ConfigError(f"generate: prompts[{i}] is of type {type(item).__name__}; each prompt is a string or a "
                              "conversation (a list of message dicts)")
    stop_ids = tok.stop_ids(tokenizer) if stop_ids is None else stop_ids
    sampler = sampler or Sampler(model)
    completions = sampler.generate_ids(prompts, params, jax.random.key(seed), stop_ids)
    for c in completions:
        c.text = tokenizer.decode(c.text_tokens, skip_special_tokens=False)
    return completions
