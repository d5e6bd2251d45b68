"""Prefill and decode throughput of qed-jax's sampler next to transformers' generate, on the same
random Qwen3 model and prompts in the same run, at each batch size given (transformers on the GPU
when JAX's default device is one, JAX then taking 45 % of its memory: see train_step.py). Each
result is also set against this machine's limits, measured in the same run (see roofline.py): a
decode step must read the weights and every row's live keys and values, and multiply every row
by the weights; the slower of the two at the measured bandwidth and matmul peak is the limit
(memory at small batches, FLOPs at large ones). Writes JSON.

    python bench/sampling.py --layers 10 --hidden 512 --batch 8 64 --prompt-len 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import roofline
from model_args import add_model_args, model_config


def _timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_qed_jax(model, prompts, new_tokens: int, repeats: int) -> dict:
    """Seconds of the jitted prefill and of the decode loop alone, best of `repeats`, after a
    compile run."""
    from qed_jax.sampling import Sampler, SamplingParams, cache_slots, decode_loop, prefill

    B, P, N = len(prompts), len(prompts[0]), new_tokens
    sampler = Sampler(model, buckets=(P,))
    sampler.generate_ids(prompts, SamplingParams(max_new_tokens=N, temperature=0.0), jax.random.key(0),
                         stop_ids=[])  # compile
    tokens = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.full((B,), P, jnp.int32)
    per_row = lambda v, dt: jnp.full((B,), v, dt)  # noqa: E731
    state = {"cache": sampler._cache(B, cache_slots(P + N))}

    def run_prefill():
        logits, state["cache"] = prefill(sampler.graphdef, sampler.state, tokens, lengths, state["cache"])
        jax.block_until_ready(logits)
        state["logits"] = logits

    def run_decode():
        out = decode_loop(sampler.graphdef, N, sampler.state, state["logits"], lengths, state["cache"],
                          jax.random.key(0), per_row(0.0, jnp.float32), per_row(0, jnp.int32),
                          per_row(1.0, jnp.float32), per_row(N, jnp.int32), jnp.zeros((0,), jnp.int32))
        jax.block_until_ready(out)
        state["cache"] = out[-1]
        assert int(out[2].min()) == N

    prefill_s = _timed(run_prefill, repeats)
    timings = []
    for _ in range(repeats):
        run_prefill()
        start, cpu = time.perf_counter(), time.process_time()
        run_decode()
        timings.append((time.perf_counter() - start, time.process_time() - cpu))
    # CPU seconds (all threads) of the fastest decode: they move less with a neighbour's load.
    return {"prefill_s": prefill_s, "decode_s": min(timings)[0], "decode_cpu_s": min(timings)[1]}


def time_transformers(hf, prompts, new_tokens: int, repeats: int) -> dict:
    """Seconds of a prompt forward and of `generate` minus that forward, best of `repeats`."""
    import torch

    ids = torch.tensor(prompts, device=hf.device)
    synchronize = torch.cuda.synchronize if hf.device.type == "cuda" else (lambda: None)

    def run_prefill():  # the prefill `generate` runs: the logits of the last position only
        hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        synchronize()

    def run_generate():
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                    eos_token_id=None)
        synchronize()

    with torch.no_grad():
        prefill_s = _timed(run_prefill, repeats)
        total = _timed(run_generate, repeats)
    return {"prefill_s": prefill_s, "decode_s": total - prefill_s, "torch_threads": torch.get_num_threads(),
            "device": str(hf.device), "float32_matmul_precision": torch.get_float32_matmul_precision()}


def figures(seconds: dict, limits: dict, config, batch: int, prompt_len: int, new_tokens: int,
            itemsize: int) -> dict:
    """Tokens/s of prefill and decode and their fractions of the machine's limits."""
    from qed_jax.model import param_count

    c = config
    weights = (param_count(c) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)) * itemsize
    flops, nbytes = roofline.decode_cost(c, batch, prompt_len, new_tokens, weights, itemsize)
    out = {
        **seconds,
        "prefill_tokens_per_s": batch * prompt_len / seconds["prefill_s"],
        "decode_tokens_per_s": batch * new_tokens / seconds["decode_s"],
        "prefill_roofline": roofline.fraction(limits, seconds["prefill_s"],
                                              flops=roofline.prefill_flops(c, batch, prompt_len)),
        "decode_roofline": roofline.fraction(limits, seconds["decode_s"], flops=flops, nbytes=nbytes),
    }
    if "small_batch_matmul" in limits:  # on a CPU: the weights read at the rate its matmul streams them at 8 rows
        out["decode_weights_at_small_batch_matmul_rate_s"] = weights * (new_tokens - 1) / limits["small_batch_matmul"]["bytes_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", default="bench/results/sampling.json")
    args = p.parse_args()
    if not args.skip_transformers:  # before JAX's backend starts: on a GPU, transformers shares it
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import qed_jax
    from qed_jax.model import param_count

    limits = roofline.measure(args.dtype)
    print(roofline.describe(limits))
    hf_config = Qwen3Config(**model_config(args).to_hf(torch_dtype=args.dtype))
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(hf_config).eval().to(getattr(torch, args.dtype))
    folder = Path(tempfile.mkdtemp())
    hf.save_pretrained(folder)
    model = qed_jax.from_pretrained(folder)
    hf = hf.to(roofline.torch_device_matching_jax())
    P, N = args.prompt_len, args.new_tokens
    itemsize = jnp.dtype(args.dtype).itemsize

    result = {
        "benchmark": "sampling",
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "params": param_count(model.config),
        "model": dataclasses.asdict(model.config),
        "config": vars(args),
        "limits": limits,
        "batches": [],
    }
    for B in args.batch:
        prompts = np.random.default_rng(0).integers(0, model.config.vocab_size, (B, P)).tolist()
        row = {"batch": B, "qed_jax": figures(time_qed_jax(model, prompts, N, args.repeats), limits,
                                              model.config, B, P, N, itemsize)}
        if not args.skip_transformers:
            row["transformers"] = figures(time_transformers(hf, prompts, N, args.repeats), limits,
                                          model.config, B, P, N, itemsize)
            row["ratio_qed_jax_over_transformers"] = {
                stage: row["qed_jax"][f"{stage}_tokens_per_s"] / row["transformers"][f"{stage}_tokens_per_s"]
                for stage in ("prefill", "decode")}
        result["batches"].append(row)
        print(json.dumps(row, indent=2))
    result["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
