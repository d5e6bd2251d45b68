"""Attention implementations against the XLA reference: kernels, gradients, the model, a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import qed_jax.model
from qed_jax import attention
from qed_jax.attention import AttentionError, causal_attention, choose_implementation
from qed_jax.config import PRESETS, ConfigError, ModelConfig
from qed_jax.model import KVCache, Qwen3
from qed_jax.sharding import MeshConfig, make_mesh

TINY = PRESETS["tiny"]


def _qkv(batch=2, seq=256, heads=4, kv_heads=2, head_dim=16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (batch, seq, heads, head_dim)),
            jax.random.normal(kk, (batch, seq, kv_heads, head_dim)),
            jax.random.normal(kv, (batch, seq, kv_heads, head_dim)))


def _packed_segments(batch, seq):
    """Rows of a packed batch: documents of uneven lengths, then padding (segment 0)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq - 20), 3, replace=False))
        row = np.zeros(seq, np.int32)
        for doc, (start, end) in enumerate(zip([0, *cuts[:2]], cuts), start=1):
            row[start:end] = doc
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def _value_and_grads(fn, q, k, v, segment_ids):
    """Output and the gradients of a fixed random projection of it w.r.t. q, k, v."""
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
    cotangent = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
    return out, vjp(cotangent)


IMPLEMENTATIONS = {
    # Several kernel blocks (256 = 2 x 128) and a chunk that does not divide T (padding path),
    # blockwise both as the unrolled causal loop (the default at this length) and as the scan.
    "splash": lambda q, k, v, s: attention.splash_attention(q, k, v, s, block=128),
    "blockwise": lambda q, k, v, s: attention.blockwise_attention(q, k, v, s, chunk=96),
    "blockwise-scan": lambda q, k, v, s: attention.blockwise_attention(q, k, v, s, chunk=96, unrolled=False),
}


@pytest.mark.parametrize("segmented", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_implementation_matches_xla_values_and_gradients(name, segmented):
    q, k, v = _qkv()
    segment_ids = _packed_segments(2, 256) if segmented else None
    out, grads = jax.jit(_value_and_grads, static_argnums=0)(IMPLEMENTATIONS[name], q, k, v, segment_ids)
    ref, ref_grads = _value_and_grads(attention.xla_attention, q, k, v, segment_ids)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for grad, ref_grad, what in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(grad, ref_grad, atol=5e-5, rtol=1e-5, err_msg=f"d{what}")


def _tiny_model(implementation):
    return Qwen3(TINY.replace(attention=implementation), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["splash", "blockwise"])
def test_model_logits_match_xla(name):
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, TINY.vocab_size)
    segment_ids = _packed_segments(2, 128)
    ref = _tiny_model("xla")(tokens, segment_ids=segment_ids)
    ours = _tiny_model(name)(tokens, segment_ids=segment_ids)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["xla", "splash", "blockwise"])
def test_prefill_equals_decode_at_positions_from_zero(name):
    """Prefill attends over the prompt itself, decode over the cache it wrote: same numbers."""
    tokens = jax.random.randint(jax.random.key(2), (2, 128), 0, TINY.vocab_size)
    lengths = jnp.array([128, 77])
    cache = KVCache.zeros(TINY, 2, 160)
    ref, ref_cache = _tiny_model("xla").decode(tokens, jnp.broadcast_to(jnp.arange(128), (2, 128)), cache,
                                               logits_at=lengths - 1)
    logits, filled = _tiny_model(name).prefill(tokens, cache, logits_at=lengths - 1)
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(filled.k, ref_cache.k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(filled.v, ref_cache.v, rtol=1e-5, atol=1e-6)


def test_a_model_trained_with_splash_prefills_prompts_of_any_width():
    """The sampler prefills prompts in buckets from 64 tokens, the reasoning cache at whatever
    width its prompts have: widths the kernel cannot serve (a multiple of 128) must not stop a
    model whose config says splash from sampling."""
    tokens = jax.random.randint(jax.random.key(3), (2, 37), 0, TINY.vocab_size)
    cache = KVCache.zeros(TINY, 2, 64)
    ref, ref_cache = _tiny_model("xla").prefill(tokens, cache, logits_at=jnp.array([36, 20]))
    logits, filled = _tiny_model("splash").prefill(tokens, cache, logits_at=jnp.array([36, 20]))
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(filled.k, ref_cache.k, rtol=1e-5, atol=1e-6)


def test_sharded_splash_equals_unsharded():
    """On a data x fsdp x tensor mesh the kernel runs per shard: batch split 4 ways, query and kv
    heads split 2 ways (each shard keeps whole kv groups)."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _qkv(batch=4, seq=128)
    segment_ids = _packed_segments(4, 128)
    ref, ref_grads = jax.jit(_value_and_grads, static_argnums=0)(IMPLEMENTATIONS["splash"], q, k, v, segment_ids)

    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    segment_ids = jax.device_put(segment_ids, NamedSharding(mesh, P(("data", "fsdp"), None)))
    with jax.set_mesh(mesh):
        fn = jax.jit(_value_and_grads, static_argnums=0)
        jaxpr = str(jax.make_jaxpr(_value_and_grads, static_argnums=0)(IMPLEMENTATIONS["splash"], q, k, v,
                                                                       segment_ids))
        out, grads = fn(IMPLEMENTATIONS["splash"], q, k, v, segment_ids)
    assert "shard_map" in jaxpr
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, atol=1e-6, rtol=1e-6)


def test_splash_over_bfloat16_matches_xla_under_the_highest_precision():
    """Over bfloat16, splash runs behind `_at_default_precision` (the suite's "highest" would make
    Mosaic reject it on TPU: the test below): its values and gradients, through that wrapper's
    forward and backward and with segment ids, match the float32 reference to bfloat16 rounding.
    Interpret mode on CPU has no Mosaic, so this checks the wrapper's numerics, not the fix."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv())
    segment_ids = _packed_segments(2, 256)
    out, grads = jax.jit(_value_and_grads, static_argnums=0)(IMPLEMENTATIONS["splash"], q, k, v, segment_ids)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_grads = _value_and_grads(lambda q, k, v, s: attention.xla_attention(f32(q), f32(k), f32(v), s)
                                      .astype(jnp.bfloat16), q, k, v, segment_ids)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(f32(out), f32(ref), atol=2e-2, rtol=2e-2)
    for grad, ref_grad, what in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(f32(grad), f32(ref_grad), atol=5e-2, rtol=2e-2, err_msg=f"d{what}")


@pytest.mark.tpu_compile
def test_splash_over_bfloat16_compiles_for_tpu_under_the_highest_precision(libtpu):
    mesh = make_mesh(MeshConfig(data=4), libtpu)
    rows = NamedSharding(mesh, P("data"))
    q, k, v = (jax.ShapeDtypeStruct((4, 256, heads, 128), jnp.bfloat16, sharding=rows) for heads in (4, 2, 2))
    segment_ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)

    def loss(q, k, v, segment_ids):
        return jnp.sum(attention.splash_attention(q, k, v, segment_ids, interpret=False).astype(jnp.float32))

    assert jax.config.jax_default_matmul_precision == "highest"
    with jax.set_mesh(mesh):
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, segment_ids).compile()


def test_splash_mesh_axes_shard_heads_only_when_both_head_counts_divide():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)).abstract_mesh
    assert attention._splash_mesh_axes(mesh, 8, 4, 2) == (("data", "fsdp"), "tensor")
    assert attention._splash_mesh_axes(mesh, 2, 4, 1) == ("data", None)
    assert attention._splash_mesh_axes(mesh, 1, 3, 3) == (None, None)


def test_splash_refuses_lengths_that_no_block_divides():
    q, k, v = _qkv(batch=1, seq=200)
    with pytest.raises(AttentionError, match="T=200"):
        attention.splash_attention(q, k, v)


def test_auto_picks_splash_on_tpu_blockwise_on_cpu_and_for_long_rows_on_gpu(monkeypatch):
    assert [choose_implementation("auto", t) for t in (256, 2047, 2048, 45056)] == ["blockwise"] * 4
    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    assert [choose_implementation("auto", t) for t in (256, 2047, 2048, 45056)] == \
        ["xla", "xla", "blockwise", "blockwise"]
    monkeypatch.setattr(attention, "platform", lambda: "tpu")
    assert [choose_implementation("auto", t) for t in (512, 1024, 1152, 2100, 45056)] == \
        ["xla", "splash", "splash", "blockwise", "splash"]
    assert choose_implementation("xla", 45056) == "xla"
    with pytest.raises(AttentionError, match="flash"):
        causal_attention(*_qkv(batch=1, seq=8), implementation="flash")


def test_blockwise_memory_grows_linearly_with_length(monkeypatch):
    """Temporary memory of the tiny model's forward + backward, compiled (not run) on CPU: doubling
    T doubles it with blockwise attention (with xla attention it grows 3.9x). This caught a T² mask
    that differentiating the layer scan had hoisted out of the chunk loop, so the layers run as
    the scan TPU uses, not CPU's loop. Rows short enough for the unrolled causal loop take no
    more than the chunk scan would."""
    monkeypatch.setattr(qed_jax.model, "unstacked_layers", lambda: False)

    def temp_bytes(seq):
        model = Qwen3(TINY.replace(attention="blockwise", num_layers=2), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state, tokens):
            return nnx.merge(graphdef, state).hidden_states(tokens).sum()

        tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
        compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(4096) / temp_bytes(2048) < 2.2  # both past UNROLL_MAX_LEN: the scan
    length = attention.UNROLL_MAX_LEN
    unrolled = temp_bytes(length)
    monkeypatch.setattr(attention, "UNROLL_MAX_LEN", 0)  # every length scanned
    assert unrolled <= temp_bytes(length)


def test_the_cpu_layer_loops_compute_the_rope_tables_once():
    """In the compiled CPU programs that run the layers as a loop (training's forward and
    backward, prefill's forward, the feature-major decode step), cos and sin are each evaluated by
    one op. Without `model.materialized`, XLA:CPU fused them into the ops that read the tables:
    18 cos and 12 sin ops in the tiny model's forward and backward, and RoPE 5-6x slower at the
    SFT benchmark's shapes."""
    if not qed_jax.model.unstacked_layers():
        pytest.skip("the layers run as a loop on CPU only")
    model = Qwen3(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((2, 16), jnp.int32)

    def transcendentals(fn, *args):
        text = jax.jit(fn).lower(*args).compile().as_text()
        return text.count(" cosine("), text.count(" sine(")

    def loss(state, tokens):
        return nnx.merge(graphdef, state).hidden_states(tokens).sum()

    def prefill(state, tokens):
        cache = KVCache.zeros(TINY, 2, 32)
        return nnx.merge(graphdef, state).prefill(tokens, cache, logits_at=jnp.array([15, 15]))

    def decode_step(state, tokens):
        model = nnx.merge(graphdef, state)
        cache = KVCache.zeros(TINY, 2, 32).unstacked()
        positions = jnp.array([[16], [16]], jnp.int32)
        return model.decode(tokens[:, :1], positions, cache, weights=model.decode_weights())

    assert transcendentals(jax.grad(loss), state, tokens) == (1, 1)
    assert transcendentals(prefill, state, tokens) == (1, 1)
    assert transcendentals(decode_step, state, tokens) == (1, 1)


def test_config_attention_field():
    old = {k: v for k, v in dataclasses.asdict(TINY).items() if k != "attention"}
    assert ModelConfig(**old).attention == "auto"  # model_config.json written before the field
    assert "attention" not in TINY.replace(attention="splash").to_hf()
    with pytest.raises(ConfigError, match="attention must be one of"):
        TINY.replace(attention="flash")


def _decode_reference(q, k, v, positions):
    """jax.nn.dot_product_attention of new tokens over one layer's cache [B, S, K, H]: token t of
    row b attends to slots 0..positions[b, t]."""
    mask = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5)


@pytest.mark.parametrize("S,chunk,furthest", [(40, None, "last"), (192, None, "last"), (40, 16, "middle"),
                                              (192, 64, "middle"), (200, 48, "middle"), (200, 48, "last")])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_decode_attention_reads_the_live_chunks_only(new_tokens, S, chunk, furthest):
    """The decode attention over the stacked cache (layer 1 of two, read in place) against
    jax.nn.dot_product_attention, read whole (chunk None: caches this short are) or in chunks,
    with the furthest position in the middle of the cache or at its last slot (200 slots in
    48-slot chunks: the last chunk overlaps the one before, whose slots it must not count
    twice). The slots past the chunk of the furthest position are NaN: no chunk there is read,
    or the output would be NaN."""
    rng = np.random.default_rng(3)
    B, K, G, H = 3, 2, 3, 16
    q = jnp.asarray(rng.normal(size=(B, new_tokens, K * G, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    last = S - new_tokens if furthest == "last" else S // 2
    positions = jnp.asarray([[0], [14], [last]]) + jnp.arange(new_tokens)  # row 1 crosses slot 16
    expected = _decode_reference(q, k, v, positions)
    if furthest == "middle":
        dead = (int(positions.max()) // chunk + 1) * chunk
        assert dead < S
        k, v = k.at[:, dead:].set(jnp.nan), v.at[:, dead:].set(jnp.nan)
    stacked_k, stacked_v = jnp.stack([jnp.zeros_like(k), k]), jnp.stack([jnp.zeros_like(v), v])
    out = jax.jit(lambda layer: attention.cached_attention(q, stacked_k, stacked_v, positions, layer,
                                                           chunk=chunk))(1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _cache_past_each_rows_block(cache, positions, block):
    """The cache [B, S, K, H] with every slot past the block of its row's position set to NaN."""
    cache = np.array(cache)
    for row, position in enumerate(np.asarray(positions)[:, 0]):
        cache[row, (position // block + 1) * block:] = np.nan
    return jnp.asarray(cache)


@pytest.mark.parametrize("S,block,rows", [(512, 128, (0, 130, 300)), (256, None, (0, 127, 255)),
                                          (384, 128, (383, 127, 128))])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_decode_kernel_reads_each_rows_live_blocks_only(S, block, rows, cache_dtype):
    """The Pallas decode kernel (interpret mode), layer 1 of the stacked cache, against
    jax.nn.dot_product_attention: grouped query heads, a position at the first slot, at a
    block's last and next slot (127, 128), and at the cache's last, in one block (256 slots: the
    default block) or several; a float32 or bfloat16 cache under float32 queries. Every slot past
    the block of its row's position is NaN: no such block enters the softmax (a row shorter than
    another stops at its own; `_cache_block`, below, keeps Pallas from copying it in)."""
    rng = np.random.default_rng(5)
    B, K, G, H = 3, 2, 3, 16
    q = jnp.asarray(rng.normal(size=(B, 1, K * G, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, K, H)), cache_dtype) for _ in range(2))
    positions = jnp.asarray(rows)[:, None]
    expected = _decode_reference(q, k.astype(jnp.float32), v.astype(jnp.float32), positions)
    read = block or attention.decode_kernel_block(S, K, H, k.dtype.itemsize)
    k, v = (_cache_past_each_rows_block(x, positions, read) for x in (k, v))
    stacked_k, stacked_v = jnp.stack([jnp.zeros_like(k), k]), jnp.stack([jnp.zeros_like(v), v])
    out = jax.jit(lambda layer: attention.kernel_cached_attention(q, stacked_k, stacked_v, positions, layer,
                                                                  block=block))(1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_kernel_in_the_shards_of_the_cache():
    """On a data x fsdp x tensor mesh (8 CPU devices), the kernel runs on each shard of the
    cache: rows over data and fsdp, kv heads over tensor. Same result as unsharded."""
    rng = np.random.default_rng(6)
    B, K, G, H, S = 4, 2, 2, 16, 256
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q = jnp.asarray(rng.normal(size=(B, 1, K * G, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, B, S, K, H)), jnp.float32) for _ in range(2))
    positions = jnp.asarray([[3], [200], [64], [255]])
    expected = _decode_reference(q, k[1], v[1], positions)
    cache = NamedSharding(mesh, P(None, ("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: attention.kernel_cached_attention(q, k, v, positions, 1, block=64))(
            q, jax.device_put(k, cache), jax.device_put(v, cache))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_kernel_blocks():
    """The largest block of 128-1,024 slots that divides the cache and keeps a block of keys
    within 2 MiB; none for caches that are not a multiple of 128 slots (the chunk loop serves
    them). Off TPU, `cached_attention` never picks the kernel."""
    block = attention.decode_kernel_block
    assert block(53248, 8, 128, 2) == 1024  # the 4B recipe's rollouts in bfloat16
    assert block(53248, 8, 128, 4) == 512 and block(53248, 4, 128, 2) == block(2048, 1, 128, 2) == 1024
    assert block(4096 + 384, 8, 128, 2) == 128 and block(104, 8, 128, 2) is None
    # Grid step (row, j) reads block j of the row, past its position its last block again.
    layer, positions = jnp.asarray([3]), jnp.asarray([130, 511])
    assert [attention._cache_block(0, j, layer, positions, block=128) for j in range(4)] == \
        [(3, 0, j, 0, 0) for j in (0, 1, 1, 1)]
    assert [attention._cache_block(1, j, layer, positions, block=128)[2] for j in range(4)] == [0, 1, 2, 3]
    q, cache = jnp.zeros((2, 1, 4, 16)), jnp.zeros((1, 2, 256, 2, 16))
    assert attention.platform() == "cpu" and not attention.use_decode_kernel(q, cache)
    with pytest.raises(AttentionError, match="one new token per row"):
        attention.kernel_cached_attention(jnp.zeros((2, 3, 4, 16)), cache, cache, jnp.zeros((2, 3), int), 0)


@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("S", [40, 192])  # key tiles of 8 and 64 slots
def test_split_cached_attention_equals_dot_product_attention(new_tokens, S):
    """The CPU decode loop's attention over the per-layer cache layout against
    jax.nn.dot_product_attention over the stacked layout."""
    rng = np.random.default_rng(3)
    B, K, G, H = 3, 2, 3, 16
    q = jnp.asarray(rng.normal(size=(B, new_tokens, K * G, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    positions = jnp.asarray([[0], [17], [S - new_tokens]]) + jnp.arange(new_tokens)
    split_k, split_v = attention.to_split_layout(k, v)
    assert split_k.shape[-1] == attention.key_tile(S) == (8 if S == 40 else 64)
    split = attention.split_cached_attention(q, split_k, split_v, positions)
    np.testing.assert_allclose(split, _decode_reference(q, k, v, positions), rtol=1e-5, atol=1e-5)
    for mine, ref in zip(attention.from_split_layout(split_k, split_v), (k, v)):
        np.testing.assert_array_equal(mine, ref)


def test_decode_chunks():
    """Caches shorter than two 512-slot chunks are read whole; longer ones in at most 8 chunks of
    equal length, at least 512 slots (the recipe's 4,096 + 49,152 slots: chunks of 6,656). All
    chunks together never span more than the cache and one slot per chunk."""
    sizes = (104, 612, 1023, 1024, 1025, 1152, 4096, 4097, 53248, 53249)
    chunks = [attention.decode_chunk(n) for n in sizes]
    assert chunks == [104, 612, 1023, 512, 513, 576, 512, 513, 6656, 6657]
    for n, chunk in zip(sizes, chunks):
        count = -(-n // chunk)
        assert count <= 8 and (count == 1 or chunk >= 512) and count * chunk - n < count
