"""The run directory's lock, one job per directory, and the record of the working directory its
relative paths were read in, without JAX: the trainers (whose processes agree on the lock, see
trainer.run_lock) and eval (one process, which may not use JAX at all) share them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Callable

from qed_jax.config import write_text_atomic
from qed_jax.errors import ConfigError, setting_path_error

log = logging.getLogger(__name__)

WORKING_DIR_FILE = "working_dir.txt"  # beside a run's config.json: where its relative paths were read


def record_working_dir(out: Path) -> None:
    """Write down where this run reads its config's relative paths, so that a rerun from another
    directory, or a report, reads them as they were (`config.recorded_path`)."""
    where = out / WORKING_DIR_FILE
    if not where.is_file() or where.read_text() != os.getcwd() + "\n":
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(where, os.getcwd() + "\n")


def refuse_a_pipelines_folder(out: Path) -> None:
    """ConfigError for an output_dir that is a pipeline's own folder (it holds the pipeline's
    base/hf export): a run written beside its stages' folders would pass for the pipeline's
    report, and each stage's run is a folder inside it."""
    if (out / "base" / "hf").is_dir():
        raise ConfigError(f"{out} is a pipeline's folder (it holds base/hf): its stages' runs are folders inside it "
                          "(sft/, grpo/, eval/...); use another output_dir")


def recorded_working_dir(out: Path) -> str | None:
    """The working directory `record_working_dir` wrote down for the run in `out`; None for a run
    begun before it was recorded."""
    where = out / WORKING_DIR_FILE
    return where.read_text().strip() if where.is_file() else None


def is_trainer_config(config) -> bool:
    """Whether a run directory's config.json (read as `config`) is a trainer's: SFT and GRPO
    configs have `optim`, an evaluation's or a pipeline's none."""
    return isinstance(config, dict) and "optim" in config


def trainer_run(folder: Path) -> bool:
    """Whether `folder` is a qed-jax trainer's run directory."""
    try:
        return is_trainer_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):  # none, or unreadable
        return False


@contextlib.contextmanager
def run_lock(out: Path, first: bool = True, agree: Callable[[int], int] | None = None):
    """Hold the run directory `out` for one job. A second job started on it would delete this
    one's checkpoint save in progress (see checkpoint.remove_unfinished_saves), or draw and grade
    samples twice, and write the same records, so it fails at once, naming the holder. The
    `first` process holds an flock on `out`/.lock, which the OS releases when the process ends,
    even on kill -9; with several processes, `agree` gives every one the worst of what the first
    found (0 held, 1 in use, 2 cannot open), so that all of them fail alike. A run that stops
    before writing anything (a config error found after the lock was taken, a judge found
    unreachable once the checkpoint manager had made its empty folder) leaves the folder as it
    found it: no lock file, and no folder it created."""
    held, refused, failed = None, None, None  # the lock, who holds it, or why it could not be opened
    created = [d for d in [out, *out.parents] if not d.exists()]  # folders this run would create
    found = set()  # what `out` held before (left as it is)
    if first:
        try:
            out.mkdir(parents=True, exist_ok=True)
            try:
                found = {p.name for p in out.iterdir()} - {".lock"}
            except OSError:  # a folder it may not list (write-only): taken as holding something
                found = {"?"}
            held, refused = open_locked(out / ".lock")
        except OSError as e:  # e.g. output_dir is a file, or not writable: a ConfigError below (the others: theirs)
            failed = e
    state = 2 if failed else 1 if refused else 0  # what the first process found
    if agree is not None:
        state = agree(state)
    if failed:
        raise setting_path_error("output_dir", failed) from failed
    if state == 2:
        raise ConfigError(f"process 0 could not open {out}/.lock (its error says why)")
    if state == 1:
        raise ConfigError(f"{out} is in use by another run ({refused or 'process 0 found it locked'}); wait for it to "
                          "end, or give this run another output_dir")
    try:
        yield
    finally:
        if held is not None:
            if not found and began_nothing(out):  # a run that failed before it began, in a folder it found empty
                for folder in [p for p in out.iterdir() if p.name != ".lock"]:
                    with contextlib.suppress(OSError):  # written in the meantime: left
                        folder.rmdir()
                (out / ".lock").unlink()
                for folder in created:  # innermost first; each is empty unless another job wrote there
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            held.close()  # releases the flock


LOCK_TRIES = 10  # locks taken on a lock file just removed, before giving up on locking


def open_locked(path: Path):
    """(the lock file `path`, open and flocked by this process, None), or (None, what its holder
    wrote in it) when another process holds it, or (None, None) on a filesystem without locks.
    A run that ends having begun nothing removes its lock file (`run_lock`): a lock taken on the
    file it removed would guard nothing, so it is taken again on the file now at `path`."""
    for _ in range(LOCK_TRIES):
        path.parent.mkdir(parents=True, exist_ok=True)  # the holder removes the folder too if it made it
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "its pid unknown"
            lock.close()
            return None, holder
        except OSError as e:  # a filesystem without locks (some network mounts): run unguarded
            log.warning("%s: cannot lock the run directory (%s); nothing stops a second job on it", path.parent, e)
            lock.close()
            return None, None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(lock.fileno()).st_ino:
            lock.close()
            continue
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        return lock, None
    # A filesystem whose file ids do not stay put (some network and FUSE mounts): as one without locks.
    log.warning("%s: cannot lock the run directory (its lock file changed under every lock taken); nothing stops a "
                "second job on it", path.parent)
    return None, None


def began_nothing(out: Path) -> bool:
    """Whether the run directory `out` holds nothing but its lock and empty folders (the
    checkpoint manager's, made in the setup); one that cannot be read holds something."""
    try:
        return all(p.name == ".lock" or (p.is_dir() and not p.is_symlink() and not any(p.iterdir()))
                   for p in out.iterdir())
    except OSError:
        return False
