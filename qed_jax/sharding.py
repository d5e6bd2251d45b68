"""Device mesh and logical-axis rules.

Parameters name their axes logically (`embed`, `heads`, `mlp`, ...). One rules table maps each
logical name to a mesh axis (or to none: replicated). Changing the rules, never the model, moves
between a single device, FSDP on a pod, and FSDP x tensor parallelism.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qed_jax.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1, meaning all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


# Logical axis → mesh axis (a name, a tuple of names, or None for replicated).
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
}


def _named_sizes(config: MeshConfig, name: str) -> list[str]:
    """Each axis as an error names it: ["mesh.data=-1", "mesh.fsdp=4", "mesh.tensor=1"]."""
    return [f"{name}.{axis}={getattr(config, axis)}" for axis in MESH_AXES]


def check_mesh_sizes(config: MeshConfig, name: str = "mesh") -> None:
    """ConfigError for axis sizes no device count fits (a config's own check, before any device
    is seen); errors name the axes `name`.axis."""
    sizes = [getattr(config, axis) for axis in MESH_AXES]
    bad = [named for named, size in zip(_named_sizes(config, name), sizes) if size < 1 and size != -1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: a mesh axis size is at least 1, or -1 for the devices left")
    if sizes.count(-1) > 1:
        raise ConfigError(f"{', '.join(_named_sizes(config, name))}: at most one mesh axis may be -1 (the devices "
                          "left); give the others their sizes")


def make_mesh(config: MeshConfig = MeshConfig(), devices=None, name: str = "mesh") -> Mesh:
    """The mesh of `config` over `devices` (default: all); errors name its axes `name`.axis."""
    devices = list(devices if devices is not None else jax.devices())
    check_mesh_sizes(config, name)
    sizes = [getattr(config, axis) for axis in MESH_AXES]
    given = ", ".join(_named_sizes(config, name))
    here = f"{len(devices)} device{'s' if len(devices) != 1 else ''}"
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ConfigError(f"{given}: the other axes ({fixed} devices) do not divide the {here} here; choose "
                              "sizes whose product divides them")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"{given} needs {math.prod(sizes)} devices, not the {here} here; choose sizes whose "
                          "product is the device count (or make one -1: the devices left)")
    # Auto axes: the compiler propagates shardings from parameters and inputs (GSPMD).
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:  # laid out along the chip grid, so that each axis's collectives take the shortest links
        mesh = jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
        if rows_stay_on_their_hosts(mesh):
            return mesh
        why = "puts the devices that share rows (mesh.tensor) on more than one host"
    except NotImplementedError:  # an axis size that is no product of the grid's sides
        mesh, why = None, "does not follow this slice's chip grid (each size a product of the grid's sides)"
    by_host = Mesh(np.array(sorted(devices, key=lambda d: (d.process_index, d.id)), dtype=object).reshape(sizes),
                   MESH_AXES, axis_types=axis_types)
    if not rows_stay_on_their_hosts(by_host):  # no layout keeps rows on their hosts: the trainers
        return by_host if mesh is None else mesh  # refuse it (`check_rows_divide`), without this warning
    log.warning("%s %s: the mesh takes the devices host by host instead, which works, with collectives "
                "that may take longer links", given, why)
    return by_host


def rows_stay_on_their_hosts(mesh: Mesh) -> bool:
    """Whether every group of devices that holds the same rows of a batch (the devices along
    `tensor`) is on one host: each process feeds rows of its own to its own devices."""
    groups = mesh.devices.reshape(-1, mesh.shape["tensor"])
    return all(len({d.process_index for d in group}) == 1 for group in groups)


def logical_to_spec(axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """Partition spec for an array with logical `axes`. A mesh axis is used at most once per
    array; a dimension that the mapped mesh axes do not divide stays replicated."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise ConfigError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
        if used & set(names):
            raise ConfigError(f"rules map two axes of {axes} onto mesh axis {sorted(used & set(names))}")
        ways = math.prod(mesh.shape[n] for n in names)
        if names and size % ways:
            _warn_replicated(name, size, names, ways)
            names = ()
        used.update(names)
        spec.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*spec)


@functools.cache  # once per process for each such axis: every parameter that has it asks again
def _warn_replicated(name: str, size: int, mesh_axes: tuple, ways: int) -> None:
    log.warning("axis %r of size %d is not divisible by mesh %s (%d); replicating it", name, size, mesh_axes, ways)


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """The NamedSharding of every variable in an (abstract) NNX state, from its `axes`."""
    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=is_variable)


def create_sharded(make_module, mesh: Mesh | None, rules=DEFAULT_RULES):
    """Build an NNX module directly on the mesh: abstract init gives shapes and axes, then a
    jitted init writes each parameter straight into its shards (never whole on one device)."""
    abstract = nnx.eval_shape(make_module)
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is None:
        return make_module()
    shardings = state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(make_module()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)

