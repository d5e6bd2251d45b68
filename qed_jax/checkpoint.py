"""qed-jax checkpoints: an Orbax CheckpointManager directory plus the model config and assets.

Layout of a checkpoint directory (local path or gs://):
    model_config.json      the ModelConfig the parameters belong to
    tokenizer.json, ...    tokenizer / generation files carried from the source model
    <step>/params          parameters (Orbax, sharded arrays)
    <step>/...             trainers add optimizer state, data iterator, RNG and step

`qed-jax convert` writes step 0 with params only; trainers write every N steps. Loading a
model picks the latest step, unless one is given (`qed-jax convert --step`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import re
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from flax import nnx

from qed_jax.config import ConfigError, ModelConfig
from qed_jax.errors import causes, out_of_device_memory, quoted, setting_path_error
from qed_jax.hf import CheckpointError, copy_assets, write_whole
from qed_jax.model import Qwen3
from qed_jax.multihost import SaveBarrier, SaveFailedElsewhere, largest, save_barrier, set_up_together
from qed_jax.sharding import DEFAULT_RULES, state_shardings

MODEL_CONFIG = "model_config.json"

log = logging.getLogger(__name__)


def is_checkpoint_dir(path) -> bool:
    return (epath.Path(path) / MODEL_CONFIG).exists()


def manager(directory, max_to_keep: int | None = None, barrier: SaveBarrier | None = None) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager for a qed-jax checkpoint folder; `barrier` (several processes)
    runs its saves' barriers (see multihost.SaveBarrier).

    With one process a save makes its step's folders before `save` returns (a few directories;
    the arrays are still written in the background), so that a folder it cannot make (a full
    disk) fails the save at once, with its reason. Orbax's default makes them in a thread of its
    own, which only logs that failure, and the save waits five minutes for the folder before it
    fails with a timeout that does not say why. Several processes keep that default, which ends
    in that timeout on every process (`write_failure` says what it means): made before `save`
    returns, the folders sit between two of Orbax's collective barriers that are not `barrier`,
    and a failure on process 0 left the other waiting at the second and process 0 waiting for it
    at JAX's shutdown, both still there after four minutes."""
    # A failed save's or restore's other tasks (its other folders and arrays) fail unawaited, and
    # asyncio reports each when it is collected, in Orbax's threads, maybe before our error is raised.
    logging.getLogger("asyncio").addFilter(_not_abandoned_orbax_task)  # once: filters are a set
    directory = epath.Path(directory)
    if "://" not in str(directory):
        directory = directory.absolute()  # Orbax wants absolute local paths
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            async_options=ocp.AsyncOptions(barrier_sync_fn=barrier,
                                           create_directories_asynchronously=jax.process_count() > 1)),
        item_handlers=handlers,
    )


def training_steps(directory) -> list[str]:
    """The steps of a folder that hold optimizer state, sorted: a trainer's checkpoints have
    some, a `qed-jax convert` output (parameters only) none."""
    directory = epath.Path(directory)
    return sorted(step.name for step in directory.iterdir() if step.is_dir() and (step / "opt_state").exists())


def write_model_config(directory, config: ModelConfig, assets_from=None) -> None:
    """Written by process 0 only; assets are copied from a local or remote folder."""
    directory = epath.Path(directory)
    if jax.process_index() != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_whole(directory / MODEL_CONFIG, json.dumps(dataclasses.asdict(config), indent=2).encode())
    copy_assets(assets_from, directory)


def read_model_config(directory) -> ModelConfig:
    path = epath.Path(directory) / MODEL_CONFIG
    if not path.exists():
        raise CheckpointError(f"{directory}: no {MODEL_CONFIG} (is this a qed-jax checkpoint directory?)")
    try:
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        return ModelConfig(**fields)
    except (ValueError, TypeError, ConfigError) as e:  # bad JSON, missing or unknown fields, bad values
        raise CheckpointError(f"{path}: not a model config ({e}); it is written with the checkpoint: restore it "
                              "from the run's copy, or convert the Hugging Face export again") from None


def params_state(model: Qwen3):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_model(model: Qwen3, directory, assets_from=None, step: int = 0) -> None:
    """A model alone (no optimizer) as a checkpoint directory, e.g. the output of `convert`."""
    write_model_config(directory, model.config, assets_from)
    mgr, failure = manager(directory), None
    try:
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params_state(model))))
        mgr.wait_until_finished()
    except Exception as e:
        failure = e
    finally:
        try:
            mgr.close()  # the step's last metadata writes
        except Exception as e:
            failure = failure or e  # after a failed save, more of the same failure: the first says why
    if failure is not None:
        raise CheckpointError(f"{directory}: writing step {step} failed ({write_failure(failure)}); fix that and "
                              "run the command again (with --overwrite)") from failure


def write_failure(error: Exception) -> str:
    """What went wrong writing a checkpoint, in a few words: Orbax reports a full disk as a
    TensorStore error whose first 200 characters are paths, the OS's error code at its end. With
    several processes only process 0 makes a step's folders, and the others (process 0 too)
    learn that it could not as a timeout of the key it would have set."""
    for cause in causes(error):
        if re.search(r"(timed out with key: |Timeout waiting for key ')\S*directory_creation", str(cause)):
            return ("the step's folders were not made within Orbax's wait for them; process 0 makes them, and its "
                    "log says why")
        code = re.search(r"\[os_error_code='(\d+)'\]", str(cause))
        code = int(code[1]) if code else getattr(cause, "errno", None)
        if isinstance(code, int) and code > 0:
            return os.strerror(code).lower()
    return unreadable_reason(error)


def restore_target(config: ModelConfig, mesh=None, rules=DEFAULT_RULES):
    """Pure dict of ShapeDtypeStruct (with shardings) for the params; nothing is allocated."""
    _, state = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    else:
        shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        nnx.to_pure_dict(state), shardings)


def load_model(directory, mesh=None, rules=DEFAULT_RULES, dtype: str | None = None,
               compute_dtype: str | None = None, step: int | None = None) -> Qwen3:
    """The parameters of the latest (or given) step, restored straight into their shards."""
    saved = read_model_config(directory)
    param_dtype = dtype or saved.param_dtype
    config = saved.replace(param_dtype=param_dtype, dtype=compute_dtype or param_dtype)
    with manager(directory) as mgr:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise CheckpointError(f"{directory}: holds a model config but no whole step (its first save was cut off); "
                                  "write the model there again")
        chosen = step is not None
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"{directory}: has no step {step}; its steps are {', '.join(map(str, steps))}")
        if (denied := no_read_access(epath.Path(directory) / str(step))) is not None:
            raise CheckpointError(f"{directory}: step {step} cannot be read by this user ({denied}: permission "
                                  "denied); give this user read access to it")
        target = restore_target(saved, mesh, rules)
        try:
            with without_closed_loop_noise():
                stored = mgr.item_metadata(step)
                misfit = "params" in stored.keys() and tree_misfit(stored["params"].tree, target, "params")
                if not misfit:
                    restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as e:  # a truncated or half-written step: name it, in one line
            others = [s for s in steps if s != step]
            if not others:
                advice = "it is the checkpoint's only step: write the model there again"
            elif chosen:
                advice = f"choose another of its steps ({', '.join(map(str, others))})"
            else:  # the latest
                advice = f"move that step's folder aside to load the one before it (step {others[-1]})"
            reason = unreadable_reason(e)
            raise CheckpointError(f"{directory}: step {step} is unreadable ({reason}); {advice}") from None
        if misfit:  # every step would fail alike
            raise CheckpointError(f"{directory}: step {step} does not fit its model config, {MODEL_CONFIG} ({misfit}); "
                                  "was that file edited, or copied from another model?")
    params = restored["params"]
    if np.dtype(param_dtype) != np.dtype(saved.param_dtype):
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _is_closed_loop_noise(line: str) -> bool:
    """A line of the 'Event loop is closed' tracebacks (see `without_closed_loop_noise`); they
    come from several threads at once, so they are recognized line by line."""
    text = line.strip()
    return text in ("Traceback (most recent call last):", "self._check_closed()",
                    "raise RuntimeError('Event loop is closed')", "RuntimeError: Event loop is closed") \
        or (text.startswith('File "') and "asyncio/base_events.py" in text)


def _not_abandoned_orbax_task(record: logging.LogRecord) -> bool:
    """A filter for the asyncio logger: False for its report of a TensorStore read or write
    failure that no one awaited (the other arrays of a failed restore or save), or of an Orbax
    task left waiting (on another process of a job, for the folder its failed save never made),
    which it logs whenever that task is garbage-collected, often after our one-line message."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += str(record.exc_info[1])
    return not (("exception was never retrieved" in text or "Task was destroyed but it is pending" in text) and
                any(word in text.lower() for word in ("tensorstore", "ocdbt", "orbax")))


@contextlib.contextmanager
def without_closed_loop_noise(quiet_s: float = 1.0, limit_s: float = 30.0):
    """Around an Orbax restore: when one array fails to read, Orbax closes its event loop while
    TensorStore still completes the other reads, and each completion prints a 'RuntimeError:
    Event loop is closed' traceback to stderr, during the restore and after it. Hold stderr
    meanwhile; after a failure, wait until it has been quiet for `quiet_s` (at most `limit_s`);
    then pass on everything but those tracebacks, so that the user sees our one-line message. The
    reads that failed unawaited are logged by asyncio, not printed: a filter drops those."""
    class Held(io.StringIO):
        last = time.monotonic()

        def write(self, text):
            Held.last = time.monotonic()
            return super().write(text)

    real, sys.stderr = sys.stderr, Held()
    try:
        yield
    except Exception:
        start = time.monotonic()
        while time.monotonic() - Held.last < quiet_s and time.monotonic() - start < limit_s:
            time.sleep(0.05)
        raise
    finally:
        held, sys.stderr = sys.stderr, real
        real.write("".join(line for line in held.getvalue().splitlines(keepends=True)
                           if not _is_closed_loop_noise(line)))


def interrupted(error: BaseException) -> bool:
    """Whether `error` is, or was raised from, a Ctrl-C or the read it cancelled (Orbax wraps
    any failure of an array read, those too, in an Exception). A timeout is none: asyncio
    raises it from the CancelledError of the read it gave up on."""
    for cause in causes(error):
        if isinstance(cause, TimeoutError):
            return False
        if isinstance(cause, (KeyboardInterrupt, asyncio.CancelledError)):
            return True
    return False


def may_pass(cause: BaseException) -> bool:
    """Whether a read failed for a reason that may pass (the network, permissions, a storage
    quota), not for what the checkpoint holds."""
    return isinstance(cause, (ConnectionError, TimeoutError, PermissionError)) or (
        isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError) and cause.filename is None) or any(
        word in str(cause) for word in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"))


def no_read_access(step_dir) -> str | None:
    """The first folder or file of a local checkpoint step that this process may not read, or
    None. Orbax reads such a step as one that holds nothing (a damaged step), so this is asked
    first: permissions are fixed, not a step set aside."""
    top = str(step_dir)
    if "://" in top or not os.path.exists(top):
        return None
    if not os.access(top, os.R_OK | os.X_OK):
        return top
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.access(path, os.R_OK | (os.X_OK if name in dirs else 0)):
                return path
    return None


def unreadable_reason(error: Exception) -> str:
    """The first line of what went wrong while reading a checkpoint."""
    text = str(error).strip().splitlines()
    first = quoted(text[0].split(" See full TensorStore details")[0], 300) if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def tree_misfit(stored, target, what: str) -> str | None:
    """How a checkpoint's array tree (Orbax metadata) differs from the arrays it would be
    restored into, in paths and shapes (dtypes may differ: restoring casts), or None. A path is
    compared as text, by its keys, attribute names and indices alike: Orbax stores a named
    tuple as a dict, a tuple as a list and every key as a string."""
    def arrays(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path):
                tuple(leaf.shape) for path, leaf in leaves}

    have, want = arrays(stored), arrays(target)
    for path in sorted(have.keys() ^ want.keys()):
        return f"{what} {path} {'only in the checkpoint' if path in have else 'not in the checkpoint'}"
    for path, shape in sorted(have.items()):
        if shape != want[path]:
            return f"{what} {path}: shape {shape} in the checkpoint, {want[path]} here"
    return None


def data_writers(step_dir) -> int | None:
    """How many processes wrote a checkpoint step's data-iterator state: Grain saves one file per
    process, `process_<i>-of-<n>.json`; None when the step has none."""
    for path in (epath.Path(step_dir) / "data").glob("process_*-of-*.json"):
        found = re.fullmatch(r"process_\d+-of-(\d+)\.json", path.name)
        if found:
            return int(found[1])
    return None


def remove_unfinished_saves(directory) -> None:
    """Delete the folders of saves that a kill cut short: on a local filesystem Orbax writes a
    step under `<step>.orbax-checkpoint-tmp…` and renames it once complete, so such a folder is
    never read back and only takes space (on gs:// it writes in place and marks a finished step
    with a commit file: nothing to delete here). Process 0 does it, before any process saves
    again. A trainer holds its run directory (`trainer.run_lock`), so no second job is saving
    there; two run directories given one `checkpoint_dir` are not guarded."""
    directory = epath.Path(directory)
    if jax.process_index() != 0 or not directory.exists():
        return
    for path in directory.glob("*.orbax-checkpoint-tmp*"):
        log.info("%s: removing an unfinished save", path)
        try:
            path.rmtree()
        except OSError as e:  # it names a file inside by its name alone
            raise setting_path_error("checkpoint_dir", OSError(e.errno, e.strerror, str(path))) from None


def check_folder(directory) -> None:
    """ConfigError when `directory`, or the nearest of its parents that exists, is not a folder,
    or when it cannot be looked at (a gs:// bucket with no network or credentials: the storage
    client's own error, after its retries). A local path or gs://; nothing is created."""
    path = epath.Path(directory)
    try:
        existing = next((p for p in [path, *path.parents] if p.exists()), None)
        is_file = existing is not None and not existing.is_dir()
    except Exception as e:
        if isinstance(e, OSError) and e.filename is not None:  # a local path's (permissions)
            raise setting_path_error("checkpoint_dir", e) from None
        # A storage client's: its network, credentials or bucket.
        raise ConfigError(f"checkpoint_dir {directory} could not be looked at ({type(e).__name__}: {quoted(e)}); "
                          "check its bucket name, and this machine's network and credentials (gcloud auth "
                          "application-default login), or choose a local checkpoint_dir") from None
    if is_file:
        where = "" if existing == path else f"{directory}: "
        raise ConfigError(f"checkpoint folder {where}{existing} is a file where a folder is needed; choose another "
                          "checkpoint_dir (or leave it out: output_dir/checkpoints)")


class TrainCheckpoints:
    """A trainer's checkpoints: params, optimizer state, data iterator, and a JSON `meta` (step,
    RNG, anything else the trainer needs to continue exactly). `run`, what the run is (its
    trainer, and the record of its data, `trainer.data_record`), goes into every meta, beside
    the data position it explains. `shared_data`: every process reads the whole data stream in
    the same order (GRPO), so a step written by one number of processes continues on another;
    otherwise (SFT) each process's place in its own share of the data holds it to that number."""

    def __init__(self, directory, config: ModelConfig, keep: int | None, *, run: dict, assets_from=None,
                 shared_data: bool = False):
        self.directory, self.run, self.shared_data = directory, run, shared_data
        self.model = (config, assets_from)  # model_config.json and assets: written with the first save
        remove_unfinished_saves(directory)
        self.barrier = save_barrier()
        try:
            self.manager = manager(directory, max_to_keep=keep, barrier=self.barrier)
        except OSError as e:
            if e.filename is None:  # the network's, not the path's
                raise
            raise setting_path_error("checkpoint_dir", e) from None
        self.writing: int | None = None  # the step whose save may still be under way (Orbax writes in the background)
        self.failed = False  # a save failed, and its error was raised

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def newest_meta(self) -> dict | None:
        """The newest step's meta, read as the file Orbax wrote it to; None when there is no step
        or it does not read. Best effort, and touching nothing: what a refusal of the run can
        also say of its checkpoints (restore_latest is what checks and restores them)."""
        step = self.manager.latest_step()
        if step is None:
            return None
        try:
            meta = json.loads((epath.Path(self.directory) / str(step) / "meta" / "metadata").read_text())
        except Exception:  # noqa: BLE001 (a damaged or missing file, a bucket out of reach: nothing to add)
            return None
        return meta if isinstance(meta, dict) else None

    def save(self, step: int, params, opt_state, data_iterator, meta: dict) -> None:
        self.failed = False  # a failure raised before is not this save's
        if self.manager.latest_step() == step:
            return  # already saved (e.g. a regular save just before a preemption save)
        meta = {**meta, **self.run}
        with self.failed_write():  # the save before this one, if still under way: its failure is its own
            self.manager.wait_until_finished()
        self.writing = step  # from here a failure is this step's: part of a save is written before it returns
        with self.failed_write():
            if self.model is not None:  # not before: a refused resume leaves the directory as it found it
                write_model_config(self.directory, *self.model)
                self.model = None
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                data=grain.checkpoint.CheckpointSave(data_iterator), meta=ocp.args.JsonSave(meta),
            ), force=True)

    @contextlib.contextmanager
    def failed_write(self):
        """A save that failed (a full disk, no permission, the network), as one line naming the
        step: Orbax raises it from its background thread, with pages of tracebacks. The steps
        saved before it are whole, and a rerun resumes from the newest (the unfinished one is
        removed, `remove_unfinished_saves`). With several processes, the others' saves fail too
        (they would wait for this one's at their next barrier), and one whose save failed only
        because this one's did says so."""
        try:
            yield
        except Exception as e:
            self.failed = True
            if self.barrier is not None:
                with contextlib.suppress(Exception):  # no coordination service left (process 0 gone): none to tell
                    self.barrier.fail()
            self.writing, step = None, self.writing
            which = f"checkpoint step {step}" if step is not None else "a checkpoint"
            own = next((cause for cause in causes(e) if not isinstance(cause, SaveFailedElsewhere)), None)
            reason = str(e) if own is None else write_failure(own)
            full = reason in (os.strerror(errno.ENOSPC).lower(), os.strerror(errno.EDQUOT).lower())
            fix = "free some space" if full else "fix that"
            if [s for s in self.manager.all_steps() if s != step]:
                then = (f"the steps saved before it are kept: {fix} and rerun the same command to resume from the "
                        "newest of them")
            else:
                then = f"no step was saved before it: {fix} and rerun the same command to start the run again"
            raise CheckpointError(f"{self.directory}: writing {which} failed ({reason}); {then}") from e

    def restore(self, step: int, params_target, opt_target, data_iterator):
        """(params, opt_state, meta); the data iterator (None: a finished run's, which reads no
        more data) is moved to where it was."""
        writers = data_writers(epath.Path(self.directory) / str(step))
        elsewhere = writers not in (None, jax.process_count())  # written by another number of processes
        items = dict(params=ocp.args.StandardRestore(params_target), opt_state=ocp.args.StandardRestore(opt_target),
                     meta=ocp.args.JsonRestore())
        if data_iterator is not None and not elsewhere:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None and elsewhere:  # shared (restore_latest checked): process 0's place is all's
            state = epath.Path(self.directory) / str(step) / "data" / f"process_0-of-{writers}.json"
            data_iterator.set_state(json.loads(state.read_text()))
        return restored["params"], restored["opt_state"], restored["meta"]

    def restore_latest(self, params_target, opt_target, data_iterator, check=None, last_step: int | None = None):
        """Restore the newest step that reads back whole, or None when there is no step. A step
        at the run's `last_step` has no data left to read: its data position is not restored,
        so another number of processes may finish the run (export it again).

        A step that cannot be read (a crash mid-write, a damaged file, an item gone) is renamed
        `<step>.unreadable-<time>`, never deleted, with a warning, and the step before it is
        tried; with no step left, or only such steps, this raises rather than let the run start
        over. A step that reads but cannot continue this run raises and is left as it is: one of
        `qed-jax convert` (parameters only), one whose arrays have other names or shapes than
        the targets (another model or optimizer), or one whose meta `check` (the trainer's)
        refuses. An error that may pass (the network, permissions) or too little device memory
        raises too, moving nothing.
        All processes act on the worst of what each found."""
        directory = epath.Path(self.directory)
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            error = None
            try:
                if (denied := no_read_access(directory / str(step))) is not None:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
                with without_closed_loop_noise():
                    stored = self.manager.item_metadata(step)
                    items = set(stored.keys())
                    if items == {"params"}:
                        raise CheckpointError(
                            f"{directory}: step {step} holds params only (a `qed-jax convert` output?), not a "
                            "trainer's checkpoint: to train from it, set model.path to "
                            f"{directory} and give checkpoint_dir (or output_dir) another folder")
                    if not {"params", "opt_state", "meta"} <= items:  # one deleted or never written: damaged
                        raise ValueError(f"it has no {', '.join(sorted({'params', 'opt_state', 'meta'} - items))}")
                    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                    finished = last_step is not None and meta["step"] >= last_step
                    writers = data_writers(directory / str(step))
                    if writers not in (None, jax.process_count()) and not self.shared_data and not finished:
                        processes = f"{writers} process{'es' if writers != 1 else ''}"
                        raise CheckpointError(
                            f"{directory}: checkpoint step {step} was written by {processes} and this job has "
                            f"{jax.process_count()}: each process's place in the data is saved apart, so the run "
                            f"continues only with {processes} (a slice of the same size); or give this run "
                            "another output_dir or checkpoint_dir")
                    misfit = tree_misfit(stored["params"].tree, params_target, "params") or \
                        tree_misfit(stored["opt_state"].tree, opt_target, "optimizer state")
            except CheckpointError:
                raise
            except Exception as e:
                error = e
            if self._agreed_failure(step, error):
                continue
            if check is not None:  # it may read this host's files: all processes refuse if one does
                with set_up_together(f"the check of {directory} step {step}"):
                    check(meta)
            if misfit:
                raise CheckpointError(f"{directory}: checkpoint step {step} does not fit this run ({misfit}): it was "
                                      "written for another model or optimizer; undo the change, or give this run "
                                      "another output_dir or checkpoint_dir (the checkpoints are left as they are)")
            error = restored = None
            try:
                with without_closed_loop_noise():
                    restored = self.restore(step, params_target, opt_target, None if finished else data_iterator)
            except Exception as e:
                error = e
            if not self._agreed_failure(step, error):
                return restored
        aside = sorted(p.name for p in directory.glob("*.unreadable-*")) if directory.exists() else []
        if aside:
            raise CheckpointError(f"{directory}: no checkpoint step reads back (set aside: {', '.join(aside)}); this "
                                  f"run would start over from step 0: to do that, move those out of {directory}, or "
                                  "give this run another output_dir or checkpoint_dir. If a step was set aside for a cause "
                                  "that has passed (a missing mount, say), rename its newest copy back to its step number "
                                  "(N.unreadable-TIME to N) and rerun")
        return None

    def _agreed_failure(self, step: int, error: Exception | None) -> bool:
        """Whether step `step` failed to read on any process (`error`: this process's), having
        set it aside if so. An error that may pass, or too little device memory, raises instead,
        on every process; Ctrl-C while the step was read (which Orbax re-raises as a plain
        Exception) is no damage."""
        if error is not None and interrupted(error):
            raise KeyboardInterrupt
        out_of_memory = out_of_device_memory(error)
        transient = any(may_pass(cause) for cause in causes(error))  # raised as it is, or wrapped by Orbax's read
        state = largest(2 if transient else 1 if error is not None else 0)
        if state == 2 and out_of_memory:
            raise CheckpointError(f"{self.directory}: reading checkpoint step {step} ran out of device memory "
                                  f"({unreadable_reason(error)}); nothing was moved: resume on more devices, or shard "
                                  "the run further (mesh.fsdp)")
        if state == 2:
            fix = "give this user read access to it, then " if any(
                isinstance(cause, PermissionError) for cause in causes(error)) else ""
            raise CheckpointError(f"{self.directory}: reading checkpoint step {step} failed in a way that may pass "
                                  f"({unreadable_reason(error) if transient else 'on another process'}); nothing was "
                                  f"moved: {fix}rerun the same command")
        if state == 1:
            self._set_aside(step, error)
        return state == 1

    def _set_aside(self, step: int, error: Exception | None) -> None:
        aside = epath.Path(self.directory) / f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        reason = unreadable_reason(error) if error is not None else "another process could not read it"
        failed = None  # why process 0 could not rename it (a folder this user may not write)
        if jax.process_index() == 0:
            try:
                (epath.Path(self.directory) / str(step)).rename(aside)
            except OSError as e:
                failed = e.strerror or str(e)
        if largest(int(failed is not None)):
            raise CheckpointError(f"{self.directory}: checkpoint step {step} is unreadable ({reason}) and could not be "
                                  f"moved aside (to {aside.name}: {failed or 'on process 0, whose log says why'}); "
                                  f"give this user write access to {self.directory}, or move that step's folder out "
                                  "of it, and rerun")
        log.warning("%s: checkpoint step %d is unreadable (%s); moved it to %s and trying the step before it",
                    self.directory, step, reason, aside.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"qed_jax unreadable checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        """Until the save under way is written; its failure is raised here (`failed_write`)."""
        if self.writing is not None:
            with self.failed_write():
                self.manager.wait_until_finished()
            self.writing = None

    def close(self) -> None:
        """Wait for the save under way, then close the manager. After a failed save what the
        closing finds is more of the same failure (Orbax's background writes of that step's
        metadata on the same full disk): dropped, so that the error that names the step stays
        the one that stops the run."""
        try:
            if self.writing is not None:  # none after a failure, already raised
                with self.failed_write():
                    self.manager.wait_until_finished()
        finally:
            self.writing = None
            with contextlib.suppress(Exception) if self.failed else self.failed_write():
                self.manager.close()
