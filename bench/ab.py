"""Before/after on a shared, noisy machine: run a benchmark alternately against the qed_jax of a
git revision and of this working tree, several rounds, and compare each side's best and median.

    python bench/ab.py --base HEAD~1 --rounds 3 -- bench/train_step.py --skip-torch --steps 3
    python bench/ab.py --base main -- bench/sampling.py --batch 8 --skip-transformers

Interleaving matters more than repeats: another job's load changes over minutes, and runs that
alternate (base, new, new, base, ...) see the same load on average. Writes every run's JSON and
the summary to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout(revision: str, into: Path) -> Path:
    """The qed_jax package of `revision`, extracted under `into` (a PYTHONPATH entry)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "qed_jax"], check=True,
                             capture_output=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(into, filter="data")
    return into


COMPARED = ("train_step", "sampling")  # the benchmarks `metrics` reads


def metrics(result: dict) -> dict:
    """The figures compared, by name, from one benchmark JSON."""
    if result["benchmark"] == "train_step":
        out = {"tokens_per_s": result["qed_jax"]["tokens_per_s"],
               "fraction_of_peak": result["qed_jax"]["roofline"]["fraction"],
               "tokens_per_cpu_s": result["config"]["batch"] * result["config"]["seq"] / result["qed_jax"]["cpu_s"]}
        if "torch" in result:
            out["torch_tokens_per_s"] = result["torch"]["tokens_per_s"]
        return out
    if result["benchmark"] == "sampling":
        out = {}
        for row in result["batches"]:
            q, b = row["qed_jax"], row["batch"]
            out.update({f"b{b}_decode_tokens_per_s": q["decode_tokens_per_s"],
                        f"b{b}_decode_tokens_per_cpu_s": b * result["config"]["new_tokens"] / q["decode_cpu_s"],
                        f"b{b}_decode_fraction": q["decode_roofline"]["fraction"],
                        f"b{b}_prefill_tokens_per_s": q["prefill_tokens_per_s"]})
            if "transformers" in row:
                out[f"b{b}_transformers_decode_tokens_per_s"] = row["transformers"]["decode_tokens_per_s"]
        return out
    raise ValueError(f"no metrics known for benchmark {result['benchmark']!r}")


def run_once(source: Path, command: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{ROOT / 'bench'}"}
    subprocess.run([sys.executable, *command, "--out", str(out)], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision whose qed_jax is the 'before'")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results/ab.json")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: a benchmark that takes --out")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the benchmark after --, e.g. -- bench/train_step.py --skip-torch")
    if Path(command[0]).stem not in COMPARED:
        p.error(f"{command[0]}: ab.py compares {' and '.join(f'bench/{name}.py' for name in COMPARED)} only")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    runs = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"base": checkout(args.base, Path(tmp) / "base"), "new": ROOT}
        for i in range(args.rounds):
            order = ["base", "new"] if i % 2 == 0 else ["new", "base"]
            for side in order:
                result = run_once(sources[side], command, Path(tmp) / "run.json")
                runs[side].append(result)
                print(f"round {i + 1} {side}: {json.dumps(metrics(result))} load {os.getloadavg()[0]:.2f}",
                      flush=True)

    summary = {}
    for name in metrics(runs["new"][0]):
        values = {side: [metrics(r)[name] for r in runs[side]] for side in runs}
        summary[name] = {f"{side}_{stat}": fn(values[side]) for side in runs
                         for stat, fn in (("best", max), ("median", statistics.median))}
        summary[name]["new_over_base_best"] = summary[name]["new_best"] / summary[name]["base_best"]
        summary[name]["new_over_base_median"] = summary[name]["new_median"] / summary[name]["base_median"]
    print(f"{'metric':40s} {'base best':>12s} {'new best':>12s} {'ratio':>7s} {'ratio(median)':>14s}")
    for name, s in summary.items():
        print(f"{name:40s} {s['base_best']:12.4g} {s['new_best']:12.4g} {s['new_over_base_best']:7.3f} "
              f"{s['new_over_base_median']:14.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"base": args.base, "command": command, "summary": summary,
                                          "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
