"""This machine's limits, measured in the benchmark's own run, and the fraction of them a result
reaches.

    python bench/roofline.py [--dtype bfloat16]  # prints the measured limits as JSON

Two limits, measured with the backend the benchmarks use (JAX on its default device):
- matmul peak, FLOP/s: the best of several jitted `jnp.dot`s of square matrices large enough to
  leave the caches (2·n³ FLOPs each), in the benchmark's compute dtype (float32 by default; on a
  GPU, JAX computes float32 products in TensorFloat-32 unless told otherwise, and so does this);
- memory bandwidth, bytes/s: the best of a copy between two preallocated host buffers (read +
  write bytes; NumPy's memcpy), a jitted float32 sum (read bytes) and a jitted negation (read +
  write bytes, on the device), over arrays eight times the size of a CPU's last-level cache, or
  of 2 GiB on an accelerator (no host copy there). The best one is the limit that applies: a
  decode step mostly reads weights.

A result's limit is the time the work would take at these rates: FLOPs / peak, or bytes /
bandwidth, or for a decode step the larger of the two (small batches read more bytes than the
peak can multiply; large batches do the opposite). `fraction` is that time over the measured
time: 1.0 is at the limit.

A third number, on a CPU only, is not a limit of the machine but of the matmul library: the rate
at which a float32 [2048, 512] @ [512, 8] matmul streams its weights (`small_batch_matmul`). A small-batch
decode step on CPU is such matmuls, so its time at that rate shows how much of the gap to the
memory limit is the library's. Its training counterpart (`mlp_train_rate`, measured by
`train_step.py` at the model's shapes) is the FLOP/s of forward and backward through bare SwiGLU
blocks: the rate a training step would reach if it were all dense matmuls and nothing else.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

MATMUL_SIZES = (1024, 2048, 4096)
STREAM_BYTES = 256 * 2 ** 20  # well past a 32 MiB last-level cache
# On an accelerator each call also pays tens of microseconds to dispatch and wait for: larger
# problems make that negligible (a GPU's matmul rate still climbs from 4096 to 8192).
ACCELERATOR_MATMUL_SIZES = (2048, 4096, 8192)
ACCELERATOR_STREAM_BYTES = 2 * 2 ** 30


def _on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def _jax_matmul_precision():
    """JAX's default precision for float32 products: None (or "default") is TensorFloat-32 on a GPU."""
    return getattr(jax.config, "jax_default_matmul_precision", None)


def _best_seconds(fn, min_repeats: int = 3, min_seconds: float = 0.5) -> float:
    """The fastest of at least `min_repeats` calls, repeating until `min_seconds` have passed."""
    best, spent, repeats = float("inf"), 0.0, 0
    while repeats < min_repeats or spent < min_seconds:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return best


def matmul_peak(sizes=None, dtype: str = "float32") -> dict:
    """FLOP/s of a [n, n] @ [n, n] in `dtype` for each n; `flops_per_s` is the best of them."""
    dot = jax.jit(jnp.dot)
    by_size = {}
    for n in sizes or (ACCELERATOR_MATMUL_SIZES if _on_accelerator() else MATMUL_SIZES):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        dot(a, b).block_until_ready()
        by_size[n] = 2 * n ** 3 / _best_seconds(lambda: dot(a, b).block_until_ready())
    return {"flops_per_s": max(by_size.values()), "by_size": by_size, "dtype": dtype,
            "default_matmul_precision": _jax_matmul_precision()}


def memory_bandwidth(nbytes: int | None = None) -> dict:
    """Bytes/s of a host memcpy (read + write counted; on a CPU only: an accelerator's memory is
    not the host's), of a jitted sum (reads only) and of a jitted negation (read + write);
    `bytes_per_s` is the best of them."""
    rates = {}
    if _on_accelerator():
        nbytes = nbytes or ACCELERATOR_STREAM_BYTES
        x = jnp.ones(nbytes // 4, jnp.float32)
    else:
        nbytes = nbytes or STREAM_BYTES
        src = np.random.default_rng(0).standard_normal(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        rates["copy_bytes_per_s"] = 2 * nbytes / _best_seconds(lambda: np.copyto(dst, src))
        x = jnp.asarray(src)
    total, negate = jax.jit(jnp.sum), jax.jit(jnp.negative)
    total(x).block_until_ready()
    rates["read_bytes_per_s"] = nbytes / _best_seconds(lambda: total(x).block_until_ready())
    negate(x).block_until_ready()
    rates["device_copy_bytes_per_s"] = 2 * nbytes / _best_seconds(lambda: negate(x).block_until_ready())
    return {"bytes_per_s": max(rates.values()), "stream_bytes": nbytes, **rates}


def small_batch_matmul(rows: int = 8, nbytes: int = STREAM_BYTES) -> dict:
    """Bytes/s at which a jitted float32 [2048, 512] @ [512, rows] streams its weights from
    memory, over distinct weight matrices adding up to `nbytes` (as a decode step reads each
    layer's weights once), in the orientation a CPU decode step multiplies them
    (`Qwen3._decode_feature_major`: weights [out, in], activations [in, rows]). Not a hardware
    limit: what the backend's matmul reaches at a decode step's shapes, to tell the library's
    share of a gap from ours."""
    d, f = 512, 2048
    count = max(1, nbytes // (4 * d * f))
    weights = [jax.random.normal(jax.random.key(i), (f, d), jnp.float32) for i in range(count)]
    x = jax.random.normal(jax.random.key(count), (d, rows), jnp.float32)
    chain = jax.jit(lambda x, ws: sum(jnp.dot(w, x)[:d] for w in ws))
    chain(x, weights).block_until_ready()
    rate = 4 * d * f * count / _best_seconds(lambda: chain(x, weights).block_until_ready())
    return {"rows": rows, "bytes_per_s": rate}


def mlp_train_rate(rows: int, hidden: int, mlp: int, layers: int = 4, dtype: str = "float32") -> dict:
    """FLOP/s of a jitted forward and backward through `layers` residual SwiGLU blocks
    x + down(silu(x @ gate) * (x @ up)) on [rows, hidden] activations in `dtype`, the weights
    float32 and cast to `dtype` for the products as a mixed-precision model does (3 x 6 x rows x
    hidden x mlp FLOPs per block, the SiLU and products not counted; gradients w.r.t. the weights
    and the input, as in a model whose embedding trains). Not a hardware limit: a reference, the
    rate the backend reaches on a training step's dense matmuls with nothing else in the step
    (no attention, no output head, no norms, no optimizer)."""
    keys = jax.random.split(jax.random.key(0), 3 * layers + 1)
    scale = hidden ** -0.5
    weights = [(jax.random.normal(keys[3 * i], (hidden, mlp)) * scale,
                jax.random.normal(keys[3 * i + 1], (hidden, mlp)) * scale,
                jax.random.normal(keys[3 * i + 2], (mlp, hidden)) * mlp ** -0.5) for i in range(layers)]
    x = jax.random.normal(keys[-1], (rows, hidden), dtype)

    def loss(weights, x):
        for gate, up, down in weights:
            gate, up, down = (w.astype(dtype) for w in (gate, up, down))
            x = x + (jax.nn.silu(x @ gate) * (x @ up)) @ down
        return jnp.sum(jnp.square(x.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(grad(weights, x))
    flops = layers * 3 * 6 * rows * hidden * mlp
    rate = flops / _best_seconds(lambda: jax.block_until_ready(grad(weights, x)))
    return {"rows": rows, "hidden": hidden, "mlp": mlp, "layers": layers, "dtype": dtype, "flops_per_s": rate}


def measure(dtype: str = "float32") -> dict:
    """Both limits, the matmul peak in `dtype`, in one call (seconds on a CPU), with the machine's
    load while measuring: on a shared machine a busy neighbour lowers every number, so results
    carry it."""
    limits = {"matmul": matmul_peak(dtype=dtype), "memory": memory_bandwidth()}
    if not _on_accelerator():  # the CPU decode's matmul orientation; no lead on an accelerator
        limits["small_batch_matmul"] = small_batch_matmul()
    return {**limits, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def torch_device_matching_jax() -> str:
    """Where a benchmark's PyTorch side runs: on the GPU when JAX's default device is one, else on
    the CPU. On the GPU it also sets PyTorch's float32 products to TensorFloat-32 for the whole
    process, as JAX computes them there unless told otherwise."""
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        if _jax_matmul_precision() in (None, "default"):
            torch.set_float32_matmul_precision("high")
        return "cuda"
    return "cpu"


def fraction(limits: dict, seconds: float, flops: float = 0.0, nbytes: float = 0.0) -> dict:
    """How close `seconds` of work (`flops` FLOPs reading/writing `nbytes` bytes) came to the
    limits: the time each limit allows, which one applies (the larger), and the fraction."""
    flop_s = flops / limits["matmul"]["flops_per_s"]
    byte_s = nbytes / limits["memory"]["bytes_per_s"]
    bound = "flops" if flop_s >= byte_s else "memory"
    return {"limit_s": max(flop_s, byte_s), "flops_limit_s": flop_s, "memory_limit_s": byte_s,
            "bound": bound, "fraction": max(flop_s, byte_s) / seconds}


def matmul_params(config) -> int:
    """Parameters that take part in a token's matmuls: the decoder blocks' projections and the
    output head (norm weights are negligible; the embedding lookup is a gather)."""
    c = config
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size


def decode_cost(config, batch: int, prompt_len: int, new_tokens: int, weight_bytes: int, kv_itemsize: int):
    """(FLOPs, bytes) of decoding `new_tokens` tokens for `batch` rows after `prompt_len`-token
    prompts. The first token comes from the prefill's logits; each later one takes a forward of
    the token before it (new_tokens - 1 in all), which multiplies every row by the weights and
    attends over its live keys (prompt_len + step + 1 of them at step 0, 1, ...), reading the
    weights once and every row's live keys and values."""
    c = config
    forwards = max(new_tokens - 1, 0)
    live = sum(prompt_len + step + 1 for step in range(forwards)) * batch  # key slots read, all forwards
    flops = 2 * matmul_params(c) * batch * forwards + 4 * c.num_layers * c.num_heads * c.head_dim * live
    kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * kv_itemsize * live
    return flops, weight_bytes * forwards + kv_bytes


def prefill_flops(config, batch: int, prompt_len: int) -> float:
    """Forward FLOPs of causal prompts [batch, prompt_len], logits at the last token only."""
    c = config
    blocks = matmul_params(c) - c.vocab_size * c.hidden_size
    attention = 2 * c.num_layers * c.num_heads * c.head_dim * prompt_len * prompt_len  # QK^T and AV, causal half
    return batch * (2 * blocks * prompt_len + attention + 2 * c.vocab_size * c.hidden_size)


def describe(limits: dict) -> str:
    text = (f"measured limits: {limits['matmul']['dtype']} matmul {limits['matmul']['flops_per_s'] / 1e9:.0f} "
            f"GFLOP/s, memory {limits['memory']['bytes_per_s'] / 1e9:.1f} GB/s")
    if small := limits.get("small_batch_matmul"):
        text += (f", weights streamed by a [2048, 512] @ [512, {small['rows']}] matmul "
                 f"{small['bytes_per_s'] / 1e9:.1f} GB/s")
    return text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Measure this machine's matmul peak and memory bandwidth.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the matmuls' dtype")
    limits = measure(parser.parse_args().dtype)
    print(describe(limits))
    print(json.dumps(limits, indent=2))
