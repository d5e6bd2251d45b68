"""Throughput of qed-jax's SFT step next to a transformers/PyTorch training step: the same random
Qwen3, the same token batch, AdamW, forward + backward + update. Each step's FLOPs (6 x matmul
parameters x tokens, plus causal attention) are set against this machine's matmul peak in the
compute dtype, and against the rate of a forward and backward through bare MLP blocks at the
model's shapes (`roofline.mlp_train_rate`: what a step made only of dense matmuls reaches), both
measured in the same run (see roofline.py). Writes JSON.

    python bench/train_step.py --layers 10 --hidden 512 --batch 4 --seq 512 [--peak-tflops 197]
    python bench/train_step.py --preset qwen3-0.6b --dtype bfloat16 --batch 4 --seq 2048  # on a GPU

The weights and the optimizer's state are float32; `--dtype` is the activations' and matmuls'
(bfloat16: qed-jax's mixed precision, and PyTorch under autocast). PyTorch runs on the GPU when
JAX's default device is one (eager, its default AdamW), and JAX then takes 45 % of the GPU's
memory rather than 75 %, leaving PyTorch the rest (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import roofline
from model_args import add_host_args, add_model_args, apply_host_args, model_config


def _best(fn, steps):
    """(best, median) wall seconds of `steps` calls, and of the fastest: its CPU seconds (all
    threads; on a shared machine they move less with the neighbours' load than wall time), the
    kernel's share of them, and its minor page faults (the kernel handing out fresh pages for
    large temporary buffers: see bench/README, "Page faults")."""
    runs = []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        system = after.ru_stime - before.ru_stime
        runs.append((wall, {"cpu_s": after.ru_utime - before.ru_utime + system, "system_cpu_s": system,
                            "minor_page_faults": after.ru_minflt - before.ru_minflt}))
    best = min(runs, key=lambda run: run[0])
    return best[0], float(np.median([run[0] for run in runs])), best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of activations and matmuls (the weights stay float32)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak, for MFU")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--out", default="bench/results/train_step.json")
    add_host_args(p)
    args = p.parse_args()
    keeps_freed_memory = apply_host_args(args)
    if not args.skip_torch:  # before JAX's backend starts: on a GPU, PyTorch shares it
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

    from flax import nnx

    from qed_jax.model import Qwen3, param_count
    from qed_jax.sft import train_flops_per_token, train_step
    from qed_jax.trainer import OptimConfig, decay_mask, make_optimizer

    limits = roofline.measure(args.dtype)
    config = model_config(args, args.dtype).replace(param_dtype="float32")
    B, T = args.batch, args.seq
    limits["mlp_train"] = roofline.mlp_train_rate(B * T, config.hidden_size, config.intermediate_size,
                                                  dtype=args.dtype)
    print(roofline.describe(limits) + f", forward + backward through bare MLP blocks "
          f"{limits['mlp_train']['flops_per_s'] / 1e9:.0f} GFLOP/s")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (B, T)).astype(np.int32)
    flops_per_step = train_flops_per_token(config, T) * B * T
    optim = OptimConfig(lr=1e-4, schedule="constant", warmup_ratio=0.0, weight_decay=0.01, grad_clip=0.0)

    # qed-jax
    model = Qwen3(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    optimizer = make_optimizer(optim, 100, decay_mask(model))
    opt_state = optimizer.init(params)
    batch = {"tokens": jnp.asarray(tokens[None]), "loss_mask": jnp.ones((1, B, T), jnp.int32),
             "segment_ids": jnp.ones((1, B, T), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, B, T))}
    step = jax.jit(partial(train_step, graphdef, optimizer), donate_argnums=(0, 1))
    holder = {"params": params, "opt": opt_state}

    def run_jax():
        holder["params"], holder["opt"], metrics = step(holder["params"], holder["opt"], batch)
        jax.block_until_ready(metrics)

    run_jax()  # compile
    jax_best, jax_median, jax_cpu = _best(run_jax, args.steps)

    def figures(seconds):
        out = {"step_s": seconds, "tokens_per_s": B * T / seconds, "tflops_per_s": flops_per_step / seconds / 1e12,
               "roofline": roofline.fraction(limits, seconds, flops=flops_per_step),
               "fraction_of_mlp_train_rate": flops_per_step / seconds / limits["mlp_train"]["flops_per_s"]}
        if args.peak_tflops:
            out["mfu"] = out["tflops_per_s"] / args.peak_tflops
        return out

    result = {
        "benchmark": "train_step",
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "host": platform.machine(),
        "jax": jax.__version__,
        "params": param_count(config),
        "model": dataclasses.asdict(config),
        "flops_per_step": flops_per_step,
        "config": vars(args),
        "limits": limits,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # the allocator's settings (see bench/README)
        "keeps_freed_memory": keeps_freed_memory,  # qed_jax/host.py, for both frameworks
        "qed_jax": {**figures(jax_best), "median_step_s": jax_median, **jax_cpu},
    }

    if not args.skip_torch:
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        device = roofline.torch_device_matching_jax()
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(**config.to_hf(torch_dtype="float32"))).train().to(device)
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

        def run_torch():
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()

        run_torch()
        torch_best, torch_median, torch_cpu = _best(run_torch, args.steps)
        result["torch"] = {**figures(torch_best), "median_step_s": torch_median, **torch_cpu,
                           "threads": torch.get_num_threads(), "version": torch.__version__, "device": device,
                           "float32_matmul_precision": torch.get_float32_matmul_precision(),
                           "attention": getattr(model.config, "_attn_implementation", None)}
        result["ratio_qed_jax_over_torch_tokens_per_s"] = torch_best / jax_best

    result["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
