"""Ahead-of-time compile for a TPU slice: memory per chip and FLOPs per step, on any machine.

libtpu compiles for a topology it is not attached to (compile-only devices), so a config's
training step, and for GRPO the sampler's prefill and decode programs, can be sized for a
v5p-64 from a laptop. Weights are never read: parameters, optimizer state and batches are
abstract arrays carrying the shardings the trainers give the real ones. A program that does not
fit fails to compile with RESOURCE_EXHAUSTED; that is reported, not raised.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.core import jaxprs_in_params
from jax.sharding import NamedSharding, PartitionSpec

from qed_jax.attention import KV_CACHE_AXES
from qed_jax.config import ConfigError, ModelConfig, PRESETS, load_config, preset, read_yaml
from qed_jax.errors import first_line
from qed_jax.model import KVCache, Qwen3
from qed_jax.sharding import logical_to_spec, make_mesh, state_shardings
from qed_jax.trainer import (batch_sharding, check_rows_divide, decay_mask, float32_init, make_optimizer,
                             opt_state_shardings)

GiB = 1024 ** 3

# --------------------------------------------------------------------------------------------
# Slices: Cloud names → topology names libtpu accepts


@dataclasses.dataclass(frozen=True)
class Generation:
    counts_cores: bool  # the Cloud name counts TensorCores (two per chip), not chips
    dims: int  # 3: a torus of 2x2x1 blocks; 2: a 2-D grid
    nominal_hbm_gib: float  # the spec sheet's, used only when the compiler does not say
    # A slice of up to this many chips is one host; larger ones have 4 chips per host (as
    # tpu_scripts/tpu.py's SINGLE_HOST_MAX_CHIPS, which runs without this package)
    single_host_chips: int
    chip_config: str | None = None  # v4: one device per chip (megacore), as JAX uses it


GENERATIONS = {
    "v4": Generation(counts_cores=True, dims=3, nominal_hbm_gib=32, single_host_chips=4, chip_config="megacore"),
    "v5p": Generation(counts_cores=True, dims=3, nominal_hbm_gib=95, single_host_chips=4),
    "v5e": Generation(counts_cores=False, dims=2, nominal_hbm_gib=16, single_host_chips=8),
    "v6e": Generation(counts_cores=False, dims=2, nominal_hbm_gib=32, single_host_chips=8),
}
_ALIASES = {"v5litepod": "v5e"}  # Cloud's accelerator type for v5e slices
_CLOUD_NAMES = {generation: cloud for cloud, generation in _ALIASES.items()}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given: "v5p-64" or "v5p:2x4x4"
    generation: str
    chips: int
    topology: str  # what jax.experimental.topologies.get_topology_desc accepts

    @property
    def spec(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def accelerator_type(self) -> str:
        """Cloud's name for the slice, as a TPU VM of it reports: `v5p-8`, `v5litepod-16`."""
        count = 2 * self.chips if self.spec.counts_cores else self.chips
        return f"{_CLOUD_NAMES.get(self.generation, self.generation)}-{count}"


def chip_grid(chips: int, dims: int, generation: str) -> tuple[int, ...]:
    """The shape Cloud gives a slice of `chips` chips: 3-D slices grow from 2x2x1, 2-D ones from
    1x1, each doubling the last of the smallest sides (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
    grid = [2, 2, 1] if dims == 3 else [1, 1]
    start = math.prod(grid)
    if chips < start or chips & (chips - 1):
        example = f"{generation}:{'2x4x4' if dims == 3 else '4x4'}"
        raise ConfigError(f"no standard {dims}-D slice of {chips} chips (sizes are powers of two from "
                          f"{start}); name the topology directly, e.g. {example}")
    while math.prod(grid) < chips:
        smallest = min(grid)
        last = len(grid) - 1 - grid[::-1].index(smallest)
        grid[last] *= 2
    return tuple(grid)


def parse_slice(name: str) -> Slice:
    """`v5p-64` (TensorCores), `v4-32` (TensorCores), `v5e-16`/`v5litepod-16`, `v6e-64` (chips), or
    a topology name such as `v5p:2x4x4`."""
    text = name.strip().lower()
    if match := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text):
        gen, shape = _ALIASES.get(match[1], match[1]), match[2]
        if gen not in GENERATIONS:
            raise ConfigError(f"unknown TPU generation {match[1]!r} in {name!r}; known: {', '.join(GENERATIONS)}")
        if len(shape.split("x")) != GENERATIONS[gen].dims:
            raise ConfigError(f"{name!r}: a {gen} topology has {GENERATIONS[gen].dims} sides")
        return Slice(name, gen, math.prod(int(s) for s in shape.split("x")), f"{gen}:{shape}")
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    gen = _ALIASES.get(match[1], match[1]) if match else None
    if gen not in GENERATIONS:
        raise ConfigError(f"cannot read TPU slice {name!r}: expected e.g. v5p-64, v4-32, v5e-16, v6e-64 "
                          f"or a topology such as v5p:2x4x4")
    spec, count = GENERATIONS[gen], int(match[2])
    if spec.counts_cores and count % 2:
        raise ConfigError(f"{name!r}: {gen} slices count TensorCores, two per chip; {count} is odd")
    chips = count // 2 if spec.counts_cores else count
    grid = chip_grid(chips, spec.dims, gen)
    return Slice(name, gen, chips, f"{gen}:{'x'.join(map(str, grid))}")


def topology_devices(tpu: Slice) -> list:
    """Compile-only devices of the slice, one per chip."""
    from jax.experimental import topologies

    # libtpu takes a lockfile meant for the chips; compiling touches none, and a plan must run
    # beside a training job (or another plan) that holds it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Off a TPU VM, libtpu cannot ask the metadata server for the workers' hostnames or the
    # accelerator type, and logs an alarming INVALID_ARGUMENT error and a warning before compiling
    # fine; a compile-only plan runs no workers, and the slice is the one being planned.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.accelerator_type)
    kwargs = {"chip_config_name": tpu.spec.chip_config} if tpu.spec.chip_config else {}
    # libtpu assumes hosts of 2x2 chips; a slice of up to `single_host_chips` is one host.
    if tpu.chips <= tpu.spec.single_host_chips:
        grid = [int(n) for n in tpu.topology.split(":")[1].split("x")]
        kwargs["chips_per_host_bounds"] = (*grid, 1)[:3]
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology, **kwargs).devices
    except RuntimeError as e:  # no libtpu, or a topology it refuses
        import importlib.util

        hint = "" if importlib.util.find_spec("libtpu") else (
            ". Compiling for TPU needs libtpu: pip install 'qed-jax[tpu]', or pip install -e '.[tpu]' in a clone")
        raise ConfigError(f"cannot build TPU topology {tpu.topology} for {tpu.name}: {first_line(e)}{hint}") from None
    if len(devices) != tpu.chips:
        raise ConfigError(f"topology {tpu.topology} has {len(devices)} devices, expected one per chip ({tpu.chips})")
    return list(devices)


def first_host(devices: list) -> list:
    """The devices of the first host (the process of devices[0])."""
    return [d for d in devices if d.process_index == devices[0].process_index]


def one_host_devices(tpu: Slice, devices: list) -> list:
    """The chips of the slice's first host, the compile target of programs that run on one
    host's chips (GRPO's sampler). libtpu compiles a program over chips 0..n-1 of a slice, but
    aborts the process while lowering a collective over other ids, and the first host's chips are
    other ids on multi-host v5e and v6e slices (a 2x2 block of the grid: chips 0, 1, 4 and 5 of a
    v6e-16) and on v4 and v5p slices from 4x4x4 up: there, a topology of one host's shape stands
    in for it (memory per chip does not depend on where the host sits)."""
    first = first_host(devices)
    if sorted(d.id for d in first) == list(range(len(first))):
        return first
    sides = [max(d.coords[i] for d in first) - min(d.coords[i] for d in first) + 1 for i in range(tpu.spec.dims)]
    host = Slice(f"one host of {tpu.name}", tpu.generation, len(first), f"{tpu.generation}:{'x'.join(map(str, sides))}")
    return topology_devices(host)


def hbm_per_chip(device, tpu: Slice) -> tuple[int, str]:
    """(bytes, where the number comes from). The compiler knows the HBM it may use (a little
    below the spec sheet's) and says so when a program exceeds it: ask it with a program that
    cannot fit. Compile-only devices have no memory_stats()."""
    huge = jax.jit(lambda: jnp.zeros((1 << 50,), jnp.int8), out_shardings=jax.sharding.SingleDeviceSharding(device))
    try:
        huge.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if (found := _bytes_after(str(e), "available HBM")) is not None:
            return found, "compiler"
    return int(tpu.spec.nominal_hbm_gib * GiB), "nominal"


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4, "P": 1024 ** 5}


def _bytes_after(message: str, label: str) -> int | None:
    """The byte count XLA prints as `label (95.74G)`, or None."""
    match = re.search(re.escape(label) + r"\s*\(([\d.]+)([KMGTP]?)i?B?\)", message)
    return int(float(match[1]) * _UNITS[match[2]]) if match else None


# --------------------------------------------------------------------------------------------
# FLOPs of a traced program


def program_flops(jaxpr) -> float:
    """FLOPs of the matrix products in a (closed) jaxpr, 2 per multiply-add, for the whole
    global computation. Scan bodies count `length` times (XLA's cost analysis counts a loop body
    once), a while loop's body once (its trip count is data dependent: one decode step), a cond
    its costliest branch, a shard_map body once per shard, a Pallas kernel its cost estimate
    (the splash kernels, which have none, by `splash_flops`).
    Rematerialized blocks appear twice in a gradient's jaxpr, as they run."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += dot_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.params["dimension_numbers"])
            continue
        if name == "pallas_call":
            estimate = eqn.params.get("cost_estimate")
            total += estimate.flops if estimate is not None else splash_flops(eqn)
            continue
        inner = [program_flops(j) for j in jaxprs_in_params(eqn.params)]
        if name == "scan":
            total += eqn.params["length"] * sum(inner)
        elif name == "cond":
            total += max(inner, default=0.0)
        elif name == "shard_map":
            mesh = eqn.params["mesh"]
            total += math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"]) * sum(inner)
        else:
            total += sum(inner)
    return total


# Matrix products per (query block, key block) pair in the splash kernels: the forward's scores
# and output; dq's scores, probabilities' gradient and dq; dkv's scores, probabilities'
# gradient, dv and dk.
SPLASH_PRODUCTS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4}


def splash_flops(eqn) -> float:
    """FLOPs of a Pallas kernel without a cost estimate: one of `attention.splash_attention`'s
    (jax.experimental's splash kernels carry none), else 0. Those run a causal mask in square
    blocks, n per sequence (the grid's last axis), and skip the pairs above the diagonal: n(n+1)/2
    block pairs per head and row, each `SPLASH_PRODUCTS` products of [block, H] by [H, block]."""
    kernel = str(eqn.params.get("name", ""))
    products = next((count for prefix, count in SPLASH_PRODUCTS.items() if kernel.startswith(prefix)), None)
    if products is None:
        return 0.0
    # The queries (or, backward, their gradient: the same shape) are the largest floating operand
    # (segment ids come as int32 [..., T, 128]): [..., N, T, H], rows and heads leading.
    q = max((v.aval.shape for v in eqn.invars
             if len(v.aval.shape) >= 3 and jnp.issubdtype(v.aval.dtype, jnp.floating)), key=math.prod)
    n = eqn.params["grid_mapping"].grid[-1]
    block = q[-2] // n
    return math.prod(q[:-2]) * n * (n + 1) / 2 * products * 2.0 * block * block * q[-1]


def dot_flops(lhs_shape, rhs_shape, dimension_numbers) -> float:
    """2 x every lhs element x the rhs's free (neither contracted nor batch) size."""
    (_, rhs_contract), (_, rhs_batch) = dimension_numbers
    rhs_free = math.prod(d for i, d in enumerate(rhs_shape) if i not in (*rhs_contract, *rhs_batch))
    return 2.0 * math.prod(lhs_shape) * rhs_free


# --------------------------------------------------------------------------------------------
# One program: compile, measure, judge


@dataclasses.dataclass
class ProgramPlan:
    """Memory in bytes per chip (as the compiler lays it out), FLOPs per call for all chips."""

    name: str
    hbm: int
    resident: int = 0  # other programs' buffers alive meanwhile (e.g. the trainer's state while sampling)
    arguments: int | None = None
    outputs: int | None = None  # outputs that do not reuse a donated argument's buffer
    temporaries: int | None = None
    host_temporaries: int | None = None  # in the host's memory (`remat: offload`), not counted in HBM
    code: int | None = None
    flops: float | None = None
    compile_s: float = 0.0
    error: str | None = None  # why it does not compile (RESOURCE_EXHAUSTED: does not fit)
    note: str = ""

    @property
    def total(self) -> int | None:
        parts = (self.arguments, self.outputs, self.temporaries, self.code)
        return None if None in parts else sum(parts) + self.resident

    @property
    def fits(self) -> bool:
        return self.error is None and self.total is not None and self.total <= self.hbm

    @property
    def headroom(self) -> float | None:
        return None if self.total is None else 1.0 - self.total / self.hbm

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        return {**fields, "total": self.total, "fits": self.fits, "headroom": self.headroom}


def compile_program(name: str, jitted, args: tuple, hbm: int, mesh, resident: int = 0,
                    note: str = "") -> ProgramPlan:
    """Trace under `mesh` (as the trainers and the sampler run their steps: attention kernels
    find the mesh there), count FLOPs, compile for the args' (TPU) devices and read the memory
    analysis."""
    plan = ProgramPlan(name, hbm, resident=resident, note=note)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        traced = jitted.trace(*args)
    plan.flops = program_flops(traced.jaxpr)
    try:
        with jax.set_mesh(mesh):
            compiled = traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        plan.error = first_line(e)
        plan.arguments = bytes_per_chip(args)  # as laid out unpadded: known without compiling
        # The "HLO temporaries" XLA says it needs include the arguments: a 4B prefill on v6e-8
        # whose arguments are 36.10 GiB per chip (temporaries 0.73 GiB at a wave that fits)
        # reports 36.82G.
        needed = _bytes_after(message, "HLO temporaries")
        plan.temporaries = None if needed is None else max(needed - plan.arguments, 0)
        plan.compile_s = time.perf_counter() - start
        return plan
    plan.compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    plan.arguments = stats.argument_size_in_bytes
    plan.outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
    plan.temporaries = stats.temp_size_in_bytes
    plan.host_temporaries = stats.host_temp_size_in_bytes
    plan.code = stats.generated_code_size_in_bytes
    return plan


# --------------------------------------------------------------------------------------------
# Abstract model, optimizer state and batches


def model_config(spec, preset_name: str | None = None) -> tuple[ModelConfig, str]:
    """The architecture to plan, without reading weights, and a line saying where it came from:
    `preset_name` if given; else the model spec's preset (no path), local folder or checkpoint
    (its config.json / model_config.json); else a Hub id whose name is a preset."""
    from qed_jax import checkpoint, hf

    path = os.path.expanduser(spec.path) if spec.path else None
    if preset_name:
        base, source = preset(preset_name), f"preset {preset_name} (--preset)"
    elif path is None:
        if not spec.preset:
            raise ConfigError("model: set model.path (a checkpoint to load) or model.preset (a random init), "
                              f"or pass --preset (one of {', '.join(PRESETS)})")
        base, source = preset(spec.preset), f"preset {spec.preset}"
    elif checkpoint.is_checkpoint_dir(path):
        base, source = checkpoint.read_model_config(path), f"qed-jax checkpoint {path}"
    elif (Path(path) / "config.json").is_file():
        base, source = hf.read_model_config(Path(path)), f"{path}/config.json"
        tensors = hf.safetensors_of(Path(path))
        if base.tie_word_embeddings and tensors is not None and hf.holds_own_head(tensors):
            base = base.replace(tie_word_embeddings=False)  # loaded untied if it differs: planned as the larger
        if spec.param_dtype is None and (stored := hf.stored_param_dtype(Path(path), base)):
            base = base.replace(param_dtype=stored)  # as the trainers load it
    elif (by_name := path.rstrip("/").split("/")[-1].lower()) in PRESETS:
        base, source = preset(by_name), f"preset {by_name} ({path} is not a local folder; same name)"
    else:
        from qed_jax.pretrained import run_dir_models

        if inside := run_dir_models(Path(path)):
            raise ConfigError(f"model.path {path!r} is a trainer's run directory, not a model; pass "
                              f"{' or '.join(inside)}")
        what = ("a local folder, but neither a Hugging Face model (config.json) nor a qed-jax checkpoint"
                if Path(path).is_dir() else "a file, not a model folder" if Path(path).exists()
                else "not a local folder or checkpoint")
        raise ConfigError(f"model.path {path!r} is {what}, and names no preset: "
                          f"pass --preset (one of {', '.join(PRESETS)})")
    param_dtype = spec.param_dtype or base.param_dtype
    config = base.replace(param_dtype=param_dtype, dtype=spec.dtype or param_dtype, remat=spec.remat,
                          attention=spec.attention)
    return config, source


def abstract_decay_mask(config: ModelConfig) -> dict:
    return decay_mask(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))


def sharded(x, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_params(config: ModelConfig, mesh):
    """(graphdef, params as a pure dict of sharded ShapeDtypeStructs), like the trainers' split."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
    shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    return graphdef, jax.tree.map(sharded, nnx.to_pure_dict(state), shardings)


def abstract_opt_state(optimizer, params, mesh):
    """The optimizer state as the trainers lay it out (`trainer.opt_state_shardings`)."""
    return jax.tree.map(sharded, jax.eval_shape(float32_init(optimizer), params),
                        opt_state_shardings(optimizer, params, mesh))


def bytes_per_chip(tree) -> int:
    """Bytes one chip holds of sharded abstract arrays (the most loaded chip's share)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct))


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


# --------------------------------------------------------------------------------------------
# SFT


def plan_sft(config, devices, hbm: int, preset_name: str | None = None) -> tuple[list[ProgramPlan], dict]:
    """The SFT train step, built as `sft.train` builds it, on abstract inputs."""
    from qed_jax import sft

    mesh = make_mesh(config.mesh, devices=devices)
    model, source = model_config(config.model, preset_name)
    graphdef, params = abstract_params(model, mesh)
    optimizer = make_optimizer(config.optim, config.steps or 1, abstract_decay_mask(model))  # steps shape the schedule only
    opt_state = abstract_opt_state(optimizer, params, mesh)
    M, rows, T = config.micro_batches, config.batch_size // config.micro_batches, config.data.max_length
    check_rows_divide(rows, mesh, "batch_size / micro_batches", len({d.process_index for d in devices}))
    batch = {k: jax.ShapeDtypeStruct((M, rows, T), jnp.int32, sharding=batch_sharding(mesh))
             for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    step = jax.jit(partial(sft.train_step, graphdef, optimizer), donate_argnums=(0, 1),
                   out_shardings=(shardings_of(params), shardings_of(opt_state), None))
    program = compile_program("train_step", step, (params, opt_state, batch), hbm, mesh,
                              note=f"batch [{M}, {rows}, {T}]")
    return [program], {"model": source, "model_config": dataclasses.asdict(model), "mesh": dict(mesh.shape),
                       "tokens_per_step": config.batch_size * T}


# --------------------------------------------------------------------------------------------
# GRPO: update step, and the sampler's prefill and decode at a wave size

# The decode loop's own temporaries (logits [B, V], attention scores over the cache) need room
# beyond the KV cache, so a wave takes this share of the HBM left after the other buffers.
KV_SHARE = 0.9
# Qwen3 stops on <|im_end|> and <|endoftext|>; the count only sets the shape of stop_ids.
NUM_STOP_IDS = 2


def kv_cache(config: ModelConfig, rows: int, length: int, dtype, mesh) -> KVCache:
    """An abstract KV cache [L, rows, length, K, H] sharded as the Sampler shards it."""
    from qed_jax import sampling
    sharding = NamedSharding(mesh, sampling.kv_cache_spec(config, rows, length, mesh))
    abstract = jax.ShapeDtypeStruct(KVCache.shape(config, rows, length), dtype, sharding=sharding)
    return KVCache(abstract, abstract)


def by_rows(shape, dtype, mesh, leading: int = 0) -> jax.ShapeDtypeStruct:
    """An abstract array whose rows (axis `leading`) are sharded over the batch axes."""
    axes = (None,) * leading + ("batch",) + (None,) * (len(shape) - leading - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(axes, shape, mesh)))


def batch_ways(mesh) -> int:
    """How many ways the batch axes split rows: a wave is a multiple of it, else its cache's rows
    are not sharded."""
    axes = logical_to_spec(("batch",), (0,), mesh)[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def wave_size(free_bytes: float, kv_bytes_per_row: float, multiple: int, rows_wanted: int) -> int:
    """Rows sampled at once: as many as fit `free_bytes` per chip at `kv_bytes_per_row` (one
    chip's share of a row's cache), in multiples of `multiple`, at most `rows_wanted`; 0 when
    not even `multiple` rows fit."""
    return min(rows_wanted, multiple * max(0, int(free_bytes // (kv_bytes_per_row * multiple))))


def sampler_programs(model: ModelConfig, mesh, wave: int, prompt_len: int, max_new_tokens: int, hbm: int,
                     resident: int) -> list[ProgramPlan]:
    """The sampler's prefill and decode loop for a wave of `wave` rows (prompts padded to
    `prompt_len`), on the sampling mesh, with inputs sharded as `Sampler` puts them."""
    from qed_jax import sampling

    graphdef, weights = abstract_params(model, mesh)
    cache = kv_cache(model, wave, sampling.cache_slots(prompt_len + max_new_tokens), model.dtype, mesh)
    lengths = by_rows((wave,), jnp.int32, mesh)
    prefill = compile_program("prefill", sampling.prefill, (
        graphdef, weights, by_rows((wave, prompt_len), jnp.int32, mesh), lengths, cache),
        hbm, mesh, resident, note=f"{wave} rows x {prompt_len} prompt tokens")
    replicated = NamedSharding(mesh, PartitionSpec())
    key = sharded(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    stop_ids = jax.ShapeDtypeStruct((NUM_STOP_IDS,), jnp.int32, sharding=replicated)
    controls = [by_rows((wave,), dtype, mesh) for dtype in (jnp.float32, jnp.int32, jnp.float32, jnp.int32)]
    decode = compile_program("decode_loop", sampling.decode_loop, (
        graphdef, max_new_tokens, weights, by_rows((wave, model.vocab_size), jnp.float32, mesh), lengths, cache,
        key, *controls, stop_ids), hbm, mesh, resident, note=f"{wave} rows; TFLOP of one decode step")
    return [prefill, decode]


# Qwen's chat wrappers around a user message (<|im_start|>user\n before; <|im_end|>\n,
# <|im_start|>assistant\n and <think>\n after) take under this many tokens on either side.
CHAT_WRAPPER_TOKENS = 16


def abstract_rc_prompts(rc, mesh):
    """The RC prompt templates' literal pieces as abstract ids, sized without a tokenizer by an
    upper bound: a byte-level BPE token covers at least one byte, plus the chat wrappers."""
    from qed_jax import reasoning_cache as rcm

    replicated = NamedSharding(mesh, PartitionSpec())

    def pieces(template: str, slots: tuple[str, ...]):
        literals, found = rcm.split_template(rcm.load_rc_template(template), slots, template)
        sizes = [len(text.encode()) for text in literals]
        sizes[0] += CHAT_WRAPPER_TOKENS
        sizes[-1] += CHAT_WRAPPER_TOKENS
        return rcm.PromptPieces(tuple(jax.ShapeDtypeStruct((n,), jnp.int32, sharding=replicated) for n in sizes),
                                found)

    return rcm.RCPrompts(pieces(rc.reasoning_template, rcm.REASONING_SLOTS),
                         pieces(rc.summarize_template, rcm.SUMMARIZE_SLOTS))


def check_problem_room(config) -> None:
    """What `qed-jax grpo` refuses when it reads the prompts: an RC config whose reasoning prompt
    leaves a problem no tokens. Its template is counted by the run's tokenizer, so only where that
    is a folder on this machine (the plan fetches nothing from the Hub)."""
    from qed_jax.grpo import problem_token_limit
    from qed_jax.tokenizer import load_tokenizer

    path = config.tokenizer or config.model.path
    if path and Path(path).expanduser().is_dir():
        problem_token_limit(config, load_tokenizer(path))


def rc_summarizer_model(rc, policy: ModelConfig) -> tuple[ModelConfig | None, str]:
    """The frozen summarizer's architecture (None when the policy summarizes itself)."""
    from qed_jax.trainer import ModelSpec

    s = rc.summarizer
    if not s.path:
        return None, "the policy"
    try:
        config, source = model_config(ModelSpec(path=s.path))
    except ConfigError:
        config, source = policy, f"{s.path} (not local: planned with the policy's architecture)"
    return config.replace(param_dtype=s.dtype, dtype=s.dtype), source


def rc_trajectory_program(config, policy: ModelConfig, mesh, hbm: int, resident: int, problems: int
                          ) -> tuple[ProgramPlan, dict]:
    """The compiled RC loop of GRPO's trajectories on one host: `rc.trajectory_batch` of its
    `problems` per step (rounded up to the batch shards) through all turns, with the policy's sampling weights, the summarizer's
    and their caches, at the widest problem bucket that `max_prompt_length` admits."""
    from qed_jax import reasoning_cache as rcm
    from qed_jax import sampling

    rc = config.rc
    summarizer, summarizer_source = rc_summarizer_model(rc, policy)
    prompts = abstract_rc_prompts(rc, mesh)
    problem_tokens = sampling.bucket_length(config.max_prompt_length - rc.summary_tokens)
    shape = rcm.LoopShape(rc.reasoning_tokens or config.max_new_tokens, rc.summary_tokens,
                          rc.summarizer.max_new_tokens, rc.turns, summarizer is not None and rc.summarizer.thinking)
    ways = batch_ways(mesh)
    rows = -(-(rc.trajectory_batch or problems) // ways) * ways
    lengths = rcm.cache_lengths(prompts, problem_tokens, shape, summarizer is not None)
    models = (policy,) if summarizer is None else (policy, summarizer)
    caches = tuple(kv_cache(m, rows, n, m.dtype, mesh) for m, n in zip(models, lengths))
    policy_def, policy_weights = abstract_params(policy, mesh)
    summarizer_def, summarizer_weights = abstract_params(summarizer, mesh) if summarizer else (None, None)
    inputs = rcm.LoopInputs(by_rows((rows, problem_tokens), jnp.int32, mesh), by_rows((rows,), jnp.int32, mesh),
                            by_rows((rows, rc.summary_tokens), jnp.int32, mesh), by_rows((rows,), jnp.int32, mesh),
                            by_rows((rows,), jnp.bool_, mesh), by_rows((rows,), jnp.int32, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())

    def scalar(dtype):
        return jax.ShapeDtypeStruct((), dtype, sharding=replicated)

    settings = (scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32))
    stop_ids = jax.ShapeDtypeStruct((NUM_STOP_IDS,), jnp.int32, sharding=replicated)
    controls = rcm.Controls(scalar(jnp.int32), scalar(jnp.int32),
                            sharded(jax.eval_shape(lambda: jax.random.key(0)), replicated), settings, settings,
                            stop_ids, stop_ids, scalar(jnp.int32))
    program = compile_program(
        "rc_trajectory", rcm.rc_loop, (policy_def, summarizer_def, shape, policy_weights, summarizer_weights,
                                       prompts, inputs, caches, controls),
        hbm, mesh, resident, note=f"{rows} problems x {rc.turns} turns, caches of {' + '.join(map(str, lengths))} slots")
    info = {"rc_trajectory_rows": rows, "rc_problem_tokens": problem_tokens, "rc_cache_lengths": list(lengths),
            "rc_summarizer": summarizer_source,
            "rc_cache_bytes_per_chip": bytes_per_chip(caches)}
    return program, info


# The wave of a sampler given neither sampling.max_concurrent nor sampling.kv_cache_gib.
ALL_SAMPLES = "all_samples"
SAMPLER_PROGRAMS = ("prefill", "decode_loop")


def plan_grpo(config, tpu: Slice, devices, hbm: int, preset_name: str | None = None,
              wave: int | None = None) -> tuple[list[ProgramPlan], dict]:
    """GRPO's learner (one micro-batch of packed rows, and the optimizer step) and the sampler's
    prefill and decode loop at a wave size, each with the buffers `grpo.train` keeps alive
    meanwhile: the trainer's state (the sampler frees its weights and cache before the update).
    The wave is `wave` (--wave-size), else as the trainer's sampler sizes it:
    `sampling.max_concurrent`, else what `sampling.kv_cache_gib` allows, else one wave of all
    the host's samples. Beside it, an estimate of the rows whose KV cache fits the HBM left
    after the trainer's state and the sampler's weights."""
    from qed_jax import grpo, sampling
    from qed_jax.multihost import host_sampling_mesh, per_process

    mesh = make_mesh(config.mesh, devices=devices)
    model, source = model_config(config.model, preset_name)
    graphdef, params = abstract_params(model, mesh)
    ref_params = params if config.loss.kl_coef > 0 else None
    optimizer = make_optimizer(config.optim, config.optimizer_updates, abstract_decay_mask(model))
    opt_state = abstract_opt_state(optimizer, params, mesh)
    trainer_bytes = bytes_per_chip((params, opt_state, ref_params))

    # Each host samples its share of the step on its own chips (grpo.train with one process per
    # host): the sampler's programs run on one host's devices.
    hosts = sorted({d.process_index for d in devices})
    # What grpo.train refuses at start is refused before anything compiles.
    per_process(config.prompts_per_step, "prompts_per_step", len(hosts))
    rows, L = config.micro_batch_rows or batch_ways(mesh), config.row_length
    check_rows_divide(rows, mesh, "micro_batch_rows", len(hosts))
    per_process(rows, "micro_batch_rows (default: the data-parallel devices)", len(hosts))
    if config.rc is not None:
        check_problem_room(config)
    sampling_meshes = host_sampling_mesh if len(hosts) > 1 else make_mesh
    sampling_mesh = sampling_meshes(config.sampling.mesh or config.mesh, one_host_devices(tpu, devices),
                                    "sampling.mesh" if config.sampling.mesh else "mesh")
    samples_per_host = config.samples_per_step // len(hosts)
    sampling_model = model.replace(param_dtype=config.sampling.dtype, dtype=config.sampling.dtype)
    sampler_bytes = bytes_per_chip(abstract_params(sampling_model, sampling_mesh)[1])
    # A frozen RC summarizer stays loaded for the whole run.
    summarizer = rc_summarizer_model(config.rc, sampling_model)[0] if config.rc else None
    frozen_bytes = bytes_per_chip(abstract_params(summarizer, sampling_mesh)[1]) if summarizer else 0
    prompt_len = sampling.bucket_length(config.max_prompt_length)
    cache_len = sampling.cache_slots(prompt_len + config.max_new_tokens)
    ways = batch_ways(sampling_mesh)
    row_bytes = bytes_per_chip(kv_cache(sampling_model, ways, cache_len, sampling_model.dtype, sampling_mesh)) / ways
    fitting = wave_size(KV_SHARE * (hbm - trainer_bytes - sampler_bytes - frozen_bytes), row_bytes, ways,
                        samples_per_host)
    if wave is not None and wave > samples_per_host:
        raise ConfigError(f"--wave-size {wave} is more rows than the sampler ever runs at once: "
                          f"{samples_per_host} samples per step on each host")
    if wave is not None:
        wave_from = "--wave-size"
    elif config.sampling.max_concurrent:
        wave_from, wave = "sampling.max_concurrent", config.sampling.max_concurrent
    elif config.sampling.kv_cache_gib:
        wave_from = "sampling.kv_cache_gib"
        cache = kv_cache(sampling_model, ways, cache_len, sampling_model.dtype, sampling_mesh)
        kv_heads = cache.k.sharding.spec[KV_CACHE_AXES.index("kv_heads")]
        kv_head_ways = math.prod(sampling_mesh.shape[a] for a in ((kv_heads,) if isinstance(kv_heads, str)
                                                                   else kv_heads or ()))
        wave = sampling.wave_size(sampling_model, cache_len, config.sampling.kv_cache_gib * 2 ** 30,
                                  sampling_model.dtype, ways, kv_head_ways)
    else:
        wave_from = ALL_SAMPLES
    if wave is not None and wave % ways:  # as the Sampler refuses it
        raise ConfigError(f"{wave_from} must be a multiple of the sampling mesh's {ways} batch shards, so rows "
                          f"split evenly; got {wave}")
    wave = sampling.rows_per_wave(samples_per_host, ways, wave)  # as the Sampler sizes its waves
    cache_bytes = bytes_per_chip(kv_cache(sampling_model, wave, cache_len, sampling_model.dtype, sampling_mesh))
    prefill, decode = sampler_programs(sampling_model, sampling_mesh, wave, prompt_len, config.max_new_tokens,
                                       hbm, resident=trainer_bytes + frozen_bytes)

    programs = [prefill, decode]
    rc_info = {}
    if config.rc is not None:
        trajectory, rc_info = rc_trajectory_program(config, sampling_model, sampling_mesh, hbm, trainer_bytes,
                                                     config.prompts_per_step // len(hosts))
        programs.insert(0, trajectory)

    replicated = NamedSharding(mesh, PartitionSpec())
    micro = {k: by_rows((rows, L), dtype, mesh) for k, dtype in (
        ("tokens", jnp.int32), ("positions", jnp.int32), ("segment_ids", jnp.int32), ("mask", jnp.float32),
        ("old_logprobs", jnp.float32), ("advantages", jnp.float32), ("sample_lengths", jnp.float32))}
    micro.update(num_sequences=jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
                 num_tokens=jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated))
    grads = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), params)
    sums = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated) for k in grpo.METRIC_SUMS}
    accumulate = compile_program(
        "accumulate", jax.jit(partial(grpo.accumulate_step, graphdef, config.loss), donate_argnums=(2, 3)),
        (params, ref_params, grads, sums, micro), hbm, mesh, resident=bytes_per_chip(opt_state) + frozen_bytes,
        note=f"one micro-batch [{rows}, {L}] of packed rows")
    apply = compile_program(
        "apply", jax.jit(partial(grpo.apply_step, optimizer), donate_argnums=(0, 1),
                         out_shardings=(shardings_of(params), shardings_of(opt_state), None)),
        (params, opt_state, grads), hbm, mesh, bytes_per_chip(ref_params) + frozen_bytes,
        note="the optimizer step")
    info = {"model": source, "model_config": dataclasses.asdict(model), "mesh": dict(mesh.shape),
            "sampling_mesh": dict(sampling_mesh.shape), "wave_size": wave, "wave_from": wave_from,
            "wave_size_that_fits": fitting,
            "samples_per_step": config.samples_per_step, "hosts": len(hosts), "samples_per_host": samples_per_host,
            "kv_bytes_per_token": sampling.kv_bytes_per_token(model, config.sampling.dtype),
            "kv_cache_length": cache_len, "kv_cache_bytes_per_chip": cache_bytes,
            "sampler_weights_bytes_per_chip": sampler_bytes, "trainer_state_bytes_per_chip": trainer_bytes,
            **rc_info}
    return [accumulate, apply, *programs], info


# --------------------------------------------------------------------------------------------
# The whole plan and its report


@dataclasses.dataclass
class Plan:
    config: str
    trainer: str
    slice: Slice
    devices: str  # device_kind
    hbm: int
    hbm_source: str
    programs: list[ProgramPlan]
    info: dict
    chips_per_host: int

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def to_json(self) -> dict:
        return {"config": self.config, "trainer": self.trainer, "slice": dataclasses.asdict(self.slice),
                "device_kind": self.devices, "hbm_bytes_per_chip": self.hbm, "hbm_source": self.hbm_source,
                "chips_per_host": self.chips_per_host,
                "fits": self.fits, "programs": [p.to_json() for p in self.programs], **self.info}


def pipeline_stages(path: str) -> None:
    """ConfigError naming the trainer stages' configs when `path` is a pipeline config (its keys
    are a pipeline's, whether or not it is complete), which `plan` cannot take as a whole (it
    plans one trainer)."""
    from qed_jax.pipeline import PipelineConfig, as_overrides

    data = read_yaml(path)
    pipeline_keys = {field.name for field in dataclasses.fields(PipelineConfig)}
    if not (isinstance(data, dict) and set(data) <= pipeline_keys and set(data) & {"sft", "grpo", "eval", "judge"}):
        return
    stages = []
    for name in ("sft", "grpo"):
        stage = data.get(name) if isinstance(data.get(name), dict) else {}
        words = ["--config", stage.get("config") or getattr(PipelineConfig, name).config,
                 *as_overrides(stage.get("overrides") if isinstance(stage.get("overrides"), dict) else None)]
        stages.append(f"`{shlex.join(str(word) for word in words)}` ({name})")
    raise ConfigError(f"{path} is a pipeline config: plan its trainer stages one at a time, "
                      f"{' and '.join(stages)}")


def trainer_config(path: str | None, overrides: list[str], trainer: str | None):
    """(trainer name, config): the config class that accepts the file, or the one named."""
    from qed_jax.grpo import GRPOConfig
    from qed_jax.sft import SFTConfig

    classes = {"sft": SFTConfig, "grpo": GRPOConfig}
    if trainer:
        return trainer, load_config(classes[trainer], path, overrides)
    loaded, errors = {}, {}
    for name, cls in classes.items():
        try:
            loaded[name] = load_config(cls, path, overrides)
        except ConfigError as e:
            errors[name] = str(e)
    if not loaded:
        if len(set(errors.values())) == 1:  # the same error for both (no such file)
            raise ConfigError(next(iter(errors.values())))
        of_its_kind = [v for v in errors.values() if " is not a key of " not in v]  # the file's keys fit one class
        if len(of_its_kind) == 1:
            raise ConfigError(of_its_kind[0])
        pipeline_stages(path)
        raise ConfigError(f"{path} is neither an SFT nor a GRPO config (" + "; ".join(
            v.removeprefix(f"{path}: ").split(" (its keys")[0] for v in errors.values()) + ")")
    if len(loaded) == 2:
        raise ConfigError(f"cannot tell whether {path} is an SFT or a GRPO config (it is valid for both); pass --trainer")
    return next(iter(loaded.items()))


def plan(config_path: str | None, topology: str, overrides: list[str] = (), trainer: str | None = None,
         preset_name: str | None = None, wave: int | None = None) -> Plan:
    if wave is not None and wave < 1:
        raise ConfigError(f"--wave-size must be at least 1 row, got {wave} (leave it out for the trainer's own)")
    trainer, config = trainer_config(config_path, list(overrides), trainer)
    if trainer == "sft" and wave is not None:
        raise ConfigError("--wave-size sizes the GRPO sampler; an SFT plan has none")
    tpu = parse_slice(topology)
    devices = topology_devices(tpu)
    hbm, hbm_source = hbm_per_chip(devices[0], tpu)
    if trainer == "sft":
        programs, info = plan_sft(config, devices, hbm, preset_name)
    else:
        programs, info = plan_grpo(config, tpu, devices, hbm, preset_name, wave)
    return Plan(str(config_path), trainer, tpu, devices[0].device_kind, hbm, hbm_source, programs, info,
                len(first_host(devices)))


def sum_known(q: ProgramPlan) -> int:
    return sum(n for n in (q.arguments, q.outputs, q.temporaries, q.code, q.resident) if n)


def _gib(n) -> str:
    return "?" if n is None else f"{n / GiB:.2f}"


def format_report(p: Plan) -> str:
    lines = [f"{p.trainer} config {p.config} on {p.slice.name}: {p.slice.chips} chips ({p.devices}, "
             f"topology {p.slice.topology}), HBM {p.hbm / GiB:.2f} GiB per chip "
             f"({'as the compiler counts it' if p.hbm_source == 'compiler' else 'nominal'})",
             f"model: {p.info['model']}",
             f"mesh: {p.info['mesh']}"]
    if p.trainer == "grpo":
        per_host = (f"{p.info['samples_per_host']} samples per host ({p.info['hosts']} hosts, each sampling on its "
                    f"own chips)" if p.info["hosts"] > 1 else f"{p.info['samples_per_step']} samples per step")
        wave_from = p.info["wave_from"]
        wave_from = ("one wave of all samples: no sampling.max_concurrent or kv_cache_gib" if wave_from == ALL_SAMPLES
                     else f"from {wave_from}")
        lines += [f"sampling mesh: {p.info['sampling_mesh']}; wave {p.info['wave_size']} rows "
                  f"({wave_from}); the KV cache of about "
                  f"{p.info['wave_size_that_fits']} of {per_host} fits beside the trainer's state; "
                  f"KV {p.info['kv_bytes_per_token']} bytes per token, cache {p.info['kv_cache_length']} tokens "
                  f"= {_gib(p.info['kv_cache_bytes_per_chip'])} GiB per chip",
                  f"resident: trainer state {_gib(p.info['trainer_state_bytes_per_chip'])} GiB per chip while "
                  f"sampling (sampler weights {_gib(p.info['sampler_weights_bytes_per_chip'])} GiB, freed with "
                  "the KV cache before the update); optimizer moments while accumulating gradients"]
    header = ("program", "args", "outputs", "temps", "resident", "total", "HBM", "headroom", "fits",
              "TFLOP/call", "compile s")
    rows = [header]
    for q in p.programs:
        rows.append((q.name, _gib(q.arguments), _gib(q.outputs), _gib(q.temporaries), _gib(q.resident),
                     _gib(q.total), _gib(q.hbm), "?" if q.headroom is None else f"{100 * q.headroom:.0f}%",
                     "yes" if q.fits else "NO", "?" if q.flops is None else f"{q.flops / 1e12:.1f}",
                     f"{q.compile_s:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["", "GiB per chip; TFLOP per call, all chips"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines += [f"  {q.name}: {q.note}" for q in p.programs if q.note]
    for q in p.programs:
        if q.error:
            known = [f"{what} {_gib(n)}" for what, n in (("arguments", q.arguments), ("temporaries", q.temporaries),
                                                          ("resident", q.resident)) if n]
            lines.append(f"{q.name}: does not fit: needs at least {_gib(sum_known(q))} GiB per chip "
                         f"({' + '.join(known)}) > {_gib(q.hbm)} GiB HBM: {q.error}")
        elif not q.fits:
            lines.append(f"{q.name}: does not fit: {_gib(q.total)} GiB with resident buffers > {_gib(q.hbm)} GiB HBM")
        if q.host_temporaries:
            # Not held against `fits`: a TPU host has hundreds of GiB.
            lines.append(f"{q.name}: also {_gib(q.host_temporaries)} GiB per chip of the host's memory "
                         f"({_gib(q.host_temporaries * p.chips_per_host)} GiB per host of {p.chips_per_host} chips; "
                         "model.remat: offload keeps the layers' inputs there)")
    sampler_fits = all(q.fits for q in p.programs if q.name in SAMPLER_PROGRAMS)
    if p.trainer == "grpo" and p.info["wave_from"] == ALL_SAMPLES and not sampler_fits:
        fitting = p.info["wave_size_that_fits"]
        lines.append(f"sample in waves: set sampling.max_concurrent (about {fitting} rows fit, an estimate: check "
                     "it with --wave-size) or sampling.kv_cache_gib" if fitting else
                     "not even one row per batch shard of the sampling mesh fits beside the trainer's state: "
                     "use more chips, or a smaller model or max_new_tokens")
    lines.append("fits" if p.fits else "does NOT fit")
    return "\n".join(lines)


def to_json(p: Plan) -> str:
    return json.dumps(p.to_json(), indent=2)
