"""Chunked log-probs, entropy and the weighted NLL with its gradient from the forward pass: equal
to the full-logit computation (values and gradients, raw arrays and through the model), and
compiled without a [B, T, V] buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qed_jax.config import PRESETS
from qed_jax.losses import token_logprobs, token_logprobs_and_entropy, weighted_nll_sum
from qed_jax.model import Qwen3


# --- references: the full [B, T, V] logits, as the trainers computed them before ---------------

def full_logprobs(hidden, head, targets, temperature=1.0):
    logits = jnp.einsum("btd,vd->btv", hidden, head.astype(hidden.dtype)).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]


def full_entropy(hidden, head, temperature=1.0):
    logits = jnp.einsum("btd,vd->btv", hidden, head.astype(hidden.dtype)).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logprobs) * logprobs, axis=-1)


def _inputs(B, T, D, V, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (B, T, D), jnp.float32)
    head = 0.5 * jax.random.normal(k2, (V, D), jnp.float32)  # logits of a few units: peaked, not one-hot
    targets = jax.random.randint(k3, (B, T), 0, V)
    return hidden, head, targets


def _close(actual, expected, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=atol)


# (T, chunk, temperature): T not a multiple of the chunk, a multiple, chunk == T, chunk > T.
CASES = [(37, 8, 1.0), (32, 8, 0.8), (24, 24, 1.0), (5, 64, 1.3)]


@pytest.mark.parametrize("T,chunk,temperature", CASES)
def test_values_equal_full_logits(T, chunk, temperature):
    hidden, head, targets = _inputs(2, T, 16, 50)
    logprobs, entropy = token_logprobs_and_entropy(hidden, head, targets, temperature, chunk_size=chunk)
    assert logprobs.shape == entropy.shape == (2, T) and logprobs.dtype == entropy.dtype == jnp.float32
    _close(logprobs, full_logprobs(hidden, head, targets, temperature))
    _close(entropy, full_entropy(hidden, head, temperature))
    _close(token_logprobs(hidden, head, targets, temperature, chunk_size=chunk), logprobs)


@pytest.mark.parametrize("T,chunk,temperature", CASES)
def test_gradients_equal_full_logits(T, chunk, temperature):
    hidden, head, targets = _inputs(2, T, 16, 50, seed=1)
    # Different random weights per token, so that every position's gradient is checked.
    w_lp, w_ent = jax.random.normal(jax.random.key(2), (2, 2, T))

    def nll_chunked(h, v):
        return -jnp.sum(w_lp * token_logprobs(h, v, targets, temperature, chunk_size=chunk))

    def nll_full(h, v):
        return -jnp.sum(w_lp * full_logprobs(h, v, targets, temperature))

    def both_chunked(h, v):
        lp, ent = token_logprobs_and_entropy(h, v, targets, temperature, chunk_size=chunk)
        return jnp.sum(w_lp * lp) + jnp.sum(w_ent * ent)

    def both_full(h, v):
        return jnp.sum(w_lp * full_logprobs(h, v, targets, temperature)) + jnp.sum(w_ent * full_entropy(h, v, temperature))

    for chunked, full in [(nll_chunked, nll_full), (both_chunked, both_full)]:
        value, (g_hidden, g_head) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head)
        value_ref, (g_hidden_ref, g_head_ref) = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(hidden, head)
        _close(value, value_ref, atol=1e-4)  # a sum over B·T tokens of O(1) terms
        _close(g_hidden, g_hidden_ref)
        _close(g_head, g_head_ref)
        assert np.abs(np.asarray(g_head)).max() > 1e-3  # the head really receives a gradient


@pytest.mark.parametrize("T,chunk", [(T, chunk) for T, chunk, _ in CASES])
def test_weighted_nll_sum_value_and_gradients_equal_full_logits(T, chunk):
    hidden, head, targets = _inputs(2, T, 16, 50, seed=4)
    weights = jax.random.uniform(jax.random.key(5), (2, T)) * (jnp.arange(T) % 3 > 0)  # zeros too

    def full(h, v):
        return -jnp.sum(weights * full_logprobs(h, v, targets))

    def fused(h, v, scale):  # a cotangent other than 1 reaches the gradients computed in the forward
        return scale * weighted_nll_sum(h, v, targets, weights, chunk_size=chunk)

    value_ref, grads_ref = jax.value_and_grad(full, argnums=(0, 1))(hidden, head)
    value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, head, 3.0)
    _close(value, 3.0 * value_ref, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, 3.0 * g_ref)
    _close(jax.jit(fused)(hidden, head, 1.0), value_ref, atol=1e-4)  # undifferentiated: the loss alone


def test_a_zero_weight_drops_its_position_whatever_id_it_holds():
    hidden, head, targets = _inputs(2, 8, 16, 50)
    weights = jnp.ones((2, 8)).at[1, 5].set(0.0)
    outside = targets.at[1, 5].set(50)  # past the vocabulary: its logit reads as NaN
    loss = jax.value_and_grad(lambda h: weighted_nll_sum(h, head, targets, weights, chunk_size=3))
    value, grad = loss(hidden)
    value_outside, grad_outside = jax.value_and_grad(
        lambda h: weighted_nll_sum(h, head, outside, weights, chunk_size=3))(hidden)
    _close(value_outside, value, atol=1e-4)
    _close(grad_outside, grad)
    _close(jax.jit(lambda h: weighted_nll_sum(h, head, outside, weights, chunk_size=3))(hidden), value, atol=1e-4)
    # A NaN hidden state there reaches neither the loss nor any gradient, the head's included.
    both = jax.value_and_grad(lambda h, v: weighted_nll_sum(h, v, targets, weights, chunk_size=3), argnums=(0, 1))
    value, (grad, grad_head) = both(hidden, head)
    value_nan, (grad_nan, grad_head_nan) = both(hidden.at[1, 5].set(jnp.nan), head)
    _close(value_nan, value, atol=1e-4)
    _close(grad_nan, grad.at[1, 5].set(0.0))
    _close(grad_head_nan, grad_head)


def test_weighted_nll_sum_refuses_weights_of_another_shape():
    hidden, head, targets = _inputs(2, 8, 16, 50)
    with pytest.raises(ValueError, match=r"weights \(2, 7\) must be \[B, T\]"):
        weighted_nll_sum(hidden, head, targets, jnp.ones((2, 7)))


def test_bfloat16_logits_are_float32_products_of_the_bfloat16_inputs():
    """With bfloat16 compute, logits are the float32 dot products of the bfloat16 hidden states
    and head, not rounded back to bfloat16: in the loss and in `Qwen3.logits` (the sampler's), so
    the sampler's log-probs are the learner's."""
    model = Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0))
    V, D = model.embed.shape
    hidden, head, targets = _inputs(2, 21, D, V, seed=3)
    model.embed[...] = head  # tied: the model's head
    hidden_bf16 = hidden.astype(jnp.bfloat16)
    exact_inputs = hidden_bf16.astype(jnp.float32), head.astype(jnp.bfloat16).astype(jnp.float32)
    logprobs, entropy = token_logprobs_and_entropy(hidden_bf16, head, targets, 0.8, chunk_size=8)
    _close(logprobs, full_logprobs(*exact_inputs, targets, 0.8))
    _close(entropy, full_entropy(*exact_inputs, 0.8))
    sampler = jax.nn.log_softmax(model.logits(hidden_bf16) / 0.8, axis=-1)
    _close(jnp.take_along_axis(sampler, targets[..., None], axis=-1)[..., 0], logprobs)
    rounded = full_logprobs(hidden_bf16, head, targets, 0.8)  # logits rounded to bfloat16
    assert np.abs(np.asarray(rounded - logprobs)).max() > 1e-3  # the test tells the two apart


def test_packed_nll_through_the_model_equals_full_logits():
    """The SFT loss on packed rows (positions and segment ids), from hidden_states + head_weight,
    equals the same loss from model(...) logits: value and gradient of every parameter."""
    model = Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    B, L = 2, 24
    tokens = jax.random.randint(jax.random.key(4), (B, L), 0, PRESETS["tiny"].vocab_size)
    segment_ids = jnp.array([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])
    positions = jnp.array([list(range(10)) + list(range(14)), list(range(20)) + [0] * 4])
    targets = tokens[:, 1:]
    weights = ((segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)).astype(jnp.float32)

    def chunked_loss(p):
        m = nnx.merge(graphdef, p)
        hidden = m.hidden_states(tokens, positions, segment_ids)[:, :-1]
        return -jnp.sum(weights * token_logprobs(hidden, m.head_weight(), targets, chunk_size=8))

    def full_loss(p):
        m = nnx.merge(graphdef, p)
        logits = m(tokens, positions, segment_ids)[:, :-1]
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
        return -jnp.sum(weights * logprobs)

    value, grads = jax.jit(jax.value_and_grad(chunked_loss))(params)
    value_ref, grads_ref = jax.jit(jax.value_and_grad(full_loss))(params)
    _close(value, value_ref, atol=1e-4)
    jax.tree.map(_close, grads, grads_ref)
    assert np.abs(np.asarray(grads["embed"])).max() > 1e-3  # the tied head/embedding is trained


# --- memory: what XLA plans to allocate, from the compiled program (deterministic on CPU) ------

def _grad_temp_bytes(loss, T, V=32768, D=64):
    """Temporary bytes of jit(grad(loss)) w.r.t. hidden and head, for B=1: compiled, never run."""
    args = (jax.ShapeDtypeStruct((1, T, D), jnp.float32), jax.ShapeDtypeStruct((V, D), jnp.float32),
            jax.ShapeDtypeStruct((1, T), jnp.int32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_gradient_memory_holds_one_chunk_of_logits_not_all():
    V, D, chunk = 32768, 64, 512

    def nll(h, v, t):
        return -jnp.sum(token_logprobs(h, v, t, chunk_size=chunk))

    def nll_and_entropy(h, v, t):
        logprobs, entropy = token_logprobs_and_entropy(h, v, t, 0.8, chunk_size=chunk)
        return -jnp.sum(logprobs) - jnp.sum(entropy)

    def nll_full(h, v, t):
        return -jnp.sum(full_logprobs(h, v, t))

    def weighted_nll(h, v, t):
        return weighted_nll_sum(h, v, t, jnp.ones(t.shape), chunk_size=chunk)

    T = 8192
    logits_bytes = T * V * 4  # one [1, T, V] float32 buffer: 1 GiB
    assert _grad_temp_bytes(nll_full, T) > logits_bytes  # the measure sees full logits
    for loss in (nll, nll_and_entropy, weighted_nll):
        temp = _grad_temp_bytes(loss, T)
        assert temp < logits_bytes / 4, (loss.__name__, temp)
        # Doubling T may add buffers the size of the hidden states [1, T, D], never logits.
        growth = temp - _grad_temp_bytes(loss, T // 2)
        assert growth < 8 * (T // 2) * D * 4, (loss.__name__, growth)
