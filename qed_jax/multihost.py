"""Several processes (one per TPU host) acting as one trainer: each takes its share of a step's
work, samples on its own devices, and the pieces meet in global arrays and small gathers.

Everything here is a no-op or a plain local computation when there is one process, so callers
run the same code on a laptop, one TPU VM or a pod.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import Counter

import numpy as np
import jax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from qed_jax.config import ConfigError
from qed_jax.sharding import MESH_AXES, MeshConfig, make_mesh, state_shardings

log = logging.getLogger(__name__)


def per_process(total: int, what: str, count: int | None = None) -> int:
    """`total` split evenly over the processes (`count`, default this run's), or a ConfigError
    naming `what`."""
    count = jax.process_count() if count is None else count
    if total % count:
        raise ConfigError(f"{what} ({total}) must split evenly over the {count} processes; "
                          f"make it a multiple of {count}")
    return total // count


def process_share(items: list) -> list:
    """This process's contiguous slice of a list every process holds whole (process p takes the
    p-th of process_count equal parts; the caller has checked that they are equal)."""
    n = len(items) // jax.process_count()
    return items[jax.process_index() * n:(jax.process_index() + 1) * n]


def gather(tree):
    """Concatenate each process's 1-D arrays (equal lengths everywhere) in process order, on
    every process: per-sample numbers from process shares become the whole step's."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def largest(value: int) -> int:
    """The largest of every process's `value`, on every process: how processes agree on the
    worst of what each found (0 for nothing wrong)."""
    if jax.process_count() == 1:
        return value
    return int(gather(np.array([value], np.int32)).max())


@contextlib.contextmanager
def set_up_together(what: str):
    """A block of host-local setup (reading data and the tokenizer, checking the config; no
    collective op in it) whose error on any process stops every process at once: the others
    would otherwise wait for that one in their first collective op until JAX's timeouts abort
    them, minutes later and without a word."""
    try:
        yield
    except Exception:
        largest(1)
        raise
    if largest(0):
        raise ConfigError(f"{what} failed on another process (its log says why)")


class SaveFailedElsewhere(RuntimeError):
    """A checkpoint save that another process of the job could not finish (see SaveBarrier)."""


class SaveBarrier:
    """The barriers of Orbax's checkpoint saves (its `AsyncOptions.barrier_sync_fn`), kept in the
    coordination service's key-value store so that a save that fails on one process fails on
    every process. Orbax's own barriers cannot tell: a process whose write fails skips the
    barrier that the others wait at and waits at the next one itself, each side until Orbax's
    timeout (20 minutes), and then JAX's shutdown barrier aborts them all. Here a process that
    finds another waiting at another barrier, one that not every process has reached, knows that
    their saves went separate ways: it marks the save failed, and every barrier of every process
    fails from then on (SaveFailedElsewhere), so that each process's save ends in an error (its
    own failed write, or that) and the run stops with it. `fail()` marks a failure that a save
    raised outside the barriers (`checkpoint.TrainCheckpoints.failed_write`). Each process runs
    Orbax's barriers in the same order: the n-th call with a key is that barrier's n-th use on
    every process. A process that passes a barrier deletes its arrival at the one before, which
    every process has left by then, so the store holds one barrier's keys, not every save's."""

    POLL_S = 0.25  # seconds between looks at the store: each is a few small requests to the coordinator

    def __init__(self, client, process: int, processes: int, name: str = "qed_jax/save"):
        self.client, self.process, self.processes, self.name = client, process, processes, name
        self.uses, self.lock = Counter(), threading.Lock()
        self.passed = None  # the last barrier this process passed

    def __call__(self, key: str, timeout_ms: int) -> None:
        with self.lock:
            self.uses[key] += 1
            barrier = f"{key.replace('/', '|')}#{self.uses[key]}"
        self.client.key_value_set(f"{self.name}/arrived/{barrier}/{self.process}", "")
        self.client.key_value_set(f"{self.name}/waiting/{self.process}", barrier, allow_overwrite=True)
        deadline = time.monotonic() + timeout_ms / 1000
        while not self.complete(barrier):
            # complete() again after stuck_elsewhere(): between the loop's look and that one, the
            # others may have arrived here, left, and started waiting at the save's next barrier
            if self.failed() or (self.stuck_elsewhere(barrier) and not self.complete(barrier)):
                self.fail()
                raise SaveFailedElsewhere("it failed on another process, whose log says why")
            if time.monotonic() > deadline:
                self.fail()
                raise TimeoutError(f"not every process reached its barrier {key} in {timeout_ms / 1000:g} s")
            time.sleep(self.POLL_S)
        self.client.key_value_set(f"{self.name}/waiting/{self.process}", "", allow_overwrite=True)
        # Every process has arrived here, so each has left the barrier before: nobody looks at it again.
        with self.lock:
            before, self.passed = self.passed, barrier
        if before is not None:
            self.client.key_value_delete(f"{self.name}/arrived/{before}/{self.process}")

    def complete(self, barrier: str) -> bool:
        return len(self.client.key_value_dir_get(f"{self.name}/arrived/{barrier}/")) == self.processes

    def stuck_elsewhere(self, barrier: str) -> bool:
        """Whether another process waits at another barrier than `barrier`, one that not every
        process has reached (a process whose barrier is complete is only about to leave it)."""
        return any(waiting_at and waiting_at != barrier and not self.complete(waiting_at)
                   for _, waiting_at in self.client.key_value_dir_get(f"{self.name}/waiting/"))

    def failed(self) -> bool:
        return bool(self.client.key_value_dir_get(f"{self.name}/failed/"))

    def fail(self) -> None:
        """Mark the save failed: every process's barriers fail from now on."""
        self.client.key_value_set(f"{self.name}/failed/{self.process}", "", allow_overwrite=True)


def save_barrier() -> SaveBarrier | None:
    """A SaveBarrier for this job's checkpoint saves; None with one process (no barriers)."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # the coordination service's client: JAX has no public handle on it

    return SaveBarrier(distributed.global_state.client, jax.process_index(), jax.process_count())


def agree_on_stop(stop) -> bool:
    """Whether any process was sent a stop signal (see trainer.StopSignals); the processes that
    were not are marked as stopped by that signal too, so that all of them finish the same step,
    write the same checkpoint and exit alike (a pod's hosts get a preemption's SIGTERM at
    slightly different moments)."""
    if jax.process_count() == 1:
        return stop.raised
    signums = gather(np.array([stop.signum or 0], np.int32))
    if signums.max() and stop.signum is None:
        stop.signum = int(signums.max())
    return bool(signums.max())


def final_stop_signal(stop) -> int | None:
    """The signal that stops a run after its checkpoints are closed, agreed by every process (see
    `agree_on_stop`), or None to go on to the export. A signal that arrived after the loop's last
    agreement, while the last checkpoint was being written, counts; one during or after this call
    does not. Export gathers the weights from every process, so all of them must take the same
    branch."""
    if agree_on_stop(stop):
        return stop.signum
    if stop.raised:  # arrived while the others were agreeing to export
        log.warning("%s came as the processes agreed to export: exporting first (send it again to stop at once)",
                    signal.Signals(stop.signum).name)
    return None


def process_rows(x) -> np.ndarray:
    """This process's rows of a global array sharded over its first axis: the inverse of
    jax.make_array_from_process_local_data (its slices in order; replicas counted once)."""
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def devices_of(process: int) -> list:
    """The devices that `process` drives, in jax.devices() order."""
    return [d for d in jax.devices() if d.process_index == process]


def host_sampling_mesh(config: MeshConfig, devices, name: str = "mesh") -> Mesh:
    """The sampling mesh over one host's `devices` when several hosts each sample on their own."""
    try:
        return make_mesh(config, devices, name)
    except ConfigError as e:
        raise ConfigError(f"sampling.mesh (default: mesh): with several processes, each samples on its own "
                          f"devices: {e}; set sampling.mesh to fit one host") from None


def sampling_meshes(config: MeshConfig, name: str = "mesh") -> tuple[Mesh, Mesh]:
    """(this process's sampling mesh, every process's sampling mesh stacked into one global mesh
    with a leading `process` axis). One process samples on `config` over all devices; several
    processes each sample on `config` over their own devices only, so that rollouts need no
    traffic between hosts. Errors name the axes `name`.axis (the setting `config` came from)."""
    if jax.process_count() == 1:
        mesh = make_mesh(config, name=name)
        return mesh, mesh
    meshes = [host_sampling_mesh(config, devices_of(p), name) for p in range(jax.process_count())]
    stacked = Mesh(np.stack([m.devices for m in meshes]), ("process", *MESH_AXES),
                   axis_types=(AxisType.Auto,) * (1 + len(MESH_AXES)))
    return meshes[jax.process_index()], stacked


def sampler_weights(params, sampling_model, dtype: str, local_mesh: Mesh, stacked_mesh: Mesh):
    """A function from the trained params (global arrays) to this process's sampler weights: the
    params in `dtype`, laid out on `local_mesh` as its rules say, as process-local arrays.

    The cast runs where the params live (sharded like them), then one reshard lays the copy out on
    `stacked_mesh`, where the sampling specs never name the `process` axis: every host's devices
    receive the shards its local sampler wants and nothing else, and those device buffers become
    the local arrays without a copy. Memory per device: the sampler's own weights (what a one-host
    sampler on `local_mesh` holds; the whole model in `dtype` when that mesh shards nothing), plus,
    until the call returns, the cast copy laid out like the trained params (1/N of the model in
    `dtype` when they are sharded N ways, as with FSDP over the slice)."""
    local = nnx.to_pure_dict(state_shardings(nnx.state(sampling_model), local_mesh))
    stacked = jax.tree.map(lambda s: NamedSharding(stacked_mesh, s.spec), local)
    cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=jax.tree.map(lambda x: x.sharding, params))

    def to_local(x, sharding):
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [s.data for s in x.addressable_shards])

    def weights(params):
        return jax.tree.map(to_local, jax.device_put(cast(params), stacked), local)

    return weights
