"""Supervised fine-tuning on a device mesh: packed batches, AdamW with warmup + cosine, gradient
accumulation normalized per target token, Orbax checkpoints that resume exactly, export to HF.

The pure pieces (`token_loss`, `train_step`) come first; `train` is the loop around them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

from qed_jax import checkpoint
from qed_jax.config import (ConfigError, ModelConfig, check_dtype, check_local_output_dir, check_seed, json_values,
                            require_at_least_one, require_range)
from qed_jax.data import (DATA_ORDER, EPOCHS_ORDER, DataConfig, count_batches, packed_batches, prepare_sft,
                          read_rows)
from qed_jax.losses import weighted_nll_sum
from qed_jax.multihost import agree_on_stop, final_stop_signal, set_up_together
from qed_jax.pretrained import loaded_from
from qed_jax.sharding import MeshConfig, check_mesh_sizes, make_mesh
from qed_jax.trainer import (MetricsLog, ModelSpec, OptimConfig, StopSignals, batch_sharding, check_finite,
                             check_rows_divide, check_run_config, data_record, decay_mask, exit_or_export,
                             init_opt_state, is_complete, lr_schedule, make_optimizer, open_model, params_finite,
                             resolve_tokenizer, run_lock, start_or_resume, to_global)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    model: ModelSpec = ModelSpec()
    tokenizer: str | None = None  # default: model.path
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    batch_size: int = 8  # packed rows per optimizer step, all processes together
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many
    epochs: int = 1  # when steps is null
    steps: int | None = None  # default: epochs x packed rows / batch_size
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: no eval loss
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    output_dir: str = "runs/sft"  # metrics, config, TensorBoard, the HF export (local)
    checkpoint_dir: str | None = None  # local path or gs://; default: output_dir/checkpoints
    export_dtype: str | None = "bfloat16"  # the Hugging Face export at the end; null: none
    peak_tflops_per_device: float | None = None  # for the MFU estimate (e.g. 197 on TPU v5e)

    def __post_init__(self):
        check_seed(self.seed, "seed")
        check_mesh_sizes(self.mesh)
        check_local_output_dir(self.output_dir, "put the checkpoints there with checkpoint_dir")
        require_at_least_one(self, ("batch_size", "micro_batches", "epochs", "steps", "log_every", "eval_batches",
                                    "checkpoint_every", "keep_checkpoints"))
        require_range(self.eval_every, "eval_every", 0)
        require_range(self.peak_tflops_per_device, "peak_tflops_per_device", 0, low_open=True)
        check_dtype(self.export_dtype, "export_dtype")
        if self.batch_size % self.micro_batches:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by micro_batches ({self.micro_batches})")
        if self.steps is not None and self.epochs != 1:
            raise ConfigError(f"steps ({self.steps}) and epochs ({self.epochs}) both size the run: set steps=null to "
                              "train for epochs, or epochs=1 to train for steps")
        if self.eval_every and not self.data.eval_rows:
            raise ConfigError(f"eval_every ({self.eval_every}) asks for an eval loss on held-out rows, and "
                              "data.eval_rows is 0: set data.eval_rows (e.g. 64), or eval_every=0")

    def derived(self) -> dict:
        return {"model": self.model.describe(), "tokenizer": self.tokenizer or self.model.path,
                "rows_per_micro_batch": self.batch_size // self.micro_batches,
                "tokens_per_step": self.batch_size * self.data.max_length}


# --------------------------------------------------------------------------------------------
# Pure pieces


def token_loss(graphdef, params, batch):
    """(sum of next-token NLL over target tokens, number of target tokens) for packed rows
    [b, L]. A token is a target when its loss_mask is 1 and it continues the same segment."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    seg = batch["segment_ids"]
    weights = (batch["loss_mask"][:, 1:] * (seg[:, 1:] == seg[:, :-1]) * (seg[:, 1:] > 0)).astype(jnp.float32)
    nll = weighted_nll_sum(hidden[:, :-1], model.head_weight(), batch["tokens"][:, 1:], weights)  # never [b, L, V]
    return nll, jnp.sum(weights)


def accumulated_grads(graphdef, params, batch):
    """Gradients of the mean loss per target token over all microbatches [M, b, L]."""
    grad_fn = jax.value_and_grad(partial(token_loss, graphdef), has_aux=True)

    def micro(carry, microbatch):
        grads, loss_sum, count = carry
        (loss, n), g = grad_fn(params, microbatch)
        return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
    denom = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g / denom, grads), loss_sum / denom, count


def eval_loss(graphdef, params, batch):
    """(sum of NLL, number of target tokens) over all microbatches [M, b, L], one microbatch at a
    time as training runs them (lax.map, not vmap): eval holds no more than one step does."""
    return jax.tree.map(jnp.sum, jax.lax.map(partial(token_loss, graphdef, params), batch))


def train_step(graphdef, optimizer, params, opt_state, batch):
    grads, loss, count = accumulated_grads(graphdef, params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    tokens = jnp.sum(batch["segment_ids"] > 0)
    return params, opt_state, {"loss": loss, "target_tokens": count, "tokens": tokens,
                               "grad_norm": optax.tree.norm(grads), "params_finite": params_finite(params)}


def total_tokens(per_step: list) -> int:
    """The tokens of several steps, each step's count an int32 on the device: summed as Python
    ints, since a window of the recipe's steps (46M tokens each) passes 2**31 in 47 of them."""
    return sum(int(n) for n in jax.device_get(per_step))


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul parameters, plus causal attention."""
    c = config
    per_layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim \
        + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    matmul = c.num_layers * per_layer + c.vocab_size * c.hidden_size
    attention = 6 * c.num_layers * c.num_heads * c.head_dim * seq_len  # QK^T and AV, halved by causality
    return 6 * matmul + attention


# --------------------------------------------------------------------------------------------
# The loop


def warn_past_trained_positions(examples: list[dict], model: ModelConfig) -> None:
    """Positions restart in each example of a packed row, so rows may be longer than the model's
    max_position_embeddings; an example that long would train positions the model never saw."""
    longest = max(len(e["tokens"]) for e in examples)
    if longest > model.max_position_embeddings:
        log.warning("the longest example (%d tokens) passes the model's max_position_embeddings (%d): positions "
                    "past it were never trained; lower data.max_length to drop or cut such examples (data.overflow)",
                    longest, model.max_position_embeddings)


def training_mesh(config: SFTConfig):
    """The mesh of `config` over the devices here, refused (ConfigError) where it, or the rows of
    a micro-batch, do not split over them."""
    mesh = make_mesh(config.mesh)
    check_rows_divide(config.batch_size // config.micro_batches, mesh, "batch_size / micro_batches")
    return mesh


def train(config: SFTConfig, resume_with_changes: bool = False) -> dict:
    """Run SFT; resumes from the newest intact checkpoint in `output_dir` (refusing a changed
    config unless `resume_with_changes`). Returns {output_dir, step, loss (of the last step),
    complete (nothing was left to do), process}."""
    with run_lock(Path(config.output_dir)):  # a second job on the same output_dir fails here
        return _train(config, resume_with_changes)


def _train(config: SFTConfig, resume_with_changes: bool) -> dict:
    from qed_jax.tokenizer import check_vocab, load_tokenizer

    out = Path(config.output_dir)
    check_run_config(out, config, resume_with_changes, refuse=False, kind_only=True)  # another command's run?
    with set_up_together("SFT's setup (config, model, tokenizer, data)"):
        mesh = training_mesh(config)
        load_model = open_model(config.model, config.seed)  # its files are checked now, read after
        checkpoints = config.checkpoint_dir or out / "checkpoints"
        checkpoint.check_folder(checkpoints)  # now, not after the model loads or at the first save
        if config.batch_size % jax.process_count():
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
        tokenizer_path = resolve_tokenizer(config.tokenizer, config.model)
        tokenizer = load_tokenizer(tokenizer_path, "tokenizer")

        rows = read_rows(config.data.path, config.data.name, config.data.split, "data.path")
        if not rows:
            raise ConfigError(f"{config.data.path}: no rows to train on (the data is empty)")
        held_out = config.data.eval_rows if config.eval_every else 0
        if held_out and held_out >= len(rows):
            # Rows of which none can be used are the first thing to fix: their own error says why.
            prepare_sft(rows, tokenizer, config.data, source=config.data.path)
            raise ConfigError(f"{config.data.path}: {len(rows)} rows, and data.eval_rows={held_out} holds out the last "
                              f"{held_out} for the eval loss, so none are left to train on; lower data.eval_rows, "
                              "or set eval_every=0 (no eval loss)")
        train_rows, eval_rows = (rows[:-held_out], rows[-held_out:]) if held_out else (rows, [])
        examples, data_stats = prepare_sft(train_rows, tokenizer, config.data, source=config.data.path)
        eval_examples = prepare_sft(eval_rows, tokenizer, config.data,
                                    source=f"{config.data.path} (eval)")[0] if eval_rows else []
        # Each process reads its own share of the examples: one with none would never join the others.
        for what, some, fix in (("training", examples, "give more rows"),
                                ("held-out", eval_examples, "raise data.eval_rows, or set eval_every=0")):
            if 0 < len(some) < jax.process_count():
                raise ConfigError(f"{config.data.path}: {len(some)} {what} examples for {jax.process_count()} "
                                  f"processes, which each read their own share; {fix}")
        local_batch = config.batch_size // jax.process_count()
        epochs = None if config.steps else config.epochs  # with steps, the data repeats for as long as they last
        steps = config.steps or epoch_steps(examples, config, local_batch)

    model = load_model(mesh)
    model_source = loaded_from(model)  # its generation config goes with the export
    check_vocab(tokenizer, model.config.vocab_size)
    warn_past_trained_positions(examples + eval_examples, model.config)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    optimizer = make_optimizer(config.optim, steps, decay_mask(model))
    schedule = lr_schedule(config.optim, steps)
    opt_state = init_opt_state(optimizer, params, mesh)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    step_fn = jax.jit(partial(train_step, graphdef, optimizer), donate_argnums=(0, 1),
                      out_shardings=(param_shardings, opt_shardings, None))
    eval_fn = jax.jit(partial(eval_loss, graphdef))

    data = iter(packed_batches(examples, config.data, local_batch, epochs=epochs,
                               process_index=jax.process_index(), process_count=jax.process_count()))
    sharding = batch_sharding(mesh)

    order = DATA_ORDER if config.steps else EPOCHS_ORDER
    record = data_record(config.data.path, examples, order, eval_examples)
    ckpts = checkpoint.TrainCheckpoints(checkpoints, model.config,
                                        config.keep_checkpoints, assets_from=tokenizer_path,
                                        run={"trainer": "sft", "data": record, "config": json_values(config)})
    params, opt_state, start = start_or_resume(out, config, ckpts, params, opt_state, data, steps,
                                               resume_with_changes)
    metrics_log = MetricsLog(out, start)
    result = {"output_dir": str(out), "process": jax.process_index(), "step": start, "start_step": start,
              "loss": metrics_log.history[-1]["loss"] if metrics_log.history else math.nan,
              # Rows left out of training or cut short, said again in the closing line (the warnings
              # scroll away).
              "rows_left_out": (f"{config.data.path}: {data_stats.summary()}"
                                if data_stats.kept < data_stats.rows or data_stats.truncated else None)}
    if is_complete(out, start, steps, config.export_dtype):
        ckpts.close()
        metrics_log.close()
        return {**result, "complete": True}
    flops_per_token = train_flops_per_token(model.config, config.data.max_length)

    meta = lambda step: {"step": step, "seed": config.seed}  # noqa: E731
    if start < steps:
        log.info("training steps %d to %d (%d packed rows of %d tokens per step): %s", start + 1, steps,
                 config.batch_size, config.data.max_length, json.dumps(config.derived()))
    else:  # trained, and its export cut short
        log.info("all %d steps trained: exporting the model", steps)
    progress = tqdm(total=steps, initial=start, desc="sft", unit="step", disable=jax.process_index() != 0)
    step, last_loss, stopping = start, result["loss"], False
    with StopSignals() as stop, jax.set_mesh(mesh):  # attention kernels find the mesh here
        try:
            # Speed is measured over the steps since the last log: the device runs steps queued
            # ahead of the host, so one step's wall time would count the queue's. The first
            # window leaves out the first step, which compiles (unless that step is logged).
            window_start, window_tokens = time.perf_counter(), []
            # `stopping` is what all processes agreed on after the last step; a signal that
            # arrives later waits for the next step's agreement (and its checkpoint).
            while step < steps and not stopping:
                batch = to_global(next(data), config.micro_batches, sharding)
                params, opt_state, metrics = step_fn(params, opt_state, batch)
                step += 1
                last_loss = metrics["loss"]
                window_tokens.append(metrics["tokens"])  # summed when logged: no wait for the device here
                eval_due = config.eval_every and step % config.eval_every == 0 and eval_examples
                logged = step % config.log_every == 0 or step == steps or eval_due
                if logged:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    seconds = time.perf_counter() - window_start
                    tokens_per_s = total_tokens(window_tokens) / seconds
                    metrics.update(lr=float(schedule(step - 1)), tokens_per_s=tokens_per_s,
                                   step_s=seconds / len(window_tokens))
                    if config.peak_tflops_per_device:
                        metrics["mfu"] = flops_per_token * tokens_per_s / (
                            config.peak_tflops_per_device * 1e12 * jax.device_count())
                    if eval_due:
                        metrics["eval_loss"] = evaluate(eval_fn, params, eval_examples, config, sharding)
                    metrics_log.write(step, metrics)
                    check_finite(step, metrics, ckpts)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
                progress.update()
                stopping = agree_on_stop(stop)
                if step % config.checkpoint_every == 0 or step == steps or stopping:
                    check_finite(step, jax.device_get({k: metrics[k] for k in ("loss", "grad_norm", "params_finite")}),
                                 ckpts)
                    ckpts.save(step, params, opt_state, data, meta(step))
                if logged or step == start + 1:  # the next window starts after this step's eval, log and
                    jax.block_until_ready(last_loss)  # save, or after the first step, which compiled the step
                    window_start, window_tokens = time.perf_counter(), []
        finally:
            progress.close()
            ckpts.close()
            metrics_log.close()
        stopped_by = final_stop_signal(stop)
    exit_or_export(stopped_by, step, nnx.merge(graphdef, params), out, config.export_dtype, tokenizer_path,
                   model_source)
    return {**result, "step": step, "loss": float(last_loss), "complete": False}


def summary(result: dict, digits: int = 6) -> str:
    """A run's last logged loss, and the rows its data left out if any, for its closing line. A
    run found complete in checkpoints that another run directory logged (its checkpoint_dir kept
    on gs:// and its run directory lost, or a checkpoint_dir two runs share) has no loss here."""
    if not math.isfinite(result["loss"]):
        loss = "no loss logged in this run directory (it was trained where its checkpoints were written)"
    else:
        loss = f"loss {result['loss']:.{digits}f}"
    return loss + (f"; {result['rows_left_out']}" if result.get("rows_left_out") else "")


def epoch_steps(examples: list[dict], config: SFTConfig, local_batch: int) -> int:
    """The steps of `config.epochs` passes over the examples: the whole batches every process's
    share packs into. The packed rows that fill no whole batch are left out (said so)."""
    steps, left_out = count_batches(examples, config.data, local_batch, config.epochs, jax.process_count())
    if steps == 0:
        raise ConfigError(f"{config.data.path}: {config.epochs} epoch(s) of {len(examples)} examples pack into fewer "
                          f"rows than one batch of {config.batch_size} (data.max_length {config.data.max_length}): "
                          "lower batch_size, or set steps")
    rows = steps * local_batch * jax.process_count() + left_out
    # The recipe's batch counts examples; a step here counts rows, each holding as many examples as fit.
    per_row = config.epochs * len(examples) / rows
    log.info("%d epoch(s) of %d examples pack into %d rows of %d tokens, %.2f examples a row: %d steps of %d rows, "
             "about %d examples a step%s", config.epochs, len(examples), rows, config.data.max_length, per_row, steps,
             config.batch_size, round(per_row * config.batch_size),
             f"; the last {left_out} rows, which fill no whole batch, are left out" if left_out else "")
    return steps


def evaluate(eval_fn, params, examples, config: SFTConfig, sharding) -> float:
    """Mean loss per target token over `eval_batches` batches of the held-out rows (a fresh,
    seeded iterator each time, repeating the rows if they fill fewer batches), each split into
    the training step's micro-batches."""
    batches = packed_batches(examples, config.data, config.batch_size // jax.process_count(), epochs=None,
                             process_index=jax.process_index(), process_count=jax.process_count())
    total, count = 0.0, 0.0
    for i, batch in enumerate(batches):
        if i == config.eval_batches:
            break
        loss, n = jax.device_get(eval_fn(params, to_global(batch, config.micro_batches, sharding)))
        total, count = total + float(loss), count + float(n)
    return total / count if count else math.nan
