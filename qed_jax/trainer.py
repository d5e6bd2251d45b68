"""What both trainers (SFT and GRPO) share: the model and optimizer from config, batches on the
mesh, the run directory (config record, resume, metrics log), stop signals and the final export.

`sft.py` and `grpo.py` are two recipes built from these parts; reasoning-cache and evaluation
code can use them without importing a trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qed_jax import checkpoint, rundir
from qed_jax.config import (ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES, ConfigError, check_choice, check_dtype,
                            dump_json, expand_paths, is_missing_local_path, json_values, not_found, preset,
                            read_json_object, recorded_path, require_range, run_moved, same_as_recorded,
                            write_text_atomic)
from qed_jax.data import DATA_ORDER
from qed_jax.errors import RunConfigChanged, TrainingDiverged
from qed_jax.model import Qwen3
from qed_jax.multihost import gather, largest
from qed_jax.sharding import DEFAULT_RULES, create_sharded

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    path: str | None = None  # Hugging Face folder, Hub id or qed-jax checkpoint
    preset: str | None = None  # random init of this preset when there is no path (e.g. tiny)
    param_dtype: str | None = None  # default: the checkpoint's (or the preset's)
    dtype: str | None = None  # compute dtype; default: param_dtype
    remat: str = "none"  # none | full | dots | offload (see ModelConfig.remat)
    attention: str = "auto"  # auto | xla | splash | blockwise (see qed_jax/attention.py)

    def __post_init__(self):
        if self.path is not None and self.preset is not None:
            raise ConfigError(f"model: both path ({self.path}) and preset ({self.preset}) are set; keep one "
                              "(model.preset=null on the command line drops a config file's preset)")
        if self.preset is not None:
            preset(self.preset)  # an unknown name fails here, listing the known ones
        check_dtype(self.param_dtype, "model.param_dtype")
        check_dtype(self.dtype, "model.dtype")
        # Here, before any data is read, not only when the model is built.
        check_choice(self.remat, REMAT_POLICIES, "model.remat")
        check_choice(self.attention, ATTENTION_IMPLEMENTATIONS, "model.attention")

    def check_given(self) -> None:
        """ConfigError unless there is a model to train: a path, or a preset to draw."""
        if not self.path and not self.preset:
            raise ConfigError("model: set model.path (a checkpoint to load) or model.preset (a random init)")

    def describe(self) -> str:
        """What will be loaded, for --print-config and logs."""
        if self.path:
            return f"load {self.path}"
        if self.preset:
            return f"random init of preset {self.preset}"
        return "nothing: set model.path (a checkpoint) or model.preset (a random init)"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-5
    schedule: str = "cosine"  # cosine | constant
    warmup_ratio: float = 0.05  # of all optimizer updates
    final_lr_ratio: float = 0.0  # where the cosine ends, as a fraction of lr
    weight_decay: float = 0.0  # applied to matrices only: never to norms (see decay_mask)
    grad_clip: float = 1.0  # global-norm clip; 0 switches it off
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule must be cosine or constant, got {self.schedule!r}")
        require_range(self.lr, "optim.lr", 0, low_open=True)
        require_range(self.lr, "optim.lr", high=float(np.finfo(np.float32).max))  # a float32 on the device
        for name in ("warmup_ratio", "final_lr_ratio"):
            require_range(getattr(self, name), f"optim.{name}", 0, 1)
        for name in ("weight_decay", "grad_clip"):
            require_range(getattr(self, name), f"optim.{name}", 0)
        # AdamW divides by sqrt(v) + eps: with eps 0, a parameter whose gradient is exactly 0 (an
        # embedding row no batch has used) updates by 0/0.
        require_range(self.eps, "optim.eps", 0, low_open=True)
        for name in ("b1", "b2"):
            require_range(getattr(self, name), f"optim.{name}", 0, 1, high_open=True)


# --------------------------------------------------------------------------------------------
# Model and optimizer


def open_model(spec: ModelSpec, seed: int):
    """The model to train, checked on this host without touching a device (model.path's files,
    see `pretrained.open_pretrained`; or the preset's name), for the trainers' setup block, where
    one host's missing or damaged copy stops every host. Returns load(mesh) → the model."""
    spec.check_given()
    if spec.path:
        from qed_jax.pretrained import open_pretrained

        if is_missing_local_path(spec.path):
            raise not_found("model.path", spec.path)
        load_pretrained = open_pretrained(spec.path)
    else:
        base = preset(spec.preset)
        param_dtype = spec.param_dtype or base.param_dtype
        config = base.replace(param_dtype=param_dtype, dtype=spec.dtype or param_dtype)

    def load(mesh) -> Qwen3:
        if spec.path:
            model = load_pretrained(mesh, dtype=spec.param_dtype, compute_dtype=spec.dtype)
        else:
            model = create_sharded(lambda: Qwen3(config, rngs=nnx.Rngs(seed)), mesh)
        model.config = model.config.replace(remat=spec.remat, attention=spec.attention)
        return model

    return load


def resolve_tokenizer(tokenizer: str | None, spec: ModelSpec) -> str:
    """The tokenizer's folder: `tokenizer` if set, else the model's own (Hub ids downloaded)."""
    from qed_jax.pretrained import resolve

    if tokenizer is None and spec.path is None:
        raise ConfigError("no tokenizer: set tokenizer (or model.path, whose tokenizer is used)")
    if tokenizer is None and is_missing_local_path(spec.path):
        raise not_found("model.path", spec.path)
    return resolve(tokenizer or spec.path)


def decay_mask(model: Qwen3) -> dict:
    """Which parameters take weight decay, decided by their logical axes: norm scales (a `norm`
    axis, or a lone `head_dim` axis as in QK-norm) do not, whatever their stacked rank."""
    def decays(var) -> bool:
        axes = tuple(a for a in var.get_metadata().get("axes", ()) if a != "layers")
        return "norm" not in axes and axes != ("head_dim",)

    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(jax.tree.map(decays, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def lr_schedule(config: OptimConfig, updates: int) -> optax.Schedule:
    """The learning rate per optimizer update (not per trainer step)."""
    warmup = int(round(config.warmup_ratio * updates))
    if config.schedule == "constant":
        if not warmup:
            return optax.constant_schedule(config.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup),
                                     optax.constant_schedule(config.lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(updates, warmup + 1),
                                              end_value=config.lr * config.final_lr_ratio)


def make_optimizer(config: OptimConfig, updates: int, mask: dict) -> optax.GradientTransformation:
    """AdamW (decay where `mask` says, see `decay_mask`) after a global-norm clip, with the
    schedule sized in optimizer updates."""
    adamw = optax.adamw(lr_schedule(config, updates), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw) if config.grad_clip else adamw


def advance_schedule(opt_state, updates: int = 1):
    """`opt_state` with its learning-rate schedule moved on past `updates` optimizer updates that
    were skipped (none of their samples trained): the schedule is sized in the run's updates, so
    a skipped one still takes its place in it, or a cosine would never decay to its end. Adam's
    own count, which its bias correction reads, stays at the updates its moments saw."""
    def advance(node):
        return node._replace(count=node.count + updates) if isinstance(node, optax.ScaleByScheduleState) else node

    return jax.tree.map(advance, opt_state, is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState))


def float32_init(optimizer):
    """`optimizer.init` with its moments in float32 whatever the parameters' dtype. Gradients are
    summed in float32 and Adam keeps its moments in the gradients' dtype, so moments made in
    bfloat16 would turn float32 at the first update: a second compile of the step, and a resume
    that restores the saved float32 moments into bfloat16 ones."""
    return lambda params: optimizer.init(jax.tree.map(lambda p: p.astype(jnp.float32), params))


def opt_state_shardings(optimizer, params, mesh):
    """The optimizer state's shardings: each moment as its parameter, the rest (step counters)
    replicated. The compiler is told so: moments are zeros, which depend on no parameter's
    layout, and left to it they came out whole on every device."""
    replicated = NamedSharding(mesh, PartitionSpec())
    state, param_shardings = jax.eval_shape(float32_init(optimizer), params), jax.tree.map(lambda p: p.sharding, params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, state, param_shardings,
                                 transform_non_params=lambda _: replicated)


def init_opt_state(optimizer, params, mesh):
    """Optimizer state on the mesh (moments in float32: `float32_init`), laid out as
    `opt_state_shardings` says."""
    return jax.jit(float32_init(optimizer), out_shardings=opt_state_shardings(optimizer, params, mesh))(params)


# --------------------------------------------------------------------------------------------
# Batches on the mesh


def batch_sharding(mesh) -> NamedSharding:
    """[microbatch, row, time]: rows over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(None, DEFAULT_RULES["batch"], None))


def data_parallel_size(mesh) -> int:
    """How many ways the rows of a batch are split (the mesh axes the `batch` rule names)."""
    return int(np.prod([mesh.shape[a] for a in DEFAULT_RULES["batch"]]))


def check_rows_divide(rows: int, mesh, what: str, processes: int | None = None) -> None:
    """Rows of a micro-batch must split evenly over the data-parallel devices: never replicate
    (every device would compute the whole micro-batch) and never fail mid-run. `processes`: the
    hosts that will feed the rows (default this job's; a plan's slice has its own)."""
    ways, processes = data_parallel_size(mesh), processes or jax.process_count()
    # With it, mesh.tensor divides each host's devices, and `make_mesh` keeps the devices that
    # hold the same rows on one host.
    if ways % processes:  # a process whose devices hold no rows of their own has nothing to feed
        raise ConfigError(f"the {ways} data-parallel devices (mesh data x fsdp) do not split over the {processes} "
                          f"processes, which each feed their own rows: make mesh.data x mesh.fsdp a multiple of "
                          f"{processes} (an axis set to -1 takes the devices the others leave); for that, mesh.tensor "
                          f"must divide each host's {mesh.devices.size // processes} devices")
    if rows % ways:
        raise ConfigError(f"{what} gives {rows} rows per micro-batch, which do not split over the "
                          f"{ways} data-parallel devices (mesh data x fsdp); make it a multiple of {ways}, "
                          "or change mesh.data / mesh.fsdp")


def to_global(batch: dict, micro_batches: int, sharding) -> dict:
    """Process-local rows → a global array [M, rows, ...] sharded over the mesh."""
    def one(x):
        local = x.reshape(micro_batches, -1, *x.shape[1:])
        shape = (micro_batches, local.shape[1] * jax.process_count(), *local.shape[2:])
        return jax.make_array_from_process_local_data(sharding, local, shape)

    return {k: one(np.asarray(v)) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# The run directory: config record, resume, metrics


# Where a run's things are, not what it computes: a run directory may be moved or copied and go
# on where it is now, a judge served elsewhere (or more patiently) grades the same, and the
# export's dtype is what is written at the end, not what is trained (a finished run exports again).
# How many failed grades a GRPO step tolerates decides only whether the run stops, never what a
# step that ran trained: raising it is the remedy its failures-stop suggests.
NOT_RUN_IDENTITY = {"output_dir", "judge.base_url", "judge.api_key_env", "judge.concurrency", "judge.timeout_s",
                    "judge.max_retries", "judge.parse_retries", "judge.backoff_s", "judge.cache_path",
                    "judge.max_failed_fraction", "export_dtype"}
# But a job's processes must agree on these: each decides alone, on every process's counts, whether
# a step stops, and every process takes part in the export's gather of the weights (one that went
# on alone, or exported otherwise, would wait for the others forever).
DECIDED_ON_EVERY_PROCESS = {"judge.max_failed_fraction", "export_dtype"}


def config_changes(saved: dict, new: dict, prefix: str = "", ignored=NOT_RUN_IDENTITY,
                   recorded_in: str | None = None, moved: tuple[str, str] | None = None) -> list[str]:
    """`key: old -> new` for every leaf that differs between two config dicts, but those in
    `ignored`. A path spelt otherwise is the same (`same_setting`); a relative one recorded in
    the working directory `recorded_in` is also the file it named there (a rerun from another
    directory that spells it otherwise). `checkpoint_dir`, the run's own state, must be the
    folder it named there: the same spelling from another directory names another folder, where
    the run would start over. When the run directory `moved` (`run_moved`), a path that was in
    what moved with it is also where it stands now."""
    changes = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if f"{prefix}{key}" in ignored:
            continue
        then = recorded_path(key, a, recorded_in)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.", ignored, recorded_in, moved)
        elif not same_as_recorded(key, a, b, recorded_in, as_spelt=key != "checkpoint_dir", moved=moved):
            changes.append(f"{prefix}{key}: {json.dumps(then)} -> {json.dumps(b)}")
    return changes


def run_lock(out: Path):
    """`rundir.run_lock` for a trainer's processes: process 0 holds the lock and every process
    learns what it found, so that all of them go on or fail alike."""
    return rundir.run_lock(out, first=jax.process_index() == 0, agree=largest)


def check_run_config(out: Path, config, resume_with_changes: bool, ignored=NOT_RUN_IDENTITY,
                     refuse: bool = True, kind_only: bool = False) -> list[str]:
    """A rerun into an existing run directory must use the config it was started with (but the
    keys `ignored`), unless the user says otherwise. Returns the changes (process 0's; empty on
    the others), which `record_run_config` writes down once the run has resumed. Process 0
    decides (on a pod only its host holds `out`), and every process acts on that. With `refuse`
    false the caller refuses them (`refuse_changes`), after adding what else changed. With
    `kind_only`, only refuses a directory that holds no run of this trainer (`read_run_config`),
    as a trainer does first, before it makes anything there."""
    path = out / "config.json"
    changes, refusal = [], None
    if jax.process_index() == 0:
        try:
            rundir.refuse_a_pipelines_folder(out)
            if path.exists():
                new = json_values(config)
                saved = read_run_config(path, out, new)
                if not kind_only:
                    recorded_in = rundir.recorded_working_dir(out) or saved.get("working_dir")
                    saved.pop("working_dir", None)  # where 2f52b90 recorded it, in config.json
                    moved = run_moved(saved.get("output_dir"), out, recorded_in)
                    changes = config_changes(expand_paths(saved), new, ignored=ignored, recorded_in=recorded_in,
                                             moved=moved)
        except Exception as e:  # whatever it is, the other processes must hear of it, or they wait forever
            refusal = e
    if largest(int(refusal is not None)):
        raise refusal or ConfigError(f"{out}: process 0 cannot continue this run directory (its log says why)")
    if refuse:
        refuse_changes(out, changes, resume_with_changes)
    if changes and resume_with_changes:
        log.warning("resuming %s with a changed config: %s", out, "; ".join(changes))
    return changes


def refuse_changes(out: Path, changes: list[str], resume_with_changes: bool) -> None:
    """Every process refuses a run whose config changed (as process 0 found) without
    --resume-with-changes."""
    if largest(int(bool(changes) and not resume_with_changes)):
        raise RunConfigChanged(out, changes or ["process 0 lists the changes"])


def read_run_config(path: Path, out: Path, new: dict) -> dict:
    """The config.json a run directory was started with, if it is a run this config may continue."""
    saved = read_json_object(path, "the run's config is damaged: move the folder aside, or use another output_dir")
    if not rundir.is_trainer_config(saved):  # another command's run (an evaluation's): never continue it
        raise ConfigError(f"{out} holds another command's run or a model ({path} is not a trainer's config: an "
                          "evaluation's, a pipeline's or a model's, such as a trainer's hf/ export); "
                          "use another output_dir")
    trainer = lambda config: "grpo" if "prompts_per_step" in config else "sft"  # noqa: E731
    if trainer(saved) != trainer(new):  # not a list of most keys, with advice the checkpoints refuse
        raise ConfigError(f"{out} holds a qed-jax {trainer(saved)} run, and this is qed-jax {trainer(new)}: give this "
                          "run its own output_dir (to start from that run's model, set model.path to its hf/ folder)")
    return saved


def record_run_config(out: Path, config, changed: bool) -> None:
    """Write the config a run goes on with: on a fresh start, after a change the user allowed
    (the old config kept as config.N.json), or in place after a move (NOT_RUN_IDENTITY: a judge
    served elsewhere). Process 0 writes."""
    path = out / "config.json"
    if jax.process_index() != 0:
        return
    rundir.record_working_dir(out)  # a rerun from another directory reads its relative paths as they were
    text = dump_json(config)
    if path.exists() and not changed:
        if path.read_text() != text:
            write_text_atomic(path, text)
        return
    out.mkdir(parents=True, exist_ok=True)
    if path.exists():
        n = 1
        while (out / f"config.{n}.json").exists():
            n += 1
        path.rename(out / f"config.{n}.json")
    write_text_atomic(path, text)


def examples_sha256(examples: list[dict]) -> str:
    """A SHA-256 over examples after tokenization, each a dict of NumPy arrays and JSON values
    (token lists, text, marking schemes, None), its keys in any order."""
    digest = hashlib.sha256()
    for example in examples:
        for key in sorted(example):
            value = example[key]
            if isinstance(value, np.ndarray):
                data = f"{value.dtype}{value.shape}".encode() + value.tobytes()
            else:
                data = json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
            digest.update(f"{key}:{len(data)}:".encode())
            digest.update(data)
    return digest.hexdigest()


def data_record(path: str, examples: list[dict], order: int | str = DATA_ORDER,
                eval_examples: list[dict] | None = None) -> dict:
    """What a run trains on, kept in each checkpoint so that a resume can tell whether it
    changed: the data's name, how many examples it gave and a SHA-256 over them after
    tokenization (`examples_sha256`: a changed file, tokenizer or data option shows alike), and the
    version of the `order` the trainer reads them in (`data.DATA_ORDER`, or SFT's
    `data.EPOCHS_ORDER`). With `eval_examples` (SFT's held-out rows), the same count and digest of
    those, under "eval": an edit to the held-out rows alone would otherwise change what the eval
    loss measures midway through a run, unsaid."""
    record = {"path": path, "examples": len(examples), "sha256": examples_sha256(examples), "order": order}
    if eval_examples:
        record["eval"] = {"examples": len(eval_examples), "sha256": examples_sha256(eval_examples)}
    return record


def check_run_data(checkpoints, saved: dict, current: dict, resume_with_changes: bool,
                   compare_config: bool = False, finished: bool = False) -> None:
    """Whether a checkpoint's meta (`saved`, in the folder `checkpoints`) can continue this run
    (`current`: the TrainCheckpoints' `run`). Another trainer's checkpoints never can. Nor, unless
    the user says otherwise, can other training data: the checkpoint's data position counts into
    the examples it was written with, so other examples under the same name would be read from
    another place than an uninterrupted run reads, in silence (the checkpoints written from then on
    record the new data). With `compare_config` (the run directory has no config.json: a new
    machine, the checkpoints kept on gs://), the config the checkpoint was written under stands in
    for it. The data order matters only to a run not `finished` (one with steps left to train).
    Every process reads the same checkpoint and decides alike."""
    if saved.get("trainer", current["trainer"]) != current["trainer"]:
        raise ConfigError(f"{checkpoints}: its checkpoints were written by qed-jax {saved['trainer']}, and this is "
                          f"qed-jax {current['trainer']}: give this run its own output_dir and checkpoint_dir (to "
                          "start from that run's model, set model.path to its hf/ folder)")
    changes = []
    if compare_config and "config" in saved:
        changes = config_changes(expand_paths(saved["config"]), current["config"])
    old = saved.get("data")
    if old is not None and not finished and "order" not in old:
        log.warning("%s: its checkpoints do not record the order they read the data in; a run begun before "
                    "qed-jax changed that order (2026-12-01) continues in the new order", checkpoints)
    changes += data_changes(old, current["data"], finished)
    if changes and not resume_with_changes:
        raise RunConfigChanged(checkpoints, changes, "checkpoint_dir")
    if changes:
        data_moved = "" if old is None or same_data(old, current["data"]) else \
            ": its data position now counts into other examples"
        log.warning("resuming from %s with changes (%s)%s", checkpoints, "; ".join(changes), data_moved)


def same_data(old: dict, new: dict) -> bool:
    """The same examples, under whatever spelling of the path."""
    return (old["examples"], old["sha256"]) == (new["examples"], new["sha256"])


def data_changes(old: dict | None, new: dict, finished: bool) -> list[str]:
    """How the data a checkpoint recorded (`old`, a `data_record`; None before they were
    recorded) differs from this run's: the examples, the held-out ones, and for a run not
    `finished` the order they are read in."""
    if old is None:
        return []
    changes = []
    describe = lambda r: f"{r['examples']} examples, sha256 {r['sha256'][:12]}"  # noqa: E731
    if not same_data(old, new):
        changes.append(f"training data: {old['path']}: {describe(old)} -> {new['path']}: {describe(new)}")
    # Checkpoints written before the held-out rows were recorded say nothing of them.
    if "eval" in old and old["eval"] != new.get("eval"):
        held_out = lambda r: describe(r["eval"]) if "eval" in r else "none"  # noqa: E731
        changes.append(f"held-out data for the eval loss: {held_out(old)} -> {held_out(new)}, so the eval loss "
                       "would measure other rows from here on")
    if not finished and "order" in old and old["order"] != new["order"]:  # the order matters to the steps left
        changes.append(f"data order: version {old['order']} -> {new['order']}, so the data would come in "
                       "another order and the samples drawn otherwise; the qed-jax version that began the run "
                       "can finish it")
    return changes


def without_keys(values: dict, ignored, prefix: str = "") -> dict:
    """A nested config dict without the dotted keys `ignored`."""
    return {key: without_keys(value, ignored, f"{prefix}{key}.") if isinstance(value, dict) else value
            for key, value in values.items() if f"{prefix}{key}" not in ignored}


def settings_processes_share(config: dict, resume_with_changes: bool) -> dict:
    """What of a run's config (and flags) every process of a job must be given alike: all of it
    but where things are (NOT_RUN_IDENTITY, less DECIDED_ON_EVERY_PROCESS; data.path, the data
    being compared by what it holds)."""
    return {**without_keys(config, (NOT_RUN_IDENTITY - DECIDED_ON_EVERY_PROCESS) | {"data.path"}),
            "--resume-with-changes": resume_with_changes}


def check_processes_agree(run: dict, resume_with_changes: bool) -> None:
    """Refuse, on every process, a job whose processes were given another config (its
    `settings_processes_share`) or other training data than process 0
    (`run`: the TrainCheckpoints' run record): each host reads its own copies, and a mismatch
    would train on a mix in silence, or hang (another `steps`, another checkpoint_every, one
    process resuming with changes that another refuses: the collectives no longer pair)."""
    if jax.process_count() == 1:
        return

    def digest(value) -> np.ndarray:  # 8 bytes of a SHA-256, as the int32s `gather` takes
        text = json.dumps(value, sort_keys=True, default=str).encode()
        return np.frombuffer(hashlib.sha256(text).digest()[:8], np.int32)

    # The data by what it holds, held-out rows too (read from any path: data.path is left out of
    # the config's digest).
    data = {key: run["data"].get(key) for key in ("examples", "sha256", "order", "eval")}
    mine = np.concatenate([digest(settings_processes_share(run["config"], resume_with_changes)), digest(data)])
    everyone = gather(mine).reshape(jax.process_count(), 4)
    for what, columns in (("another config", slice(0, 2)), ("other training data", slice(2, 4))):
        others = [p for p in range(1, jax.process_count()) if (everyone[p, columns] != everyone[0, columns]).any()]
        if others:
            raise ConfigError(f"process {', '.join(map(str, others))} {'was' if len(others) == 1 else 'were'} given "
                              f"{what} than process 0: every process of a job runs the same command on the same "
                              "files (hosts share no disk: check each host's copies)")


def start_or_resume(out: Path, config, ckpts: checkpoint.TrainCheckpoints, params, opt_state, data_iterator,
                    steps: int, resume_with_changes: bool = False):
    """Restore the newest intact checkpoint (params, optimizer, data position) into the given
    shardings, or start afresh; then record the config, unless it changed and the run already
    reached its `steps` (nothing would train under it). Returns (params, opt_state, step)."""
    check_processes_agree(ckpts.run, resume_with_changes)
    changes = check_run_config(out, config, resume_with_changes, refuse=False)
    changed = bool(changes)
    if not resume_with_changes and largest(int(changed)) and not finished_a_step(out, config.checkpoint_dir):
        if changes:
            log.warning("%s holds a run that finished no step, so it starts again as this run is set up (%s); its "
                        "config until now is kept beside it as config.N.json", out, "; ".join(changes))
        resume_with_changes = True
    if changed and not resume_with_changes and (meta := ckpts.newest_meta()) is not None:
        # One refusal lists what changed in the data too (process 0's read, before anything is restored).
        changes += data_changes(meta.get("data"), ckpts.run["data"], finished=meta.get("step", 0) >= steps)
    refuse_changes(out, changes, resume_with_changes)
    recorded = largest(int(jax.process_index() == 0 and (out / "config.json").exists()))  # process 0 holds `out`
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (params, opt_state))
    restored = ckpts.restore_latest(*targets, data_iterator, check=lambda meta: check_run_data(
        ckpts.directory, meta, ckpts.run, resume_with_changes, compare_config=not recorded,
        finished=meta["step"] >= steps), last_step=steps)
    step = 0 if restored is None else restored[2]["step"]
    # Its checkpoints deleted after it finished (disk reclaimed, a bucket's lifecycle rule):
    # training again from step 0 would replace its export and metrics, and what was built on
    # them would no longer match. Finished: its config unchanged, its metrics logged to the last
    # step (always logged) and an export there. Process 0 holds `out` and decides for all.
    if restored is None and largest(int(jax.process_index() == 0 and not changed and last_logged_step(out) == steps
                                         and (out / "hf" / "config.json").exists())):
        if not is_complete(out, steps, steps, config.export_dtype):
            raise ConfigError(f"{out}: the run finished at step {steps}, but no checkpoint of it is left in "
                              f"{ckpts.directory} to export it as export_dtype={config.export_dtype} from; its export "
                              f"{out / 'hf'} is what there is (to train it again, delete {out})")
        log.warning("%s: no checkpoint is left in %s, but the run finished (its metrics reach step %d, its export %s "
                    "is whole): nothing to train", out, ckpts.directory, steps, out / "hf")
        step = steps  # the caller finds the run complete: the fresh params and opt_state go unused
    if changed and step >= steps:
        log.warning("%s: the run is complete at step %d, so its changed config is not recorded: nothing trains under "
                    "it (raise steps to continue the run)", out, step)
    else:
        record_run_config(out, config, changed)
    if restored is None:
        if step == 0 and jax.process_index() == 0 and (logged := last_logged_step(out)):
            # A kill before the first save, or its checkpoints gone (deleted, a disk not mounted).
            log.warning("%s: no checkpoint of this run is in %s, though its metrics.jsonl reaches step %d: training "
                        "starts again from step 0 and replaces those metrics (if its checkpoints were moved or sit on "
                        "a disk not mounted, stop it now and put them back)", out, ckpts.directory, logged)
        return params, opt_state, step
    params, opt_state, meta = restored
    log.info("resumed from %s at step %d", ckpts.directory, meta["step"])
    return params, opt_state, meta["step"]


def finished_a_step(out: Path, checkpoint_dir: str | None) -> bool:
    """Whether the trainer's run in `out` finished a step: a step's metrics logged, or a step saved
    in its checkpoint folder (`checkpoint_dir`, else out/checkpoints). A run that finished none
    (stopped by its judge, a typo found at the first step) has nothing to continue, so a rerun
    may change its config. Process 0, which holds `out`, decides for every process."""
    found = 0
    if jax.process_index() == 0:
        folder = epath.Path(checkpoint_dir or out / "checkpoints")
        try:
            found = int(last_logged_step(out) is not None
                        or (folder.is_dir() and bool(checkpoint.training_steps(folder))))
        except Exception:  # noqa: BLE001 (a bucket out of reach: say it did, and the change is refused as before)
            found = 1
    return bool(largest(found))


def last_logged_step(out: Path) -> int | None:
    """The step of the last whole row of a run's metrics.jsonl; None without one."""
    try:
        lines = (out / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:  # a last line a kill cut short
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            return row["step"]
    return None


class MetricsLog:
    """Per-step metrics to JSONL (truncated to the resumed step) and TensorBoard. `history`
    holds every row of the run so far, the resumed part included."""

    def __init__(self, directory: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = directory / "metrics.jsonl"
        self.history: list[dict] = []
        if not self.enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop what a killed run logged after its last checkpoint
            self.history = [row for row in self._rows() if row["step"] <= resume_step]
            partial = self.path.with_name(self.path.name + ".partial")  # replaced whole, or not at all
            partial.write_text("".join(json.dumps(row) + "\n" for row in self.history))
            partial.replace(self.path)
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides the points a killed run logged past the resumed step.
        self.tb = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step + 1)

    def _rows(self) -> list[dict]:
        """The rows logged so far. A line that does not parse is one a kill or a crash cut short
        (lines are appended one by one): it is dropped, with a warning."""
        rows = []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("no step")
            except ValueError:
                log.warning("%s: line %d is cut short or damaged; dropped", self.path, n)
                continue
            rows.append(row)
        return rows

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


# --------------------------------------------------------------------------------------------
# Stopping and finishing


class StopSignals:
    """Within `with`, SIGTERM (how TPU VMs announce preemption) and SIGINT (Ctrl-C) are recorded
    instead of killing the process, so a training loop can finish its step, write a checkpoint
    and exit (or `convert` finish the output it is writing). A second signal exits at once, or
    where the main thread runs a compiled program to its end (`qed-jax sft` on CPU: see
    `host.keep_freed_memory`), as soon as that program returns."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT),
                 announce: str = "finishing this step, then writing a checkpoint",
                 abandon: str = "exiting without a checkpoint"):
        self.signals, self.announce, self.abandon = signals, announce, abandon
        self.signum: int | None = None

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._record) for s in self.signals}
        return self

    def _record(self, signum, frame) -> None:
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: {self.abandon}", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s: %s (send it again to exit at once)", signal.Signals(signum).name, self.announce)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def raised(self) -> bool:
        return self.signum is not None


def params_finite(params) -> jax.Array:
    """1.0 when every parameter is finite, else 0.0: a step's metric, so that `check_finite`
    sees an update that overflowed even where the loss and gradients it came from were finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])).astype(jnp.float32)


def check_finite(step: int, metrics: dict, ckpts: checkpoint.TrainCheckpoints) -> None:
    """TrainingDiverged when a step's loss or gradient norm is not finite, or its update made a
    parameter so (`params_finite` below 1: GRPO's is the mean over the step's updates): the
    step is not saved (a checkpoint of it would rotate good ones out) and the run stops, its
    newest checkpoint kept."""
    bad = [f"{k} {float(metrics[k])}" for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])]
    if metrics.get("params_finite", 1.0) < 1.0:
        bad.append("parameters no longer finite after the update")
    if not bad:
        return
    latest = ckpts.latest_step()
    kept = f"the newest checkpoint, step {latest}, is kept" if latest is not None else "no checkpoint was saved"
    raise TrainingDiverged(f"step {step}: {' and '.join(bad)}, so training stopped before saving it; {kept}: lower "
                           "optim.lr (or look for a bad batch) and rerun, which resumes from there (with "
                           "--resume-with-changes for a changed config)")


def exit_or_export(stopped_by: int | None, step: int, model: Qwen3, out: Path, export_dtype: str | None,
                   assets_from, generation_from=None) -> None:
    """The end of a training run: exit after the stop signal `stopped_by` (its checkpoint is
    written; see multihost.final_stop_signal), else export the model as a Hugging Face folder
    `out/hf`."""
    if stopped_by is not None:
        log.warning("%s: wrote a checkpoint at step %d; exiting (rerun the same command to resume)",
                    signal.Signals(stopped_by).name, step)
        raise SystemExit(128 + stopped_by)
    if export_dtype:
        from qed_jax.pretrained import save_pretrained

        save_pretrained(model, out / "hf", dtype=export_dtype, assets_from=assets_from,
                        generation_from=generation_from, stop_on_turn_end=True)
        if jax.process_index() == 0:  # the one that wrote it (on a pod, the path is on its host only)
            log.info("exported the model to %s", out / "hf")


def is_complete(out: Path, step: int, steps: int, export_dtype: str | None) -> bool:
    """A run that reached its last step and (if asked for) its export in `export_dtype` has
    nothing left to do: a finished run rerun with another export_dtype exports again."""
    if step < steps:
        return False
    if not export_dtype:
        return True
    exported = out / "hf" / "config.json"
    done = False
    if jax.process_index() == 0:  # on a pod only its host holds `out`; the export involves every process
        try:
            hf_config = json.loads(exported.read_text())
            # An export written before config.json carried torch_dtype gives its dtype as "dtype".
            done = hf_config.get("torch_dtype", hf_config.get("dtype")) == export_dtype
        except (OSError, ValueError):  # none yet, or one cut short by a crash: export (again)
            pass
    return bool(largest(int(done)))
