"""The Qwen3 dense decoder in Flax NNX.

Decoder layers are stored stacked (a leading `layers` axis on every block parameter) and run with
`jax.lax.scan`, so 36 layers compile as one block; on CPU mostly as a loop over per-layer
arrays instead (see `unstacked_layers`). Every parameter carries logical axis names in its
`axes` metadata; `qed_jax.sharding` maps them onto a device mesh.

Shapes: B batch, T query time, S key/cache time, D hidden, N query heads, K kv heads, H head_dim,
F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qed_jax.attention import (cached_attention, causal_attention, from_split_layout, platform, split_cached_attention,
                               splash_block, to_split_layout)
from qed_jax.config import ModelConfig

# What a rematerialized block keeps for the backward pass besides its input, which the layer
# scan stacks: [L, B, T, D], one layer's input per layer. "offload" keeps that stack in host
# memory instead (TPU's pinned host memory; on CPU the same memory), moved out during the
# forward pass and back during the backward. For one 51,200-token row of the 4B model per chip
# (GRPO's micro-batch on a v6e-8) `qed-jax plan` shows 8.8 GiB per chip in host memory and the
# step's HBM going from 35.4 to 21.5 GiB.
_LAYER_INPUT = "layer_input"
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[_LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}


class KVCache(NamedTuple):
    """Keys and values for every layer; slot s of a row holds the token at position s.

    Stacked, both are [L, B, S, K, H]: a new token's keys and values are a contiguous write,
    and on TPU the decode kernel reads a block of a row's slots, all kv heads, as one contiguous
    copy (`attention.kernel_cached_attention`). Stacked in [L, B, K, S, H] order instead, the
    cache was copied whole into this one around the decode loop, for its writes (16 GiB more
    temporaries in the 4B decode loop on v5p-8). A decode loop on CPU works on the per-layer
    form (`unstacked`): a tuple of L arrays per side, keys in tiles [B, K, S / C, H, C] and
    values [B, K, S, H], the layouts its attention products read in place
    (`attention.to_split_layout`); in the stacked layout XLA:CPU copied each layer's cache into
    them on every step."""

    k: jax.Array  # [L, B, S, K, H], or a tuple of L arrays [B, K, S / C, H, C] (see `unstacked`)
    v: jax.Array  # [L, B, S, K, H], or a tuple of L arrays [B, K, S, H]

    @staticmethod
    def shape(config: ModelConfig, batch: int, max_len: int) -> tuple[int, ...]:
        """The shape of k and of v, stacked."""
        return (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        shape = cls.shape(config, batch, max_len)
        dtype = dtype or config.dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if isinstance(self.k, tuple) else self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2] if isinstance(self.k, tuple) else self.k.shape[2]

    def unstacked(self) -> "KVCache":
        """The per-layer form (see `Qwen3.decode`'s `weights`)."""
        split = [to_split_layout(k, v) for k, v in zip(self.k, self.v)]
        return KVCache(tuple(k for k, _ in split), tuple(v for _, v in split))

    def stacked(self) -> "KVCache":
        layers = [from_split_layout(k, v) for k, v in zip(self.k, self.v)]
        return KVCache(jnp.stack([k for k, _ in layers]), jnp.stack([v for _, v in layers]))

    def write(self, layer, rows, positions, k, v) -> "KVCache":
        """The cache with layer `layer`'s slots positions[b, t] of rows[b] set to k, v [B, T, K, H]."""
        # Advanced indices (rows, positions) around slices: the updated block is [B, T, K, H].
        if isinstance(self.k, tuple):
            def put(layers, new, at):
                updated = layers[layer].at[at].set(new.astype(layers[layer].dtype))
                return layers[:layer] + (updated,) + layers[layer + 1:]
            tile = self.k[layer].shape[4]
            return KVCache(put(self.k, k, (rows, slice(None), positions // tile, slice(None), positions % tile)),
                           put(self.v, v, (rows, slice(None), positions)))
        return KVCache(self.k.at[layer, rows, positions].set(k.astype(self.k.dtype)),
                       self.v.at[layer, rows, positions].set(v.astype(self.v.dtype)))


class DecodeWeights(NamedTuple):
    """The weights as a decode step on CPU reads them best (see `unstacked_layers` and
    `Qwen3._decode_feature_major`): each layer's as separate arrays, its projections output-major
    [out, in] (norm weights as they are), and the output projection [V, D] as stored."""

    layers: list  # each decoder layer's weights, {name: array}
    head: jax.Array  # [V, D]


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class DecoderLayers(nnx.Module):
    """All decoder blocks' weights, stacked along a leading `layers` axis."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        L, D, N, K, H, F = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
                            c.head_dim, c.intermediate_size)
        p = lambda shape, axes, init="normal": _param(rngs, shape, axes, c.param_dtype, init)  # noqa: E731
        self.attn_norm = p((L, D), ("layers", "norm"), "ones")
        self.q = p((L, D, N, H), ("layers", "embed", "heads", "head_dim"))
        self.k = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
        self.v = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
        self.o = p((L, N, H, D), ("layers", "heads", "head_dim", "embed"))
        self.q_norm = p((L, H), ("layers", "head_dim"), "ones")
        self.k_norm = p((L, H), ("layers", "head_dim"), "ones")
        self.mlp_norm = p((L, D), ("layers", "norm"), "ones")
        self.gate = p((L, D, F), ("layers", "embed", "mlp"))
        self.up = p((L, D, F), ("layers", "embed", "mlp"))
        self.down = p((L, F, D), ("layers", "mlp", "embed"))


class Qwen3(nnx.Module):
    """`model(input_ids)` → float32 logits [B, T, V]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        self.layers = DecoderLayers(c, rngs)
        self.final_norm = _param(rngs, (c.hidden_size,), ("norm",), c.param_dtype, "ones")
        if not c.tie_word_embeddings:
            self.lm_head = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """Full-sequence forward → float32 logits [B, T, V]. See `hidden_states`."""
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    def hidden_states(self, input_ids, positions=None, segment_ids=None):
        """The final-normed hidden states [B, T, D]. `segment_ids` [B, T] keeps packed rows
        apart: a token attends to earlier tokens of its own segment only. `positions` [B, T]
        default to 0..T-1. Losses multiply these by `head_weight()` chunk by chunk, so that
        [B, T, V] logits never exist at once."""
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        implementation = self.config.attention

        def attend(q, k, v, cache, layer):
            return causal_attention(q, k, v, segment_ids, implementation=implementation), cache

        # The loop does not rematerialize: with remat, the scan (XLA:CPU schedules an unrolled
        # loop's recomputation early and keeps every activation alive anyway).
        layers = self.layer_weights() if unstacked_layers() and self.config.remat == "none" else None
        x, _ = self._decoder(input_ids, positions, None, attend, layers)
        return x

    def prefill(self, input_ids, cache: KVCache, logits_at=None):
        """`decode` of prompts [B, T] at positions 0..T-1: the same logits and cache, computed as
        causal self-attention over the prompt (which is what attending to cache slots 0..t is,
        once they hold this prompt), so the long-sequence attention implementations serve it.
        Slots T and later are left as they were."""
        B, T = input_ids.shape
        rows, slots = cache.batch, cache.max_len
        if (B, T) != (rows, min(T, slots)):  # shapes are static: a traced call is checked as it is traced
            raise ValueError(f"prefill of {B} prompts of {T} tokens into a KV cache of {rows} rows of {slots} slots: "
                             "the cache needs a row per prompt and a slot per token (KVCache.zeros(config, batch, "
                             "max_len))")
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        implementation = self.config.attention
        if implementation == "splash" and not splash_block(T):
            # A model trained with splash still samples prompts of any width (the sampler's
            # buckets start at 64, the reasoning cache's prompts are as long as they are): where
            # the kernel cannot serve the width, another implementation gives the same numbers.
            implementation = "auto"

        def attend(q, k, v, cache, layer):
            start = (layer, 0, 0, 0, 0)
            cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), start),
                            jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start))
            return causal_attention(q, k, v, implementation=implementation), cache

        layers = self.layer_weights() if unstacked_layers() else None
        x, cache = self._decoder(input_ids, positions, cache, attend, layers)
        return self._logits_at(x, logits_at), cache

    def decode(self, input_ids, positions, cache: KVCache, logits_at=None, weights: DecodeWeights | None = None):
        """Forward with a KV cache: token t of row b is written to cache slot positions[b, t] and
        attends to slots 0..positions[b, t] of its row; positions must be from 0 to below the
        cache's length (a traced program cannot check them, and XLA drops a write past the end,
        so the token would attend without itself: the sampler sizes its caches by
        `sampling.cache_slots` for that). Returns (logits [B, T, V], new cache);
        with `logits_at` [B] (an index into T per row), logits [B, V] at that token only, so a
        prefill never computes the vocabulary projection for every prompt position. Attention
        reads the cache only up to the furthest position (`attention.cached_attention`: on TPU
        a kernel, each row up to its own); prompts written from position 0 go faster by
        `prefill`.

        With `weights` (from `decode_weights`, and `cache.unstacked()`), the layers run one by
        one over per-layer arrays instead of a scan over the stacked ones, feature-major (see
        `unstacked_layers` and `_decode_feature_major`)."""
        rows = jnp.arange(input_ids.shape[0])[:, None]
        furthest = jnp.max(positions)  # once for all layers (over sharded rows, an all-reduce)

        def attend(q, k, v, cache, layer):
            cache = cache.write(layer, rows, positions, k, v)
            if isinstance(cache.k, tuple):
                k, v = cache.k[layer].astype(q.dtype), cache.v[layer].astype(q.dtype)
                return split_cached_attention(q, k, v, positions), cache
            return cached_attention(q, cache.k, cache.v, positions, layer, furthest=furthest), cache

        if weights is not None:
            return self._decode_feature_major(input_ids, positions, cache, attend, weights, logits_at)
        x, cache = self._decoder(input_ids, positions, cache, attend)
        return self._logits_at(x, logits_at), cache

    def decode_weights(self) -> DecodeWeights:
        """The weights for `decode(..., weights=)`: per layer, projections output-major [out, in]."""
        def output_major(name, w):
            inputs = 2 if name == "o" else 1  # o contracts [N, H]; the others their first axis
            return w if w.ndim == 1 else w.reshape(math.prod(w.shape[:inputs]), -1).T
        layers = [{name: output_major(name, w) for name, w in layer.items()} for layer in self.layer_weights()]
        # The barrier makes the transposed copies real: XLA would otherwise fold each transpose
        # into the matmul that reads it, which then reads [in, out] in the slow orientation.
        return DecodeWeights(jax.lax.optimization_barrier(layers), self.head_weight())

    def _decode_feature_major(self, input_ids, positions, cache: KVCache, attend, weights: DecodeWeights,
                              logits_at=None):
        """The decoder of `decode` on CPU, over per-layer weights and cache: the same blocks as
        `_decoder` with the activations feature-major [D, B*T], so that every projection is
        [out, in] @ [in, B*T]: XLA:CPU's matmul streams weights faster in that orientation than
        in [B*T, in] @ [in, out] (ten layers' projections: 1.2x at 8 rows, 1.35x at 64; the
        whole decode loop: 1.10x and 1.06-1.09x, see bench/README.md). Queries, keys and values
        go to [B, T, heads, H] for QK-norm, RoPE and the cache, as in `_decoder`."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        B, T = input_ids.shape
        eps = c.rms_norm_eps

        def project(w, x):
            return jnp.dot(w.astype(dtype), x)

        def heads(y, count):  # [count * H, B * T] -> [B, T, count, H]
            return y.reshape(count, c.head_dim, B, T).transpose(2, 3, 0, 1)

        x = jnp.take(self.embed[...], input_ids.reshape(-1), axis=0).astype(dtype).T  # [D, B * T]
        cos, sin = map(materialized, rope_tables(positions, c.head_dim, c.rope_theta, dtype))
        for layer, w in enumerate(weights.layers):
            h = rms_norm(x, w["attn_norm"], eps, axis=0)
            q, k = norm_and_rotate(heads(project(w["q"], h), c.num_heads),
                                   heads(project(w["k"], h), c.num_kv_heads), w, cos, sin, c)
            v = heads(project(w["v"], h), c.num_kv_heads)
            h, cache = attend(q, k, v, cache, layer)
            x = x + project(w["o"], h.reshape(B * T, -1).T)
            h = rms_norm(x, w["mlp_norm"], eps, axis=0)
            x = x + project(w["down"], jax.nn.silu(project(w["gate"], h)) * project(w["up"], h))
        x = rms_norm(x, self.final_norm[...], eps, axis=0).reshape(-1, B, T)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[None, :, None], axis=2)  # [D, B, 1]
        logits = jnp.dot(weights.head.astype(dtype), x.reshape(x.shape[0], -1),
                         preferred_element_type=jnp.float32)  # [V, B * T'], as `logits`
        V = logits.shape[0]
        # The transpose to [B * T', V] as a real copy, between barriers: XLA would fold it into
        # the matmul (making that [B * T', D] @ [D, V]) or into each op of the sampler (reading
        # [V, B] strided); a flat array has one layout, so no later op can take it transposed.
        barrier = jax.lax.optimization_barrier
        logits = barrier(barrier(logits).T.reshape(-1)).reshape(B, -1, V)
        return (logits if logits_at is None else logits[:, 0]), cache

    def layer_weights(self) -> list[dict]:
        """Each decoder layer's weights, {name: array}, as separate arrays."""
        stacked = self._stacked_weights()
        return [{name: w[i] for name, w in stacked.items()} for i in range(self.config.num_layers)]

    def _stacked_weights(self) -> dict:
        return {name: getattr(self.layers, name)[...] for name in vars(self.layers)
                if isinstance(getattr(self.layers, name), nnx.Param)}

    def _logits_at(self, x, logits_at):
        """Logits at every token, or at token logits_at[b] of each row b."""
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # [B, 1, D]
        logits = self.logits(x)
        return logits if logits_at is None else logits[:, 0]

    def _decoder(self, input_ids, positions, cache: KVCache | None, attend, layers=None):
        """The decoder stack. `attend(q, k, v, cache, layer) -> (out, cache)` is the attention
        of one layer over its rotated q [B, T, N, H] and k, v [B, T, K, H]. With `layers` (a
        list of per-layer weights), a loop over them, without remat (it serves decoding, and
        training with `remat: none`); else a scan over the stacked weights."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, dtype)
        if layers is not None:  # only the loop needs this: a scan gets the tables as loop inputs
            cos, sin = map(materialized, (cos, sin))

        def block(carry, layer):
            x, cache = carry
            w, index = layer
            if c.remat == "offload":  # every use of the input below reads the named, offloaded copy
                x = checkpoint_name(x, _LAYER_INPUT)
            h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
            q, k, v = qkv(h, w, cos, sin, c)
            h, cache = attend(q, k, v, cache, index)
            x = x + dense(h, w["o"].astype(dtype), contract=2)
            h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
            return (x + mlp(h, w), cache), None

        if layers is not None:
            for index, w in enumerate(layers):
                (x, cache), _ = block((x, cache), (w, index))
        else:
            if c.remat != "none":
                block = jax.checkpoint(block, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
            # The whole cache rides in the carry and is updated in place, layer by layer.
            (x, cache), _ = jax.lax.scan(block, (x, cache), (self._stacked_weights(), jnp.arange(c.num_layers)))
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        return x, cache

    def head_weight(self):
        """The output projection [V, D] (the embedding when tied)."""
        return (self.embed if self.config.tie_word_embeddings else self.lm_head)[...]

    def logits(self, x):
        """Hidden states [..., D] → float32 logits [..., V], accumulated and returned in float32
        whatever the compute dtype (as `losses.token_logprobs` computes them: the sampler's
        log-probs and the learner's agree)."""
        return jnp.einsum("...d,vd->...v", x, self.head_weight().astype(x.dtype), preferred_element_type=jnp.float32)


def unstacked_layers() -> bool:
    """Whether the decoder runs its layers as a loop over per-layer arrays (`layer_weights`)
    rather than a scan over the stacked ones: on CPU, for decoding and for training without
    remat. XLA:CPU copies a layer's slice of a stacked array before every matmul that reads it
    (a decode step copied all the weights and each layer's cache, 43 % of a batch-8 step), and
    a scan's backward first fills [L, ...] buffers with zeros to stack every layer's residuals
    and gradients into (SFT step: unrolled 4-5 % faster). A decode loop splits the weights and
    the cache once before it starts (`decode_weights`, `KVCache.unstacked`, which also lays each
    layer's cache out the way CPU reads it), so on CPU it holds a second copy of both while it
    runs; `sampling.kv_cache_gib` does not count that copy. TPU fuses the slice into its
    consumer and keeps the scan: one compiled block for all layers, and no second copy."""
    return platform() == "cpu"


def rms_norm(x, weight, eps, axis: int = -1):
    """RMSNorm over `axis` (the last: features; 0: a feature-major [D, tokens] array),
    statistics in float32 (as transformers does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=axis, keepdims=True) + eps)
    if axis != -1:
        weight = weight.reshape(weight.shape + (1,) * (x.ndim - 1 - axis % x.ndim))
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_tables(positions, head_dim, theta, dtype):
    """cos and sin [B, T, H] for the split-half RoPE layout of transformers."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def materialized(x):
    """x unchanged, as an identity gather: XLA:CPU does not fuse a computation into a gather
    that reads it, so x is computed once, into a buffer of its own. For the RoPE tables of the
    layer loops on CPU: XLA:CPU fused their cos and sin into every op that reads them, and
    evaluated them again for each head and each shifted read of the rotation, forward and
    backward (ten layers' RoPE forward and backward at the SFT step's shapes, printed: 89-115 ms,
    against 15-19 with the tables as buffers; see bench/README.md). An optimization barrier does
    not stop that (XLA:CPU drops barriers before it fuses). On a CPU mesh with the batch
    sharded, the partitioner gathers the tables ([B * T, H], small beside the activations) whole
    on every device."""
    rows = x.reshape(-1, x.shape[-1])
    return rows[jnp.arange(rows.shape[0])].reshape(x.shape)


def apply_rope(x, cos, sin):
    """x [B, T, heads, H]; rotates the two halves of head_dim as one complex pair."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def dense(x, w, contract: int = 1):
    """x [..., *in] @ w [*in, *out] → [..., *out], contracting the last `contract` axes of x with
    the first of w, over x's leading axes merged into one. Why merged: the gradient of w then
    contracts a single axis (batch and time), which XLA:CPU multiplies in place; with batch and
    time as two contracted axes it first copies the incoming gradient into a transposed layout,
    which cost a quarter of the SFT step. The contracted axes stay apart: merging the attention
    output's heads with head_dim made XLA:TPU copy the attention kernel's heads-major output
    into a row-major layout, twice per layer and way (+0.7 GiB for the 4B SFT step on v5p).
    Merging batch with time is free on both, and the merged axis shards like the batch axis."""
    lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    if w.shape[:contract] != inner:
        raise ValueError(f"dense: x {x.shape} and w {w.shape} disagree on the {contract} contracted axes")
    y = jnp.tensordot(x.reshape(-1, *inner), w, axes=contract)
    return y.reshape(*lead, *w.shape[contract:])


def qkv(x, w, cos, sin, c: ModelConfig):
    """Queries [B, T, N, H] and keys, values [B, T, K, H], with QK-norm before RoPE."""
    dtype = x.dtype
    q, k = norm_and_rotate(dense(x, w["q"].astype(dtype)), dense(x, w["k"].astype(dtype)), w, cos, sin, c)
    return q, k, dense(x, w["v"].astype(dtype))


def norm_and_rotate(q, k, w, cos, sin, c: ModelConfig):
    """QK-norm, then RoPE, of projected queries [B, T, N, H] and keys [B, T, K, H]."""
    q = apply_rope(rms_norm(q, w["q_norm"], c.rms_norm_eps), cos, sin)
    k = apply_rope(rms_norm(k, w["k_norm"], c.rms_norm_eps), cos, sin)
    return q, k


def mlp(x, w):
    dtype = x.dtype
    gate = dense(x, w["gate"].astype(dtype))
    up = dense(x, w["up"].astype(dtype))
    return dense(jax.nn.silu(gate) * up, w["down"].astype(dtype))


def param_count(config: ModelConfig) -> int:
    """Number of parameters, from abstract shapes (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
