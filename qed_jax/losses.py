"""Per-token log-probs and entropies of the output distribution, without [B, T, V] logits.

At the recipe's lengths the full logits do not fit (T=45,056 and V=151,936 make ~27 GB of float32
per row), so the time axis is cut into chunks and a `lax.scan` projects one chunk at a time:
hidden [B, C, D] @ head.T → float32 logits [B, C, V] → logsumexp → the chunk's [B, C] results.
The chunk body is rematerialized, so the backward pass also recomputes one chunk's logits at a
time; what the scan keeps between forward and backward is its inputs (hidden and targets, which
already exist), never logits.

Chunks run along time, not along flattened B·T tokens, so that a batch sharded over the mesh
stays sharded the same way inside every chunk.

Numerics: the projection runs in the hidden states' dtype with float32 output
(`preferred_element_type`), as `Qwen3.logits` does, so the sampler's log-probs and these share
the head's numerics in either compute dtype. Use these functions for every log-prob that enters a
ratio (the loss and the recomputed old log-probs).

`weighted_nll_sum` serves a loss that is a fixed weighting of token NLLs (SFT): its gradient
with respect to the logits, w·(softmax − onehot), is known in the forward pass, so each chunk
computes its hidden and head gradients right away and the backward pass only scales them. That
is three vocabulary-sized matmuls per chunk instead of four (no recomputed logits).

Shapes: B batch, T time, C chunk, D hidden, V vocab.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from qed_jax.attention import platform

# Time steps per chunk. One chunk holds a few [B, C, V] float32 buffers (logits, probabilities,
# their cotangents): at C=512, B=1 and V=151,936, each is ~311 MB.
DEFAULT_CHUNK_SIZE = 512
# On CPU, about this many tokens (B x C) per chunk instead (see `default_chunk_size`).
CPU_CHUNK_TOKENS = 512


def default_chunk_size(batch: int) -> int:
    """Time steps per chunk when the caller gives none: DEFAULT_CHUNK_SIZE, and on CPU about
    CPU_CHUNK_TOKENS tokens over the batch's rows. On CPU the SFT benchmark's step (4 rows of
    512, V=32,000) ran 1.19-1.23x faster with chunks of 128 time steps than with one chunk of
    2,044 x 32,000 logits (`bench/ab.py`, bench/README.md); an accelerator keeps the longer
    chunks, which make fewer passes over the head's gradient."""
    return max(1, CPU_CHUNK_TOKENS // batch) if platform() == "cpu" else DEFAULT_CHUNK_SIZE


def token_logprobs(hidden, head, targets, temperature: float = 1.0, *, chunk_size: int | None = None):
    """log_softmax(hidden @ head.T / temperature) at `targets` → float32 [B, T].
    hidden [B, T, D] (final-normed), head [V, D], targets [B, T] (integer ids)."""
    logprobs, _ = _chunked(hidden, head, targets, temperature, chunk_size, with_entropy=False)
    return logprobs


def token_logprobs_and_entropy(hidden, head, targets, temperature: float = 1.0, *,
                               chunk_size: int | None = None):
    """(log-probs of `targets`, entropy of the whole distribution), both float32 [B, T], under
    log_softmax(hidden @ head.T / temperature). Shapes as in `token_logprobs`."""
    return _chunked(hidden, head, targets, temperature, chunk_size, with_entropy=True)


def weighted_nll_sum(hidden, head, targets, weights, *, chunk_size: int | None = None):
    """sum(weights · −log_softmax(hidden @ head.T)[targets]) → float32 scalar, differentiable in
    hidden and head (not in weights). Shapes as in `token_logprobs`; weights [B, T]."""
    chunk_size = _check_shapes(hidden, head, targets, chunk_size)
    if weights.shape != targets.shape:
        raise ValueError(f"weights {weights.shape} must be [B, T] like targets {targets.shape}")
    return _weighted_nll_sum(hidden, head, targets, weights.astype(jnp.float32), chunk_size)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll_sum(hidden, head, targets, weights, chunk_size):
    # Undifferentiated (an eval loss), the gradients are not computed.
    logprobs, _ = _chunked(hidden, head, targets, 1.0, chunk_size, with_entropy=False)
    return -jnp.sum(jnp.where(weights != 0, weights * logprobs, 0.0))  # a 0 weight drops even a NaN


def _nll_forward(hidden, head, targets, weights, chunk_size):
    """The loss and, as residuals, its gradients w.r.t. hidden [B, T, D] and head [V, D]."""
    B, T, D = hidden.shape
    hidden = jnp.where(weights[..., None] != 0, hidden, 0)  # dropped as the loss drops them: a NaN there too
    n, C, (hidden_chunks, target_chunks, weight_chunks) = _time_chunks(chunk_size, hidden, targets, weights)

    def chunk(d_head, xs):
        hidden_c, targets_c, weights_c = xs  # [B, C, D], [B, C], [B, C]
        flat = hidden_c.reshape(-1, D)  # [B·C, D]
        head_c = head.astype(flat.dtype)
        logits = jnp.einsum("nd,vd->nv", flat, head_c, preferred_element_type=jnp.float32)  # [B·C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        ids, w = targets_c.reshape(-1), weights_c.reshape(-1)
        target_logits = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
        nll = jnp.sum(jnp.where(w != 0, w * (lse - target_logits), 0.0))  # as in _weighted_nll_sum
        d_logits = w[:, None] * (jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(ids, logits.shape[-1]))
        d_logits = d_logits.astype(flat.dtype)
        d_hidden = jnp.dot(d_logits, head_c, preferred_element_type=jnp.float32).astype(hidden.dtype)
        d_head = d_head + jnp.einsum("nv,nd->vd", d_logits, flat, preferred_element_type=jnp.float32)
        return d_head, (nll, d_hidden.reshape(B, C, D))

    d_head, (nll, d_hidden) = jax.lax.scan(chunk, jnp.zeros(head.shape, jnp.float32),
                                           (hidden_chunks, target_chunks, weight_chunks))
    d_hidden = d_hidden.transpose(1, 0, 2, 3).reshape(B, n * C, D)[:, :T]
    return jnp.sum(nll), (d_hidden, d_head.astype(head.dtype))


def _nll_backward(chunk_size, residuals, g):
    d_hidden, d_head = residuals
    return (g * d_hidden).astype(d_hidden.dtype), (g * d_head).astype(d_head.dtype), None, None


_weighted_nll_sum.defvjp(_nll_forward, _nll_backward)


def _time_chunks(chunk_size, *arrays):
    """(n, C, each [B, T, ...] array as [n, B, C, ...]): T cut into n chunks of C, the last padded
    with zeros. Padding costs at most one chunk; zero hidden states give finite logits (all
    zero), and the padded results are sliced off (or weighted 0), so they get no gradient."""
    B, T = arrays[0].shape[:2]
    C = min(chunk_size, T)
    n = -(-T // C)
    out = []
    for x in arrays:
        x = jnp.pad(x, ((0, 0), (0, n * C - T)) + ((0, 0),) * (x.ndim - 2))
        out.append(x.reshape(B, n, C, *x.shape[2:]).swapaxes(0, 1))
    return n, C, out


def _chunked(hidden, head, targets, temperature, chunk_size, with_entropy):
    chunk_size = _check_shapes(hidden, head, targets, chunk_size)
    B, T, D = hidden.shape
    n, C, (hidden_chunks, target_chunks) = _time_chunks(chunk_size, hidden, targets)

    # Nothing inside is saved for the backward pass: it recomputes the chunk's logits from the
    # chunk's hidden states and the head.
    @jax.checkpoint
    def chunk(hidden_c, targets_c):
        # The head is cast here, not before the scan, so that its gradient is accumulated over
        # chunks in the head's own dtype (float32 parameters stay float32). Batch and chunk are
        # merged into one axis so that the head's gradient contracts one axis (see model.dense).
        logits = jnp.einsum("nd,vd->nv", hidden_c.reshape(-1, D), head.astype(hidden_c.dtype),
                            preferred_element_type=jnp.float32).reshape(B, C, -1) / temperature  # [B, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
        target_logits = jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0]
        logprobs = target_logits - lse
        if not with_entropy:
            return logprobs, None
        all_logprobs = logits - lse[..., None]
        return logprobs, -jnp.sum(jnp.exp(all_logprobs) * all_logprobs, axis=-1)

    _, (logprobs, entropy) = jax.lax.scan(lambda carry, xs: (carry, chunk(*xs)), None,
                                          (hidden_chunks, target_chunks))
    unchunk = lambda x: x.transpose(1, 0, 2).reshape(B, n * C)[:, :T]  # noqa: E731  [n, B, C] → [B, T]
    return unchunk(logprobs), None if entropy is None else unchunk(entropy)


def _check_shapes(hidden, head, targets, chunk_size) -> int:
    """Raises on inputs that do not fit together; returns the chunk size to use."""
    if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[-1] != head.shape[-1]:
        raise ValueError(f"expected hidden [B, T, D] and head [V, D] with the same D; got hidden "
                         f"{hidden.shape} and head {head.shape}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets {targets.shape} must be [B, T] = {hidden.shape[:2]} (hidden "
                         f"{hidden.shape}); shift them before the call (hidden[:, :-1], tokens[:, 1:])")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if hidden.shape[1] < 1:
        raise ValueError(f"hidden {hidden.shape} has no time steps; there is nothing to score")
    if chunk_size is None:
        return default_chunk_size(hidden.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of time steps, got {chunk_size}")
    return chunk_size
