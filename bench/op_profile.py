"""Where the time of the SFT step or of the decode loop goes, op by op: runs the jitted function
under `jax.profiler`, adds up the time of each compiled HLO op (XLA:CPU records one trace event
per op it executes, named after the op), and prints the top ops with what they are: the op's
kind and shape, and the JAX operation and source line it came from (from the compiled HLO's
metadata). Control flow (while, conditional, call) is left out: its time is its body's ops.

    python bench/op_profile.py train [--batch 4 --seq 512]
    python bench/op_profile.py decode [--batch 8 --prompt-len 128 --new-tokens 128]
    python bench/op_profile.py attention [--batch 4 --seq 512]   # one layer's, forward and backward

Writes the table as JSON (--out) and keeps the raw trace (--trace-dir) for Perfetto / TensorBoard.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from model_args import add_host_args, add_model_args, apply_host_args, model_config

CONTROL_FLOW = ("while", "conditional", "call")


def source_lines(hlo_text: str) -> dict:
    """{stack frame id: "file.py:line"} for the innermost frame of each stack that lies in
    qed_jax (else the innermost frame), from the module's stack-frame tables."""
    def table(title, pattern):
        section = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", hlo_text, re.S | re.M)
        return {} if not section else {int(m.group(1)): m.groups()[1:] for m in
                                       (re.match(pattern, line) for line in section.group(1).splitlines()) if m}

    files = table("FileNames", r'(\d+) "(.*)"')
    locations = table("FileLocations", r"(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)")
    frames = table("StackFrames", r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")
    out = {}
    for frame in frames:
        chain, current = [], frame
        while current in frames and current not in chain:
            chain.append(current)
            location, parent = frames[current]
            current = int(parent)
        where = [(files[int(locations[int(frames[f][0])][0])][0], locations[int(frames[f][0])][1]) for f in chain]
        ours = [w for w in where if "qed_jax/" in w[0] and "site-packages" not in w[0]]
        path, line = (ours or where)[0]
        out[frame] = f"{Path(path).name}:{line}"
    return out


def hlo_ops(hlo_text: str) -> dict:
    """{instruction name: {"op": opcode, "shape", "jax_op", "source" (file:line)}} for every
    instruction of a compiled module's text."""
    sources = source_lines(hlo_text)
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\(", line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        kind = re.search(r"kind=(\w+)", line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        ops[name] = {
            "op": opcode + (f"({kind.group(1)})" if kind else ""),
            "shape": shape[:80],
            "calls": calls.group(1) if calls else None,
            "jax_op": op_name.group(1)[-100:] if op_name else "",
            "source": sources.get(int(frame.group(1)), "") if frame else "",
        }
    return ops


def fused_kinds(hlo_text: str) -> dict:
    """{computation name: sorted opcodes inside it}, for saying what a fusion does."""
    kinds, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            current = head.group(1)
            kinds[current] = set()
            continue
        m = re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = .+? ([\w\-]+)\(", line)
        if m and current:
            kinds[current].add(m.group(1))
    trivial = {"parameter", "constant", "bitcast", "broadcast", "reshape", "tuple", "get-tuple-element"}
    return {name: sorted(ops - trivial) for name, ops in kinds.items()}


def profile(fn, hlo_text: str, repeats: int, trace_dir: str) -> dict:
    """Run `fn` `repeats` times under the profiler; time per op name, per call of `fn`."""
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    path = max(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
    ops, kinds = hlo_ops(hlo_text), fused_kinds(hlo_text)
    totals, counts = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in ops:
                    totals[event.name] += event.duration_ns
                    counts[event.name] += 1
    rows = []
    for name, ns in totals.most_common():
        info = ops[name]
        if info["op"].split("(")[0] in CONTROL_FLOW:
            continue
        body = kinds.get(info["calls"] or "", [])
        rows.append({"name": name, "ms_per_call": ns / 1e6 / repeats, "executions_per_call": counts[name] / repeats,
                     **{k: info[k] for k in ("op", "shape", "jax_op", "source")}, "fused": body})
    op_ms = sum(r["ms_per_call"] for r in rows)
    for r in rows:
        r["share"] = r["ms_per_call"] / op_ms
    return {"wall_ms_per_call": wall * 1e3 / repeats, "op_ms_per_call": op_ms, "ops": rows}


def kind(row: dict) -> str:
    """What an op spends its time on, from its opcode and the ops fused into it."""
    fused = set(row["fused"])
    if row["op"] == "dot" or "dot" in fused:
        return "matmul"
    if "transpose" in fused or row["op"] == "transpose":
        return "transposing copy"
    if {"dynamic-slice", "dynamic-update-slice"} & fused or row["op"] in ("dynamic-slice", "dynamic-update-slice"):
        return "layer slicing (dynamic-slice / update)"
    if row["name"].startswith("wrapped_broadcast"):
        return "buffer fill (broadcast)"
    if row["op"] == "copy" or "copy" in fused:
        return "copy"
    return "elementwise / reduce"


def summary(rows: list[dict], key) -> list[dict]:
    """Per-call milliseconds and share of op time, grouped by key(row), largest first."""
    total = sum(r["ms_per_call"] for r in rows)
    groups = {}
    for r in rows:
        groups[key(r)] = groups.get(key(r), 0.0) + r["ms_per_call"]
    return [{"group": g, "ms_per_call": ms, "share": ms / total}
            for g, ms in sorted(groups.items(), key=lambda item: -item[1])]


def train_target(args):
    from flax import nnx

    from qed_jax.model import Qwen3
    from qed_jax.sft import train_step
    from qed_jax.trainer import OptimConfig, decay_mask, make_optimizer

    config = model_config(args)
    B, T = args.batch, args.seq
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (B, T)).astype(np.int32)
    model = Qwen3(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    optim = OptimConfig(lr=1e-4, schedule="constant", warmup_ratio=0.0, weight_decay=0.01, grad_clip=0.0)
    optimizer = make_optimizer(optim, 100, decay_mask(model))
    holder = {"params": params, "opt": optimizer.init(params)}
    batch = {"tokens": jnp.asarray(tokens[None]), "loss_mask": jnp.ones((1, B, T), jnp.int32),
             "segment_ids": jnp.ones((1, B, T), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, B, T))}
    step = jax.jit(partial(train_step, graphdef, optimizer), donate_argnums=(0, 1))
    compiled = step.lower(holder["params"], holder["opt"], batch).compile()

    def run():
        holder["params"], holder["opt"], metrics = compiled(holder["params"], holder["opt"], batch)
        jax.block_until_ready(metrics)

    return compiled.as_text(), run


def decode_target(args):
    from flax import nnx

    from qed_jax.model import Qwen3
    from qed_jax.sampling import Sampler, cache_slots, decode_loop, prefill

    model = Qwen3(model_config(args), rngs=nnx.Rngs(0))
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    sampler = Sampler(model, buckets=(P,))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (B, P)), jnp.int32)
    lengths = jnp.full((B,), P, jnp.int32)
    per_row = lambda v, dt: jnp.full((B,), v, dt)  # noqa: E731
    controls = (jax.random.key(0), per_row(0.0, jnp.float32), per_row(0, jnp.int32), per_row(1.0, jnp.float32),
                per_row(N, jnp.int32), jnp.zeros((0,), jnp.int32))
    state = {"cache": sampler._cache(B, cache_slots(P + N))}
    logits, state["cache"] = prefill(sampler.graphdef, sampler.state, tokens, lengths, state["cache"])
    compiled = decode_loop.lower(sampler.graphdef, N, sampler.state, logits, lengths, state["cache"],
                                 *controls).compile()

    def run():
        out = compiled(sampler.state, logits, lengths, state["cache"], *controls)
        jax.block_until_ready(out)
        state["cache"] = out[-1]

    return compiled.as_text(), run


def attention_target(args):
    """One layer's causal attention, forward and backward, at the SFT step's shapes (the path
    the model takes on CPU: `blockwise`)."""
    from qed_jax.attention import causal_attention

    c = model_config(args)
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, heads, c.head_dim)), jnp.float32)
               for heads in (c.num_heads, c.num_kv_heads, c.num_kv_heads))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v) ** 2), argnums=(0, 1, 2)))
    compiled = grad.lower(q, k, v).compile()
    return compiled.as_text(), lambda: jax.block_until_ready(compiled(q, k, v))


TARGETS = {"train": train_target, "decode": decode_target, "attention": attention_target}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=list(TARGETS))
    add_model_args(p)
    p.add_argument("--batch", type=int, default=None, help="default: 4 (train, attention), 8 (decode)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace-dir", default=str(Path(__file__).resolve().parent / "results" / "trace"),
                   help="default: bench/results/trace (ignored by git), wherever the script runs from")
    p.add_argument("--out", default=None, help="default: bench/results/profile_<target>.json")
    add_host_args(p)
    args = p.parse_args()
    # As the programs run: `sft` keeps freed memory (qed_jax/host.py); the decoding ones do not.
    keeps_freed_memory = apply_host_args(args) if args.target != "decode" else False
    args.batch = args.batch or (8 if args.target == "decode" else 4)

    hlo_text, run = TARGETS[args.target](args)
    run()  # warm up
    result = profile(run, hlo_text, args.repeats, args.trace_dir)
    result.update(target=args.target, config=vars(args), model=dataclasses.asdict(model_config(args)),
                  load_average=os.getloadavg(),
                  keeps_freed_memory=keeps_freed_memory, xla_flags=os.environ.get("XLA_FLAGS", ""),
                  by_kind=summary(result["ops"], kind),
                  by_file=summary(result["ops"], lambda r: r["source"].split(":")[0] or "(no source)"))
    print(f"{args.target}: {result['wall_ms_per_call']:.1f} ms per call, {result['op_ms_per_call']:.1f} ms in ops "
          f"(ops on two threads can overlap); load {os.getloadavg()[0]:.2f}")
    print(f"{'ms':>8} {'share':>6} {'n':>6}  op / shape / jax op / source / fused")
    for r in result["ops"][: args.top]:
        print(f"{r['ms_per_call']:8.2f} {r['share']:6.1%} {r['executions_per_call']:6.0f}  {r['name']} {r['op']} "
              f"{r['shape']}\n{'':24}{r['jax_op']} {r['source']} {' '.join(r['fused'])}")
    for title in ("by_kind", "by_file"):
        print(f"{title}: " + ", ".join(f"{g['group']} {g['share']:.1%}" for g in result[title]))
    out = Path(args.out or f"bench/results/profile_{args.target}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
