"""The host process's memory when JAX runs on the CPU backend.

XLA:CPU gives every run of a compiled program one temporary buffer (1.7 GiB for the SFT step of
`bench/train_step.py`) and frees it when the run ends. glibc's malloc serves a block that large
with its own `mmap` and hands it back with `munmap`, so on every step the kernel maps and zeroes
all of its pages again: ~445,000 page faults per step of that benchmark, 15-18 % of its time on
one machine (bench/README, "Page faults"). `keep_freed_memory` has malloc keep what a step
frees for the next step instead. `qed-jax sft` calls it before anything starts JAX's backend
(`sft.train` called from Python does not: a setting for the whole process is the program's to
make).

The programs that decode (`grpo`, `eval`, `generate`) do not: it makes the main thread run each
compiled program to its end, and Ctrl-C cannot act while it does (`sampling.fetch`), which for a
decode loop at the recipe's lengths means minutes. An SFT step is seconds, and the trainer stops
between steps anyway.
"""

from __future__ import annotations

import ctypes
import logging
import platform

import jax

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h), and the values that keep freed memory (mallopt(3)):
M_TRIM_THRESHOLD, NEVER_TRIM = -1, -1  # never hand the top of the heap back to the kernel
M_MMAP_MAX, NO_MMAP = -4, 0  # serve every block from the heap, however large


def keep_freed_memory() -> bool:
    """On the CPU backend, with glibc: run compiled programs on the calling thread (synchronous
    dispatch) and have malloc serve large blocks from its heap and never trim it, so that the
    memory one step frees is what the next step gets, its pages already mapped. Returns whether
    malloc was set so.

    Both parts are needed. A worker thread's malloc (JAX runs CPU programs on worker threads by
    default) maps any block larger than its 64 MiB arena apart, whatever mallopt says; the
    calling thread allocates from the main heap, which grows to any size. So call this before
    anything starts JAX's backend (`jax.devices()`, `jax.process_index()`, a computation), after
    `jax.distributed.initialize`: once the backend runs, its dispatch is fixed, and the programs'
    buffers are mapped apart as before. JAX runs a program over several CPU devices on worker
    threads whatever the setting, so only single-device programs gain.

    What it costs: Ctrl-C acts only between compiled programs (see the module's docstring), and
    the process keeps its peak heap until it exits. A loop of the same steps reaches that peak on
    every step; a one-off peak before the loop (loading a checkpoint) stays mapped too. Nothing
    changes on other backends (their buffers are not malloc's) or with another C library."""
    if platform.libc_ver()[0] != "glibc":
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # read when the CPU backend starts
    if jax.default_backend() != "cpu":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    kept = mallopt(M_MMAP_MAX, NO_MMAP) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    log.debug("malloc keeps freed memory for the next step: %s", kept)
    return kept
