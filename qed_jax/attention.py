"""Attention: one function, several implementations.

`causal_attention` is causal self-attention over a whole sequence (training, `hidden_states`,
and a prompt's prefill), optionally kept apart by packed-row segment ids. It has three
implementations that compute the same thing:

- `xla`: `jax.nn.dot_product_attention` with a [B, 1, T, T] boolean mask. The reference; its
  memory grows with T², so it serves short sequences.
- `splash`: the Pallas TPU splash-attention kernel (flash attention with block sparsity: blocks
  above the diagonal are skipped; its own backward kernels). Memory grows with T. Off TPU it runs
  in Pallas interpret mode, which is for tests only.
- `blockwise`: plain JAX, one query chunk at a time with a flash-attention backward (it keeps
  each chunk's output and softmax normalizer, and recomputes the probabilities), so that neither
  the forward nor the backward holds more than [chunk, T] scores per head. For long sequences on
  backends without splash, and for every length on CPU, where it is also the fastest.

`auto` picks among them by backend and length (see `choose_implementation`).

`cached_attention` serves decoding: new tokens attend to KV-cache slots 0..position, in plain
JAX (one query token per row: there is no T² to avoid), reading only the chunks of the cache
that some row attends to. On TPU, one new token per row goes to `kernel_cached_attention`, a
Pallas kernel that reads each row's live blocks of the cache where they lie (XLA:TPU copies
every chunk the plain-JAX loop reads). `split_cached_attention` serves the per-layer cache
layout a decode loop uses on CPU (see `qed_jax.model.KVCache`), reading it whole: on CPU,
slicing chunks out of it cost more than the dead slots they skip.

Sharding contract for the kernels. Mosaic kernels are not partitioned by the compiler, so each
runs inside `jax.shard_map` over the mesh found in context with `jax.sharding.get_abstract_mesh()`.
`splash`: batch over the mesh axes of the `batch` rule, heads over those of the `heads` rule
(query and kv heads together, and only when both divide). The decode kernel: in the shards of
the KV cache (`KV_CACHE_AXES`: rows by the `batch` rule, kv heads by `kv_heads`). Both follow
`DEFAULT_RULES`: with other rules, the compiler reshards their inputs to match. Callers
(trainers, the sampler) therefore run their jitted steps under `with jax.set_mesh(mesh):`
(trace time is what matters). With no mesh in context a kernel runs unsharded, which on a
multi-device mesh means the compiler gathers its inputs onto every device: correct, but slow
and memory-hungry.

Shapes: B batch, T query time, S key time, N query heads, K kv heads (N a multiple of K: grouped
query attention, query head n reads kv head n // (N / K)), H head_dim.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from qed_jax.config import ATTENTION_IMPLEMENTATIONS
from qed_jax.sharding import DEFAULT_RULES, logical_to_spec

# `auto` thresholds. Below them the XLA path's [T, T] scores are small (T=1024: 4 MiB per head in
# float32) and XLA fuses it well; above them T² dominates activation memory. On CPU blockwise
# serves every length: the XLA path's backward keeps the probabilities of every layer and
# transposes them, and blockwise ran its forward + backward 1.4x faster at T=512 (one chunk).
SPLASH_MIN_LEN = 1024  # on TPU
BLOCKWISE_MIN_LEN = 2048  # on GPU: blockwise computes the masked half too, so wait longer

SPLASH_BLOCKS = (512, 256, 128)  # preferred first; the kernel needs multiples of 128 lanes
BLOCKWISE_CHUNK = 512  # query chunk of the scanned blockwise path (long rows)
# Rows up to this length run blockwise as an unrolled loop over chunks of UNROLL_CHUNK queries
# that skip the keys after their own (at T=512: forward + backward 1.5x faster than one chunk).
UNROLL_MAX_LEN = 1024
UNROLL_CHUNK = 128


class AttentionError(ValueError):
    """An attention implementation that cannot serve the given shapes; says what to change."""


def causal_attention(q, k, v, segment_ids=None, *, implementation: str = "auto"):
    """Causal self-attention: token t attends to tokens 0..t of its row that share its segment.

    q [B, T, N, H]; k, v [B, T, K, H]; segment_ids [B, T] int or None (one segment per row).
    Scores are scaled by 1/sqrt(H). Returns [B, T, N, H] in q's dtype.
    """
    implementation = choose_implementation(implementation, q.shape[1])
    if implementation == "xla":
        return xla_attention(q, k, v, segment_ids)
    if implementation == "splash":
        return splash_attention(q, k, v, segment_ids)
    return blockwise_attention(q, k, v, segment_ids)


def choose_implementation(implementation: str, seq_len: int) -> str:
    """Resolve `auto` for a sequence of `seq_len` tokens on the current backend."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise AttentionError(
            f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {implementation!r}"
        )
    if implementation != "auto":
        return implementation
    if platform() == "tpu" and seq_len >= SPLASH_MIN_LEN and splash_block(seq_len):
        return "splash"
    if platform() == "cpu" or seq_len >= BLOCKWISE_MIN_LEN:
        return "blockwise"
    return "xla"


def platform() -> str:
    """The platform the current computation is for: the context mesh's devices when a mesh is
    set (this is what an ahead-of-time compile for a TPU topology on a CPU host sees), else the
    default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


# --------------------------------------------------------------------------------------------
# XLA reference


def xla_attention(q, k, v, segment_ids=None):
    """The reference: one [B, 1, T, T] boolean mask, all scores at once."""
    T = q.shape[1]
    mask = jnp.tril(jnp.ones((T, T), bool))[None]  # [1, T, T]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5)


# A decode step over the stacked cache reads it in chunks, only those up to the furthest slot
# any row attends to: from a short prompt to a long budget, about half the slots on average. A
# cache is split into at most DECODE_CHUNKS chunks of equal length (the last one may overlap the
# one before by fewer slots than there are chunks), each of at least MIN_DECODE_CHUNK slots: few
# enough that each loop step moves megabytes, many enough that the dead slots of the last chunk
# read stay a small share. A cache shorter than two such chunks is read whole.
DECODE_CHUNKS = 8
MIN_DECODE_CHUNK = 512


def decode_chunk(max_len: int) -> int:
    """Slots per chunk that `cached_attention` reads a cache of `max_len` slots in (max_len: whole)."""
    chunks = min(DECODE_CHUNKS, max_len // MIN_DECODE_CHUNK)
    return max_len if chunks <= 1 else -(-max_len // chunks)


def cached_attention(q, k, v, positions, layer, *, furthest=None, chunk: int | None = None):
    """Attention of new tokens over layer `layer` (an int or a traced index) of the stacked KV
    cache k, v [L, B, S, K, H]: token t of row b attends to slots 0..positions[b, t].
    q [B, T, N, H]; returns [B, T, N, H] in q's dtype. `furthest` is the largest of `positions`
    (computed here when not given: a decoder passes it once for all its layers, as over sharded
    rows it takes an all-reduce).

    The cache is read `chunk` slots at a time (default `decode_chunk(S)`) with an online softmax
    (as flash attention does), in a loop that stops after the chunk holding the largest of
    `positions`: slots past every row's position are never read, so a step costs what the live
    part of the cache costs (the recipe's rollouts, a 4,096-slot prompt and a budget of 49,152,
    read 0.6 of the cache on average). Each chunk is sliced from the cache as it is read: a
    layer sliced out before the loop would be a copy of all its slots. With chunk == S the cache
    is read whole, without a loop.

    On TPU, one new token per row goes to `kernel_cached_attention` instead, which reads the
    cache in place (XLA:TPU copies each chunk of this loop before its products)."""
    if use_decode_kernel(q, k):
        return kernel_cached_attention(q, k, v, positions, layer)
    B, T, N, H = q.shape
    S, K = k.shape[2], k.shape[3]
    G = N // K
    chunk = min(chunk or decode_chunk(S), S)
    f32 = jnp.float32
    q = q.reshape(B, T, K, G, H)

    def read(cache, start):  # slots start..start+chunk of the layer → [B, chunk, K, H] in q's dtype
        block = jax.lax.dynamic_slice(cache, (layer, 0, start, 0, 0), (1, B, chunk, K, H))
        return block[0].astype(q.dtype)

    def step(i, carry):
        top, total, out = carry  # running max and sum of exp [B, K, G, T], output [B, K, G, T, H]
        start = jnp.minimum(i * chunk, S - chunk)  # the last chunk ends at slot S (it may overlap)
        scores = jnp.einsum("btkgh,bckh->bkgtc", q, read(k, start), preferred_element_type=f32) * f32(H ** -0.5)
        slots = start + jnp.arange(chunk)
        visible = (slots >= i * chunk)[None, None, :] & (slots[None, None, :] <= positions[:, :, None])  # [B, T, C]
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(f32).min)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
        probs = jnp.exp(scores - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(probs, axis=-1)
        out = out * rescale[..., None] + jnp.einsum("bkgtc,bckh->bkgth", probs.astype(q.dtype), read(v, start),
                                                    preferred_element_type=f32)
        return new_top, total, out

    init = (jnp.full((B, K, G, T), jnp.finfo(f32).min, f32), jnp.zeros((B, K, G, T), f32),
            jnp.zeros((B, K, G, T, H), f32))
    if chunk == S:
        _, total, out = step(0, init)
    else:  # slot 0, which every row sees, is in chunk 0: the loop runs at least once
        furthest = jnp.max(positions) if furthest is None else furthest
        _, total, out = jax.lax.fori_loop(0, furthest // chunk + 1, step, init)
    out = out / total[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Pallas TPU decode kernel

# Logical axes of the stacked KV cache [L, B, S, K, H], for sharding it like the activations
# that fill it (the kernel's shard_map reads the cache in these shards).
KV_CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")

# The kernel reads one row's cache `block` slots at a time, all kv heads of the shard together
# (one contiguous copy from HBM): the largest of DECODE_KERNEL_BLOCKS that divides the cache and
# keeps a block of keys, all kv heads of the model, within DECODE_KERNEL_BLOCK_BYTES. Keys and
# values, each double-buffered, then take up to 4x that of VMEM (8 MiB: half of v5e's default
# scoped VMEM). No 2,048-slot blocks: with 4 kv heads per shard, Mosaic took minutes to compile
# them (and 45-71 s for 1,024-slot blocks, against 4-17 s for other head counts).
DECODE_KERNEL_BLOCKS = (1024, 512, 256, 128)
DECODE_KERNEL_BLOCK_BYTES = 2 * 2 ** 20


def decode_kernel_block(slots: int, kv_heads: int, head_dim: int, itemsize: int) -> int | None:
    """Slots per block of the decode kernel over a cache of `slots` slots, or None if none fits."""
    return next((b for b in DECODE_KERNEL_BLOCKS
                 if slots % b == 0 and b * kv_heads * head_dim * itemsize <= DECODE_KERNEL_BLOCK_BYTES), None)


def use_decode_kernel(q, k) -> bool:
    """Whether `cached_attention` runs `kernel_cached_attention`: on TPU, for one new token per
    row, over a stacked cache that a kernel block divides (a multiple of 128 slots: the
    sampler's and the reasoning cache's are, see `sampling.cache_slots`)."""
    return (platform() == "tpu" and q.shape[1] == 1
            and decode_kernel_block(*k.shape[2:], k.dtype.itemsize) is not None)


def kernel_cached_attention(q, k, v, positions, layer, *, block: int | None = None, interpret: bool | None = None):
    """`cached_attention` of one new token per row (q [B, 1, N, H], positions [B, 1]) by a Pallas
    kernel that reads the stacked cache [L, B, S, K, H] where it lies.

    For each row, the kernel walks the cache `block` slots at a time (default
    `decode_kernel_block`) with an online softmax, as `cached_attention` does, and only up to
    the block holding the row's position: the blocks past it are never copied from HBM (the
    grid ends at the furthest position of the shard's rows; a shorter row repeats its last
    block's index, which Pallas does not copy again). Each block is all kv heads of the row,
    one contiguous copy; the grouped query heads of a kv head share its keys and values.

    Runs inside `jax.shard_map` over the context mesh (see the module's sharding contract):
    rows and kv heads in the shards of the cache (`KV_CACHE_AXES`), so the cache is read where
    it is. `interpret` defaults to True off TPU (Pallas interpret mode: slow, for tests)."""
    B, T, N, H = q.shape
    S, K = k.shape[2], k.shape[3]
    block = block or decode_kernel_block(S, K, H, k.dtype.itemsize)
    if T != 1 or not block or S % block:
        raise AttentionError(f"the decode kernel reads one new token per row from a cache of whole blocks; got "
                             f"{T} new tokens, {S} slots, block {block}. Use cached_attention")
    if interpret is None:
        interpret = platform() != "tpu"
    q = q.reshape(B, K, N // K, H)
    # A copy past the cache's end reads whatever lies beyond it: positions stay inside it.
    positions = jnp.clip(positions.reshape(B), 0, S - 1).astype(jnp.int32)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)

    local = partial(_decode_kernel, block=block, interpret=interpret)
    if q.dtype == jnp.bfloat16:
        local = _at_default_precision(local)

    def specs(mesh):
        cache = logical_to_spec(KV_CACHE_AXES, k.shape, mesh)
        rows, heads = cache[KV_CACHE_AXES.index("batch")], cache[KV_CACHE_AXES.index("kv_heads")]
        queries = PartitionSpec(rows, heads, None, None)
        return (queries, cache, cache, PartitionSpec(rows), PartitionSpec()), queries

    return _in_mesh_shards(local, (q, k, v, positions, layer), specs).reshape(B, 1, N, H)


def _cache_block(row, j, layer_ref, positions_ref, *, block: int):
    """The block of the stacked cache that the decode kernel's grid step (row, j) reads: block j
    of the row in the layer, or past the row's position its last block again (Pallas copies a
    block in only when its index changes, so the row's dead blocks are never copied)."""
    return layer_ref[0], row, jnp.minimum(j, jax.lax.div(positions_ref[row], block)), 0, 0


def _decode_kernel(q, k, v, positions, layer, block: int, interpret: bool):
    """The pallas_call of `kernel_cached_attention` on one shard: q [B, K, G, H], the stacked
    cache [L, B, S, K, H], positions [B], layer [1] → [B, K, G, H]. Grid (row, block)."""
    B, K, G, H = q.shape
    f32 = jnp.float32
    lowest = jnp.finfo(f32).min
    contract_last = (((1,), (1,)), ((), ()))  # [G, H] x [block, H] -> [G, block]
    contract_slots = (((1,), (0,)), ((), ()))  # [G, block] x [block, H] -> [G, H]

    def kernel(layer_ref, positions_ref, q_ref, k_ref, v_ref, out_ref, top_ref, total_ref, acc_ref):
        row, j = pl.program_id(0), pl.program_id(1)
        position = positions_ref[row]

        @pl.when(j == 0)
        def _start():
            top_ref[...] = jnp.full(top_ref.shape, lowest, f32)
            total_ref[...] = jnp.zeros(total_ref.shape, f32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

        @pl.when(j * block <= position)  # blocks past the row's position: nothing to add
        def _read_block():
            visible = j * block + jax.lax.broadcasted_iota(jnp.int32, (G, block), 1) <= position
            for head in range(K):  # running max and sum are [G, 128]: every lane holds the same value
                keys, values = k_ref[:, head, :].astype(q.dtype), v_ref[:, head, :].astype(q.dtype)
                scores = jax.lax.dot_general(q_ref[head], keys, contract_last, preferred_element_type=f32)
                scores = jnp.where(visible, scores * f32(H ** -0.5), lowest)
                top = top_ref[head]
                new_top = jnp.maximum(top, jnp.max(scores, axis=1, keepdims=True))
                probs = jnp.exp(scores - new_top[:, :1])
                rescale = jnp.exp(top - new_top)
                total_ref[head] = total_ref[head] * rescale + jnp.sum(probs, axis=1, keepdims=True)
                top_ref[head] = new_top
                acc_ref[head] = acc_ref[head] * rescale[:, :1] + jax.lax.dot_general(
                    probs.astype(q.dtype), values, contract_slots, preferred_element_type=f32)

        @pl.when(j == pl.num_programs(1) - 1)
        def _finish():
            out_ref[...] = (acc_ref[...] / total_ref[...][..., :1]).astype(out_ref.dtype)

    def query_block(row, j, *_):
        return row, 0, 0, 0

    grid = (B, jnp.max(positions) // block + 1)  # ends at the shard's furthest position
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=grid,
        in_specs=[pl.BlockSpec((None, K, G, H), query_block),
                  pl.BlockSpec((None, None, block, K, H), partial(_cache_block, block=block)),
                  pl.BlockSpec((None, None, block, K, H), partial(_cache_block, block=block))],
        out_specs=pl.BlockSpec((None, K, G, H), query_block),
        scratch_shapes=[pltpu.VMEM((K, G, 128), f32), pltpu.VMEM((K, G, 128), f32), pltpu.VMEM((K, G, H), f32)])
    # What a step costs when every row has reached the cache's end (the grid stops earlier):
    # scores and values, one exponential per score, the layer's keys and values read once.
    S = k.shape[2]
    most = pl.CostEstimate(flops=4 * B * K * G * S * H, transcendentals=B * K * G * S,
                           bytes_accessed=2 * B * S * K * H * k.dtype.itemsize + 2 * q.size * q.dtype.itemsize)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")), cost_estimate=most,
    )(layer, positions, q, k, v)


# Slots per key tile in the split layout: a tile's keys are [H, KEY_TILE], so one new token's
# scores read each tile as one contiguous block.
KEY_TILE = 64


def key_tile(max_len: int) -> int:
    """Slots per key tile for a cache of `max_len` slots: the largest power of two dividing it,
    at most KEY_TILE (cache lengths that are multiples of 64 read fastest)."""
    return min(KEY_TILE, max_len & -max_len)


def to_split_layout(k, v):
    """One layer's keys and values [B, S, K, H] → the layouts `split_cached_attention` reads in
    place: keys [B, K, S / C, H, C] in tiles of C = key_tile(S) slots, values [B, K, S, H]."""
    B, S, K, H = k.shape
    C = key_tile(S)
    return k.reshape(B, S // C, C, K, H).transpose(0, 3, 1, 4, 2), v.transpose(0, 2, 1, 3)


def from_split_layout(k, v):
    """The inverse of `to_split_layout`."""
    B, K, tiles, H, C = k.shape
    return k.transpose(0, 2, 4, 1, 3).reshape(B, tiles * C, K, H), v.transpose(0, 2, 1, 3)


def split_cached_attention(q, k, v, positions):
    """`cached_attention` over a layer of the per-layer cache a decode loop uses on CPU
    (`KVCache.unstacked`, `to_split_layout`): keys in tiles [B, K, S / C, H, C], values
    [B, K, S, H]. Both products read these layouts in place. One new token's scores are a
    product summed over H that XLA:CPU fuses with the read of the keys; each tile is one
    contiguous [H, C] block, which that fusion streams at 2.6x (batch 8) and 1.7x (batch 64)
    the rate it read keys [H, S] whole (a column-strided walk). The output is a batched matmul
    [G, S] @ [S, H] with (B, K) leading (asked for in [B, T, K, G, H] order directly, XLA:CPU
    ran it 3x slower)."""
    B, T, N, H = q.shape
    K, tiles, C = k.shape[1], k.shape[2], k.shape[4]
    S = tiles * C
    q = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    if T == 1:
        f32 = jnp.float32
        scores = jnp.sum(q[:, :, :, 0, None, :, None].astype(f32) * k[:, :, None].astype(f32), axis=4)
        scores = scores.reshape(B, K, N // K, 1, S)
    else:
        scores = jnp.einsum("bkgth,bkjhc->bkgtjc", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(B, K, N // K, T, S)
    scores = scores * jnp.float32(H ** -0.5)
    mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Blockwise (plain JAX, memory linear in T)


def blockwise_attention(q, k, v, segment_ids=None, *, chunk: int | None = None, unrolled: bool | None = None):
    """Same result as `xla_attention`, computed one query chunk at a time with a flash-attention
    backward (`_chunk_attention`): a chunk's scores [B, N, chunk, T] exist only while it is
    computed, forward and backward, and what the backward keeps of the forward is the chunk's
    output and softmax normalizer, never probabilities.

    Rows of up to UNROLL_MAX_LEN tokens run as a loop unrolled at trace time over chunks of
    UNROLL_CHUNK queries, each against the keys up to its last query only: the blocks above the
    diagonal are skipped (5/8 of the work remains at four chunks). The compiler may run those
    chunks side by side, so their scratch memory grows faster than T; up to UNROLL_MAX_LEN it
    stays below the scan's. Longer rows run as a scan over chunks of BLOCKWISE_CHUNK queries
    against all keys, masked: twice the causal work, but one traced body and memory linear in T.
    `chunk` overrides the chunk length of either, `unrolled` the choice between them."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    unrolled = T <= UNROLL_MAX_LEN if unrolled is None else unrolled
    C = min(chunk or (UNROLL_CHUNK if unrolled else BLOCKWISE_CHUNK), T)
    chunks = -(-T // C)
    pad = chunks * C - T  # padded query rows attend to real keys and are dropped at the end
    if segment_ids is None:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    # Heads before time, and a kv head's G query heads x C tokens as one axis of M = G·C rows, so
    # that every product of the forward and backward contracts a single axis (see _chunk_attention).
    q = q * jnp.asarray(H ** -0.5, q.dtype)  # scaled once here, as the splash path does
    q_chunks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, chunks, C, K, G, H)
    q_chunks = q_chunks.transpose(1, 0, 3, 4, 2, 5).reshape(chunks, B, K, G * C, H)
    k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    q_index = jnp.arange(chunks * C).reshape(chunks, C)
    q_segments = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(B, chunks, C).transpose(1, 0, 2)
    k_index = jnp.arange(T)

    keys = (k_heads, v_heads, k_index, segment_ids)
    if unrolled:
        out = jnp.stack([_chunk_attention(q_chunks[i], *keys, q_index[i], q_segments[i], min((i + 1) * C, T))
                         for i in range(chunks)])  # [chunks, B, K, M, H]
    else:
        def one_chunk(_, xs):
            q_c, index, q_seg = xs  # [B, K, M, H], [C], [B, C]
            return None, _chunk_attention(q_c, *keys, index, q_seg, T)

        _, out = jax.lax.scan(one_chunk, None, (q_chunks, q_index, q_segments))  # [chunks, B, K, M, H]
    out = out.reshape(chunks, B, K, G, C, H).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(B, chunks * C, N, H)[:, :T]


# Why a hand-written backward: differentiating the chunk's softmax(QK^T)V would keep the
# probabilities [B, N, C, T] of every chunk and every layer for the backward, and XLA:CPU
# computes the products that contract the query axis (dK, dV) by first transposing those
# [C, T] tensors. The backward below recomputes the probabilities from Q, K and the saved
# log-normalizer, and orients each product so that only [T, H]-sized operands are transposed.
# Shapes: q [B, K, M, H] with M = G·C (a kv head's query heads x the chunk's tokens, in that
# order), all keys and values k, v [B, K, T, H] with their indices [T] and segments [B, T], the
# chunk's query indices [C] and segments [B, C]; `keys` (static) is how many leading keys the
# chunk can see. The chunk slices them itself, forward and backward, so that what it keeps for
# the backward is the whole k and v every chunk shares, not a copy of its own prefix.


def _chunk_scores(q, k, q_index, q_segments, k_index, k_segments):
    """Masked float32 scores [B, K, M, S] of the (already scaled) queries against keys k [B, K, S, H]."""
    # The mask depends on nothing that changes from layer to layer, so the compiler could hoist
    # it out of the layer loop and keep every chunk's mask at once (T² again). Tying its inputs
    # to q keeps it inside, one chunk at a time.
    q, q_index, q_segments = jax.lax.optimization_barrier((q, q_index, q_segments))
    B, K, M, H = q.shape
    C = q_index.shape[0]
    mask = (q_index[:, None] >= k_index[None, :]) & (q_segments[:, :, None] == k_segments[:, None, :])
    mask = jnp.broadcast_to(mask[:, None], (B, M // C, C, k.shape[2])).reshape(B, 1, M, -1)
    scores = jnp.einsum("bkmh,bksh->bkms", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


def _visible(keys, k, v, k_index, k_segments):
    return k[:, :, :keys], v[:, :, :keys], k_index[:keys], k_segments[:, :keys]


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _chunk_attention(q, k, v, k_index, k_segments, q_index, q_segments, keys):
    """softmax(masked QK^T) V over the first `keys` keys → [B, K, M, H] in q's dtype."""
    return _chunk_forward(q, k, v, k_index, k_segments, q_index, q_segments, keys)[0]


def _chunk_forward(q, k, v, k_index, k_segments, q_index, q_segments, keys):
    k_s, v_s, index_s, segments_s = _visible(keys, k, v, k_index, k_segments)
    scores = _chunk_scores(q, k_s, q_index, q_segments, index_s, segments_s)
    top = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - top)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = jnp.einsum("bkms,bksh->bkmh", (unnormalized / total).astype(v.dtype), v_s)
    log_normalizer = top + jnp.log(total)  # [B, K, M, 1]
    return out, (q, k, v, k_index, k_segments, q_index, q_segments, out, log_normalizer)


def _chunk_backward(keys, residuals, d_out):
    q, k, v, k_index, k_segments, q_index, q_segments, out, log_normalizer = residuals
    k_s, v_s, index_s, segments_s = _visible(keys, k, v, k_index, k_segments)
    probs = jnp.exp(_chunk_scores(q, k_s, q_index, q_segments, index_s, segments_s) - log_normalizer)
    # dV and dK contract the query axis M: computed transposed ([H, S]) so that the [M, S]
    # operand is read in place and only d_out or q ([M, H]) is transposed.
    d_v = jnp.einsum("bkmh,bkms->bkhs", d_out, probs.astype(d_out.dtype)).swapaxes(2, 3)
    d_probs = jnp.einsum("bkmh,bksh->bkms", d_out, v_s, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - row_dot)).astype(q.dtype)
    d_q = jnp.einsum("bkms,bksh->bkmh", d_scores, k_s)
    d_k = jnp.einsum("bkmh,bkms->bkhs", q, d_scores).swapaxes(2, 3)
    hidden = ((0, 0), (0, 0), (0, k.shape[2] - keys), (0, 0))  # keys the chunk could not see
    return (d_q, jnp.pad(d_k, hidden).astype(k.dtype), jnp.pad(d_v, hidden).astype(v.dtype),
            None, None, None, None)


_chunk_attention.defvjp(_chunk_forward, _chunk_backward)


# --------------------------------------------------------------------------------------------
# Splash (Pallas TPU kernel)


def splash_block(seq_len: int) -> int | None:
    """The largest kernel block that divides `seq_len`, or None when none does."""
    return next((b for b in SPLASH_BLOCKS if b <= seq_len and seq_len % b == 0), None)


def splash_attention(q, k, v, segment_ids=None, *, block: int | None = None, interpret: bool | None = None):
    """Same result as `xla_attention`, by the splash kernel, sharded over the context mesh.

    `block` (query and key block, default `splash_block(T)`) must divide T and be a multiple of
    128. `interpret` defaults to True off TPU (Pallas interpret mode: slow, for tests).
    """
    B, T, N, H = q.shape
    block = block or splash_block(T)
    if not block or T % block or block % 128:
        raise AttentionError(
            f"splash attention needs the sequence length to be a multiple of a block that is a "
            f"multiple of 128; got T={T}, block={block}. Pad or bucket sequences to a multiple of "
            f"128, or set model attention=blockwise or xla"
        )
    if interpret is None:
        interpret = platform() != "tpu"
    # The kernel takes unscaled scores: scale q once here, as XLA scales the logits.
    q = (q * jnp.asarray(H ** -0.5, q.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]

    def local(q, k, v, *segments):  # shapes of one shard: [b, n, T, H], [b, k, T, H], [b, T]
        kernel = _splash_kernel(q.shape[1], T, block, interpret)
        ids = splash.SegmentIds(segments[0], segments[0]) if segments else None
        return jax.vmap(kernel)(q, k, v, segment_ids=ids)

    if q.dtype == jnp.bfloat16:
        local = _at_default_precision(local)

    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids.astype(jnp.int32))

    def specs(mesh):
        batch, heads = _splash_mesh_axes(mesh, B, N, k.shape[1])
        qkv = PartitionSpec(batch, heads, None, None)
        return (qkv, qkv, qkv, PartitionSpec(batch, None))[: len(args)], qkv

    return _in_mesh_shards(local, args, specs).transpose(0, 2, 1, 3)


def _in_mesh_shards(local, args, specs):
    """`local(*args)` inside `jax.shard_map` over the context mesh, with (in_specs, out_specs) =
    `specs(mesh)`; without a mesh in context, on the whole arrays. check_vma=False: a Pallas
    kernel's pallas_call does not declare how its outputs vary over mesh axes, which vma
    checking requires."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(*args)
    in_specs, out_specs = specs(mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _at_default_precision(fn):
    """`fn`, its forward and its backward traced under matmul precision "default", whatever the
    global setting. A global "highest" (as in the tests) asks Mosaic for float32 passes over the
    kernel's bfloat16 operands, which it rejects ("Bad lhs type"); at "default" the kernel runs
    as it does in training (its products of bfloat16 operands are exact in float32 accumulation;
    the few it forms in float32 take Mosaic's default precision). The backward needs its own
    context: JAX traces a custom_vjp's backward when it transposes, after the forward's context
    is gone."""
    @jax.custom_vjp
    def call(*args):
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def forward(*args):
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)  # the vjp function is a pytree of the residuals

    def backward(vjp_fn, g):
        with jax.default_matmul_precision("default"):
            return vjp_fn(g)

    call.defvjp(forward, backward)
    return call


def _splash_kernel(heads: int, seq_len: int, block: int, interpret: bool):
    # The kernel's block map is built with NumPy on the host (~15 s for T=45056); the splash
    # library caches that work per mask and block size, so a retrace does not repeat it.
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len)) for _ in range(heads)])
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_mesh_axes(mesh, batch: int, heads: int, kv_heads: int):
    """Mesh axes for the batch and head dimensions of the kernel's inputs (None: replicated).
    Query and kv heads shard together or not at all, so each shard keeps whole kv groups."""
    def axes(rule, *sizes):
        names = []
        for name in (rule,) if isinstance(rule, str) else tuple(rule or ()):
            ways = math.prod(mesh.shape[n] for n in names) * mesh.shape.get(name, 1)
            if mesh.shape.get(name, 1) > 1 and not any(size % ways for size in sizes):
                names.append(name)
        return None if not names else names[0] if len(names) == 1 else tuple(names)

    return axes(DEFAULT_RULES["batch"], batch), axes(DEFAULT_RULES["heads"], heads, kv_heads)

