"""The sampler against transformers' generate and a full forward pass recomputed in NumPy."""

import json
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qed_jax
from qed_jax import attention, cli, sampling
from qed_jax.config import ConfigError, preset
from qed_jax.model import Qwen3
from qed_jax.sampling import Sampler, SamplingParams, bucket_length, kv_bytes_per_token, wave_size
from qed_jax.sharding import MeshConfig, make_mesh
from qed_jax.tokenizer import load_tokenizer, stop_ids
from tests.helpers import REPO, cli_env, make_hf_model, make_hf_model_with_tokenizer, make_tokenizer

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], [300, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 77, 31]]
# Seven prompts of different lengths: with max_concurrent 3, waves of 3, 3 and 1 (+2 dummies).
SEVEN = PROMPTS + [[1, 2, 3], [9] * 20, [44, 45, 46, 47, 48], [200]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampling_model")
    hf = make_hf_model(path, seed=7)
    return hf, qed_jax.from_pretrained(path)


def _full_logits(model, prompt, completion):
    tokens = jnp.asarray([prompt + completion])
    return np.asarray(model(tokens))[0, len(prompt) - 1: len(prompt) + len(completion) - 1]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _assert_greedy_matches_transformers(tiny, max_new_tokens=40):
    """The sampler's greedy completions of PROMPTS are transformers' `generate`'s; returns them."""
    import torch

    hf, model = tiny
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    completions = Sampler(model).generate_ids(PROMPTS, greedy, jax.random.key(0), stop_ids=[])
    for prompt, c in zip(PROMPTS, completions):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert c.tokens == ref[0, len(prompt):].tolist()
    return completions


def test_greedy_matches_transformers_generate(tiny):
    for c in _assert_greedy_matches_transformers(tiny):
        assert c.finish_reason == "length" and len(c.tokens) == 40


def test_greedy_reading_the_stacked_cache_in_chunks_matches_transformers(tiny, monkeypatch, fresh_jit_caches):
    """The decode loop over the stacked cache with a scan over layers (the accelerators'), reading
    its 128-slot cache (prompt bucket 64 + 40 new tokens, rounded up) in chunks of 16 slots, only
    those up to the furthest position (slot 52: four chunks)."""
    monkeypatch.setattr(attention, "decode_chunk", lambda max_len: 16)
    monkeypatch.setattr(qed_jax.model, "unstacked_layers", lambda: False)
    monkeypatch.setattr(sampling, "unstacked_layers", lambda: False)
    _assert_greedy_matches_transformers(tiny)


def _decode_by_the_kernel(monkeypatch):
    """Decode loops over the stacked cache with its attention by the Pallas decode kernel (as on
    TPU; interpret mode here), in 16-slot blocks."""
    monkeypatch.setattr(attention, "use_decode_kernel", lambda q, k: q.shape[1] == 1)
    monkeypatch.setattr(attention, "DECODE_KERNEL_BLOCKS", (16,))
    monkeypatch.setattr(qed_jax.model, "unstacked_layers", lambda: False)
    monkeypatch.setattr(sampling, "unstacked_layers", lambda: False)


def test_cache_slots_are_whole_kernel_blocks():
    """A cache holds the prompt bucket + budget rounded up to 128 slots, and past 16,384 to
    1,024, so that TPU's decode kernel serves it (`attention.use_decode_kernel` needs whole
    blocks) and reads a long bfloat16 cache of 8 kv heads in blocks of 1,024 slots."""
    sizes = (1, 104, 128, 129, 16384, 16385, 53248, 53845)
    assert [sampling.cache_slots(n) for n in sizes] == [128, 128, 128, 256, 16384, 17408, 53248, 54272]
    assert [attention.decode_kernel_block(sampling.cache_slots(n), 8, 128, 2) for n in (104, 2900, 16385, 53845)] == \
        [128, 128, 1024, 1024]


def test_greedy_by_the_decode_kernel_matches_transformers(tiny, monkeypatch, fresh_jit_caches):
    """The decode loop with the Pallas decode kernel reading its 128-slot cache (prompt bucket
    64 + 40 new tokens, rounded up) in 16-slot blocks, each row up to its own position."""
    _decode_by_the_kernel(monkeypatch)
    _assert_greedy_matches_transformers(tiny)


def test_logprobs_equal_log_softmax_of_tempered_logits(tiny):
    _, model = tiny
    temperature = 0.7
    params = SamplingParams(max_new_tokens=24, temperature=temperature, top_k=50, top_p=0.9)
    completions = Sampler(model).generate_ids(PROMPTS, params, jax.random.key(1), stop_ids=[])
    for prompt, c in zip(PROMPTS, completions):
        expected = _log_softmax(_full_logits(model, prompt, c.tokens) / temperature)
        expected = expected[np.arange(len(c.tokens)), c.tokens]
        np.testing.assert_allclose(c.logprobs, expected, atol=1e-4)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (20, 0.3)])
def test_top_k_and_top_p_stay_in_the_allowed_set(tiny, top_k, top_p):
    _, model = tiny
    temperature = 1.5  # flat distributions make an escape from the allowed set likely
    params = SamplingParams(max_new_tokens=48, temperature=temperature, top_k=top_k, top_p=top_p)
    completions = Sampler(model).generate_ids(PROMPTS, params, jax.random.key(2), stop_ids=[])
    for prompt, c in zip(PROMPTS, completions):
        logits = _full_logits(model, prompt, c.tokens) / temperature
        for step, token in enumerate(c.tokens):
            order = np.argsort(-logits[step], kind="stable")
            allowed = order[: top_k or len(order)]
            probs = np.exp(_log_softmax(logits[step][allowed]))
            before = np.cumsum(probs) - probs
            allowed = allowed[before < top_p]
            assert token in allowed, (step, token)


def test_near_zero_temperature_reproduces_greedy(tiny):
    _, model = tiny
    sampler = Sampler(model)
    greedy = sampler.generate_ids(PROMPTS, SamplingParams(max_new_tokens=32, temperature=0.0),
                                  jax.random.key(3), stop_ids=[])
    cold = sampler.generate_ids(PROMPTS, SamplingParams(max_new_tokens=32, temperature=1e-5),
                                jax.random.key(4), stop_ids=[])
    assert [c.tokens for c in cold] == [c.tokens for c in greedy]


def test_new_weights_are_sampled_from_at_the_next_call(tiny, tmp_path, caplog):
    """After `update_weights` the sampler samples from the new weights (the same tokens and
    log-probs as a sampler built on them) without compiling again."""
    _, model = tiny
    make_hf_model(tmp_path, seed=8)
    other = qed_jax.from_pretrained(tmp_path)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    sampler = Sampler(model)
    before = sampler.generate_ids(PROMPTS, greedy, jax.random.key(0), stop_ids=[])
    sampler.update_weights(nnx.split(other)[1])
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        after = sampler.generate_ids(PROMPTS, greedy, jax.random.key(0), stop_ids=[])
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not [m for m in compiles if "decode_loop" in m or "prefill" in m], compiles
    expected = Sampler(other).generate_ids(PROMPTS, greedy, jax.random.key(0), stop_ids=[])
    assert [c.tokens for c in after] == [c.tokens for c in expected] != [c.tokens for c in before]
    assert [c.logprobs for c in after] == [c.logprobs for c in expected]


def test_fixed_key_is_deterministic(tiny):
    _, model = tiny
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    a = Sampler(model).generate_ids(PROMPTS, params, jax.random.key(5), stop_ids=[])
    b = Sampler(model).generate_ids(PROMPTS, params, jax.random.key(5), stop_ids=[])
    c = Sampler(model).generate_ids(PROMPTS, params, jax.random.key(6), stop_ids=[])
    assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]


def test_a_stopped_row_ends_while_others_go_on(tiny):
    _, model = tiny
    sampler = Sampler(model)
    params = SamplingParams(max_new_tokens=30, temperature=1.0)
    free = sampler.generate_ids(PROMPTS, params, jax.random.key(0), stop_ids=[])
    # A stop id that row 0 first emits mid-way and that the other rows never emit.
    others = {t for c in free[1:] for t in c.tokens}
    step = next(i for i, t in enumerate(free[0].tokens)
                if i >= 3 and t not in others and t not in free[0].tokens[:i])
    stop = free[0].tokens[step]
    stopped = sampler.generate_ids(PROMPTS, params, jax.random.key(0), stop_ids=[stop])
    assert stopped[0].tokens == free[0].tokens[: step + 1] and stopped[0].finish_reason == "stop"
    assert stopped[0].logprobs == free[0].logprobs[: step + 1]
    for before, after in zip(free[1:], stopped[1:]):
        assert after.tokens == before.tokens and after.finish_reason == "length"


def test_decode_feeds_every_token_but_the_last(tiny):
    """The first token comes from the prefill's logits, and no forward follows the last one drawn:
    after N tokens of a P-token prompt, cache slots up to P + N - 2 hold keys, slot P + N - 1 none."""
    _, model = tiny
    P, N = 7, 5
    sampler = Sampler(model)
    cache = sampling.new_kv_cache(sampler.config, 1, 16, jnp.float32)
    lengths = jnp.asarray([P], jnp.int32)
    logits, cache = sampling.prefill(sampler.graphdef, sampler.state, jnp.asarray([PROMPTS[0]]), lengths, cache)
    one = lambda v, dtype: jnp.asarray([v], dtype)  # noqa: E731
    tokens, _, n, _, cache = sampling.decode_loop(
        sampler.graphdef, N, sampler.state, logits, lengths, cache, jax.random.key(0), one(0.0, jnp.float32),
        one(0, jnp.int32), one(1.0, jnp.float32), one(N, jnp.int32), jnp.zeros((0,), jnp.int32))
    assert int(n[0]) == N
    written = np.abs(np.asarray(cache.k)).sum(axis=(0, 3, 4))[0]  # per slot
    assert (written[: P + N - 1] > 0).all() and (written[P + N - 1:] == 0).all(), written


def test_decode_loop_compiles_once_per_bucket(tiny, caplog):
    _, model = tiny
    sampler = Sampler(model, buckets=(16, 32))
    batches = [[[1, 2, 3], [4, 5, 6, 7, 8]], [[9] * 11, [10] * 2], [[7] * 16, [8] * 1]]
    settings = [(0.0, 1.0), (0.8, 0.9), (1.3, 0.5)]
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for batch, (temperature, top_p) in zip(batches, settings):
            sampler.generate_ids(batch, SamplingParams(max_new_tokens=8, temperature=temperature, top_p=top_p),
                                 jax.random.key(0), stop_ids=[2])
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert sum("decode_loop" in m for m in compiles) == 1, compiles
    assert sum("prefill" in m for m in compiles) == 1, compiles


@pytest.mark.parametrize("buckets", [(), (128, 16), (0, 16), (16, 16), (16.5, 32)])
def test_prompt_buckets_that_are_not_increasing_token_counts_are_refused(buckets):
    """No bucket raised an IndexError at the first call; buckets out of order padded a short
    prompt to the first that held it and named the last as the largest."""
    model = Qwen3(preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"^prompt buckets must be one or more token counts of at least 1 in "
                                          r"increasing order"):
        Sampler(model, buckets=buckets)


def test_a_budget_past_the_trained_positions_warns_once(caplog):
    limit, longest = 24, max(len(p) for p in PROMPTS)
    sampler = Sampler(Qwen3(preset("tiny").replace(max_position_embeddings=limit), rngs=nnx.Rngs(0)))
    sampling._warn_past_trained_positions.cache_clear()  # whatever another test warned of
    params = SamplingParams(max_new_tokens=limit - longest, temperature=0.0)
    with caplog.at_level(logging.WARNING, logger="qed_jax.sampling"):
        # Rows whose own budgets keep them within the limit warn of nothing (it warned when the
        # longest prompt plus max_new_tokens passed it).
        sampler.generate_ids([*PROMPTS, [7] * (longest + 5)], params, jax.random.key(0), stop_ids=[],
                             budgets=[params.max_new_tokens] * len(PROMPTS) + [params.max_new_tokens - 5])
        assert len(caplog.records) == 0
        for extra in (0, 1, 1, 5):  # at the limit, past it, again, a longer prompt: one warning in all
            sampler.generate_ids([*PROMPTS, [7] * (longest + extra)], params, jax.random.key(0), stop_ids=[])
            assert len(caplog.records) == (extra > 0)
        # A prompt that reaches the limit by itself: lowering max_new_tokens would not help.
        sampler.generate_ids([[7] * limit], params, jax.random.key(0), stop_ids=[])
    warning = (f"prompts plus max_new_tokens ({params.max_new_tokens}) pass the model's max_position_embeddings "
               f"({limit}): positions beyond it were never trained; ")
    assert [r.getMessage() for r in caplog.records] == [
        warning + "lower max_new_tokens for this model", warning + "a prompt alone reaches it: shorten the prompts"]


@pytest.mark.parametrize("layers", ["per-layer", "stacked, in chunks", "stacked, by the kernel"])
def test_sharded_greedy_equals_unsharded(tmp_path, monkeypatch, fresh_jit_caches, layers):
    """Rows over data x fsdp, kv heads over tensor; CPU's decode over per-layer arrays, or the
    accelerators' over the stacked cache: read in 16-slot chunks (the chunk loop's length is the
    furthest position over rows on every shard), or by the decode kernel in each shard of the
    cache (TPU's)."""
    if layers == "stacked, in chunks":
        monkeypatch.setattr(attention, "decode_chunk", lambda max_len: 16)
        monkeypatch.setattr(qed_jax.model, "unstacked_layers", lambda: False)
        monkeypatch.setattr(sampling, "unstacked_layers", lambda: False)
    elif layers == "stacked, by the kernel":
        _decode_by_the_kernel(monkeypatch)
    make_hf_model(tmp_path, num_attention_heads=4, num_key_value_heads=2, seed=3)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    prompts = PROMPTS + [[1, 2, 3], [4], [8, 9, 10, 11]]
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    plain = Sampler(qed_jax.from_pretrained(tmp_path)).generate_ids(prompts, greedy, jax.random.key(0), [])
    # Two waves of 4 rows, one per batch shard; the second is half dummies.
    sharded = Sampler(qed_jax.from_pretrained(tmp_path, mesh=mesh), mesh=mesh, max_concurrent=4)
    assert [c.tokens for c in sharded.generate_ids(prompts, greedy, jax.random.key(0), [])] == \
        [c.tokens for c in plain]


def test_waves_greedy_equals_one_batch_and_transformers(tiny):
    import torch

    hf, model = tiny
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    waved = Sampler(model, max_concurrent=3).generate_ids(SEVEN, greedy, jax.random.key(0), stop_ids=[])
    whole = Sampler(model).generate_ids(SEVEN, greedy, jax.random.key(0), stop_ids=[])
    assert [c.tokens for c in waved] == [c.tokens for c in whole]
    for prompt, c in zip(SEVEN, waved):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert c.tokens == ref[0, len(prompt):].tolist()


def test_samples_do_not_depend_on_the_waves(tiny):
    _, model = tiny
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95)
    budgets = [12, 3, 9, 12, 1, 10, 7]  # per-request budgets must follow their requests into waves

    def run(sampler):
        return sampler.generate_ids(SEVEN, params, jax.random.key(9), stop_ids=[4], budgets=budgets)

    waved, whole = run(Sampler(model, max_concurrent=3)), run(Sampler(model))
    for a, b, budget in zip(waved, whole, budgets):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert len(a.tokens) <= budget
    assert len({tuple(c.tokens) for c in waved}) == len(SEVEN)  # rows draw different samples


def test_a_share_of_the_requests_samples_what_the_whole_batch_does(tiny):
    """A process sampling its share of a step passes its prompts' rows: each request keeps its
    draws (the share's prompts fall in the same bucket as the whole batch's here)."""
    _, model = tiny
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    whole = Sampler(model).generate_ids(SEVEN, params, jax.random.key(3), stop_ids=[])
    share = Sampler(model).generate_ids(SEVEN[4:], params, jax.random.key(3), stop_ids=[], row_ids=range(4, 7))
    assert [c.tokens for c in share] == [c.tokens for c in whole[4:]]
    # Any rows, in any order, in waves or not: prompt i draws as row row_ids[i].
    picked = Sampler(model, max_concurrent=2).generate_ids([SEVEN[5], SEVEN[1], SEVEN[6]], params, jax.random.key(3),
                                                           stop_ids=[], row_ids=[5, 1, 6])
    assert [c.tokens for c in picked] == [whole[i].tokens for i in (5, 1, 6)]
    for row_ids, shape in [([0, 1], r"\(2,\)"), (4, r"\(\)"), ([[0, 1, 2]], r"\(1, 3\)")]:
        with pytest.raises(ValueError, match=f"^row_ids has shape {shape}; give a flat sequence of 3 ints"):
            Sampler(model).generate_ids(SEVEN[:3], params, jax.random.key(3), stop_ids=[], row_ids=row_ids)


def test_one_compile_serves_every_wave(tiny, caplog):
    _, model = tiny
    sampler = Sampler(model, buckets=(32,), max_concurrent=3)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for prompts, temperature in [(SEVEN, 0.0), (SEVEN[2:], 0.9), (SEVEN[:3], 1.2)]:
            completions = sampler.generate_ids(prompts, SamplingParams(max_new_tokens=6, temperature=temperature),
                                               jax.random.key(0), stop_ids=[])
            assert [len(c.tokens) for c in completions] == [6] * len(prompts)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert sum("decode_loop" in m for m in compiles) == 1, compiles
    assert sum("prefill" in m for m in compiles) == 1, compiles


def test_a_sharded_kv_cache_compiles_once_however_often_it_is_allocated(caplog):
    """GRPO releases the sampler's and the reasoning cache's KV caches every step and allocates
    them again: on a mesh each allocation compiled its zero fill again."""
    mesh = make_mesh(MeshConfig(data=-1))
    config = preset("tiny")
    first = sampling.new_kv_cache(config, 8, 256, "float32", mesh)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        again = sampling.new_kv_cache(config, 8, 256, "float32", mesh)
    assert [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()] == []
    assert again.k.sharding == first.k.sharding and again.k.shape == first.k.shape
    assert not np.asarray(again.k).any() and not np.asarray(again.v).any()


def test_wave_size_by_hand():
    config = preset("qwen3-4b")
    per_token = 2 * 36 * 8 * 128 * 2  # K and V, 36 layers, 8 kv heads of 128, bf16
    assert kv_bytes_per_token(config, "bfloat16") == per_token == 147_456
    per_sequence = 51_200 * per_token  # 7.03 GiB: 8 fit in 60 GiB
    assert (60 * 2**30) // per_sequence == 8
    assert wave_size(config, 51_200, 60 * 2**30, "bfloat16", batch_shards=8) == 8 * 8
    # kv heads split two ways: each device holds half of every sequence, 17 fit.
    assert wave_size(config, 51_200, 60 * 2**30, "bfloat16", batch_shards=8, kv_head_shards=2) == 17 * 8
    assert wave_size(config, 51_200, 60 * 2**30, "float32", batch_shards=8) == 4 * 8
    with pytest.raises(ConfigError, match=r"7\.03 GiB per device, more than the budget of 4\.00 GiB"):
        wave_size(config, 51_200, 4 * 2**30, "bfloat16", batch_shards=8)


def test_sampler_derives_its_wave_from_the_mesh_and_kv_budget():
    # Abstract weights: the sampler's planning needs shapes only.
    model = nnx.eval_shape(lambda: Qwen3(preset("qwen3-4b"), rngs=nnx.Rngs(0)))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sampler = Sampler(model, mesh=mesh, kv_cache_gib=60)
    assert sampler.cache_shards() == (4, 2)  # batch over data x fsdp, kv heads over tensor
    assert sampler.wave_rows(1024, 51_200) == 17 * 4
    assert sampler.wave_rows(10, 51_200) == 12  # a small call: its own size, rounded up to the shards
    assert Sampler(model, mesh=mesh, max_concurrent=64).wave_rows(1024, 51_200) == 64
    with pytest.raises(ConfigError, match="multiple of the mesh's 4 batch shard"):
        Sampler(model, mesh=mesh, max_concurrent=6)
    with pytest.raises(ConfigError, match="budget"):
        Sampler(model, mesh=mesh, kv_cache_gib=2).wave_rows(1024, 51_200)


def test_filter_logits_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 50)).astype(np.float32) * 3
    logits[6] = np.r_[30.0, np.zeros(49)]  # the tail's mass (1e-12) is past float32's resolution of 1
    top_k = np.array([0, 1, 5, 0, 7, 50, 0], np.int32)
    top_p = np.array([1.0, 1.0, 1.0, 0.6, 0.4, 0.95, 1.0], np.float32)
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for row in range(7):
        order = np.argsort(-logits[row])
        kept = order[: top_k[row] or 50]
        probs = np.exp(_log_softmax(logits[row][kept].astype(np.float64)))
        if top_p[row] < 1:  # 1 is off
            kept = kept[(np.cumsum(probs) - probs) < top_p[row]]
        assert set(np.flatnonzero(np.isfinite(out[row]))) == set(kept.tolist()), row



@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 1.0), (2.0, 0, 1.0), (1.3, 4, 0.9)])
def test_sampled_tokens_follow_the_tempered_filtered_softmax(temperature, top_k, top_p):
    """Draw frequencies against the exact distribution, written here from its definition: softmax
    of logits / temperature over the top-k, then the nucleus of what is left. A fixed key makes the
    statistic the same in every run; the bound is far above chance (chi-square's 99.9th percentile
    is under 25 at these degrees of freedom) and far below what temperature applied twice or not
    at all, or a draw from unfiltered logits, gives (thousands)."""
    logits = np.array([2.0, 1.5, 1.5, 0.3, -0.5, -1.0, -4.0, 0.0])
    n = 100_000
    x = logits / temperature
    order = np.argsort(-x, kind="stable")
    kept = order[: top_k or len(x)]
    probs = np.exp(x[kept] - x[kept].max()) / np.exp(x[kept] - x[kept].max()).sum()
    kept = kept[np.cumsum(probs) - probs < top_p]
    expected = np.zeros(len(x))
    expected[kept] = np.exp(x[kept]) / np.exp(x[kept]).sum()

    def full(value, dtype):
        return jnp.full((n,), value, dtype)

    tokens, _ = jax.jit(sampling.sample_tokens)(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(x))), jax.random.split(jax.random.key(7), n),
        full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32))
    counts = np.bincount(np.asarray(tokens), minlength=len(x))
    assert counts[expected == 0].sum() == 0, counts
    chi_square = (((counts - n * expected)[kept]) ** 2 / (n * expected[kept])).sum()
    assert chi_square < 40, (chi_square, counts / n, expected)

@pytest.mark.parametrize("top_k,top_p,kept", [(2, 0.6, [0, 1, 2, 3, 4]), (3, 0.6, [0, 1, 2, 3, 4]),
                                               (0, 0.3, [0]), (0, 0.5, [0, 1, 2, 3, 4]), (1, 1.0, [0])])
def test_tokens_tied_at_a_cut_are_kept_or_dropped_together(top_k, top_p, kept):
    """Four tokens tie for second place: top-k keeps all of them, and the nucleus is taken over
    what top-k kept (over its first k sorted entries only, top-k 2 with top-p 0.6 kept the top
    token alone, as if the other ties had no mass)."""
    logits = jnp.asarray([[2.0, 1.0, 1.0, 1.0, 1.0, -3.0]])
    out = np.asarray(sampling.filter_logits(logits, jnp.asarray([top_k]), jnp.asarray([top_p], jnp.float32)))
    assert np.flatnonzero(np.isfinite(out[0])).tolist() == kept


def test_generate_cli_json(tmp_path, capsys):
    make_hf_model_with_tokenizer(tmp_path)
    capsys.readouterr()
    rc = cli.main(["generate", "--model", str(tmp_path), "--prompt", "Let n be", "--prompt", "Prove",
                   "--chat", "--max-new-tokens", "6", "--temperature", "0.7", "--top-p", "0.9",
                   "--seed", "1", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["Let n be", "Prove"]
    for r in rows:
        assert len(r["logprobs"]) == len(r["tokens"]) <= 6 and r["finish_reason"] in ("stop", "length")
        assert isinstance(r["text"], str)
    # As plain text, several completions come each under a numbered line that says how it ended;
    # one alone is its text only (greedy, 6 tokens: cut off), the note on stderr.
    texts = [r["text"] for r in rows]
    args = ["generate", "--model", str(tmp_path), "--chat", "--max-new-tokens", "6", "--temperature", "0.7",
            "--top-p", "0.9", "--seed", "1"]
    assert cli.main([*args, "--prompt", "Let n be", "--prompt", "Prove"]) == 0
    notes = [" (cut off at --max-new-tokens 6)" if r["finish_reason"] == "length" else "" for r in rows]
    assert capsys.readouterr().out == (f"=== prompt 1 of 2{notes[0]} ===\n{texts[0]}\n"
                                       f"=== prompt 2 of 2{notes[1]} ===\n{texts[1]}\n")
    assert cli.main(["generate", "--model", str(tmp_path), "--max-new-tokens", "2", "--temperature", "0",
                     "--prompt", "Prove"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == "[cut off at --max-new-tokens 2]" and "===" not in out


def test_generate_cli_takes_the_tokenizer_from_another_folder(tmp_path, capsys):
    model, tokens = tmp_path / "model_only", tmp_path / "tokenizer"
    make_hf_model(model)
    make_tokenizer().save_pretrained(tokens)
    args = ["generate", "--model", str(model), "--max-new-tokens", "3", "--temperature", "0", "--prompt", "Prove"]
    assert cli.main(args) == 2  # before any model loads
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"qed-jax generate: error: tokenizer {model}: the folder holds no tokenizer (tokenizer.json, "
        "tokenizer_config.json, vocab.json); or name one with --tokenizer")
    assert cli.main([*args, "--tokenizer", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"qed-jax generate: error: --tokenizer: tokenizer {tmp_path / 'none'} does not exist")
    assert cli.main([*args, "--tokenizer", str(tokens)]) == 0
    text = capsys.readouterr().out
    make_tokenizer().save_pretrained(model)  # the same tokenizer in the model's folder: the same text
    assert cli.main(args) == 0
    assert capsys.readouterr().out == text


def test_generate_cli_names_a_wrong_model_path_as_the_models(tmp_path, capsys):
    """--model is checked before the tokenizer is looked for in it: a missing folder or a
    trainer's run directory gets the model's own message (as convert gives), not a tokenizer's."""
    run = tmp_path / "run"
    make_hf_model_with_tokenizer(run / "hf")
    for given, message in ((tmp_path / "none", f"{tmp_path / 'none'}: no such file or directory"),
                           (run, f"{run}: a trainer's run directory, not a model; pass {run / 'hf'} (its exported "
                                 "model)")):
        assert cli.main(["generate", "--model", str(given), "--prompt", "Prove"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"qed-jax generate: error: {message}"


def test_inputs_the_model_cannot_read_are_refused_not_sampled_as_nan(tmp_path, capsys):
    make_hf_model_with_tokenizer(tmp_path, vocab_size=256)  # the tokenizer has 320 tokens
    model = qed_jax.from_pretrained(tmp_path)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    sampler = Sampler(model)
    with pytest.raises(ValueError, match=r"^prompts\[1\] holds token id 256, outside the model's vocabulary \[0, 256\)"):
        sampler.generate_ids([[5, 6], [7, 256]], greedy, jax.random.key(0), stop_ids=[])
    with pytest.raises(ValueError, match=r"^prompts\[0\] holds token id -1"):
        sampler.generate_ids([[-1]], greedy, jax.random.key(0), stop_ids=[])
    # One prompt not wrapped in a list, or texts, name the prompt and say what to give.
    with pytest.raises(ValueError, match=r"^prompts\[0\] is of type int, not token ids: give one list of ints per prompt"):
        sampler.generate_ids([5, 6], greedy, jax.random.key(0), stop_ids=[])
    with pytest.raises(ValueError, match=r"^prompts\[1\] is of type str, not token ids"):
        sampler.generate_ids([[5], "Prove"], greedy, jax.random.key(0), stop_ids=[])
    # Ids that are not flat ints (floats were cut to ints and sampled) are refused; a 2-D array of
    # prompts is prompts (it was refused as an ambiguous truth value).
    with pytest.raises(ValueError, match=r"^prompts\[1\] is not a flat sequence of ints \(list of float64"):
        sampler.generate_ids([[5], [6.7]], greedy, jax.random.key(0), stop_ids=[])
    with pytest.raises(ValueError, match=r"^prompts\[0\] is not a flat sequence of ints \(list of int64, "
                                         r"shape \(1, 2\)"):
        sampler.generate_ids([[[5, 6]]], greedy, jax.random.key(0), stop_ids=[])
    as_list = sampler.generate_ids([[5, 6], [7, 8]], greedy, jax.random.key(0), stop_ids=[])
    as_array = sampler.generate_ids(np.array([[5, 6], [7, 8]]), greedy, jax.random.key(0), stop_ids=[])
    assert [c.tokens for c in as_array] == [c.tokens for c in as_list]
    with pytest.raises(ValueError, match=r"^prompts\[1\] has a budget of -2 new tokens; give 0 or more"):
        sampler.generate_ids([[5], [6]], greedy, jax.random.key(0), stop_ids=[], budgets=[3, -2])
    with pytest.raises(ValueError, match=r"^stop_ids is None: give the token ids that end a completion"):
        sampler.generate_ids([[5]], greedy, jax.random.key(0), stop_ids=None)
    # Stop ids as a set are its ids (a set failed in JAX with a TypeError); ids that are not ints
    # are refused, naming them.
    as_set = sampler.generate_ids([[5, 6], [7, 8]], greedy, jax.random.key(0), stop_ids={as_list[0].tokens[1]})
    as_stop_list = sampler.generate_ids([[5, 6], [7, 8]], greedy, jax.random.key(0), stop_ids=[as_list[0].tokens[1]])
    assert [c.tokens for c in as_set] == [c.tokens for c in as_stop_list] != [c.tokens for c in as_list]
    for bad in ([2.5], "7", [[7]], [[7], [8, 9]]):
        with pytest.raises(ValueError, match=r"^stop_ids is .*; give a flat list of token ids \(ints, may be empty\)"):
            sampler.generate_ids([[5]], greedy, jax.random.key(0), stop_ids=bad)
    sampler.release()
    with pytest.raises(RuntimeError, match="weights were released; call update_weights"):
        sampler.generate_ids([[5, 6]], greedy, jax.random.key(0), stop_ids=[])
    capsys.readouterr()
    rc = cli.main(["generate", "--model", str(tmp_path), "--prompt", "Prove", "--max-new-tokens", "2"])
    assert rc == 2 and capsys.readouterr().err.strip().endswith(
        "the tokenizer has 320 tokens but the model's vocab_size is 256, so its last ids have no embedding; use the "
        "tokenizer saved with this model")


def test_the_readme_python_example_runs_and_the_public_names_are_listed(tmp_path, capsys):
    import re

    make_hf_model_with_tokenizer(tmp_path)
    readme = (REPO / "README.md").read_text()
    example = re.search(r"In Python \(`dir\(qed_jax\)` lists the public names\):\n\n```python\n(.*?)```", readme, re.S)[1]
    capsys.readouterr()
    exec(example.replace("path/to/model", str(tmp_path)), {})
    text, finish_reason = capsys.readouterr().out.rstrip("\n").rsplit(" ", 1)
    assert finish_reason in ("stop", "length")
    assert set(qed_jax.__all__) <= set(dir(qed_jax)) and "load_tokenizer" in qed_jax.__all__
    assert all(getattr(qed_jax, name) is not None for name in qed_jax.__all__)


def test_one_prompt_or_one_conversation_alone_is_one_request(tmp_path, capsys):
    make_hf_model_with_tokenizer(tmp_path)
    model, tokenizer = qed_jax.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    conversation = [{"role": "user", "content": "Prove it."}]
    for alone, listed in (("Let n be", ["Let n be"]), (conversation, [conversation])):
        one = qed_jax.generate(model, tokenizer, alone, greedy)
        assert len(one) == 1 and one[0].tokens == qed_jax.generate(model, tokenizer, listed, greedy)[0].tokens
    # A message alone would list as its keys, two prompts "role" and "content": refused, as is a mixed list.
    with pytest.raises(ConfigError, match=r"^generate: a message alone is no prompt; pass a conversation"):
        qed_jax.generate(model, tokenizer, conversation[0], greedy)
    with pytest.raises(ConfigError, match=r"^generate: prompts\[1\] is of type dict; each prompt is a string or a conversation"):
        qed_jax.generate(model, tokenizer, ["Let n be", conversation[0]], greedy)
    # A chat template that refuses the conversation (Qwen3's raise_exception) and a prompt past the
    # largest bucket: one line each, not a traceback.
    refusing = load_tokenizer(tmp_path)
    refusing.chat_template = "{{ raise_exception('a system message is required') }}"
    with pytest.raises(ConfigError, match=r"^generate: prompts\[0\]: the chat template refuses this conversation \(a "
                                          r"system message is required\)$"):
        qed_jax.generate(model, refusing, [conversation], greedy)
    refusing.save_pretrained(tmp_path)  # the CLI numbers its --prompt flags from 1
    assert cli.main(["generate", "--model", str(tmp_path), "--chat", "--prompt", "a", "--prompt", "b"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qed-jax generate: error: prompt 1 (--prompt): the chat template refuses this conversation (a system message "
        "is required)")
    with pytest.raises(ConfigError, match=r"^a prompt of 262145 tokens is longer than the sampler's largest prompt "
                                          r"bucket \(262144 tokens\); shorten it$"):
        bucket_length(262145)
    # A tokenizer with no token that ends a turn would sample to the budget every time.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    for unknown in ({}, {"unk_token": "a"}):  # a missing token looked up as None, or as the unknown word's id
        bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")),
                                       **unknown)
        with pytest.raises(ConfigError, match=r"the tokenizer has none of <\|im_end\|>, <\|endoftext\|> or an eos "
                                              "token, so generation would never stop: use the model's own tokenizer"):
            stop_ids(bare)


def test_first_argmax_is_argmax_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 5, (64, 300)).astype(np.float32)  # many ties at the maximum
    np.testing.assert_array_equal(sampling.first_argmax(jnp.asarray(logits)), np.argmax(logits, axis=-1))
    logits[3, 10] = np.nan  # backends differ on whether max propagates NaN: in range either way
    assert 0 <= int(sampling.first_argmax(jnp.asarray(logits))[3]) < 300


def test_a_prefill_that_does_not_fit_its_cache_is_refused(tiny):
    """A cache with another number of rows than the prompts, or fewer slots than their tokens:
    XLA would write row 0 alone, or refuse the slice with a shape error naming neither."""
    _, model = tiny
    prompt = jnp.ones((1, 8), jnp.int32)
    for batch, max_len in ((2, 16), (1, 4)):
        with pytest.raises(ValueError, match=rf"prefill of 1 prompts of 8 tokens into a KV cache of {batch} rows of "
                                             rf"{max_len} slots: the cache needs a row per prompt and a slot per token"):
            model.prefill(prompt, qed_jax.KVCache.zeros(model.config, batch=batch, max_len=max_len))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_decode_over_per_layer_arrays_equals_the_scan(tiny, remat):
    """The CPU decode path (weights split per layer and output-major, activations feature-major,
    cache split per layer) against the scanned one: same logits and the same cache after a
    prefill and three decode steps of unequal positions (row 0 writes the last slot of the first
    64-slot key tile, then the first of the second; the third step is two tokens per row), with
    logits at one token or at all, and the model's remat setting either way (decoding never
    rematerializes)."""
    _, loaded = tiny
    model = Qwen3(loaded.config.replace(remat=remat), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(loaded, nnx.Param))
    cache = qed_jax.KVCache.zeros(model.config, batch=2, max_len=128)
    prompt = jnp.asarray([[5, 17, 42, 99], [11, 12, 0, 0]])
    _, cache = model.prefill(prompt, cache)
    split = cache.unstacked()
    assert (split.batch, split.max_len) == (cache.batch, cache.max_len) == (2, 128)
    positions = jnp.asarray([[62], [1]])  # the last slot written before each step
    # One token per row with logits at it, one with logits everywhere, then two tokens per row.
    for token, logits_at in (([[7], [8]], jnp.zeros(2, jnp.int32)), ([[250], [3]], None),
                             ([[4, 9], [31, 6]], None)):
        token = jnp.asarray(token, jnp.int32)
        positions = positions[:, -1:] + jnp.arange(1, token.shape[1] + 1)
        logits, cache = model.decode(token, positions, cache, logits_at=logits_at)
        split_logits, split = model.decode(token, positions, split, logits_at=logits_at,
                                           weights=model.decode_weights())
        expected = (2, model.config.vocab_size) if logits_at is not None else (*token.shape, model.config.vocab_size)
        assert logits.shape == split_logits.shape == expected
        np.testing.assert_allclose(split_logits, logits, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(split.stacked(), cache):  # float32 rounding of differently fused matmuls
        np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-5)


# A command whose device call does not end within the test (as a recipe-length decode runs for
# minutes) gets Ctrl-C once `fetch` waits for it. A child process, since nothing can stop the call.
CTRL_C_DURING_A_DEVICE_CALL = """
import os, signal, sys, threading, time, types
import jax, jax.numpy as jnp
from qed_jax import cli, sampling
from qed_jax.trainer import StopSignals

def command(args, stop=None):
    out = jax.jit(lambda x: jax.lax.fori_loop(0, 2**31 - 1, lambda i, y: jnp.tanh(y @ y), x))(jnp.eye(64))
    polling, sleep = threading.Event(), time.sleep
    sampling.time = types.SimpleNamespace(sleep=lambda s: (polling.set(), sleep(s)))

    def ctrl_c():
        polling.wait()
        os.kill(os.getpid(), signal.SIGINT)
        if stop is not None:  # a trainer's handler: once it recorded the first, a second exits
            while not stop.raised:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=ctrl_c, daemon=True).start()
    sampling.fetch(out)

if sys.argv[1] == "cli":
    cli._report = command
    sys.exit(cli.main(["report", "unused"]))
with StopSignals() as stop:
    command(None, stop)
"""


@pytest.mark.parametrize("case", ["cli", "trainer"])
def test_ctrl_c_acts_while_a_device_call_runs(case):
    # Blocked in jax.device_get, the main thread would run no signal handler until the call ends,
    # and an interpreter exiting normally waits for it: either would hang here until the timeout.
    proc = subprocess.run([sys.executable, "-c", CTRL_C_DURING_A_DEVICE_CALL, case], cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    if case == "cli":
        assert proc.stderr.strip().splitlines()[-1] == "qed-jax report: interrupted"
    else:
        assert "SIGINT again: exiting without a checkpoint" in proc.stderr, proc.stdout + proc.stderr

