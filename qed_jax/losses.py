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
(`preferred_element_type`). With float32 compute this is exactly `Qwen3.logits`; with bfloat16
compute it is more accurate than `Qwen3.logits`, which rounds the logits to bfloat16 before
casting them up. Use these functions for every log-prob that enters a ratio (the loss and the
recomputed old log-probs) so that both sides use the same numerics.

Shapes: B batch, T time, C chunk, D hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# One chunk holds a few [B, C, V] float32 buffers (logits, probabilities, their cotangents): at
# C=512, B=1 and V=151,936, each is ~311 MB.
DEFAULT_CHUNK_SIZE = 512


def token_logprobs(hidden, head, targets, temperature: float = 1.0, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """log_softmax(hidden @ head.T / temperature) at `targets` → float32 [B, T].
    hidden [B, T, D] (final-normed), head [V, D], targets [B, T] (integer ids)."""
    logprobs, _ = _chunked(hidden, head, targets, temperature, chunk_size, with_entropy=False)
    return logprobs


def token_logprobs_and_entropy(hidden, head, targets, temperature: float = 1.0, *,
                               chunk_size: int = DEFAULT_CHUNK_SIZE):
    """(log-probs of `targets`, entropy of the whole distribution), both float32 [B, T], under
    log_softmax(hidden @ head.T / temperature). Shapes as in `token_logprobs`."""
    return _chunked(hidden, head, targets, temperature, chunk_size, with_entropy=True)


def _chunked(hidden, head, targets, temperature, chunk_size, with_entropy):
    _check_shapes(hidden, head, targets, chunk_size)
    B, T, D = hidden.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    # Padding to n·C costs at most one chunk; zero hidden states give finite logits (all zero),
    # and the padded results are sliced off, so they receive no gradient.
    pad = n * C - T
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(B, n, C, D).transpose(1, 0, 2, 3)  # [n, B, C, D]
    target_chunks = targets.reshape(B, n, C).transpose(1, 0, 2)  # [n, B, C]

    # Nothing inside is saved for the backward pass: it recomputes the chunk's logits from the
    # chunk's hidden states and the head.
    @jax.checkpoint
    def chunk(hidden_c, targets_c):
        # The head is cast here, not before the scan, so that its gradient is accumulated over
        # chunks in the head's own dtype (float32 parameters stay float32).
        # Batch and chunk merged into one axis so that the head's gradient contracts one axis
        # (see `qed_jax.model.dense`).
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


def _check_shapes(hidden, head, targets, chunk_size):
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
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
