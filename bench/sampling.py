"""Prefill and decode throughput of qed-jax's sampler next to transformers' generate, on the same
random Qwen3 model and prompts in the same run. Writes JSON.

    python bench/sampling.py --layers 10 --hidden 512 --batch 8 --prompt-len 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import jax
from model_args import add_model_args, model_config
import numpy as np


def _timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", default="bench/results/sampling.json")
    args = p.parse_args()

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import qed_jax
    from qed_jax.model import param_count
    from qed_jax.sampling import Sampler, SamplingParams, decode_loop, prefill

    hf_config = Qwen3Config(**model_config(args).to_hf(torch_dtype=args.dtype))
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(hf_config).eval().to(getattr(torch, args.dtype))
    folder = Path(tempfile.mkdtemp())
    hf.save_pretrained(folder)
    model = qed_jax.from_pretrained(folder)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    prompts = np.random.default_rng(0).integers(0, args.vocab, (B, P)).tolist()

    # qed-jax: time the jitted prefill and the decode loop separately, after a compile run.
    sampler = Sampler(model, buckets=(P,))
    params = SamplingParams(max_new_tokens=N, temperature=0.0)
    sampler.generate_ids(prompts, params, jax.random.key(0), stop_ids=[])  # compile
    tokens = jax.numpy.asarray(prompts, jax.numpy.int32)
    lengths = jax.numpy.full((B,), P, jax.numpy.int32)
    per_row = lambda v, dt: jax.numpy.full((B,), v, dt)  # noqa: E731
    state = {"cache": sampler._cache(B, P + N)}

    def run_prefill():
        logits, state["cache"] = prefill(sampler.graphdef, sampler.state, tokens, lengths, state["cache"])
        jax.block_until_ready(logits)
        state["logits"] = logits

    def run_decode():
        out = decode_loop(sampler.graphdef, N, sampler.state, state["logits"], lengths, state["cache"],
                          jax.random.key(0), per_row(0.0, jax.numpy.float32), per_row(0, jax.numpy.int32),
                          per_row(1.0, jax.numpy.float32), per_row(N, jax.numpy.int32),
                          jax.numpy.zeros((0,), jax.numpy.int32))
        jax.block_until_ready(out)
        state["cache"] = out[-1]
        assert int(out[2].min()) == N

    jax_prefill = _timed(run_prefill, args.repeats)
    timings = []
    for _ in range(args.repeats):
        run_prefill()
        timings.append(_timed(run_decode, 1))
    jax_decode = min(timings)

    result = {
        "benchmark": "sampling",
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "host": platform.processor() or platform.machine(),
        "params": param_count(model.config),
        "config": vars(args),
        "qed_jax": {"prefill_tokens_per_s": B * P / jax_prefill, "decode_tokens_per_s": B * N / jax_decode,
                    "prefill_s": jax_prefill, "decode_s": jax_decode},
    }
    if not args.skip_transformers:
        ids = torch.tensor(prompts)
        with torch.no_grad():
            hf_prefill = _timed(lambda: hf(input_ids=ids, use_cache=True), args.repeats)
            hf_total = _timed(lambda: hf.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                                  pad_token_id=0, eos_token_id=None), args.repeats)
        hf_decode = hf_total - hf_prefill
        result["transformers"] = {
            "prefill_tokens_per_s": B * P / hf_prefill, "decode_tokens_per_s": B * N / hf_decode,
            "prefill_s": hf_prefill, "decode_s": hf_decode, "torch_threads": torch.get_num_threads(),
        }
        result["ratio_qed_jax_over_transformers"] = {
            "prefill": result["qed_jax"]["prefill_tokens_per_s"] / result["transformers"]["prefill_tokens_per_s"],
            "decode": result["qed_jax"]["decode_tokens_per_s"] / result["transformers"]["decode_tokens_per_s"],
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
