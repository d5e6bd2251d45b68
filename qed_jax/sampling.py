"""Jitted sampling: prefill a prompt batch into a fixed-size KV cache, then a `lax.while_loop`
that decodes one token per step for the whole batch.

Static shapes: prompts are right-padded to a length bucket, the cache holds bucket +
max_new_tokens slots, and sampling controls (temperature, top-k, top-p, stop ids, per-row
budgets) are traced arrays, so changing them never recompiles. The cache is donated between
calls. Each row keeps its own positions, so prompts of different lengths decode exactly.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qed_jax.model import KV_CACHE_AXES, KVCache, Qwen3
from qed_jax.sharding import DEFAULT_RULES, logical_to_spec

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
FINISH_STOP, FINISH_LENGTH = 1, 2
FINISH_REASONS = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated ids, the stop token included when the row stopped
    logprobs: list[float]  # log-prob of each token under log_softmax(logits / temperature)
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
    logits [B, V] already divided by the temperature; top_k [B] (0 = off); top_p [B]."""
    vocab = logits.shape[-1]
    desc = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    desc = jnp.where(jnp.arange(vocab)[None] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = before < top_p[:, None]
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_tokens(logits, key, temperature, top_k, top_p):
    """One token per row and its log-prob under log_softmax(logits / temperature) (temperature
    1 for greedy rows). logits [B, V] float32; temperature/top_k/top_p [B]."""
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

    def draw(scaled):
        # The filters sort the vocabulary, which is slow on some backends: skip them when unused.
        filtered = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), filter_logits, lambda x, *_: x,
                                scaled, top_k, top_p)
        return jax.random.categorical(key, filtered, axis=-1)

    sampled = jax.lax.cond(jnp.all(greedy), lambda x: jnp.argmax(x, axis=-1), draw, scaled)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprobs


# --------------------------------------------------------------------------------------------
# Jitted prefill and decode loop (model weights are arguments: graphdef static, state traced)


@partial(jax.jit, static_argnums=0, donate_argnames="cache")
def prefill(graphdef, state, tokens, lengths, cache: KVCache):
    """Run right-padded prompts [B, P] through the model; returns the logits at each row's last
    prompt token [B, V] and the filled cache."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.decode(tokens, positions, cache, logits_at=lengths - 1)


@partial(jax.jit, static_argnums=(0, 1), donate_argnames="cache")
def decode_loop(graphdef, max_new_tokens: int, state, logits, lengths, cache: KVCache, key,
                temperature, top_k, top_p, budgets, stop_ids):
    """Sample until every row has stopped or spent its budget (≤ max_new_tokens).
    Returns tokens [B, N], logprobs [B, N], lengths [B], finish reasons [B], cache."""
    model = nnx.merge(graphdef, state)
    batch = logits.shape[0]
    init = dict(
        step=jnp.int32(0), logits=logits, cache=cache, key=key,
        positions=lengths.astype(jnp.int32),
        tokens=jnp.zeros((batch, max_new_tokens), jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
        finish=jnp.full((batch,), FINISH_LENGTH, jnp.int32),
        done=budgets <= 0,
    )

    def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        key, sub = jax.random.split(s["key"])
        token, logprob = sample_tokens(s["logits"], sub, temperature, top_k, top_p)
        live = ~s["done"]
        token = jnp.where(live, token, 0)
        stopped = live & jnp.isin(token, stop_ids)
        step = s["step"]
        out = dict(s, step=step + 1, key=key)
        out["tokens"] = s["tokens"].at[:, step].set(token)
        out["logprobs"] = s["logprobs"].at[:, step].set(jnp.where(live, logprob, 0.0))
        out["lengths"] = jnp.where(live, step + 1, s["lengths"])
        out["finish"] = jnp.where(stopped, FINISH_STOP, s["finish"])
        out["done"] = s["done"] | stopped | (step + 1 >= budgets)
        logits, out["cache"] = model.decode(token[:, None], s["positions"][:, None], s["cache"])
        out["logits"] = logits[:, 0]
        out["positions"] = s["positions"] + live
        return out

    s = jax.lax.while_loop(cond, body, init)
    return s["tokens"], s["logprobs"], s["lengths"], s["finish"], s["cache"]


# --------------------------------------------------------------------------------------------
# Host side


def bucket_length(length: int, buckets=DEFAULT_BUCKETS) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest bucket ({buckets[-1]})")


class Sampler:
    """Holds the model split for jit and one donated KV cache per (batch, cache length)."""

    def __init__(self, model: Qwen3, mesh=None, rules=DEFAULT_RULES, buckets=DEFAULT_BUCKETS,
                 cache_dtype: str | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.mesh, self.rules, self.buckets = mesh, rules, tuple(buckets)
        self.cache_dtype = cache_dtype or model.config.dtype
        self._caches: dict[tuple[int, int], KVCache] = {}

    def update_weights(self, state) -> None:
        """Sample from new weights (an nnx.State or pure dict of the same structure, e.g. the
        trainer's params cast to the sampling dtype) without recompiling."""
        self.state = state

    def _put(self, array: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(array)
        spec = logical_to_spec(("batch",) + (None,) * (array.ndim - 1), array.shape, self.mesh, self.rules)
        return jax.device_put(array, jax.sharding.NamedSharding(self.mesh, spec))

    def _cache(self, batch: int, max_len: int) -> KVCache:
        cache = self._caches.pop((batch, max_len), None)
        if cache is not None:
            return cache
        zeros = partial(KVCache.zeros, self.config, batch, max_len, self.cache_dtype)
        if self.mesh is None:
            return zeros()
        shape = (self.config.num_layers, batch, max_len, self.config.num_kv_heads, self.config.head_dim)
        spec = logical_to_spec(KV_CACHE_AXES, shape, self.mesh, self.rules)
        sharding = jax.sharding.NamedSharding(self.mesh, spec)
        return jax.jit(zeros, out_shardings=KVCache(sharding, sharding))()

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams, key, stop_ids: list[int],
                     budgets: list[int] | None = None) -> list[Completion]:
        """Sample a completion for each prompt (token ids). `budgets` caps new tokens per row."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        batch = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        width = bucket_length(int(lengths.max()), self.buckets)
        tokens = np.zeros((batch, width), np.int32)
        for row, p in enumerate(prompts):
            tokens[row, : len(p)] = p
        n = params.max_new_tokens
        cache = self._cache(batch, width + n)
        logits, cache = prefill(self.graphdef, self.state, self._put(tokens), self._put(lengths), cache)

        def per_row(value, dtype):
            return self._put(np.full((batch,), value, dtype))

        budgets = np.minimum(np.array(budgets if budgets is not None else [n] * batch, np.int32), n)
        out = decode_loop(
            self.graphdef, n, self.state, logits, self._put(lengths), cache, key,
            per_row(params.temperature, np.float32), per_row(params.top_k, np.int32),
            per_row(params.top_p, np.float32), self._put(budgets), jnp.asarray(stop_ids, jnp.int32),
        )
        out_tokens, out_logprobs, out_lengths, finish, cache = out
        self._caches[(batch, width + n)] = cache
        out_tokens, out_logprobs, out_lengths, finish = jax.device_get(
            (out_tokens, out_logprobs, out_lengths, finish))
        return [
            Completion(tokens=out_tokens[r, : out_lengths[r]].tolist(),
                       logprobs=out_logprobs[r, : out_lengths[r]].tolist(),
                       finish_reason=FINISH_REASONS[int(finish[r])])
            for r in range(batch)
        ]


def generate(model: Qwen3, tokenizer, prompts_or_messages, params: SamplingParams = SamplingParams(),
             seed: int = 0, stop_ids: list[int] | None = None, sampler: Sampler | None = None) -> list[Completion]:
    """Generate for a list of prompts: each a string (tokenized as is) or a list of chat messages
    (formatted with the tokenizer's chat template and generation prompt)."""
    from qed_jax import tokenizer as tok

    prompts = []
    for item in prompts_or_messages:
        if isinstance(item, str):
            prompts.append(tokenizer(item, add_special_tokens=False)["input_ids"])
        else:
            prompts.append(tok.chat_prompt(tokenizer, item))
    stop_ids = tok.stop_ids(tokenizer) if stop_ids is None else stop_ids
    sampler = sampler or Sampler(model)
    completions = sampler.generate_ids(prompts, params, jax.random.key(seed), stop_ids)
    for c in completions:
        c.text = tokenizer.decode(c.text_tokens, skip_special_tokens=False)
    return completions
