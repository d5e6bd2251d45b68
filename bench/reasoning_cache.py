"""Tokens per second of the compiled reasoning-cache loop (all turns in one call) next to a
host-driven loop that calls the sampler turn by turn and composes prompts on the host, on the same
random models, problems and settings in the same run. Writes JSON.

    python bench/reasoning_cache.py --turns 3 --batch 8 --reasoning-tokens 128 --summary-tokens 64

The summarizer is a second random model of the same shape (not thinking). Both loops sample with
the same keys; each counts the tokens it generated (reasoning and summaries).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import jax
from model_args import add_model_args, model_config
import numpy as np

TOKENIZER = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "tokenizer"


def _timed(fns, repeats):
    """Per function: the best wall time, the best process CPU time (all threads; steadier than
    wall time on a shared machine) and the last result. The functions run in turns, so that a
    change in the machine's load touches them alike."""
    wall, cpu, out = [float("inf")] * len(fns), [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            out[i] = fn()
            wall[i] = min(wall[i], time.perf_counter() - start)
            cpu[i] = min(cpu[i], time.process_time() - start_cpu)
    return wall, cpu, out


def host_loop(runner, policy_sampler, summary_sampler, problems, turns, key):
    """The RC loop driven from the host: one sampler call per role and turn, prompts composed as
    lists by the same token contract. Returns the tokens generated."""
    from qed_jax.sampling import SamplingParams

    p, prompts, think_end = runner.params, runner.prompts, runner.think_end
    reasoning_params = SamplingParams(p.reasoning_tokens, p.temperature, p.top_k, p.top_p)
    summaries = [list(runner.first_summary) for _ in problems]
    generated = 0
    for t in range(turns):
        ids = [prompts.reasoning.ids(problem=x, summary=s) for x, s in zip(problems, summaries)]
        out = policy_sampler.generate_ids(ids, reasoning_params, jax.random.fold_in(key, 2 * t), runner.stop_ids)
        generated += sum(len(c.tokens) for c in out)
        if t == turns - 1:
            break
        reasonings = [c.text_tokens[: c.text_tokens.index(think_end)] if think_end in c.text_tokens else c.text_tokens
                      for c in out]
        ids = [prompts.summarize.ids(problem=x, summary=s, reasoning=r)
               for x, s, r in zip(problems, summaries, reasonings)]
        written = summary_sampler.generate_ids(ids, runner.summarizer_sampling, jax.random.fold_in(key, 2 * t + 1),
                                               runner.summarizer_stop_ids)
        generated += sum(len(c.tokens) for c in written)
        summaries = [c.text_tokens[: p.summary_tokens] for c in written]
    return generated


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--problem-tokens", type=int, default=64)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--reasoning-tokens", type=int, default=128)
    p.add_argument("--summary-tokens", type=int, default=64)
    p.add_argument("--summarizer-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/reasoning_cache.json")
    args = p.parse_args()

    from flax import nnx

    from qed_jax.model import Qwen3, param_count
    from qed_jax.reasoning_cache import RCParams, ReasoningCache, Summarizer
    from qed_jax.sampling import Sampler, SamplingParams
    from qed_jax.tokenizer import load_tokenizer

    config = model_config(args, args.dtype)
    policy, summarizer = Qwen3(config, rngs=nnx.Rngs(0)), Qwen3(config, rngs=nnx.Rngs(1))
    tokenizer = load_tokenizer(TOKENIZER)  # its ids fit any vocabulary of 512 or more
    params = RCParams(turns=args.turns, reasoning_tokens=args.reasoning_tokens, summary_tokens=args.summary_tokens,
                      problem_tokens=args.problem_tokens, max_turns=max(args.turns, 16))
    runner = ReasoningCache(policy, tokenizer, params, Summarizer(
        summarizer, SamplingParams(args.summarizer_tokens, temperature=0.7, top_k=20, top_p=0.8)))
    rng = np.random.default_rng(0)
    problems = [rng.integers(10, 400, rng.integers(args.problem_tokens // 2, args.problem_tokens + 1)).tolist()
                for _ in range(args.batch)]
    key = jax.random.key(0)

    def compiled():
        turns = runner.run_ids(problems, key=key)
        return sum(t.num_tokens + t.summarizer_num_tokens for row in turns for t in row)

    # The host loop's prompts padded to exactly the compiled loop's widths: the same work per call.
    widths = (runner.prompts.reasoning.literal_tokens + args.problem_tokens + args.summary_tokens,
              runner.prompts.summarize.literal_tokens + args.problem_tokens + args.summary_tokens
              + args.reasoning_tokens)
    policy_sampler = Sampler(policy, buckets=sorted(widths), progress=False)
    summary_sampler = Sampler(summarizer, buckets=sorted(widths), progress=False)

    def host():
        return host_loop(runner, policy_sampler, summary_sampler, problems, args.turns, key)

    compiled(), host()  # compile both
    (compiled_s, host_s), (compiled_cpu, host_cpu), (compiled_tokens, host_tokens) = _timed((compiled, host),
                                                                                          args.repeats)
    result = {
        "benchmark": "reasoning_cache",
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "host": platform.processor() or platform.machine(),
        "params": param_count(config),
        "model": dataclasses.asdict(config),
        "config": vars(args),
        "compiled_loop": {"tokens": compiled_tokens, "seconds": compiled_s, "tokens_per_s": compiled_tokens / compiled_s,
                          "cpu_seconds": compiled_cpu},
        "host_loop": {"tokens": host_tokens, "seconds": host_s, "tokens_per_s": host_tokens / host_s,
                      "cpu_seconds": host_cpu},
        "speedup_compiled_over_host": (compiled_tokens / compiled_s) / (host_tokens / host_s),
        "cpu_time_ratio_host_over_compiled": host_cpu / compiled_cpu,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
