"""The README's TPU memory table: `qed-jax plan` for the recipe's configs on several Cloud TPU
slices, compiled ahead of time on this machine (needs the `tpu` extra: libtpu).

    python bench/plan_table.py                      # all configs x slices (tens of minutes on 2 cores)
    python bench/plan_table.py --slices v5p-8 v5p-16 --configs configs/sft/qed_nano_4b.yaml
    python bench/plan_table.py --slices v6e-8 --set model.remat=offload   # overrides for every cell

Writes bench/results/plan_table.json and prints a Markdown table: per config and slice, the
largest per-chip total over the config's programs, the HBM, the headroom and whether it fits;
then the smallest slice (fewest chips) that fits each config with at least --headroom to spare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only: never open a local accelerator

CONFIGS = {  # config -> the preset its model.path stands for when that path is not on this machine
    "configs/sft/qed_nano_4b.yaml": "qwen3-4b-thinking-2507",
    "configs/rl/qed_nano_4b.yaml": "qwen3-4b-thinking-2507",
}
SLICES = ("v5p-8", "v5p-16", "v5p-64", "v6e-8", "v6e-16")


def micro_batches_for(config: str, chips: int) -> list[str]:
    """SFT splits each step into micro-batches whose rows must spread over every chip: on a
    slice with more chips than the config's rows per micro-batch, use fewer, larger micro-batches
    (same batch, same loss)."""
    from qed_jax.config import load_config
    from qed_jax.sft import SFTConfig

    if "/sft/" not in config:
        return []
    c = load_config(SFTConfig, config)
    if (c.batch_size // c.micro_batches) % chips == 0 or c.batch_size % chips:
        return []
    return [f"micro_batches={c.batch_size // chips}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--slices", nargs="+", default=list(SLICES))
    parser.add_argument("--headroom", type=float, default=0.15, help="headroom a slice needs to count as the smallest")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every config and slice, e.g. model.remat=offload")
    parser.add_argument("--out", default="bench/results/plan_table.json")
    args = parser.parse_args()

    from qed_jax import plan

    rows = []
    for config in args.configs:
        for name in args.slices:
            overrides = micro_batches_for(config, plan.parse_slice(name).chips) + args.set
            p = plan.plan(config, name, overrides, preset_name=CONFIGS.get(config))
            worst = max(p.programs, key=lambda q: plan.sum_known(q) / q.hbm)
            rows.append({"config": config, "slice": name, "chips": p.slice.chips, "overrides": overrides, "fits": p.fits,
                         "worst_program": worst.name, "gib_per_chip": plan.sum_known(worst) / plan.GiB,
                         "hbm_gib": p.hbm / plan.GiB, "headroom": 1 - plan.sum_known(worst) / p.hbm,
                         "programs": [q.to_json() for q in p.programs], "info": p.info})
            print(f"{config} on {name}: {rows[-1]['gib_per_chip']:.1f} GiB per chip ({worst.name}), "
                  f"fits {p.fits}", file=sys.stderr, flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("| config | slice | chips | GiB per chip (largest program) | HBM GiB | headroom | fits |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        config = f"`{r['config']}`" + "".join(f" `{o}`" for o in r["overrides"])
        print(f"| {config} | {r['slice']} | {r['chips']} | {r['gib_per_chip']:.1f} ({r['worst_program']}) "
              f"| {r['hbm_gib']:.1f} | {100 * r['headroom']:.0f} % | {'yes' if r['fits'] else 'no'} |")
    for config in args.configs:
        fitting = [r for r in rows if r["config"] == config and r["fits"] and r["headroom"] >= args.headroom]
        smallest = min(fitting, key=lambda r: (r["chips"], r["hbm_gib"]), default=None)
        print(f"\nsmallest slice for `{config}` with {100 * args.headroom:.0f} % headroom: "
              + (f"{smallest['slice']} ({smallest['chips']} chips)" if smallest else "none of those tried"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
