"""What both trainers share: weight decay by logical axes, the run directory's config record
(refusing silent changes, finishing complete runs), falling back past an unreadable checkpoint,
Ctrl-C writing a checkpoint like a preemption, and one job at a time per run directory."""

import asyncio
import errno
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx

from qed_jax import checkpoint, grpo, sft
from qed_jax.config import PRESETS, ConfigError, load_config, preset
from qed_jax.model import Qwen3
from qed_jax.trainer import (MetricsLog, OptimConfig, check_finite, check_run_data, config_changes, data_record,
                             decay_mask, make_optimizer, params_finite, run_lock)
from tests.helpers import assert_signal_writes_a_checkpoint, cli_env, cli_with_file_size_limit, read_metrics

REPO = Path(__file__).resolve().parent.parent
TINY_SFT = str(REPO / "configs" / "sft" / "tiny.yaml")

NOT_DECAYED = {"attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm"}


def test_decay_mask_of_the_4b_preset_spares_every_norm():
    model = nnx.eval_shape(lambda: Qwen3(preset("qwen3-4b-thinking-2507"), rngs=nnx.Rngs(0)))
    flat = {path[-1]: decays for path, decays in jax.tree_util.tree_flatten_with_path(decay_mask(model))[0]}
    names = {p.key for p in flat}
    assert names == NOT_DECAYED | {"embed", "q", "k", "v", "o", "gate", "up", "down"}
    assert {p.key for p, decays in flat.items() if not decays} == NOT_DECAYED


def test_weight_decay_leaves_stacked_norm_weights_alone():
    model = Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = make_optimizer(OptimConfig(lr=0.1, schedule="constant", warmup_ratio=0.0, weight_decay=0.5,
                                           grad_clip=0.0), 10, decay_mask(model))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = path[-1].key
        if name in NOT_DECAYED:
            assert not np.any(np.asarray(update)), name  # [layers, dim] or [dim]: never decayed
        else:
            assert np.any(np.asarray(update)), name


def test_adam_moments_are_sharded_like_their_parameters_as_the_plan_counts():
    from qed_jax.plan import abstract_opt_state
    from qed_jax.sharding import MeshConfig, create_sharded, make_mesh
    from qed_jax.trainer import init_opt_state

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    model = create_sharded(lambda: Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0)), mesh)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = make_optimizer(OptimConfig(weight_decay=0.1), 10, decay_mask(model))
    opt_state = init_opt_state(optimizer, params, mesh)
    adam = opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        specs = jax.tree.map(lambda m, p: (m.sharding.spec, p.sharding.spec), moments, params)
        assert all(m == p for m, p in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple))), specs
    q = adam.mu["layers"]["q"]
    assert q.addressable_shards[0].data.size == q.size // 8  # [layers, dim / fsdp, heads / tensor, head_dim]
    # The memory plan lays the state out the same way.
    planned = abstract_opt_state(optimizer, params, mesh)
    assert jax.tree.map(lambda x: x.sharding, planned) == jax.tree.map(lambda x: x.sharding, opt_state)


def test_adam_moments_are_float32_from_the_start_with_bfloat16_parameters():
    # Gradients are summed in float32: moments made in bfloat16 would turn float32 at the first
    # update (a second compile of the step, and a resume that truncates the saved moments).
    from qed_jax.sharding import MeshConfig, make_mesh
    from qed_jax.trainer import init_opt_state

    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    model = Qwen3(PRESETS["tiny"].replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = make_optimizer(OptimConfig(weight_decay=0.1), 10, decay_mask(model))
    opt_state = init_opt_state(optimizer, params, mesh)
    grads = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), params)
    updates, after = jax.jit(optimizer.update)(grads, opt_state, params)
    assert jax.tree.map(lambda x: x.dtype, after) == jax.tree.map(lambda x: x.dtype, opt_state)
    assert {x.dtype for x in jax.tree.leaves(opt_state[1][0].mu)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(optax.apply_updates(params, updates))} == {jnp.dtype("bfloat16")}


def _sft(args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY_SFT, "eval_every=0",
                           "export_dtype=null", "checkpoint_every=1", *args], cwd=REPO, env=env or cli_env(1),
                          capture_output=True, text=True, timeout=300, **kwargs)


def _corrupt(step_dir: Path) -> None:
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:16])


@pytest.mark.slow  # five training runs: 40-55 s on 2 cores
def test_run_directory_refuses_changes_finishes_complete_runs_and_skips_unreadable_steps(tmp_path):
    run = tmp_path / "run"
    first = _sft(["steps=2", f"output_dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]

    again = _sft(["steps=2", f"output_dir={run}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is already complete at step 2: nothing to do" in again.stdout and "nan" not in again.stdout

    changed = _sft(["steps=4", "optim.lr=1e-3", f"output_dir={run}"])
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    error = changed.stderr.strip().splitlines()[-1]
    assert "steps: 2 -> 4" in error and "optim.lr: 0.003 -> 0.001" in error and "--resume-with-changes" in error

    _corrupt(run / "checkpoints" / "2")
    unfinished = run / "checkpoints" / "3.orbax-checkpoint-tmp-1795950000"  # a save a kill cut short
    (unfinished / "params").mkdir(parents=True)
    (unfinished / "params" / "data").write_bytes(b"partial")
    resumed = _sft(["steps=4", f"output_dir={run}", "--resume-with-changes"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert "checkpoint step 2 is unreadable" in resumed.stderr
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]  # step 2 trained again from step 1
    assert json.loads((run / "config.json").read_text())["steps"] == 4
    assert (run / "working_dir.txt").read_text() == f"{REPO}\n"  # where its relative paths were read
    assert json.loads((run / "config.1.json").read_text())["steps"] == 2
    assert [p.name.startswith("2.unreadable-") for p in (run / "checkpoints").iterdir()].count(True) == 1

    _corrupt(run / "checkpoints" / "4")
    generate = subprocess.run([sys.executable, "-m", "qed_jax.cli", "generate", "--model", str(run / "checkpoints"),
                               "--prompt", "hi", "--max-new-tokens", "2"], cwd=REPO, env=cli_env(1),
                              capture_output=True, text=True, timeout=300)
    assert generate.returncode == 2 and len(generate.stderr.strip().splitlines()) == 1, generate.stderr[-3000:]
    assert "step 4 is unreadable" in generate.stderr


def test_an_unfinished_save_that_cannot_be_removed_is_named_by_its_folder(tmp_path, monkeypatch):
    """shutil.rmtree names a file it may not delete by its name alone ("x: Permission denied"):
    the error names the unfinished save's folder, as checkpoint_dir's."""
    unfinished = tmp_path / "3.orbax-checkpoint-tmp-1795950000"  # a save a kill cut short
    (unfinished / "params").mkdir(parents=True)
    (unfinished / "params" / "x").write_bytes(b"partial")

    def refuse(name, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(os, "unlink", refuse)
    message = f"checkpoint_dir: {unfinished}: Permission denied; choose another path, or change its permissions"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        checkpoint.remove_unfinished_saves(tmp_path)


@pytest.mark.slow  # five training runs: 35-45 s on 2 cores
def test_a_resumed_run_refuses_training_data_that_changed_under_the_same_name(tmp_path):
    data, run = tmp_path / "rows.jsonl", tmp_path / "run"
    lines = (REPO / "configs" / "data" / "tiny_proofs.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(lines))
    first = _sft(["steps=2", f"data.path={data}", f"output_dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]

    data.write_text("".join(lines[1:]))  # a row removed: every later row's position moves
    refused = _sft(["steps=2", f"data.path={data}", f"output_dir={run}"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert f"holds a run that differs from this one (training data: {data}: {len(lines)} examples, sha256 " in error
    assert f"-> {data}: {len(lines) - 1} examples, sha256 " in error and "--resume-with-changes" in error
    assert not list((run / "checkpoints").glob("*.unreadable-*"))  # refused, not mistaken for damage
    both = _sft(["steps=3", f"data.path={data}", f"output_dir={run}"])  # the config changed too: one line lists all
    assert both.returncode == 2 and "Traceback" not in both.stderr
    assert f"holds a run that differs from this one (steps: 2 -> 3; training data: {data}: " in both.stderr

    resumed = _sft(["steps=3", f"data.path={data}", f"output_dir={run}", "--resume-with-changes"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "with a changed config: steps: 2 -> 3" in resumed.stderr
    assert "with changes (training data: " in resumed.stderr and "position now counts into other" in resumed.stderr
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    assert json.loads((run / "config.1.json").read_text())["steps"] == 2
    again = _sft(["steps=3", f"data.path={data}", f"output_dir={run}"])  # step 3's checkpoint has the new data
    assert again.returncode == 0 and "already complete at step 3" in again.stdout, again.stderr[-3000:]


def test_the_same_data_under_another_spelling_of_its_path_is_not_a_change(tmp_path, caplog):
    examples = [{"tokens": np.arange(4, dtype=np.int32)}]
    saved = {"trainer": "sft", "data": data_record("configs/data/rows.jsonl", examples)}
    current = {"trainer": "sft", "data": data_record(f"{tmp_path}/configs/data/rows.jsonl", examples), "config": {}}
    check_run_data(tmp_path, saved, current, resume_with_changes=False)
    check_run_data(tmp_path, saved, current, resume_with_changes=True)
    assert "changes" not in caplog.text
    current["data"] = data_record("configs/data/rows.jsonl", examples * 2)
    with pytest.raises(ConfigError, match=r"training data: configs/data/rows.jsonl: 1 examples, sha256 .* -> "):
        check_run_data(tmp_path, saved, current, resume_with_changes=False)


def test_an_edit_to_the_held_out_rows_alone_is_a_change(tmp_path, caplog):
    """SFT's eval loss reads the rows held out from the end of the data: editing only those
    leaves the training examples as they were, but the eval loss would measure other rows from
    the resume on."""
    examples = [{"tokens": np.arange(4, dtype=np.int32)}]
    held_out = [{"tokens": np.arange(5, dtype=np.int32)}, {"tokens": np.arange(6, dtype=np.int32)}]
    edited = [held_out[0], {"tokens": np.arange(1, 7, dtype=np.int32)}]
    saved = {"trainer": "sft", "data": data_record("rows.jsonl", examples, eval_examples=held_out)}
    current = {"trainer": "sft", "data": data_record("rows.jsonl", examples, eval_examples=held_out), "config": {}}
    check_run_data(tmp_path, saved, current, resume_with_changes=False)
    for other, says in ((edited, r"2 examples, sha256 \w{12}"), (None, "none")):
        current["data"] = data_record("rows.jsonl", examples, eval_examples=other)
        assert current["data"]["sha256"] == saved["data"]["sha256"]
        with pytest.raises(ConfigError, match=rf"held-out data for the eval loss: 2 examples, sha256 \w{{12}} -> "
                                              rf"{says}, so the eval loss would measure other rows from here on"):
            check_run_data(tmp_path, saved, current, resume_with_changes=False)
    with caplog.at_level(logging.WARNING):
        check_run_data(tmp_path, saved, current, resume_with_changes=True)
    assert "resuming from" in caplog.text and "held-out data for the eval loss" in caplog.text
    # Checkpoints written before the held-out rows were recorded: nothing to compare them with.
    unrecorded = {"trainer": "sft", "data": data_record("rows.jsonl", examples)}
    current["data"] = data_record("rows.jsonl", examples, eval_examples=edited)
    check_run_data(tmp_path, unrecorded, current, resume_with_changes=False)


def test_a_path_spelt_otherwise_is_the_same_setting(tmp_path, monkeypatch):
    """A pipeline's stages load the models it writes under its own folder: the folder named by
    an absolute path, or through a link, on a rerun is the same run."""
    from qed_jax.config import same_setting

    (tmp_path / "run" / "sft" / "hf").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    saved = {"model": {"path": "../run/sft/hf"}, "seed": 0}
    for spelt in (str(tmp_path / "run" / "sft" / "hf"), str(tmp_path / "link" / "sft" / "hf"), "sft/hf/"):
        assert config_changes(saved, {"model": {"path": spelt}, "seed": 0}) == []
    assert config_changes(saved, {"model": {"path": str(tmp_path / "other")}, "seed": 0}) == [
        f'model.path: "../run/sft/hf" -> "{tmp_path / "other"}"']
    # Names that are no local file (Hub ids) compare as text; so do other settings.
    assert not same_setting("path", "org/model", "./org/model") and not same_setting("seed", 0, 1)
    # A relative path is read in the working directory it was recorded in too: from another one,
    # another spelling of what it named there is the same setting, and so is the same spelling (a
    # copied project), but for checkpoint_dir, the run's own state: another folder is a change.
    (tmp_path / "elsewhere" / "sft" / "hf").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    then = str(tmp_path / "run")
    assert config_changes(saved, {"model": {"path": str(tmp_path / "run" / "sft" / "hf")}, "seed": 0},
                          recorded_in=then) == []
    assert config_changes({"model": {"path": "sft/hf"}}, {"model": {"path": "sft/hf"}}, recorded_in=then) == []
    assert config_changes({"checkpoint_dir": "sft/hf"}, {"checkpoint_dir": "sft/hf"}, recorded_in=then) == [
        f'checkpoint_dir: "{tmp_path / "run" / "sft" / "hf"}" -> "sft/hf"']
    # Its folder gone (the project moved): read where it is now.
    assert config_changes({"checkpoint_dir": "sft/hf"}, {"checkpoint_dir": "sft/hf"},
                          recorded_in=str(tmp_path / "moved")) == []


def test_a_checkpoint_written_under_another_data_order_is_not_resumed_in_silence(tmp_path, caplog):
    """A checkpoint's data position counts into the order it was written under: the examples a
    resume reads next would not be the ones an uninterrupted run reads."""
    from qed_jax.data import DATA_ORDER

    examples = [{"tokens": np.arange(4, dtype=np.int32)}]
    current = {"trainer": "sft", "data": data_record("rows.jsonl", examples), "config": {}}
    older = {"trainer": "sft", "data": {**current["data"], "order": DATA_ORDER - 1}}
    with pytest.raises(ConfigError, match=rf"\(data order: version {DATA_ORDER - 1} -> {DATA_ORDER}, so the data "
                                          "would come in another order and the samples drawn otherwise; the qed-jax "
                                          r"version that began the run can finish it\); pass --resume-with-changes"):
        check_run_data(tmp_path, older, current, resume_with_changes=False)
    with caplog.at_level(logging.WARNING):
        check_run_data(tmp_path, older, current, resume_with_changes=True)
        assert "resuming from" in caplog.text and "data order: version" in caplog.text
        caplog.clear()
        # Written before checkpoints recorded their order: the run goes on, with a warning.
        unrecorded = {"trainer": "sft", "data": {k: v for k, v in current["data"].items() if k != "order"}}
        check_run_data(tmp_path, unrecorded, current, resume_with_changes=False)
        assert "do not record the order they read the data in" in caplog.text
        caplog.clear()
        # A finished run trains nothing more: its order does not matter (a pipeline reruns it to evaluate).
        for saved in (older, unrecorded):
            check_run_data(tmp_path, saved, current, resume_with_changes=False, finished=True)
        assert not caplog.text


def test_a_step_whose_update_overflowed_is_not_saved_though_its_loss_was_finite(tmp_path):
    """The loss and gradient norm a step logs come from the parameters before its update: an
    update that overflowed shows only in the parameters it made."""
    from qed_jax.checkpoint import TrainCheckpoints
    from qed_jax.errors import TrainingDiverged

    good = {"w": jnp.ones(3), "b": {"c": jnp.zeros(2)}}
    overflowed = {"w": jnp.ones(3), "b": {"c": jnp.array([1, jnp.inf])}}
    assert float(params_finite(good)) == 1.0 and float(params_finite(overflowed)) == 0.0
    ckpts = TrainCheckpoints(tmp_path / "checkpoints", preset("tiny"), 2, run={"trainer": "sft"})
    check_finite(3, {"loss": 2.0, "grad_norm": 1.0, "params_finite": 1.0}, ckpts)
    with pytest.raises(TrainingDiverged, match=r"^step 3: parameters no longer finite after the update, so training "
                                               "stopped before saving it; no checkpoint was saved: lower optim.lr"):
        check_finite(3, {"loss": 2.0, "grad_norm": 1.0, "params_finite": 0.0}, ckpts)
    with pytest.raises(TrainingDiverged, match=r"^step 4: loss nan and grad_norm inf and parameters no longer finite"):
        check_finite(4, {"loss": np.float32("nan"), "grad_norm": float("inf"), "params_finite": 0.5}, ckpts)
    ckpts.close()


def test_the_data_record_sees_text_tokens_marking_schemes_and_missing_fields():
    base = {"problem": "P", "rubric": None, "prompt_ids": [1, 2, 3], "tokens": np.arange(4, dtype=np.int32)}
    scheme = [{"title": "Lemma", "points": 3, "desc": "proved"}]
    variants = [{"rubric": "R"}, {"rubric": ""}, {"rubric": "\0"}, {"rubric": scheme},
                {"rubric": [{**scheme[0], "points": 4}]}, {"prompt_ids": [1, 2, 4]}, {"problem": "Q"},
                {"tokens": np.arange(4, dtype=np.int64)}, {"tokens": np.arange(4, dtype=np.int32).reshape(2, 2)}]
    records = [data_record("d", [base]), *(data_record("d", [{**base, **v}]) for v in variants),
               data_record("d", [base, base])]
    assert len({r["sha256"] for r in records}) == len(records)
    # Equal content gives an equal record, built anew (no object identities) and in any key order.
    assert data_record("d", [{**base, "rubric": json.loads(json.dumps(scheme))}]) == records[4]
    assert data_record("d", [dict(reversed(base.items()))]) == records[0]


@pytest.mark.slow  # eight trainer runs: 55-70 s on 2 cores
def test_checkpoints_that_do_not_fit_the_run_are_refused_and_kept_and_none_readable_is_no_fresh_start(tmp_path):
    run = tmp_path / "run"
    first = _sft(["steps=2", f"output_dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    metrics, config = (run / "metrics.jsonl").read_text(), (run / "config.json").read_text()

    def refused(result, message):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert message in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept  # nothing moved aside
        assert (run / "metrics.jsonl").read_text() == metrics  # nor any history rewritten
        assert (run / "config.json").read_text() == config and not (run / "config.1.json").exists()

    # Another optimizer (no clipping: another chain of states), let through the config check.
    refused(_sft(["steps=3", "optim.grad_clip=0", f"output_dir={run}", "--resume-with-changes"]),
            "checkpoint step 2 does not fit this run (optimizer state 0/count not in the checkpoint): it was written "
            "for another model or optimizer")

    def grpo(*overrides):
        return subprocess.run([sys.executable, "-m", "qed_jax.cli", "grpo", "--config", str(REPO / "configs/rl/tiny.yaml"),
                               "steps=1", "export_dtype=null", *overrides, "--resume-with-changes"], cwd=REPO,
                              env=cli_env(1), capture_output=True, text=True, timeout=300)

    # The other trainer in this run directory is refused by the run's config.json; pointed only at its
    # checkpoints (from a directory of its own), by what the checkpoints record.
    refused(grpo(f"output_dir={run}"), f"{run} holds a qed-jax sft run, and this is qed-jax grpo: give this run its "
                                       "own output_dir")
    refused(grpo(f"output_dir={tmp_path / 'grpo'}", f"checkpoint_dir={run / 'checkpoints'}"),
            "its checkpoints were written by qed-jax sft, and this is qed-jax grpo: give this run its own "
            "output_dir and checkpoint_dir")
    # Written by a job of 2 processes (Grain's data state is one file per process), resumed by 1.
    data = run / "checkpoints" / "2" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    refused(_sft(["steps=3", f"output_dir={run}", "--resume-with-changes"]),
            "checkpoint step 2 was written by 2 processes and this job has 1: each process's place in the data is "
            "saved apart, so the run continues only with 2 processes")
    # Finished, it reads no more data: another number of processes may finish it (export it again).
    exported = _sft(["steps=2", f"output_dir={run}", "export_dtype=float32"])
    assert exported.returncode == 0 and (run / "hf" / "config.json").exists(), exported.stderr[-3000:]
    assert (run / "metrics.jsonl").read_text() == metrics
    (data / "process_0-of-2.json").rename(data / "process_0-of-1.json")

    _corrupt(run / "checkpoints" / "1")
    shutil.rmtree(run / "checkpoints" / "2" / "meta")  # an item gone (a kill in Orbax's clean-up): damaged too
    for attempt in range(2):  # the second finds only the steps the first set aside: no fresh start either
        nothing = _sft(["steps=2", f"output_dir={run}"])
        assert nothing.returncode == 2, nothing.stderr[-3000:]
        assert re.search(r"no checkpoint step reads back \(set aside: 1\.unreadable-\d+-\d+, 2\.unreadable-\d+-\d+\); "
                         r"this run would start over from step 0: to do that, move those out of .*\. If a step was "
                         r"set aside for a cause that has passed \(a missing mount, say\), rename its newest copy back "
                         r"to its step number \(N\.unreadable-TIME to N\) and rerun$",
                         nothing.stderr.strip().splitlines()[-1])
        assert (run / "metrics.jsonl").read_text() == metrics and not (run / "checkpoints" / "1").exists()

    # A `qed-jax convert` folder (parameters only) given as checkpoint_dir: refused, and left loadable.
    converted = tmp_path / "converted"
    checkpoint.save_model(Qwen3(PRESETS["tiny"].replace(param_dtype="float32", dtype="float32"), rngs=nnx.Rngs(0)),
                          converted)
    before = sorted(p.name for p in converted.iterdir())
    params_only = _sft(["steps=2", f"output_dir={tmp_path / 'other'}", f"checkpoint_dir={converted}"])
    assert params_only.returncode == 2, params_only.stderr[-3000:]
    assert f"{converted}: step 0 holds params only (a `qed-jax convert` output?), not a trainer's checkpoint: to " \
           f"train from it, set model.path to {converted}" in params_only.stderr
    assert sorted(p.name for p in converted.iterdir()) == before


def _orbax_read_failure(cause: BaseException):
    """A checkpoint restore that fails as Orbax's array read wraps whatever stopped it."""
    def restore(*args):
        try:
            raise cause
        except BaseException as e:
            raise Exception("Encountered error while reading array index: (slice(0, 4, 1),).") from e
    return restore


async def _timed_out_read():
    await asyncio.wait_for(asyncio.sleep(10), 0.001)  # a TimeoutError raised from a CancelledError


@pytest.mark.parametrize("failure,raised,message", [
    (KeyboardInterrupt(), KeyboardInterrupt, None),
    (asyncio.CancelledError(), KeyboardInterrupt, None),  # Ctrl-C while asyncio.run waited on the read
    ("timeout", checkpoint.CheckpointError, r"failed in a way that may pass \(Exception: .*\); nothing was moved"),
    ("out of memory", checkpoint.CheckpointError,
     r"reading checkpoint step 1 ran out of device memory .*; nothing was moved: resume on more devices"),
    (RuntimeError("RESOURCE_EXHAUSTED: quota exceeded for storage reads"), checkpoint.CheckpointError,
     r"failed in a way that may pass \(Exception: .*\); nothing was moved"),  # storage's, not the device's
])
def test_a_checkpoint_read_stopped_by_ctrl_c_a_timeout_or_memory_is_left_in_place(tmp_path, monkeypatch, failure,
                                                                                 raised, message):
    """Orbax re-raises whatever stops an array read as a plain Exception: Ctrl-C is the user
    stopping the run, a timeout may pass, and too little device memory is the slice's; none is
    a damaged step to set aside."""
    import grain

    ckpts = checkpoint.TrainCheckpoints(tmp_path, PRESETS["tiny"], 2, run={"trainer": "sft"})
    params, opt_state = {"w": jnp.arange(4.0)}, {"m": jnp.zeros(4)}
    data = iter(grain.MapDataset.range(8).to_iter_dataset())
    ckpts.save(1, params, opt_state, data, {"step": 1})
    ckpts.manager.wait_until_finished()
    if failure == "timeout":
        with pytest.raises(TimeoutError) as timeout:
            asyncio.run(_timed_out_read())
        failure = timeout.value
    elif failure == "out of memory":  # XLA's own error, as a read that cannot be placed on the device gets
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as too_large:
            jnp.zeros((1 << 40,), jnp.float32).block_until_ready()  # 4 TiB
        failure = too_large.value
    monkeypatch.setattr(ckpts, "restore", _orbax_read_failure(failure))
    with pytest.raises(raised, match=message):
        ckpts.restore_latest(params, opt_state, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "model_config.json"]  # nothing set aside
    monkeypatch.undo()
    restored_params, _, meta = ckpts.restore_latest(params, opt_state, data)[:3]
    assert meta["step"] == 1 and np.array_equal(restored_params["w"], np.arange(4.0))
    ckpts.close()


def test_an_unreadable_step_that_cannot_be_moved_aside_says_so_and_why_it_was_to_be(tmp_path, monkeypatch):
    """A step that does not read back is renamed; when the rename fails (a folder this user may
    not write), the one line says which step, why it was moved and what to do, and no warning
    says that it was moved."""
    (tmp_path / "5").mkdir()  # a step a crash left holding nothing
    ckpts = checkpoint.TrainCheckpoints(tmp_path, PRESETS["tiny"], 2, run={"trainer": "sft"})

    def refuse(path, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(path), None, str(target))

    monkeypatch.setattr(type(epath.Path(tmp_path)), "rename", refuse)
    with pytest.raises(checkpoint.CheckpointError, match=(
            f"^{re.escape(str(tmp_path))}: checkpoint step 5 is unreadable \\(ValueError: it has no meta, opt_state, "
            f"params\\) and could not be moved aside \\(to 5.unreadable-.*: Permission denied\\); give this user "
            f"write access to {re.escape(str(tmp_path))}, or move that step's folder out of it, and rerun$")):
        ckpts.restore_latest(None, None, None)
    assert (tmp_path / "5").is_dir()
    ckpts.close()


def test_a_moved_run_directory_is_no_config_change():
    saved = {"output_dir": "runs/a", "steps": 2, "data": {"output_dir": "x"}}
    assert config_changes(saved, {**saved, "output_dir": "/elsewhere/a"}) == []
    assert config_changes(saved, {**saved, "data": {"output_dir": "y"}}) == ['data.output_dir: "x" -> "y"']
    judge = {"base_url": "http://a:8000/v1", "concurrency": 32, "model": "m"}  # a judge served elsewhere
    moved = {**saved, "judge": {**judge, "base_url": "http://b:8000/v1", "concurrency": 8}}
    assert config_changes({**saved, "judge": judge}, moved) == []
    assert config_changes({**saved, "judge": judge}, {**moved, "judge": {**judge, "model": "n"}}) == [
        'judge.model: "m" -> "n"']
    # A judge asked more patiently (re-asked on unparsable replies), or a run allowed more failed
    # grades before it stops (the remedy the failures-stop suggests), trains what it trained.
    patient = {**judge, "parse_retries": 5, "max_failed_fraction": 0.5}
    assert config_changes({**saved, "judge": {**judge, "parse_retries": 2, "max_failed_fraction": 0.05}},
                          {**saved, "judge": patient}) == []



def test_a_run_moved_with_its_pipeline_finds_the_model_it_started_from_where_it_moved(tmp_path, monkeypatch):
    """A pipeline's folder moved or copied: its GRPO stage recorded the SFT export beside it
    (p1/sft/hf), which now stands at p2/sft/hf. A path outside what moved is still a change."""
    from qed_jax.config import moved_path, run_moved

    old, new, elsewhere = tmp_path / "p1", tmp_path / "p2", tmp_path / "other"
    for folder in (new / "sft" / "hf", elsewhere / "sft" / "hf"):
        folder.mkdir(parents=True)
    moved = run_moved(str(old / "grpo"), new / "grpo", None)
    assert moved == (str(old), str(new))
    assert run_moved(str(new / "grpo"), new / "grpo", None) is None  # not moved
    assert moved_path(str(old / "sft" / "hf"), moved, None) == str(new / "sft" / "hf")
    assert moved_path(str(elsewhere / "sft" / "hf"), moved, None) == str(elsewhere / "sft" / "hf")
    saved = {"output_dir": str(old / "grpo"), "model": {"path": str(old / "sft" / "hf")}, "steps": 4}
    now = {**saved, "output_dir": str(new / "grpo"), "model": {"path": str(new / "sft" / "hf")}}
    assert config_changes(saved, now, moved=moved) == []
    assert config_changes(saved, now) == [f'model.path: "{old}/sft/hf" -> "{new}/sft/hf"']
    other = {**now, "model": {"path": str(elsewhere / "sft" / "hf")}}
    assert config_changes(saved, other, moved=moved) == [f'model.path: "{old}/sft/hf" -> "{elsewhere}/sft/hf"']
    # Relative paths, recorded in a working directory (the repository's root) and given from it now.
    monkeypatch.chdir(tmp_path)
    moved = run_moved("p1/grpo", "p2/grpo", str(tmp_path))
    assert moved == (str(old), str(new))
    assert config_changes({**saved, "model": {"path": "p1/sft/hf"}}, {**now, "model": {"path": "p2/sft/hf"}},
                          recorded_in=str(tmp_path), moved=moved) == []

class KeyValueStore:
    """The coordination service's key-value store as SaveBarrier uses it, in one process."""

    def __init__(self):
        import threading

        self.values, self.lock = {}, threading.Lock()

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        with self.lock:
            if key in self.values and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.values[key] = value

    def key_value_dir_get(self, directory: str) -> list[tuple[str, str]]:
        with self.lock:
            return [(k, v) for k, v in self.values.items() if k.startswith(directory)]

    def key_value_delete(self, key: str) -> None:
        with self.lock:
            self.values.pop(key, None)


def run_barriers(sequences: list[list[str]], store: KeyValueStore | None = None) -> list[BaseException | None]:
    """Each sequence's barriers passed in order by its own process (a thread), all sharing one
    store; what each raised (None: it passed them all)."""
    import threading

    from qed_jax.multihost import SaveBarrier

    store, raised = store or KeyValueStore(), [None] * len(sequences)
    barriers = [SaveBarrier(store, i, len(sequences)) for i in range(len(sequences))]

    def run(i):
        barriers[i].POLL_S = 0.001
        try:
            for key in sequences[i]:
                barriers[i](key, timeout_ms=60_000)
        except Exception as e:
            raised[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sequences))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a barrier still waits"
    return raised


def test_save_barriers_pass_together_and_fail_together():
    """Orbax's checkpoint barriers through SaveBarrier: processes that pass the same barriers in
    the same order (keys reused by every save) all pass; one that skips a barrier (its part of the
    save failed before it) leaves the others stuck at another barrier than its own, and every
    process's barrier fails at once rather than wait for Orbax's 20-minute timeout."""
    from qed_jax.multihost import SaveFailedElsewhere

    saves = ["write", "commit", "start", "end"] * 25
    store = KeyValueStore()
    assert run_barriers([saves, saves, saves], store) == [None, None, None]
    # each process's arrivals at earlier barriers were deleted: the store does not grow with the saves
    assert sorted(k for k in store.values if "/arrived/" in k) == [f"qed_jax/save/arrived/end#25/{i}" for i in range(3)]
    skipped = ["write", "commit", "start", "end", "start", "end"]  # the second save's write failed on process 2
    raised = run_barriers([saves[:8], saves[:8], skipped])
    assert all(isinstance(e, SaveFailedElsewhere) for e in raised), raised
    assert str(raised[0]) == "it failed on another process, whose log says why"


def test_a_save_failure_marked_outside_the_barriers_fails_them():
    import threading

    from qed_jax.multihost import SaveBarrier, SaveFailedElsewhere

    store = KeyValueStore()
    waiting, failing = SaveBarrier(store, 0, 2), SaveBarrier(store, 1, 2)
    waiting.POLL_S = 0.001
    raised = []

    def wait():
        try:
            waiting("write", timeout_ms=60_000)
        except SaveFailedElsewhere as e:
            raised.append(e)

    thread = threading.Thread(target=wait)
    thread.start()
    failing.fail()  # its save raised in its own thread, before its first barrier
    thread.join(timeout=60)
    assert not thread.is_alive() and len(raised) == 1


def test_a_save_barrier_passed_by_the_others_while_it_looks_is_not_a_failure():
    """The others may arrive at a barrier, leave it and wait at the save's next one between a
    process's look at that barrier and its look at where they wait: it has passed, not failed.
    That interleaving, forced in one thread: process 1's steps run inside process 0's first look."""
    from qed_jax.multihost import SaveBarrier

    store = KeyValueStore()

    class LookingTooEarly(SaveBarrier):
        looks = 0

        def complete(self, barrier):
            self.looks += 1
            if self.looks > 1:
                return super().complete(barrier)
            # what process 0's first look read was incomplete; then process 1 passes "write"
            store.key_value_set("qed_jax/save/arrived/write#1/1", "")
            store.key_value_set("qed_jax/save/arrived/commit#1/1", "")
            store.key_value_set("qed_jax/save/waiting/1", "commit#1", allow_overwrite=True)
            return False

    LookingTooEarly(store, 0, 2)("write", timeout_ms=5_000)
    assert not store.key_value_dir_get("qed_jax/save/failed/")


def test_processes_of_a_job_share_what_each_decides_alone():
    """Where things are may differ between a job's processes (each host its own judge, its own
    copy of the data), but not the failed-grade limit, on which each decides whether a step
    stops, nor the export's dtype: a process going on alone, or exporting otherwise, would wait
    for the others forever."""
    from qed_jax.trainer import settings_processes_share

    config = {"steps": 2, "data": {"path": "/host0/rows.jsonl"},
              "judge": {"base_url": "http://a:8000/v1", "max_retries": 3, "max_failed_fraction": 0.05}}
    elsewhere = {**config, "data": {"path": "/host1/rows.jsonl"},
                 "judge": {**config["judge"], "base_url": "http://b:8000/v1", "max_retries": 5}}
    assert settings_processes_share(config, False) == settings_processes_share(elsewhere, False)
    laxer = {**config, "judge": {**config["judge"], "max_failed_fraction": 0.5}}
    assert settings_processes_share(config, False) != settings_processes_share(laxer, False)
    no_export = {**config, "export_dtype": None}  # the export gathers from every process: all export, alike
    assert settings_processes_share({**config, "export_dtype": "bfloat16"}, False) != \
        settings_processes_share(no_export, False)
    assert settings_processes_share(config, False) != settings_processes_share(config, True)


def test_a_damaged_run_config_or_another_commands_run_is_never_continued(tmp_path):
    from qed_jax.config import dump_json
    from qed_jax.evaluate import EvalConfig
    from qed_jax.trainer import check_run_config

    config = load_config(sft.SFTConfig, REPO / "configs/sft/tiny.yaml")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON \(.*\); the run's config is damaged: move "
                                          r"the folder aside, or use another output_dir$"):
        check_run_config(tmp_path, config, resume_with_changes=True)
    # Unreadable (here a folder of that name; on a pod, process 0's error must reach every process
    # as a ConfigError, or the others wait for it forever).
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json: cannot be read \(Is a directory\); the run's config is "):
        check_run_config(tmp_path, config, resume_with_changes=True)
    (tmp_path / "config.json").rmdir()
    evaluation = load_config(EvalConfig, REPO / "configs/eval/imo_proofbench.yaml", ["model.path=m"])
    (tmp_path / "config.json").write_text(dump_json(evaluation))
    for trainer in (config, load_config(grpo.GRPOConfig, REPO / "configs/rl/tiny.yaml")):
        with pytest.raises(ConfigError, match=rf"^{tmp_path} holds another command's run or a model \(.*config\.json "
                                              r"is not a trainer's config: an evaluation's, a pipeline's or a "
                                              r"model's, such as a trainer's hf/ export\); use another output_dir$"):
            check_run_config(tmp_path, trainer, resume_with_changes=True)
        # The trainer refuses it before it makes anything there (it left an empty checkpoints/ before).
        with pytest.raises(ConfigError, match=rf"^{tmp_path} holds another command's run"):
            (sft.train if trainer is config else grpo.train)(replace(trainer, output_dir=str(tmp_path)))
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.json"]
    # A pipeline's own folder (its stages' runs are folders inside it) is no trainer's run either.
    pipeline = tmp_path / "pipeline"
    (pipeline / "base" / "hf").mkdir(parents=True)
    for trainer in (config, load_config(grpo.GRPOConfig, REPO / "configs/rl/tiny.yaml")):
        with pytest.raises(ConfigError, match=rf"^{pipeline} is a pipeline's folder \(it holds base/hf\): its stages' "
                                              r"runs are folders inside it \(sft/, grpo/, eval/...\); use another "
                                              r"output_dir$"):
            (sft.train if trainer is config else grpo.train)(replace(trainer, output_dir=str(pipeline)))
        assert sorted(p.name for p in pipeline.iterdir()) == [".lock", "base"]
    # The other trainer's run: named as such, not a list of most keys and advice to pass
    # --resume-with-changes (its checkpoints refuse that flag when read).
    trainers = {"sft": config, "grpo": load_config(grpo.GRPOConfig, REPO / "configs/rl/tiny.yaml")}
    for written, now in (("grpo", "sft"), ("sft", "grpo")):
        (tmp_path / "config.json").write_text(dump_json(trainers[written]))
        with pytest.raises(ConfigError, match=rf"^{tmp_path} holds a qed-jax {written} run, and this is qed-jax {now}: "
                                              r"give this run its own output_dir \(to start from that run's model, "
                                              r"set model.path to its hf/ folder\)$"):
            check_run_config(tmp_path, trainers[now], resume_with_changes=True)


def test_any_failure_reading_the_run_config_reaches_the_other_processes(tmp_path, monkeypatch):
    """Process 0 reads config.json alone; the others wait in `largest` for its verdict. An error of
    any kind there must go through that agreement (here a stand-in for an unforeseen one), else
    the other processes of a pod wait for process 0 until the collective times out."""
    from qed_jax import trainer

    config = load_config(sft.SFTConfig, REPO / "configs/sft/tiny.yaml")
    (tmp_path / "config.json").write_text("{}")
    agreed = []
    monkeypatch.setattr(trainer, "largest", lambda value: agreed.append(value) or value)

    def unforeseen(*args):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(trainer, "read_run_config", unforeseen)
    with pytest.raises(RuntimeError, match="unforeseen"):
        trainer.check_run_config(tmp_path, config, resume_with_changes=True)
    assert agreed == [1]


def test_a_mesh_that_does_not_fit_the_devices_says_what_to_set():
    from qed_jax.sharding import MeshConfig, make_mesh

    devices = jax.devices()[:1]
    with pytest.raises(ConfigError, match=r"^mesh.data=1, mesh.fsdp=4, mesh.tensor=1 needs 4 devices, not the 1 "
                                          r"device here; choose sizes"):
        make_mesh(MeshConfig(data=1, fsdp=4), devices)
    with pytest.raises(ConfigError, match=r"^mesh.data=-1, mesh.fsdp=4, mesh.tensor=1: the other axes \(4 devices\) "
                                          r"do not divide the 1 device here"):
        make_mesh(MeshConfig(fsdp=4), devices)
    for sizes, named in (({"fsdp": 0}, "mesh.fsdp=0"), ({"data": 1, "fsdp": -2}, "mesh.fsdp=-2"),
                         ({"data": 2, "fsdp": -3}, "mesh.fsdp=-3")):
        with pytest.raises(ConfigError, match=rf"^{named}: a mesh axis size is at least 1, or -1 for the devices left$"):
            make_mesh(MeshConfig(**sizes), devices)
    # Sizes no device count fits: refused as the config loads (so by --print-config too), with the key.
    from qed_jax.grpo import GRPOConfig
    from qed_jax.sft import SFTConfig

    for cls, override, message in (
            (SFTConfig, "mesh.data=0", "mesh.data=0: a mesh axis size is at least 1, or -1 for the devices left"),
            (GRPOConfig, "mesh.tensor=-2", "mesh.tensor=-2: a mesh axis size is at least 1"),
            (GRPOConfig, "sampling.mesh={data: -1, fsdp: -1}", "sampling.mesh.data=-1, sampling.mesh.fsdp=-1, "
                                                               "sampling.mesh.tensor=1: at most one mesh axis may be -1")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            load_config(cls, None, [override])


def test_mesh_sizes_that_cannot_work_from_a_config_file_name_the_file(tmp_path):
    """As any value a config file gives: the error names the file the mesh section came from."""
    from qed_jax.sft import SFTConfig

    for mesh, message in (("{data: -1, fsdp: -1}", "mesh.data=-1, mesh.fsdp=-1, mesh.tensor=1: at most one mesh axis "
                                                    "may be -1 (the devices left); give the others their sizes"),
                          ("{data: -1, tensor: 0}", "mesh.tensor=0: a mesh axis size is at least 1")):
        path = tmp_path / "sft.yaml"
        path.write_text(f"mesh: {mesh}\n")
        with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {message}')}"):
            load_config(SFTConfig, path, ["steps=3"])


def test_metrics_cut_short_by_a_crash_are_dropped_not_fatal(tmp_path, caplog):
    rows = [{"step": n, "loss": 1.0 / n} for n in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    with caplog.at_level("WARNING"):
        log = MetricsLog(tmp_path, resume_step=2)
    log.close()
    assert log.history == rows[:2]
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    assert "metrics.jsonl: line 4 is cut short or damaged; dropped" in caplog.text
    assert not list(tmp_path.glob("*.partial"))


def test_ctrl_c_writes_a_checkpoint_before_exiting(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY_SFT, "steps=400",
                             "checkpoint_every=1000", "eval_every=0", f"output_dir={tmp_path}"], cwd=REPO,
                            env=cli_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert_signal_writes_a_checkpoint(proc, tmp_path, steps=3, signum=signal.SIGINT)
    assert "Traceback" not in proc.stderr.read()


def test_a_second_job_on_a_run_directory_in_use_fails_at_once_naming_the_first(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):  # this test process is the first job
        result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY_SFT, "steps=1",
                                 f"output_dir={run}"], cwd=REPO, env=cli_env(1), capture_output=True, text=True)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1] == (
            f"qed-jax sft: error: {run} is in use by another run (pid {os.getpid()} on {socket.gethostname()}); "
            "wait for it to end, or give this run another output_dir")
        for trainer, config in [(sft, sft.SFTConfig), (grpo, grpo.GRPOConfig)]:
            yaml = REPO / "configs" / ("sft" if trainer is sft else "rl") / "tiny.yaml"
            with pytest.raises(ConfigError, match="is in use by another run"):
                trainer.train(load_config(config, yaml, [f"output_dir={run}"]))
        assert [p.name for p in run.iterdir()] == [".lock"]  # refused before writing anything
    with pytest.raises(RuntimeError, match="a failure inside"), run_lock(run):
        (run / "metrics.jsonl").write_text("")
        raise RuntimeError("a failure inside")
    with run_lock(run):  # released, however the holder's body ended
        pass
    assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl"]  # what a run wrote stays
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from qed_jax.trainer import run_lock\nwith run_lock(Path(sys.argv[1])):\n"
                               "    print('locked', flush=True)\n    time.sleep(600)", str(run)],
                              cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on"), run_lock(run):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run):  # the OS released a killed holder's lock
        pass


def test_a_run_that_fails_before_it_begins_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "runs" / "sft"
    with pytest.raises(ConfigError, match="no tokenizer"):
        sft.train(load_config(sft.SFTConfig, None, ["model.preset=tiny", f"output_dir={out}"]))
    assert not list(tmp_path.iterdir())
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "other").write_text("kept")
    with pytest.raises(ConfigError, match="no tokenizer"):
        sft.train(load_config(sft.SFTConfig, None, ["model.preset=tiny", f"output_dir={out}"]))
    assert [p.name for p in tmp_path.rglob("*")] == ["runs", "other"]
    (out / "notes").mkdir(parents=True)  # a folder of the user's, empty, in the run directory: left alone
    with pytest.raises(ConfigError, match="no tokenizer"):
        sft.train(load_config(sft.SFTConfig, None, ["model.preset=tiny", f"output_dir={out}"]))
    assert (out / "notes").is_dir()


def test_a_run_directory_that_cannot_be_listed_is_locked_and_left_as_it_is(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    listing = Path.iterdir

    def write_only(path):  # a folder with -wx permissions (root reads any, so the OS cannot show it here)
        if path == out:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", write_only)
    with pytest.raises(RuntimeError, match="failed in the setup"), run_lock(out):
        raise RuntimeError("failed in the setup")
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == [".lock"]  # what it cannot see, it does not clean up


def test_a_lock_file_removed_while_it_is_taken_is_taken_again(tmp_path, monkeypatch):
    """A run that ends having begun nothing removes its lock file: a job that had opened that
    file just before takes the lock on the file that is gone, which would let a third job take
    the lock on a new file beside it. The job checks that it holds the file now in place."""
    import fcntl

    flock = fcntl.flock
    removed = []

    def holder_ends_first(f, operation):  # the holder removes the file and lets go between open and flock
        if not removed:
            removed.append(tmp_path / ".lock")
            (tmp_path / ".lock").unlink()
        return flock(f, operation)

    (tmp_path / "notes").mkdir()  # a run directory with something in it keeps its lock file at the end
    monkeypatch.setattr(fcntl, "flock", holder_ends_first)
    with run_lock(tmp_path):
        monkeypatch.setattr(fcntl, "flock", flock)
        assert removed
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))} is in use by another run \(pid "
                                              rf"{os.getpid()} on "):
            with run_lock(tmp_path):
                pass


def test_a_run_directory_on_a_filesystem_without_locks_runs_unguarded(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="qed_jax.trainer"), run_lock(tmp_path):
        pass
    assert f"cannot lock the run directory ([Errno {errno.ENOLCK}] {os.strerror(errno.ENOLCK)})" in caplog.text


@pytest.mark.parametrize("limit", [64 * 1024, 10_000], ids=["orbax_files", "tokenizer_file"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line_and_a_rerun_resumes(tmp_path, limit):
    """Orbax writes in the background and raises a failed write (a full disk) at the next save or
    at the end, with hundreds of lines of its threads' tracebacks: one line names the step and
    what to do, and a rerun with room to write trains again, each step recorded once. The
    checkpoint folder's own files (the tiny tokenizer.json is 21 kB, over the second limit) fail
    the same way, and leave no truncated file that every step's loading would read."""
    run = tmp_path / "run"
    limited = subprocess.run(cli_with_file_size_limit(
        ["sft", "--config", TINY_SFT, "eval_every=0", "export_dtype=null", "checkpoint_every=1", "steps=3",
         f"output_dir={run}"], limit), cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=300)
    assert limited.returncode == 2, limited.stderr[-3000:]
    assert not (run / "checkpoints" / "tokenizer.json").exists() or limit > 21_000
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert "Traceback" not in limited.stderr and len(limited.stderr.splitlines()) < 20, limited.stderr[-3000:]
    assert limited.stderr.strip().splitlines()[-1] == (
        f"qed-jax sft: error: {run / 'checkpoints'}: writing checkpoint step 1 failed (file too large); no step was "
        "saved before it: fix that and rerun the same command to start the run again")
    resumed = _sft(["steps=3", f"output_dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]  # step 1 trained again, recorded once


@pytest.mark.slow  # a run, then a rerun as another user (as root, after an import check): 15-25 s on 2 cores
def test_a_checkpoint_step_this_user_may_not_read_is_refused_and_left_in_place():
    """Orbax reads a step it may not open as one that holds nothing: it was set aside as damaged
    (every step alike, copied by another user), and the run was told to start over. It is an
    error that passes once the permissions are fixed: refused, nothing moved. As root, whom no
    permission stops, the rerun is another user's (nobody's, through setpriv)."""
    import tempfile

    as_root = os.geteuid() == 0
    become = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_root else []
    if as_root and (not shutil.which("setpriv") or subprocess.run(
            [*become, sys.executable, "-c", "import qed_jax"], cwd=REPO, capture_output=True).returncode):
        pytest.skip("cannot run this checkout as another user (nobody, through setpriv)")
    work = Path(tempfile.mkdtemp(prefix="qed-jax-permissions-"))  # in /tmp: tmp_path's parents are root's alone
    run = work / "run"
    try:
        work.chmod(0o777)
        env = {**cli_env(1), "HOME": str(work)}
        first = _sft(["steps=2", f"output_dir={run}"], env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        if as_root:  # nobody's run directory, but step 2 (root's)
            for path in [run, *run.rglob("*")]:
                if path.relative_to(run).parts[1:2] != ("2",):
                    os.chown(path, 65534, 65534)
        (run / "checkpoints" / "2").chmod(0)
        again = subprocess.run([*become, sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY_SFT,
                                "eval_every=0", "export_dtype=null", "checkpoint_every=1", "steps=2",
                                f"output_dir={run}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 2, again.stderr[-3000:]
        assert again.stderr.strip().splitlines()[-1] == (
            f"qed-jax sft: error: {run / 'checkpoints'}: reading checkpoint step 2 failed in a way that may pass "
            f"(PermissionError: [Errno 13] Permission denied: '{run / 'checkpoints' / '2'}'); nothing was moved: "
            "give this user read access to it, then rerun the same command")
        assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["1", "2"]
    finally:
        if (run / "checkpoints" / "2").exists():
            (run / "checkpoints" / "2").chmod(0o755)
        shutil.rmtree(work)


def test_a_save_that_fails_as_it_starts_is_named_as_its_own_step(tmp_path, monkeypatch):
    """Part of a save is written before Orbax's `save` returns (the data iterator's state): a full
    disk there is the new step's failure, not the finished step before it, which a rerun resumes
    from."""
    import grain

    ckpts = checkpoint.TrainCheckpoints(tmp_path, PRESETS["tiny"], 2, run={"trainer": "sft"})
    params, opt_state = {"w": jnp.arange(4.0)}, {"m": jnp.zeros(4)}
    data = iter(grain.MapDataset.range(8).to_iter_dataset())
    ckpts.save(1, params, opt_state, data, {"step": 1})
    ckpts.manager.wait_until_finished()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpts.manager, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=(
            rf"^{tmp_path}: writing checkpoint step 2 failed \(no space left on device\); the steps saved before it "
            r"are kept: free some space and rerun the same command to resume from the newest of them$")):
        ckpts.save(2, params, opt_state, data, {"step": 2})
    monkeypatch.undo()
    ckpts.close()
    assert ckpts.manager.all_steps() == [1]


def full_disk_while_making(where: str, step_folder: str, monkeypatch) -> None:
    """A full disk from the moment a save of `step_folder` (e.g. "2.orbax-checkpoint-tmp") makes
    `where`: its own folder, its metadata file, or the folders of its items (in that order)."""
    from orbax.checkpoint._src.metadata import checkpoint as metadata
    from orbax.checkpoint._src.path import async_path

    mkdir, write = async_path.mkdir, metadata._MetadataStoreImpl.write

    def full(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    async def full_mkdir(path, *args, **kwargs):
        if step_folder in str(path) and (where == "step folder" or path.name != step_folder):
            raise full(path)
        return await mkdir(path, *args, **kwargs)

    def full_write(self, file_path, data):
        if where != "item folders" and step_folder in str(file_path):
            raise full(file_path)
        return write(self, file_path, data)

    monkeypatch.setattr(async_path, "mkdir", full_mkdir)
    monkeypatch.setattr(metadata._MetadataStoreImpl, "write", full_write)


@pytest.mark.parametrize("where", ["step folder", "step metadata", "item folders"])
def test_a_full_disk_while_a_save_makes_its_folders_fails_that_save_at_once(tmp_path, monkeypatch, caplog, where):
    """Orbax makes a step's folders in a thread of its own by default, which only logs a failure
    there, while the save waits five minutes for them and then fails with a timeout that says
    nothing of the disk. With one process they are made before `save` returns: that save fails at
    once with its reason, closing does not replace that error with the step's metadata write that
    failed with it, and the step before it is kept. asyncio's reports of the save's other failed
    tasks are filtered: it makes them only when Orbax's event loop stops before their failures are
    gathered, which depends on timing, so that check fails only in some runs when the filter is
    missing."""
    import gc

    import grain

    params, opt_state = {"w": jnp.arange(4.0)}, {"m": jnp.zeros(4)}
    data = iter(grain.MapDataset.range(8).to_iter_dataset())
    ckpts = checkpoint.TrainCheckpoints(tmp_path, PRESETS["tiny"], 2, run={"trainer": "sft"})
    ckpts.save(1, params, opt_state, data, {"step": 1})
    ckpts.manager.wait_until_finished()
    full_disk_while_making(where, "2.orbax-checkpoint-tmp", monkeypatch)
    with caplog.at_level("ERROR", logger="asyncio"):
        with pytest.raises(checkpoint.CheckpointError, match=(
                rf"^{tmp_path}: writing checkpoint step 2 failed \(no space left on device\); the steps saved before "
                "it are kept: free some space and rerun the same command to resume from the newest of them$")):
            try:
                ckpts.save(2, params, opt_state, data, {"step": 2})
            finally:
                ckpts.close()
        gc.collect()  # the failed save's other tasks, reported by asyncio when collected
    reported = [r.getMessage() for r in caplog.records if r.name == "asyncio"]  # Orbax's own (absl) are its log
    assert not reported, reported
    monkeypatch.undo()
    again = checkpoint.TrainCheckpoints(tmp_path, PRESETS["tiny"], 2, run={"trainer": "sft"})  # a rerun, with room
    assert again.manager.all_steps() == [1]
    again.save(2, params, opt_state, data, {"step": 2})
    again.close()
    assert again.manager.all_steps() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["1", "2"]


@pytest.mark.parametrize("where", ["step folder", "step metadata"])
def test_a_full_disk_while_a_model_is_saved_names_the_disk(tmp_path, monkeypatch, where):
    """`qed-jax convert`'s save: the step's metadata write that fails with its folders does not
    replace the error that says why."""
    full_disk_while_making(where, "0.orbax-checkpoint-tmp", monkeypatch)
    with pytest.raises(checkpoint.CheckpointError, match=(
            rf"^{tmp_path / 'out'}: writing step 0 failed \(no space left on device\); fix that and run the command "
            r"again \(with --overwrite\)$")):
        checkpoint.save_model(Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0)), tmp_path / "out")


def test_a_full_disk_is_named_among_orbaxs_paths():
    error = ValueError('RESOURCE_EXHAUSTED: Error writing "1.0.count/0" in OCDBT database at local file '
                       '"/ck/3.orbax-checkpoint-tmp/opt_state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
                       '"/ck/3.orbax-checkpoint-tmp/opt_state.orbax-checkpoint-tmp/ocdbt.process_0/d/39c5": Failed to '
                       "write 643262 bytes to file 8: No space left on device [os_error_code='28']")
    assert checkpoint.write_failure(error) == "no space left on device"
    # several processes, and process 0 could not make the step's folders: every process's save times out
    waited = RuntimeError("DEADLINE_EXCEEDED: GetKeyValue() timed out with key: awaitable_signals_contract_1/"
                          "step_directory_creation and duration: 5m "
                          "[type.googleapis.com/tensorflow.CoordinationServiceError='']")
    late = TimeoutError("Timeout waiting for key 'awaitable_signals_contract_2/item_directory_creation'")
    for error in (waited, late):
        assert checkpoint.write_failure(error) == (
            "the step's folders were not made within Orbax's wait for them; process 0 makes them, and its log says why")
    assert checkpoint.write_failure(RuntimeError("a failure of something else")) == \
        "RuntimeError: a failure of something else"


UNAWAITED_COROUTINE_CHILD = """
import sys
from qed_jax import cli
try:
    cli.main(sys.argv[1:])
except Exception as e:  # -v raises the error
    print(type(e).__name__, file=sys.stderr)
async def left_by_a_failed_save():
    pass
left_by_a_failed_save()  # created and never awaited, as Orbax leaves some when a save fails
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_coroutine_left_unawaited_after_the_error_is_reported_only_with_v(tmp_path, verbose):
    """Python warns of each coroutine that was never run as it is collected (two lines, the last
    one about tracemalloc): a failed save's, after the one-line error, are the user's concern
    only with -v."""
    config = tmp_path / "typo.yaml"
    config.write_text("trainer: sft\nstep: 3\n")
    child = subprocess.run([sys.executable, "-c", UNAWAITED_COROUTINE_CHILD, "sft", "--config", str(config),
                            *(["-v"] if verbose else [])], cwd=REPO, env=cli_env(1), capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    if verbose:
        assert "ConfigError" in child.stderr and "'left_by_a_failed_save' was never awaited" in child.stderr
    else:
        lines = child.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"qed-jax sft: error: {config}: unknown config key step"), lines


STOPPED_INSIDE_A_LIBRARY_CHILD = """
import os, signal, sys, time
from qed_jax import cli

def run(args):
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises KeyboardInterrupt here
        time.sleep(30)
    except KeyboardInterrupt:  # as anyio's cancel scope does when the interrupt lands inside one
        if sys.argv[1] == "cancelled":
            import asyncio
            raise asyncio.CancelledError()  # a BaseException
        if sys.argv[1] == "full_disk":  # the command's cleanup, writing what it has, fails
            raise OSError(28, "No space left on device", "runs/x/samples.jsonl")
        raise RuntimeError("Attempted to exit a cancel scope that isn't the current tasks's current cancel scope")

cli._eval = run
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("error", ["runtime_error", "cancelled"])
def test_a_stop_signal_that_a_library_turns_into_another_error_still_stops_the_command(error):
    """SIGTERM landing in an evaluation's HTTP request once ended in anyio's RuntimeError, a
    traceback and status 1: a stop, whatever error it ends in, says so and exits 128 + signal."""
    child = subprocess.run([sys.executable, "-c", STOPPED_INSIDE_A_LIBRARY_CHILD, error, "eval", "--config", "x.yaml"],
                           cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-3000:]
    assert child.stderr.strip().splitlines() == [
        "qed-jax eval: stopped by SIGTERM; what finished is kept: rerun the same command to continue"]


def test_a_write_that_fails_while_a_stopped_command_cleans_up_is_reported_not_called_kept():
    """A cleanup that cannot write (a full disk) after SIGTERM still ends as a stop, but its line
    names the failed write instead of saying that what finished is kept."""
    child = subprocess.run([sys.executable, "-c", STOPPED_INSIDE_A_LIBRARY_CHILD, "full_disk", "eval", "--config",
                            "x.yaml"], cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-3000:]
    assert child.stderr.strip().splitlines() == [
        "qed-jax eval: stopped by SIGTERM; then a write failed: runs/x/samples.jsonl: No space left on device; "
        "free space on that disk, or choose a path on another"]


def test_asyncio_reports_of_a_failed_restores_other_reads_are_dropped(caplog):
    """After a restore fails, the arrays still being read fail unawaited, and asyncio logs each one
    whenever its task is garbage-collected, possibly after the one-line error (the corrupted-step
    test above saw it once in a loaded run); so are Orbax's tasks left waiting when a save failed
    (on the other process of a job, for the folder the failed save never made). Those reports are
    dropped; others are kept."""
    import asyncio
    import gc
    import logging

    from qed_jax import checkpoint

    def unretrieved(error):
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(error)
        del future
        gc.collect()
        loop.close()

    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(checkpoint._not_abandoned_orbax_task)
    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            unretrieved(ValueError("OUT_OF_RANGE: Error reading \"layers.q_norm/.zarray\" [tensorstore_spec='{}']"))
            assert not caplog.records
            unretrieved(ValueError("a failure of something else"))
            assert [r.getMessage().splitlines()[0] for r in caplog.records] == ["Future exception was never retrieved"]
            caplog.clear()

            async def orbax_wait_for_base_dir_creation():  # its name, as Orbax's coroutines' paths, says orbax
                await asyncio.Event().wait()

            async def something_else():
                await asyncio.Event().wait()

            for coroutine in (orbax_wait_for_base_dir_creation, something_else):
                loop = asyncio.new_event_loop()
                task = loop.create_task(coroutine())
                loop.run_until_complete(asyncio.sleep(0))  # started, and waiting
                loop.close()
                del task
                gc.collect()
            assert [r.getMessage().splitlines()[0] for r in caplog.records] == ["Task was destroyed but it is pending!"]
            assert "something_else" in caplog.records[0].getMessage()
    finally:
        asyncio_log.removeFilter(checkpoint._not_abandoned_orbax_task)


# Runs a program whose temporary buffer is 192 MiB six times and prints the fewest page faults of
# a run after the second (the first compiles; what else the heap holds settles by the third):
# after `host.keep_freed_memory` ("keep"), after a `qed-jax sft` run in the same process ("sft":
# argv[2] and argv[3] are its output folder and config), or as glibc and JAX leave it ("default").
KEEP_FREED_MEMORY_CHILD = """
import resource, sys
import jax, jax.numpy as jnp
from qed_jax import cli, host
if sys.argv[1] == "sft":
    assert cli.main(["sft", "--config", sys.argv[3], f"output_dir={sys.argv[2]}", "steps=1", "eval_every=0",
                     "export_dtype=null"]) == 0
kept = host.keep_freed_memory() if sys.argv[1] == "keep" else None
step = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * x, axis=0)[-1] + jnp.cumsum(jnp.cos(x), axis=1)[:, -1])
x = jnp.ones((4096, 4096), jnp.float32)
temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, temp // 4096, min(faults[2:]), faults)
"""


@pytest.mark.slow  # three child processes (192 MiB buffers, an SFT run): 20-30 s on 2 cores
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_sft_keeps_freed_memory_on_cpu_so_each_step_reuses_the_last_ones_pages(tmp_path):
    """A compiled step's temporary buffer is freed when the step ends. By default glibc unmaps it
    and the next step faults every page in again; after `host.keep_freed_memory`, which `qed-jax
    sft` calls before JAX's backend starts (else it would not take), later runs fault almost
    none."""
    def later_runs(*args):
        out = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY_CHILD, *args], cwd=REPO, env=cli_env(1),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        kept, pages, faults = out.stdout.splitlines()[-1].split(maxsplit=3)[:3]
        return kept, int(pages), int(faults), out.stdout.splitlines()[-1]

    kept, pages, faults, line = later_runs("keep")
    assert kept == "True" and pages >= 30_000, line
    assert faults < pages // 20, line
    _, _, faults, line = later_runs("sft", str(tmp_path / "sft"), TINY_SFT)
    assert faults < pages // 20, line
    huge_pages = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (huge_pages.exists() and "[always]" in huge_pages.read_text()):  # else 512 pages per fault
        _, _, faults, line = later_runs("default")
        assert faults > pages // 2, line


def test_a_run_whose_checkpoints_are_gone_says_so_before_it_trains_again_from_step_0(tmp_path, caplog):
    """metrics.jsonl past step 0 and no checkpoint: its checkpoints were deleted, or sit on a disk
    not mounted. Training starts again, and says so while the user can still stop it."""
    from tests.helpers import REPO

    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "steps=2", "checkpoint_every=2", "eval_every=0", "log_every=1", "micro_batches=1"]
    config = load_config(sft.SFTConfig, REPO / "configs/sft/tiny.yaml", overrides)
    sft.train(config)
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "hf")  # not a finished run any more either
    with caplog.at_level(logging.WARNING, logger="qed_jax.trainer"):
        sft.train(config)
    assert (f"{out}: no checkpoint of this run is in {out / 'checkpoints'}, though its metrics.jsonl reaches step 2: "
            "training starts again from step 0") in caplog.text
    assert [row["step"] for row in read_metrics(out)] == [1, 2]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qed_jax.trainer"):
        sft.train(config)  # finished: nothing said, nothing trained
    assert "no checkpoint of this run" not in caplog.text
