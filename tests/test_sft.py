"""SFT: packing and masks, gradient accumulation, learning, exact resume after SIGKILL,
sharded and multi-process training, bad data and bad config."""

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from functools import partial
from unittest import mock
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qed_jax import cli
from qed_jax.config import ConfigError, PRESETS, load_config
from qed_jax.data import DataConfig, packed_batches, prepare_sft, read_rows, sft_messages, tokenize_sft
from qed_jax.hf import SafetensorsFolder
from qed_jax.model import Qwen3
from qed_jax.sft import SFTConfig, accumulated_grads, eval_loss, total_tokens, train, train_step
from qed_jax.sft import summary as sft_summary
from qed_jax.tokenizer import load_tokenizer
from tests.helpers import assert_signal_writes_a_checkpoint, cli_env, finish, processes, read_metrics, wait_for_steps

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "sft" / "tiny.yaml")
TOKENIZER = str(REPO / "configs" / "tiny" / "tokenizer")
DATA = str(REPO / "configs" / "data" / "tiny_proofs.jsonl")


def _run_sft(args, devices=1, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY, *args],
                            cwd=REPO, env=cli_env(devices), **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def test_packed_batch_masks_segments_and_positions(tokenizer):
    config = DataConfig(path=DATA, max_length=256, overflow="truncate", packing_bins=4)
    rows = read_rows(DATA)
    examples, stats = prepare_sft(rows, tokenizer, config)
    assert stats.kept == len(rows) == 48
    batch = next(iter(packed_batches(examples, config, batch_size=2, epochs=1)))
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    model = Qwen3(PRESETS["tiny"], rngs=nnx.Rngs(0))
    packed_logits = np.asarray(model(jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
                                     segment_ids=jnp.asarray(batch["segment_ids"])))
    checked = 0
    for row in range(2):
        seg = batch["segment_ids"][row]
        for s in set(seg.tolist()) - {0}:
            idx = np.flatnonzero(seg == s)
            tokens, mask, pos = batch["tokens"][row, idx], batch["loss_mask"][row, idx], batch["positions"][row, idx]
            assert pos.tolist() == list(range(len(idx)))  # positions restart in each segment
            text = tokenizer.decode(tokens)
            answer = tokenizer.decode(tokens[mask == 1])
            # Exactly the assistant turn after its generation prefix, through <|im_end|>.
            prefix, _, rest = text.rpartition("<|im_start|>assistant\n<think>\n")
            assert answer == rest.rstrip("\n") and answer.endswith("<|im_end|>") and "</think>" in answer
            assert tokens[mask == 1][-1] == im_end and mask[: list(tokens).count(im_start)].sum() == 0
            # The packed row's logits equal this example run alone.
            alone = np.asarray(model(jnp.asarray(tokens[None])))[0]
            np.testing.assert_allclose(packed_logits[row, idx], alone, atol=1e-5)
            checked += 1
    assert checked >= 3  # at least one row held several segments


def test_gradient_accumulation_equals_one_big_batch():
    config = PRESETS["tiny"]
    model = Qwen3(config, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    n, b, length = 4, 2, 32
    batch = {
        "tokens": rng.integers(0, config.vocab_size, (n * b, length)).astype(np.int32),
        "loss_mask": (rng.random((n * b, length)) < 0.6).astype(np.int32),
        "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 8 + [0] * 4]), n * b, 0).astype(np.int32),
        "positions": np.repeat(np.array([list(range(20)) + list(range(8)) + [0] * 4]), n * b, 0).astype(np.int32),
    }
    # Plain SGD, so the update is the gradient itself (Adam would amplify float noise in
    # near-zero gradients into sign flips).
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(params)
    step = jax.jit(lambda p, o, bt: train_step(graphdef, optimizer, p, o, bt))
    one = step(params, opt_state, {k: jnp.asarray(v[None]) for k, v in batch.items()})
    many = step(params, opt_state, {k: jnp.asarray(v.reshape(n, b, length)) for k, v in batch.items()})
    for a, c in zip(jax.tree.leaves(one[0]), jax.tree.leaves(many[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)
    np.testing.assert_allclose(float(one[2]["loss"]), float(many[2]["loss"]), atol=1e-5)
    grads = accumulated_grads(graphdef, params, {k: jnp.asarray(v[None]) for k, v in batch.items()})[0]
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # a real update


def test_the_logged_speed_counts_a_window_past_two_to_the_31_tokens():
    # Fifty steps of the recipe's size (1,024 rows of 45,056 tokens), each counted on the device
    # as an int32, as train_step does: their sum as int32 would wrap to a negative tokens_per_s.
    per_step = [jnp.sum(jnp.ones((1024, 45_056), jnp.int8) > 0)] * 50
    assert per_step[0].dtype == jnp.int32
    assert total_tokens(per_step) == 50 * 1024 * 45_056 > 2**31


def test_eval_loss_runs_the_micro_batches_one_at_a_time():
    """The eval loss of a batch split into micro-batches equals the whole batch's, and its
    program holds about one micro-batch's activations, not the whole batch's."""
    config = PRESETS["tiny"].replace(vocab_size=4096)  # the head's activations dominate
    graphdef, state = nnx.split(Qwen3(config, rngs=nnx.Rngs(1)))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    n, b, length = 4, 4, 256
    rows = {"tokens": rng.integers(0, config.vocab_size, (n * b, length)),
            "loss_mask": rng.random((n * b, length)) < 0.6, "segment_ids": np.ones((n * b, length)),
            "positions": np.tile(np.arange(length), (n * b, 1))}
    rows = {k: v.astype(np.int32) for k, v in rows.items()}
    whole, split = ({k: jnp.asarray(v.reshape(m, -1, length)) for k, v in rows.items()} for m in (1, n))
    fn = jax.jit(partial(eval_loss, graphdef))
    (loss_whole, count_whole), (loss_split, count_split) = fn(params, whole), fn(params, split)
    assert float(count_whole) == float(count_split) > 0
    np.testing.assert_allclose(float(loss_split), float(loss_whole), rtol=1e-6)
    temp = {m: fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
            for m, batch in ((1, whole), (n, split))}
    assert temp[n] < temp[1] / 2, temp


def test_the_eval_loss_gets_the_steps_micro_batches(tokenizer):
    from qed_jax.sft import evaluate
    from qed_jax.sharding import MeshConfig, make_mesh
    from qed_jax.trainer import batch_sharding

    config = load_config(SFTConfig, TINY, ["batch_size=32", "micro_batches=4", "eval_batches=2"])
    examples = prepare_sft(read_rows(DATA)[:6], tokenizer, config.data)[0]
    shapes = []

    def eval_fn(params, batch):
        shapes.append(batch["tokens"].shape)
        return jnp.float32(2.0), jnp.float32(1.0)

    assert evaluate(eval_fn, None, examples, config, batch_sharding(make_mesh(MeshConfig(data=-1)))) == 2.0
    assert shapes == [(4, 8, config.data.max_length)] * 2  # 8 rows of each micro-batch over 8 devices


def test_tiny_config_loss_halves_and_exports(tmp_path):
    relative = os.path.relpath(tmp_path, REPO)  # as README's command uses runs/sft-tiny
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY,
                             f"output_dir={relative}"], cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # stderr is not a terminal: the progress bar is drawn at its start, its end and every 30 s
    # between, not at each of the 120 steps.
    assert result.stderr.count("sft: ") <= 3 + (time.monotonic() - started) // cli.LOG_PROGRESS_SECONDS
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    assert "eval_loss" in read_metrics(tmp_path)[-1]
    from transformers import Qwen3ForCausalLM

    assert Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size == 512
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    # The trainer's checkpoint directory loads as a model too, equal to the (fp32) export.
    import qed_jax

    tokens = jnp.asarray([[5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(np.asarray(qed_jax.from_pretrained(tmp_path / "checkpoints")(tokens)),
                                  np.asarray(qed_jax.from_pretrained(tmp_path / "hf")(tokens)))


def _final_params(directory):
    st = SafetensorsFolder(Path(directory) / "hf")
    return {name: np.array(st.read(name)) for name in st.names()}


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    common = ["steps=20", "checkpoint_every=5", "eval_every=0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run_sft([*common, f"output_dir={straight}"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL).wait() == 0

    proc = _run_sft([*common, f"output_dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(killed, 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(read_metrics(killed))
    assert 12 <= logged < 20, logged
    assert _run_sft([*common, f"output_dir={killed}"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL).wait() == 0

    a, b = _final_params(straight), _final_params(killed)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    keys = ("step", "loss", "grad_norm", "target_tokens", "lr")
    curve = lambda d: [{k: m[k] for k in keys} for m in read_metrics(d)]  # noqa: E731
    assert curve(straight) == curve(killed)  # identical, the resumed part included
    assert [m["step"] for m in read_metrics(killed)] == list(range(1, 21))


def test_a_step_that_diverges_stops_the_run_before_it_is_saved(tmp_path, capsys):
    """An absurd learning rate makes step 2's gradient NaN (and every parameter after its
    update): the run stops with exit 1 instead of saving NaN checkpoints over step 1's (only two
    are kept) and exporting NaN weights."""
    args = ["sft", "--config", TINY, f"tokenizer={TOKENIZER}", f"data.path={DATA}", f"output_dir={tmp_path}",
            "steps=6", "checkpoint_every=1", "keep_checkpoints=2", "log_every=3", "eval_every=0",
            "optim.lr=1e30", "optim.warmup_ratio=0", "micro_batches=1"]
    assert cli.main(args) == 1
    assert re.search(r"error: step 2: grad_norm nan( and parameters no longer finite after the update)?, so training "
                     "stopped before saving it; the newest checkpoint, step 1, is kept: lower optim.lr",
                     capsys.readouterr().err)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]
    assert not (tmp_path / "hf").exists()


def test_speed_is_measured_over_the_steps_since_the_last_log(tmp_path, monkeypatch):
    """Steps run queued ahead of the host, so a logged step's speed covers every step since the
    last log: a clock that reads 10 s more at each look gives 10 s per window of 5 steps. The
    first window starts after the first step, which compiles: 10 s for steps 2 to 5."""
    from types import SimpleNamespace

    from qed_jax import sft

    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(sft, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    common = [f"tokenizer={TOKENIZER}", f"data.path={DATA}", "steps=10", "eval_every=0", "micro_batches=1"]
    sft.train(load_config(sft.SFTConfig, TINY, [*common, "log_every=1", f"output_dir={tmp_path / 'each'}"]))
    sft.train(load_config(sft.SFTConfig, TINY, [*common, "log_every=5", f"output_dir={tmp_path / 'fifth'}"]))
    each, fifth = read_metrics(tmp_path / "each"), read_metrics(tmp_path / "fifth")
    assert [m["step"] for m in fifth] == [5, 10] and [m["step_s"] for m in fifth] == [2.5, 2.0]
    for m, first in zip(fifth, (1, 5)):
        assert m["tokens_per_s"] * 10 == pytest.approx(sum(e["tokens"] for e in each[first:m["step"]]))


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path):
    proc = _run_sft(["steps=400", "checkpoint_every=1000", "eval_every=0", f"output_dir={tmp_path}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_signal_writes_a_checkpoint(proc, tmp_path, steps=5)


def test_fsdp_tensor_sharded_losses_match_one_device(tmp_path):
    common = ["steps=5", "eval_every=0", "checkpoint_every=100", "export_dtype=null"]
    one = subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY, *common,
                          "mesh.data=1", f"output_dir={tmp_path / 'one'}"], cwd=REPO, env=cli_env(1),
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    sharded = subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY, *common,
                              "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", f"output_dir={tmp_path / 'eight'}"],
                             cwd=REPO, env=cli_env(8), capture_output=True, text=True)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    a = [m["loss"] for m in read_metrics(tmp_path / "one")]
    b = [m["loss"] for m in read_metrics(tmp_path / "eight")]
    assert len(a) == 5 and np.allclose(a, b, atol=1e-4, rtol=0), (a, b)


@pytest.mark.slow  # two processes: 15-20 s on 2 cores
def test_two_processes_train_and_agree_on_the_loss(tmp_path):
    with processes(["sft", "--config", TINY, "steps=3", "eval_every=0", "export_dtype=null", f"output_dir={tmp_path}"],
                   count=2, devices=1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as procs:
        outputs = finish(procs)
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    finals = [next(line for line in o[0].splitlines() if line.startswith("done at step 3")) for o in outputs]
    assert "(process 0)" in finals[0] and "(process 1)" in finals[1]
    assert finals[0].split(": loss ")[1].split(";")[0] == finals[1].split(": loss ")[1].split(";")[0]
    assert len(read_metrics(tmp_path)) == 3


@pytest.mark.slow  # two processes, eight times: 80-160 s on 2 cores
def test_a_two_process_job_that_cannot_start_fails_in_both(tmp_path):
    from qed_jax.trainer import run_lock

    def both_fail(*overrides, entry=None) -> list[str]:
        """The stderr of each of two SFT processes, both of which must exit 2, neither waiting."""
        with processes(["sft", "--config", TINY, "steps=1", *overrides], count=2, devices=1, entry=entry,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as procs:
            outputs = finish(procs, timeout=120)
        assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outputs]
        return [err for _, err in outputs]

    with run_lock(tmp_path):  # held by this test, as by a first job
        errors = both_fail(f"output_dir={tmp_path}")
    assert all(f"{tmp_path} is in use by another run" in e for e in errors)
    a_file = tmp_path / "a_file"  # process 0 cannot make the run directory: both fail, neither waits
    a_file.write_text("")
    errors = both_fail(f"output_dir={a_file}")
    assert "is a file where a folder is needed" in errors[0]
    assert f"process 0 could not open {a_file}/.lock" in errors[1]
    # One held-out row for two processes: one would have no eval batch and the other would wait
    # for it in the eval forever.
    errors = both_fail("steps=2", "eval_every=1", "data.eval_rows=1", f"output_dir={tmp_path / 'eval'}")
    assert all("1 held-out examples for 2 processes, which each read their own share; raise data.eval_rows" in e
               for e in errors)
    # A mesh whose data axes leave a process no rows of its own: refused before the first step.
    errors = both_fail("mesh.data=1", "mesh.tensor=2", f"output_dir={tmp_path / 'tp'}")
    assert all("the 1 data-parallel devices (mesh data x fsdp) do not split over the 2 processes" in e for e in errors)
    # A data file only process 1 lacks (hosts share no disk): both stop at once, process 0 saying
    # where to look, where it waited in its first collective op until JAX's timeouts aborted it.
    errors = both_fail(f"output_dir={tmp_path / 'data'}",
                       entry={1: ["-c", WITH_ARGS.format(extra=["data.path=/nonexistent/rows.jsonl"])]})
    assert "SFT's setup (config, model, tokenizer, data) failed on another process (its log says why)" in errors[0]
    assert "/nonexistent/rows.jsonl does not exist" in errors[1]
    # So does a model folder only process 1 lacks, or holds cut off: its files are checked in the
    # setup, and read after it.
    from tests.helpers import make_hf_model_with_tokenizer

    model, damaged = tmp_path / "model", tmp_path / "damaged"
    make_hf_model_with_tokenizer(model)
    shutil.copytree(model, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    for elsewhere, says in ((tmp_path / "nowhere", f"model.path {tmp_path / 'nowhere'} does not exist"),
                            (damaged, f"{weights}: not a readable safetensors file")):
        errors = both_fail("model.preset=null", f"model.path={model}", "tokenizer=null",
                           f"output_dir={tmp_path / 'model-run'}",
                           entry={1: ["-c", WITH_ARGS.format(extra=[f"model.path={elsewhere}"])]})
        assert "SFT's setup (config, model, tokenizer, data) failed on another process" in errors[0], errors[0]
        assert says in errors[1], errors[1]
    # A config only process 1 refuses: it joins the others before reading it, so none waits.
    errors = both_fail(f"output_dir={tmp_path / 'config'}", entry={1: ["-c", WITH_ARGS.format(extra=["steps=0"])]})
    assert "reading the config failed on another process (its log says why)" in errors[0]
    assert "steps must be at least 1, got 0" in errors[1]
    # Another config or other data that process 1 accepts: refused by both before the first step (another
    # steps would leave process 0 waiting in its last save; another lr would train on a mix in silence).
    edited = tmp_path / "rows.jsonl"
    lines = (REPO / "configs/data/tiny_proofs.jsonl").read_text().splitlines()
    edited.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same rows, another order
    for extra, what in ((["steps=2"], "another config"), (["--resume-with-changes"], "another config"),
                        (["export_dtype=null"], "another config"),
                        ([f"data.path={edited}"], "other training data")):
        errors = both_fail(f"output_dir={tmp_path / 'mixed'}", entry={1: ["-c", WITH_ARGS.format(extra=extra)]})
        assert all(f"process 1 was given {what} than process 0: every process of a job runs the same command on "
                   "the same files" in e for e in errors), errors
        assert not (tmp_path / "mixed").exists()  # stopped before it began

@pytest.mark.slow  # two processes, three times: 40-80 s on 2 cores
def test_a_resume_that_one_process_would_read_other_data_in_is_refused_by_both(tmp_path):
    """Hosts share no disk: one whose copy of the data differs refuses to resume the run (as it
    would to start it), and the other, whose copy matches, must not go on to restore and wait
    for it."""
    run = ["steps=2", f"output_dir={tmp_path / 'run'}", "eval_every=0", "export_dtype=null"]
    with processes(["sft", "--config", TINY, *run], count=2, devices=1, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True) as procs:
        outputs = finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    edited = tmp_path / "rows.jsonl"
    lines = (REPO / "configs/data/tiny_proofs.jsonl").read_text().splitlines()
    edited.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same rows, another order
    with processes(["sft", "--config", TINY, *run], count=2, devices=1,
                   entry={1: ["-c", WITH_ARGS.format(extra=[f"data.path={edited}"])]},
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as procs:
        outputs = finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outputs]
    assert all("process 1 was given other training data than process 0" in o[1] for o in outputs)


WITH_ARGS = """
import sys
from qed_jax.cli import main
args = sys.argv[1:]
at = args.index("--coordinator")
sys.exit(main(args[:at] + {extra!r} + args[at:]))
"""


@pytest.mark.slow  # two processes: 20-40 s on 2 cores
def test_a_stop_signal_to_one_process_stops_both_after_the_same_step(tmp_path):
    """A preemption's SIGTERM reaches a pod's hosts at different moments: the processes agree after
    every step, so both write the same checkpoint and exit, and neither waits for the other."""
    with processes(["sft", "--config", TINY, "steps=400", "log_every=1", "checkpoint_every=1000", "eval_every=0",
                    f"output_dir={tmp_path}"], count=2, devices=1, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL) as procs:
        assert_signal_writes_a_checkpoint(procs[1], tmp_path, steps=3)
        assert procs[0].wait(timeout=120) == 128 + signal.SIGTERM


@pytest.mark.slow  # two processes, twice: 40-80 s on 2 cores
def test_a_checkpoint_write_failing_on_one_process_stops_both(tmp_path):
    """A full disk on one host: that process's part of a save fails in Orbax's background thread,
    and it skips the barrier that the other's save waits at. Both saves fail, each says why in
    one line, and neither waits for the other (Orbax's barriers alone held both for 20 minutes)."""
    from tests.helpers import file_size_limited_entry

    args = ["sft", "--config", TINY, "steps=4", "checkpoint_every=2", "eval_every=0", "export_dtype=null",
            f"output_dir={tmp_path}"]
    with processes(args, count=2, devices=1, entry={1: file_size_limited_entry(65536)}, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True) as procs:
        outputs = finish(procs, timeout=180)
    assert [p.returncode for p in procs] == [2, 2], [err[-3000:] for _, err in outputs]
    errors = [err.strip().splitlines()[-1] for _, err in outputs]
    then = "no step was saved before it: fix that and rerun the same command to start the run again"
    assert errors[0] == (f"qed-jax sft: error: {tmp_path}/checkpoints: writing checkpoint step 2 failed (it failed on "
                         f"another process, whose log says why); {then}"), errors[0]
    assert errors[1] == (f"qed-jax sft: error: {tmp_path}/checkpoints: writing checkpoint step 2 failed (file too "
                         f"large); {then}"), errors[1]
    assert not (tmp_path / "checkpoints" / "2").exists()
    with processes(args, count=2, devices=1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as procs:
        outputs = finish(procs, timeout=180)  # the disk has room again: the same command runs
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


@pytest.mark.slow  # two processes: 20-40 s on 2 cores
def test_a_process_killed_mid_run_stops_the_other_with_one_line(tmp_path):
    """kill -9 of one host's process (an OOM kill, a host lost): the other finds its collectives
    broken at the next step and exits at once, in one line, rather than wait for the dead one at
    JAX's shutdown barrier until the coordination service aborts it (100 s and pages of C++ logs)."""
    # No save in flight when it dies: the other would wait for it at Orbax's barrier until JAX's
    # coordination service gives up on it (a heartbeat timeout) and aborts the process itself.
    with processes(["sft", "--config", TINY, "steps=400", "log_every=1", "checkpoint_every=1000", "eval_every=0",
                    f"output_dir={tmp_path}"], count=2, devices=1, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True) as procs:
        wait_for_steps(tmp_path, 3)
        procs[1].kill()
        procs[1].wait()
        _, err = finish(procs[:1], timeout=60)[0]
    assert procs[0].returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("qed-jax sft: error: another process of this job stopped (") and last.endswith(
        "the checkpoints written are kept: run the same command again on every host to resume from the newest"), last
    assert "Traceback" not in err


# The CLI, with a SIGTERM sent to the process itself as the trainer starts closing its checkpoints
# (after the loop's last agreement): the moment a late preemption notice can arrive.
SIGTERM_WHILE_CLOSING = """
import os, signal, sys
from qed_jax import checkpoint
close = checkpoint.TrainCheckpoints.close
def close_after_a_signal(self):
    os.kill(os.getpid(), signal.SIGTERM)
    close(self)
checkpoint.TrainCheckpoints.close = close_after_a_signal
from qed_jax.cli import main
sys.exit(main())
"""


@pytest.mark.slow  # two processes, twice: 30-60 s on 2 cores
def test_a_stop_signal_while_the_last_checkpoint_closes_stops_both_and_a_rerun_exports(tmp_path):
    """Export gathers the weights from every process, so all of them must export or none: a
    signal to one process after the last step, while its checkpoint is being written, makes both
    exit with that checkpoint written; the rerun has no step left to run and exports."""
    args = ["sft", "--config", TINY, "steps=2", "checkpoint_every=1000", "eval_every=0", f"output_dir={tmp_path}"]
    with processes(args, count=2, devices=1, entry={1: ["-c", SIGTERM_WHILE_CLOSING]}, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True) as procs:
        outputs = finish(procs, timeout=180)
        assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, [err[-1500:] for _, err in outputs]
    assert "wrote a checkpoint at step 2" in outputs[0][1]
    assert (tmp_path / "checkpoints" / "2").is_dir() and not (tmp_path / "hf").exists()
    with processes(args, count=2, devices=1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as procs:
        outputs = finish(procs, timeout=180)
        assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outputs]
    assert len(read_metrics(tmp_path)) == 2  # no step ran again
    assert SafetensorsFolder(tmp_path / "hf").names()
    # A changed config is refused by every process alike (process 0 decides: on a pod only its
    # host has the run directory), none of them left waiting for the others.
    changed = [*args, "steps=3"]
    with processes(changed, count=2, devices=1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as procs:
        outputs = finish(procs, timeout=180)
        assert [p.returncode for p in procs] == [2, 2], [err[-1500:] for _, err in outputs]
    assert "differs from this one (steps: 2 -> 3)" in outputs[0][1]
    assert "differs from this one (process 0 lists the changes)" in outputs[1][1]


def test_malformed_rows_are_skipped_counted_and_reported(tmp_path, tokenizer, caplog):
    good = [json.loads(line) for line in open(DATA)][:10]
    lines = [json.dumps(r) for r in good]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"problem": "P", "proof": "Q"}))  # no reasoning_content, no messages
    lines.insert(6, json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}))
    lines.insert(8, json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}))
    lines.insert(0, "")  # blank lines count in the line numbers the warnings give
    lines.insert(4, "  ")
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        examples, stats = prepare_sft(read_rows(str(path)), tokenizer, DataConfig(path=str(path)), source=str(path))
    assert stats.kept == len(examples) == 10 and sum(stats.skipped.values()) == 4
    assert [r.getMessage() for r in caplog.records[:4]] == [f"{path}: skipped {where}" for where in (
        "line 4: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "line 7: field 'reasoning_content' is missing or empty (and there are no messages)",
        "line 9: messages[0] has unknown role 'wizard'", "line 11: messages[1] has empty content")]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a part of the file (held-out rows): still named by their lines
        prepare_sft(read_rows(str(path))[6:10], tokenizer, DataConfig(), source="part")
    assert [r.getMessage().split(":")[1] for r in caplog.records] == [" skipped line 9", " skipped line 11"]

    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY, f"data.path={path}",
                             "steps=2", "eval_every=0", "export_dtype=null", f"output_dir={tmp_path / 'run'}"],
                            cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "10 of 14 rows kept, 4 malformed skipped" in result.stderr
    # Said again in the closing line, which the warnings do not scroll away.
    assert re.search(rf"^done at step 2: loss \S+; {re.escape(str(path))}: 10 of 14 rows kept, 4 malformed "
                     r"skipped; metrics in ", result.stdout, re.M), result.stdout


def test_an_empty_system_prompt_is_kept_as_the_chat_template_writes_it(tokenizer):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Prove that 1 + 1 = 2."},
                {"role": "assistant", "content": "By definition.", "reasoning_content": "Peano."}]
    assert sft_messages({"messages": messages}) == messages
    ids, mask = tokenize_sft(tokenizer, messages)
    written = tokenizer.apply_chat_template(messages, tokenize=False)
    assert written.startswith("<|im_start|>system\n<|im_end|>\n")
    assert tokenizer.decode(ids) == written
    assert tokenizer.decode(ids[mask.astype(bool)]).endswith("By definition.<|im_end|>")
    with pytest.raises(ValueError, match=r"^messages\[1\] has empty content$"):  # an empty user turn is not
        sft_messages({"messages": [messages[0], {**messages[1], "content": " "}, messages[2]]})


def test_an_assistant_turn_of_thinking_alone_is_an_empty_reply(tokenizer):
    """A reply given as messages whose content ends with its </think> has no proof after it
    (as a `proof` field left empty has none): trained, the model would learn to end its turn
    right after thinking. Refused as an empty reply."""
    user = {"role": "user", "content": "Prove that 1 + 1 = 2."}
    for content in ("<think>\nPeano.\n</think>\n\n", "<think>Peano.</think>", "Peano.</think>  \n"):
        row = {"messages": [user, {"role": "assistant", "content": content}]}
        with pytest.raises(ValueError, match=r"^messages\[1\] has no reply after its </think> \(its content is "
                                             r"thinking alone\)$"):
            sft_messages(row)
    kept = {"messages": [user, {"role": "assistant", "content": "<think>\nPeano.\n</think>\n\nBy definition."}]}
    ids, mask = tokenize_sft(tokenizer, sft_messages(kept))
    assert tokenizer.decode(ids[mask.astype(bool)]).endswith("By definition.<|im_end|>")
    assert sft_messages({"messages": [user, {"role": "assistant", "content": "No thinking here."}]})
    examples, stats = prepare_sft([("line 1", row), ("line 2", kept)], tokenizer, DataConfig())
    assert len(examples) == stats.kept == 1 and stats.first_skipped == [
        ("line 1", "messages[1] has no reply after its </think> (its content is thinking alone)")]


def test_a_conversation_without_a_user_message_is_skipped(tokenizer):
    """Messages with no user turn (a system prompt and the reply alone) hold no problem, as a row
    without its `problem` field holds none; such a reply was trained on an empty prompt (and
    Qwen3's template, which writes thinking only after the last user turn, left its thinking out)."""
    reply = {"role": "assistant", "content": "<think>\nPeano.\n</think>\n\nBy definition."}
    bad = {"messages": [{"role": "system", "content": "Be rigorous."}, reply]}
    good = {"messages": [{"role": "user", "content": "Prove that 1 + 1 = 2."}, reply]}
    why = "no user message before the assistant's: the reply has no problem it answers"
    with pytest.raises(ValueError, match=f"^{re.escape(why)}$"):
        sft_messages(bad)
    examples, stats = prepare_sft([("line 1", bad), ("line 2", good)], tokenizer, DataConfig())
    assert len(examples) == stats.kept == 1 and stats.first_skipped == [("line 1", why)]


def test_reasoning_content_that_is_not_text_is_skipped():
    """Qwen3's chat template writes a reply's reasoning_content only when it is a string: one
    given as a list or a number was trained as an empty thinking block, in silence."""
    tokenizer = load_tokenizer(TOKENIZER)  # a fresh copy: the module's fixture is shared
    tokenizer.chat_template = (  # Qwen3's handling of reasoning_content, in brief
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' %}"
        "{%- set r = m.reasoning_content if m.reasoning_content is string else '' %}"
        "{{- '<think>\\n' + r + '\\n</think>\\n\\n' }}{%- endif %}{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    user = {"role": "user", "content": "Prove that 1 + 1 = 2."}
    good = {"messages": [user, {"role": "assistant", "content": "By definition.", "reasoning_content": "Peano."}]}
    rows = [("line 1", good)] + [(f"line {n}", {"messages": [user, {**good["messages"][1], "reasoning_content": r}]})
                                 for n, r in ((2, ["Peano."]), (3, 7))]
    examples, stats = prepare_sft(rows, tokenizer, DataConfig())
    assert "<think>\nPeano.\n</think>" in tokenizer.decode(examples[0]["tokens"])
    assert len(examples) == stats.kept == 1 and stats.first_skipped == [
        ("line 2", "messages[1] has reasoning_content that is not text (list): give the thinking as one string"),
        ("line 3", "messages[1] has reasoning_content that is not text (int): give the thinking as one string")]


def test_a_reply_whose_thinking_never_closes_is_skipped(tokenizer):
    """A reply cut off while thinking (no </think>), under a template whose generation prompt
    opens <think> (the bundled one, Qwen3-Thinking-2507's) or with its own <think>: trained, the
    model would learn to end its turn inside its thinking, with no proof after it."""
    user = {"role": "user", "content": "Prove that 1 + 1 = 2."}
    why = ("the answer opens its thinking and never closes it (no </think>, e.g. a reply cut off while thinking): "
           "trained, the model would learn to end its turn inside its thinking, with no proof")
    for content in ("<think>\nBy Peano, 1 + 1 is the successor of", "<think>\nPeano.\n\n"):
        with pytest.raises(ValueError, match=f"^{re.escape(why)}$"):
            tokenize_sft(tokenizer, [user, {"role": "assistant", "content": content}])
    ids, mask = tokenize_sft(tokenizer, [user, {"role": "assistant", "content": "<think>\nPeano.\n</think>\n\nQED."}])
    assert tokenizer.decode(ids[mask.astype(bool)]) == "Peano.\n</think>\n\nQED.<|im_end|>"
    plain = load_tokenizer(TOKENIZER)  # a template that never thinks: nothing to close
    plain.chat_template = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                           "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    ids, mask = tokenize_sft(plain, [user, {"role": "assistant", "content": "By definition."}])
    assert plain.decode(ids[mask.astype(bool)]) == "By definition.<|im_end|>"


def test_an_answer_holding_the_chats_own_tokens_as_text_is_skipped(tokenizer, caplog):
    """"<|im_end|>" written in a proof tokenizes as the stop token (as transformers' template does
    too): trained, the model would learn to end its turn mid-proof. Such a row is skipped and
    named; the same text in the prompt is left alone."""
    row = {key: json.loads(open(DATA).readline())[key] for key in ("problem", "reasoning_content", "proof")}
    rows = [("line 1", row),
            ("line 2", {**row, "proof": row["proof"] + " The stop token is <|im_end|> here."}),
            ("line 3", {**row, "reasoning_content": "Think <|im_start|>user of it."}),
            ("line 4", {**row, "problem": row["problem"] + " (<|im_end|> is the stop token.)"}),
            ("line 5", {**row, "proof": "Clearly 1=1.<|endoftext|> QED."})]  # a stop token too
    with caplog.at_level(logging.WARNING):
        examples, stats = prepare_sft(rows, tokenizer, DataConfig(path="rows"), source="rows")
    assert stats.kept == len(examples) == 2 and sum(stats.skipped.values()) == 3
    assert [r.getMessage()[:37] for r in caplog.records] == ["rows: skipped line 2: the answer's te",
                                                             "rows: skipped line 3: the answer's te",
                                                             "rows: skipped line 5: the answer's te"]
    assert "which tokenize as the chat's own tokens" in caplog.records[0].getMessage()


def test_an_unknown_word_in_the_answer_is_not_taken_for_a_missing_chat_token():
    """A tokenizer with an unk token and no <|im_start|> token: an answer's unknown word (the unk
    id, which a lookup of the missing token also returns) is no chat token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qed_jax.tokenizer import THINKING_CHAT_TEMPLATE

    words = ["user", "assistant", "Prove", "it", "Proof", "done", "think"]
    core = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_end|>", "<think>", "</think>"]})
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    ids, mask = tokenize_sft(tokenizer, sft_messages({"problem": "Prove it", "reasoning_content": "think",
                                                      "proof": "Proof done, unknown"}))
    assert tokenizer.unk_token_id in ids[mask == 1].tolist()


def test_a_row_the_chat_template_refuses_is_skipped_and_no_template_is_one_error(caplog):
    from qed_jax.tokenizer import THINKING_CHAT_TEMPLATE

    tokenizer = load_tokenizer(TOKENIZER)  # a fresh copy: the module's fixture is shared
    # Some templates refuse what they do not write, e.g. a system turn (raise_exception: a jinja2 error).
    tokenizer.chat_template = ("{%- if messages | selectattr('role', 'equalto', 'system') | list %}"
                               "{{- raise_exception('System role not supported') }}{%- endif %}"
                               + THINKING_CHAT_TEMPLATE)
    rows = [("line 1", {"problem": "p", "reasoning_content": "r", "proof": "q"}),
            ("line 2", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                     {"role": "assistant", "content": "a"}]})]
    with caplog.at_level(logging.WARNING):
        examples, stats = prepare_sft(rows, tokenizer, DataConfig())
    assert len(examples) == 1 and [r.getMessage() for r in caplog.records] == [
        "data: skipped line 2: the chat template refuses this conversation (System role not supported)"]
    tokenizer.chat_template = None  # a base model's tokenizer: not the rows' fault, so not a skip of each
    with pytest.raises(ConfigError, match=r"has no chat template \(a base model's\?\): use the tokenizer of a chat"):
        prepare_sft(rows, tokenizer, DataConfig())
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }"  # broken: nor is this
    with pytest.raises(ConfigError, match=r"chat template of the tokenizer .* is not valid Jinja \(line 1: "):
        prepare_sft(rows, tokenizer, DataConfig())


def test_a_conversation_without_reasoning_for_a_thinking_template_says_so(caplog):
    from qed_jax.tokenizer import THINKING_CHAT_TEMPLATE

    tokenizer = load_tokenizer(TOKENIZER)  # a fresh copy: the module's fixture is shared
    plain = {"messages": [{"role": "user", "content": "Prove 1 > 0."}, {"role": "assistant", "content": "Clear."}]}
    thought = ("line 2", {"problem": "p", "reasoning_content": "r", "proof": "q"})  # one usable row
    with caplog.at_level(logging.WARNING):
        prepare_sft([("line 1", plain), thought], tokenizer, DataConfig())
    assert [r.getMessage() for r in caplog.records] == [
        "data: skipped line 1: the chat template opens the answer with <think>, and the assistant message has no "
        "reasoning: give it reasoning_content (its thinking), or use a tokenizer whose chat template does not think"]
    # A template that writes every assistant turn's <think></think>, empty without reasoning (as
    # Qwen3-Thinking-2507's does): the row would teach the model to close its thinking at once.
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE.replace(
        "message['role'] == 'assistant' and message.get('reasoning_content')", "message['role'] == 'assistant'"
    ).replace("message['reasoning_content'].strip", "(message.get('reasoning_content') or '').strip")
    assert "<think>\n\n</think>\n\nClear." in tokenizer.apply_chat_template(plain["messages"], tokenize=False)
    with pytest.raises(ValueError, match="^the chat template opens the answer with <think>, and the assistant"):
        tokenize_sft(tokenizer, plain["messages"])
    tokenize_sft(tokenizer, [*plain["messages"][:-1], {**plain["messages"][-1], "reasoning_content": "r"}])
    # Any other template that renders a conversation's start otherwise than its prompt: where they part.
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE.replace("<think>\n' }}{%- endif %}", "Answer:' }}{%- endif %}")
    with pytest.raises(ValueError, match=re.escape(
            "the chat template renders the conversation's prompt as 'Answer:'... where the whole conversation has "
            "'Clear.<|im_end|>\\n'...: it does not render it as prompt + answer")):
        tokenize_sft(tokenizer, plain["messages"])


def test_nearby_data_seeds_give_unrelated_orders():
    # Grain reshuffles epoch e with its seed + e: with data.seed as that seed, seed 1 repeated
    # seed 0's order one epoch early (a seed sweep trained on the same stream). Rows of one
    # example each, so the order shows.
    config = DataConfig(max_length=8, packing_bins=1, prefetch=0)
    examples = [{"tokens": np.full(8, i, np.int32), "loss_mask": np.ones(8, np.int32)} for i in range(12)]

    def order(seed, rows):
        batches = iter(packed_batches(examples, dataclasses.replace(config, seed=seed), batch_size=1, epochs=None))
        return [int(next(batches)["tokens"][0, 0]) for _ in range(rows)]

    seed_0, seed_1 = order(0, 36), order(1, 24)
    assert sorted(seed_0[:12]) == sorted(seed_1[12:24]) == list(range(12))
    assert seed_0[12:] != seed_1 and seed_0[:12] != seed_1[:12] and order(0, 36) == seed_0


@pytest.mark.parametrize("max_length,epochs,process_count", [(512, 1, 1), (256, 1, 1), (256, 3, 1), (256, 1, 2),
                                                         (256, 2, 2)])
def test_epochs_train_each_example_that_many_times_but_for_a_last_partial_batch(tokenizer, max_length, epochs,
                                                                                process_count, caplog):
    """The steps `epochs` gives are the whole batches of that many passes, as the trainer's stream
    packs them (across pass boundaries, several bins at once): over those steps every example
    comes `epochs` times, except in the rows left out, which fill no whole batch on the process
    with the fewest. (Sized from one pass packed alone, 14 of the 48 bundled examples came twice
    in one epoch and 14 never.)"""
    from qed_jax.data import _packed_rows, count_batches
    from qed_jax.sft import epoch_steps

    config = SFTConfig(data=DataConfig(path=DATA, max_length=max_length, overflow="truncate", packing_bins=16),
                       batch_size=4, micro_batches=1, steps=None, epochs=epochs)
    examples, _ = prepare_sft(read_rows(DATA), tokenizer, config.data)
    which = {tuple(e["tokens"].tolist()): i for i, e in enumerate(examples)}
    local_batch = config.batch_size // process_count
    with mock.patch.object(jax, "process_count", return_value=process_count), caplog.at_level(logging.INFO):
        steps = epoch_steps(examples, config, local_batch)
    trained, left_out_rows, times, left_out = 0, 0, Counter(), Counter()
    for process in range(process_count):
        rows = list(_packed_rows(examples, config.data, epochs, process, process_count))  # the whole stream
        batches = list(packed_batches(examples, config.data, local_batch, epochs, process, process_count))
        assert len(batches) >= steps
        for n, (tokens, segments) in enumerate((r["tokens"], r["tokens_segment_ids"]) for r in rows):
            ids = [which[tuple(tokens[segments == s].tolist())] for s in set(segments.tolist()) - {0}]
            if n < steps * local_batch:  # what the steps train: the batches' rows, in order
                batch, row = divmod(n, local_batch)
                np.testing.assert_array_equal(batches[batch]["tokens"][row], tokens)
                times.update(ids)
                trained += 1
            else:
                left_out.update(ids)
                left_out_rows += 1
    assert (steps, left_out_rows) == count_batches(examples, config.data, local_batch, epochs, process_count)
    assert steps * local_batch * process_count == trained
    assert all(times[i] + left_out[i] == epochs for i in range(len(examples)))
    # The log says how many examples a row holds, so that a batch counted in examples can be set.
    rows, per_row = trained + left_out_rows, epochs * len(examples) / (trained + left_out_rows)
    assert per_row > 1.5  # short examples: rows that hold several
    assert (f"{epochs} epoch(s) of {len(examples)} examples pack into {rows} rows of {max_length} tokens, {per_row:.2f} "
            f"examples a row: {steps} steps of 4 rows, about {round(per_row * 4)} examples a step") in caplog.text
    if process_count == 1:
        assert left_out_rows < local_batch


def test_a_run_sized_by_epochs_records_its_own_data_order(tmp_path, monkeypatch):
    """Its stream changed on 2026-12-02 (a finite one, its steps counted from it): a run begun
    before is refused rather than resumed in the new order, while a run sized by steps, whose
    stream did not change, records (and resumes under) the unchanged DATA_ORDER."""
    from qed_jax import sft
    from qed_jax.data import DATA_ORDER, EPOCHS_ORDER

    recorded = []

    def stop_at_checkpoints(*args, run, **kwargs):
        recorded.append(run["data"]["order"])
        raise KeyboardInterrupt

    monkeypatch.setattr(sft.checkpoint, "TrainCheckpoints", stop_at_checkpoints)
    for sizing in (["steps=null", "epochs=1"], ["steps=2"]):
        with pytest.raises(KeyboardInterrupt):
            train(load_config(SFTConfig, TINY, [f"output_dir={tmp_path}", "eval_every=0", "batch_size=16", *sizing]))
    assert recorded == [EPOCHS_ORDER, DATA_ORDER] and EPOCHS_ORDER != DATA_ORDER


def test_a_line_that_is_not_utf8_is_a_skipped_row_and_other_files_are_one_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n' + b'{"b": "caf\xe9\xff"}\n' + b'{"c": 3}\n')  # a BOM, then Latin-1
    rows = read_rows(str(path))
    assert rows[0] == ("line 1", {"a": 1}) and rows[2] == ("line 3", {"c": 3})
    assert rows[1][0] == "line 2" and rows[1][1].reason == "not UTF-8 text (byte 0xe9 at column 11)"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"b": "caf\xe9"}\n')  # on line 1, after a BOM: the byte and column past it
    assert read_rows(str(path))[0][1].reason == "not UTF-8 text (byte 0xe9 at column 11)"
    (tmp_path / "rows.csv").write_text("problem,proof\n")
    with pytest.raises(ConfigError, match=r"rows\.csv: cannot read '\.csv' files; use JSON lines \(\.jsonl or \.json\), a "
                       r"JSON array \(\.json\) or Parquet"):
        read_rows(str(tmp_path / "rows.csv"))
    with pytest.raises(ConfigError, match=r"^benchmark\.path .*/rows\.csv: cannot read '\.csv' files"):
        read_rows(str(tmp_path / "rows.csv"), key="benchmark.path")  # every message names the setting
    (tmp_path / "rows").write_text('{"a": 1}\n')  # no suffix: not "cannot read '' files"
    with pytest.raises(ConfigError, match=r"rows: its name has no suffix to tell its format by; use JSON lines "
                                          r"\(\.jsonl or \.json\), a JSON array \(\.json\) or Parquet \(\.parquet\), "
                                          r"named so$"):
        read_rows(str(tmp_path / "rows"))
    with pytest.raises(ConfigError, match=r"^data file .*/rows\.jsonll does not exist$"):
        read_rows(str(tmp_path / "rows.jsonll"))
    with pytest.raises(ConfigError, match=r"^data\.path .*/rows\.jsonll does not exist$"):  # named by its setting
        read_rows(str(tmp_path / "rows.jsonll"), key="data.path")
    (tmp_path / "ROWS.JSONL").write_text('{"a": 1}\n')  # a suffix in capitals reads as its lower case
    assert read_rows(str(tmp_path / "ROWS.JSONL")) == [("line 1", {"a": 1})]


def test_a_dataset_folder_that_cannot_be_built_is_one_line_and_a_partitioned_parquet_folder_is_read(tmp_path,
                                                                                                   monkeypatch):
    import pyarrow
    import pyarrow.parquet

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.jsonl").write_text("{broken\n")
    with pytest.raises(ConfigError, match=r"^data folder .*/broken: .*/broken/train\.jsonl:1: not valid JSON "
                                          r"\(Expecting property name enclosed in double quotes at column 2\), so "
                                          r"its files do not read as one Hugging Face dataset; fix or delete that "
                                          r"line$"):
        read_rows(str(tmp_path / "broken"))
    with pytest.raises(ConfigError, match=r"^data\.path \(a folder\) .*/broken: .*train\.jsonl:1: "):
        read_rows(str(tmp_path / "broken"), key="data.path")
    (tmp_path / "broken_array").mkdir()  # one JSON array: datasets' own error, which names the cause
    (tmp_path / "broken_array" / "train.json").write_text("[{broken")
    with pytest.raises(ConfigError, match=r"^data folder .*/broken_array: read as one Hugging Face "
                                          r"dataset of its data files, which failed \(An error occurred while "
                                          r"generating the dataset: .*\); or give one "
                                          r"\.jsonl/\.json/\.parquet file instead$"):
        read_rows(str(tmp_path / "broken_array"))
    (tmp_path / "tests_only").mkdir()  # the split is named where it is the trouble, or was chosen
    (tmp_path / "tests_only" / "test.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(ConfigError, match=r"^data folder .*/tests_only \(split 'train'\): read as one .*split"):
        read_rows(str(tmp_path / "tests_only"))
    with pytest.raises(ConfigError, match=r"^data folder .*/broken \(split 'test'\): .*train\.jsonl:1: not valid"):
        read_rows(str(tmp_path / "broken"), split="test")  # datasets reads every split's files first
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^data folder .*/empty: .* failed \(its files hold no rows\); or give "):
        read_rows(str(tmp_path / "empty"))
    (tmp_path / "mixed").mkdir()  # files whose columns differ
    (tmp_path / "mixed" / "a.jsonl").write_text('{"problem": "P", "proof": "Q"}\n')
    (tmp_path / "mixed" / "b.jsonl").write_text('{"question": "P", "answer": 3}\n')
    with pytest.raises(ConfigError, match=r"^data folder .*/mixed: .* failed \(.*\); its files must share their "
                                          r"columns; or give one "):
        read_rows(str(tmp_path / "mixed"))
    # A Hub id that is not there (offline here) is still named as one.
    with pytest.raises(ConfigError, match=r"^data 'no-such-org/no-such-set' \(name None, split 'train'\): not a "
                                          r"local .jsonl/.json/.parquet file, and loading it as a Hugging Face "
                                          r"dataset failed: "):
        read_rows("no-such-org/no-such-set")
    with pytest.raises(ConfigError, match=r"^data\.path 'no-such-org/no-such-set' \(name None, split 'train'\): "):
        read_rows("no-such-org/no-such-set", key="data.path")
    # pandas' and Spark's partitioned writes make a folder named .parquet.
    table = pyarrow.table({"problem": ["P1", "P2"], "split": ["a", "b"]})
    pyarrow.parquet.write_to_dataset(table, tmp_path / "rows.parquet", partition_cols=["split"])
    rows = read_rows(str(tmp_path / "rows.parquet"))
    assert sorted(row["problem"] for _, row in rows) == ["P1", "P2"] and [w for w, _ in rows] == ["row 1", "row 2"]


def test_a_row_with_a_lone_surrogate_is_a_bad_row_and_an_escaped_pair_is_text(tmp_path, tokenizer):
    # JSON takes "\ud800" without its pair; no tokenizer or HTTP client does, so the row is skipped.
    path = tmp_path / "rows.jsonl"
    path.write_text('{"problem": "P \\ud83d\\ude00", "proof": "a \\\\ud800"}\n'  # an emoji, a backslash
                    '{"problem": "P", "messages": [{"role": "user", "content": "x\\udc00"}]}\n')
    (first, row), (second, bad) = read_rows(str(path))
    assert (first, row) == ("line 1", {"problem": "P \U0001f600", "proof": "a \\ud800"})
    assert second == "line 2" and bad.reason == ("not valid text: field 'messages'[0]['content'] holds a lone "
                                                 "surrogate \\udc00 (half of an escaped UTF-16 pair)")
    array = tmp_path / "rows.json"
    array.write_text('[{"problem": "P"}, {"proof": "\\uDBFF"}]')
    assert read_rows(str(array))[1][1].reason == (
        "not valid text: field 'proof' holds a lone surrogate \\udbff (half of an escaped UTF-16 pair)")
    good = json.loads(open(DATA).readline())
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "proof": "Q.E.D. \ud800"}) + "\n")
    examples, stats = prepare_sft(read_rows(str(path)), tokenizer, DataConfig())
    assert len(examples) == 1 and stats.first_skipped == [("line 2", (
        "not valid text: field 'proof' holds a lone surrogate \\ud800 (half of an escaped UTF-16 pair)"))]


def test_a_json_file_may_hold_one_array_of_rows_or_json_lines(tmp_path):
    rows = [json.loads(line) for line in open(DATA)][:4]
    pretty = tmp_path / "pretty.json"
    pretty.write_text("\ufeff  " + json.dumps(rows, indent=2) + "\n", encoding="utf-8")  # a BOM and indent too
    assert read_rows(str(pretty)) == [(f"row {n}", r) for n, r in enumerate(rows, 1)]
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_rows(str(lines)) == [(f"line {n}", r) for n, r in enumerate(rows, 1)]
    pretty.write_text(json.dumps(rows, indent=2)[:-3] + "\n")  # cut off before the closing brackets
    with pytest.raises(ConfigError, match=r"pretty\.json: not a valid JSON array \(Expecting .* at line \d+ column \d+\)"):
        read_rows(str(pretty))
    pretty.write_bytes(b'\xef\xbb\xbf[\n{"problem": "caf\xe9"}]')
    with pytest.raises(ConfigError, match=r"pretty\.json: line 2 is not UTF-8 text \(byte 0xe9\)"):
        read_rows(str(pretty))
    with pytest.raises(ConfigError, match=r"^data\.path .*/pretty\.json: line 2 is not UTF-8 text"):
        read_rows(str(pretty), key="data.path")
    lines.write_text('["a row that is a list"]\n' + json.dumps(rows[0]) + "\n")  # JSON lines that open with '['
    assert read_rows(str(lines)) == [("line 1", ["a row that is a list"]), ("line 2", rows[0])]
    # A whole array over several lines, then more: a stray ']', or a second array appended.
    for extra, line in (("]\n", 7), (json.dumps(rows, indent=2), 7), ("\n" + json.dumps(rows[0]), 8)):
        pretty.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n" + extra)
        with pytest.raises(ConfigError, match=rf"pretty\.json: not a valid JSON array \(Extra data at line {line} "
                                              r"column 1\); a \.json file that opens with '\[' is read as one array"):
            read_rows(str(pretty))
    # One object over several lines (an export's {"data": [rows]}): said so, not every line skipped.
    pretty.write_text(json.dumps({"version": 1, "data": rows}, indent=2))
    with pytest.raises(ConfigError, match=r"^data\.path .*/pretty\.json: holds one JSON object \(keys 'version', "
                                          r"'data'\), not rows: give JSON lines \(one row per line\) or one JSON "
                                          r"array of rows, e\.g\. the list under 'data'$"):
        read_rows(str(pretty), key="data.path")
    pretty.write_text(json.dumps({"version": 1, "data": rows}))  # on one line: not a row either
    with pytest.raises(ConfigError, match=r"pretty\.json: holds one JSON object \(keys 'version', 'data'\), not rows"):
        read_rows(str(pretty))
    pretty.write_text(json.dumps(rows[0]) + "\n{not json\n")  # JSON lines with a bad line: skipped as before
    assert [where for where, _ in read_rows(str(pretty))] == ["line 1", "line 2"]


def test_unknown_config_key_fails_at_start_listing_valid_keys(capsys):
    with pytest.raises(ConfigError, match=r"unknown config key optim.lrr \(did you mean optim.lr\?\); valid keys "
                       r"here: optim.lr, optim.schedule"):
        load_config(SFTConfig, TINY, ["optim.lrr=1e-4"])
    assert cli.main(["sft", "--config", TINY, "batch_size_typo=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key batch_size_typo" in err and "batch_size" in err and "micro_batches" in err


@pytest.mark.parametrize("override, message", [
    ("model.remat=ful", "model.remat must be one of none, full, dots, offload, got 'ful'"),
    ("model.attention=splsh", "model.attention must be one of auto, xla, splash, blockwise, got 'splsh'"),
])
def test_a_misspelt_model_setting_fails_when_the_config_loads(capsys, override, message):
    """Before any data is read or tokenized (the model is built only after)."""
    assert cli.main(["sft", "--config", TINY, override]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"qed-jax sft: error: {message}"]


@pytest.mark.parametrize("remat", ["full", "dots", "offload"])
def test_remat_gives_the_same_loss_and_gradients(remat):
    rng = np.random.default_rng(5)
    batch = {"tokens": jnp.asarray(rng.integers(0, 512, (1, 2, 16)), jnp.int32),
             "loss_mask": jnp.ones((1, 2, 16), jnp.int32), "segment_ids": jnp.ones((1, 2, 16), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (1, 2, 16))}
    results = []
    for mode in ("none", remat):
        graphdef, state = nnx.split(Qwen3(PRESETS["tiny"].replace(remat=mode), rngs=nnx.Rngs(3)))
        grads, loss, _ = jax.jit(lambda p, b: accumulated_grads(graphdef, p, b))(nnx.to_pure_dict(state), batch)
        results.append((float(loss), jax.tree.leaves(grads)))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_parquet_rows_read_like_jsonl(tmp_path, tokenizer):
    import datasets

    rows = [json.loads(line) for line in open(DATA)][:6]
    flat = [{k: r[k] for k in ("problem", "reasoning_content", "proof")} for r in rows]
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "rows.parquet"))
    from_parquet, _ = prepare_sft(read_rows(str(tmp_path / "rows.parquet")), tokenizer, DataConfig())
    from_jsonl, _ = prepare_sft([(f"line {n}", r) for n, r in enumerate(flat, 1)], tokenizer, DataConfig())
    assert [e["tokens"].tolist() for e in from_parquet] == [e["tokens"].tolist() for e in from_jsonl]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not a table")
    with pytest.raises(ConfigError, match=f"^data file {re.escape(str(broken))}: not a readable Parquet file "):
        read_rows(str(broken))
    with pytest.raises(ConfigError, match=f"^data.path {re.escape(str(broken))}: not a readable Parquet file "):
        read_rows(str(broken), key="data.path")


def test_held_out_rows_that_leave_nothing_to_train_on_are_named(tmp_path):
    five = tmp_path / "five.jsonl"
    five.write_text("".join(open(DATA).readlines()[:5]))
    config = load_config(SFTConfig, TINY, [f"data.path={five}", "data.eval_rows=6", "eval_every=5",
                                           f"output_dir={tmp_path / 'run'}", "batch_size=16"])  # for 8 devices
    with pytest.raises(ConfigError, match=r"5 rows, and data.eval_rows=6 holds out the last 6 .* lower data.eval_rows"):
        train(config)
    # Rows none of which can be used: that is the error, not the held-out count.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "P"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: no usable rows \(0 of 2 rows kept, 2 malformed skipped\); 1 of "
                                          r"them: field 'reasoning_content' is missing or empty \(and there are no "
                                          r"messages\)$"):
        train(dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(bad))))


def test_rows_may_pass_the_models_positions_but_an_example_that_long_is_warned_of(caplog):
    from qed_jax.sft import warn_past_trained_positions

    examples = [{"tokens": np.zeros(n, np.int32)} for n in (155, 2048)]
    limit = PRESETS["tiny"].max_position_embeddings
    with caplog.at_level(logging.WARNING, logger="qed_jax.sft"):
        warn_past_trained_positions(examples, PRESETS["tiny"])  # rows of 4096 packing these are fine
        assert not caplog.records
        warn_past_trained_positions([*examples, {"tokens": np.zeros(limit + 1, np.int32)}], PRESETS["tiny"])
    assert [r.getMessage() for r in caplog.records] == [
        f"the longest example ({limit + 1} tokens) passes the model's max_position_embeddings ({limit}): positions "
        "past it were never trained; lower data.max_length to drop or cut such examples (data.overflow)"]


def test_what_needs_no_data_or_model_is_refused_before_they_load(tmp_path):
    """A batch that does not split over the devices, or a checkpoint_dir that is a file, is
    found before any row is read or any weight loaded (at the recipe's scale: minutes), and
    before a step that would then be lost; nothing is left behind."""
    out = tmp_path / "out"
    missing = ["data.path=/nonexistent/rows.jsonl", f"output_dir={out}", "steps=2"]
    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", TINY, "batch_size=4", *missing],
                            cwd=REPO, env=cli_env(8), capture_output=True, text=True)
    assert result.returncode == 2
    assert "batch_size / micro_batches gives 2 rows per micro-batch, which do not split over the 8" in result.stderr
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for checkpoint_dir in (a_file, a_file / "sub"):
        with pytest.raises(ConfigError, match=rf"^checkpoint folder .*{a_file} is a file where a folder is needed"):
            train(load_config(SFTConfig, TINY, [f"checkpoint_dir={checkpoint_dir}", f"output_dir={out}", "steps=2",
                                                "batch_size=16"]))  # rows for the 8 devices here
    with pytest.raises(ConfigError, match="^checkpoint_dir: /proc/qed-jax-checkpoints: No such file or directory$"):
        train(load_config(SFTConfig, TINY, ["checkpoint_dir=/proc/qed-jax-checkpoints", f"output_dir={out}", "steps=2",
                                            "batch_size=16"]))  # where no folder can be made
    assert not out.exists()


@pytest.mark.parametrize("trainer", ["sft", "grpo"])
def test_a_checkpoint_dir_that_cannot_be_looked_at_is_one_line_before_the_model_loads(tmp_path, monkeypatch, trainer):
    """A gs:// checkpoint_dir on a machine without network or credentials: the storage client's
    error (an OSError that names no file, as aiohttp's connection errors are) comes out as one
    line naming checkpoint_dir, from the setup, before the model loads (minutes for the 4B). A
    local folder that cannot be read is named with its path."""
    from etils import epath

    from qed_jax import grpo, sft
    from qed_jax.grpo import GRPOConfig

    module, cls, config, rows = {"sft": (sft, SFTConfig, TINY, ["micro_batches=1"]),  # 8 rows: one per device
                                 "grpo": (grpo, GRPOConfig, str(REPO / "configs" / "rl" / "tiny.yaml"), [])}[trainer]
    monkeypatch.setattr(module, "open_model", lambda *a, **k: lambda mesh: pytest.fail("the model loaded first"))
    exists = epath.Path.exists

    def probe(path):
        if str(path).startswith("gs://"):
            raise OSError("Cannot connect to host storage.googleapis.com:443 ssl:default [Name or service not known]")
        if "unreadable" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return exists(path)

    monkeypatch.setattr(type(epath.Path("gs://b/c")), "exists", probe)
    out = tmp_path / "out"
    refusals = {"gs://qed-jax-bucket/ckpt": ("checkpoint_dir gs://qed-jax-bucket/ckpt could not be looked at (OSError: "
                                             "Cannot connect to host storage.googleapis.com:443 ssl:default [Name or "
                                             "service not known]); check its bucket name, and this machine's network "
                                             "and credentials (gcloud auth application-default login), or choose a "
                                             "local checkpoint_dir"),
                f"{tmp_path}/unreadable/ckpt": (f"checkpoint_dir: {tmp_path}/unreadable/ckpt: Permission denied; "
                                                "choose another path, or change its permissions")}
    for checkpoint_dir, message in refusals.items():
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            module.train(load_config(cls, config, [f"checkpoint_dir={checkpoint_dir}", f"output_dir={out}", "steps=2",
                                                     *rows]))
    assert not out.exists()


@pytest.mark.slow  # three runs of a finished run's trainer: 15-20 s on 2 cores
def test_a_finished_run_rerun_with_another_export_dtype_exports_again(tmp_path):
    base = [f"output_dir={tmp_path}", "steps=1", "eval_every=0", "batch_size=16", "checkpoint_every=1"]
    train(load_config(SFTConfig, TINY, [*base, "export_dtype=float32"]))
    config_json = tmp_path / "hf" / "config.json"
    assert json.loads(config_json.read_text())["torch_dtype"] == "float32"
    result = train(load_config(SFTConfig, TINY, [*base, "export_dtype=bfloat16"]))  # no change to the run
    assert json.loads(config_json.read_text())["torch_dtype"] == "bfloat16"
    assert SafetensorsFolder(tmp_path / "hf").dtype("model.embed_tokens.weight") == np.dtype("bfloat16")
    assert result["step"] == 1
    # An export from before config.json carried torch_dtype names it "dtype": finished, not redone.
    hf_config = json.loads(config_json.read_text())
    config_json.write_text(json.dumps({**{k: v for k, v in hf_config.items() if k != "torch_dtype"},
                                       "dtype": "bfloat16"}))
    assert train(load_config(SFTConfig, TINY, [*base, "export_dtype=bfloat16"]))["complete"]


@pytest.mark.slow  # a run, then three reruns: 12-16 s on 2 cores
def test_a_finished_run_whose_checkpoints_were_deleted_is_done_not_trained_again(tmp_path, caplog):
    """Checkpoints removed after the run (disk reclaimed, a bucket's lifecycle rule): it trained
    again from step 0, replaced its export and cut its metrics to nothing."""
    base = [f"output_dir={tmp_path / 'run'}", "steps=2", "eval_every=0", "batch_size=16", "export_dtype=float32"]
    train(load_config(SFTConfig, TINY, base))
    exported = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "run" / "hf").iterdir()}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    result = train(load_config(SFTConfig, TINY, base))
    assert result["complete"] and result["step"] == 2
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "run" / "hf").iterdir()} == exported
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert "no checkpoint is left in" in caplog.text and "but the run finished" in caplog.text
    # Nothing to export it from in another dtype: refused, the export kept.
    with pytest.raises(ConfigError, match=r"the run finished at step 2, but no checkpoint of it is left in .* to "
                                          r"export it as export_dtype=bfloat16 from"):
        train(load_config(SFTConfig, TINY, [*base, "export_dtype=bfloat16"]))
    assert (tmp_path / "run" / "hf" / "model.safetensors").read_bytes() == exported["model.safetensors"][1]
    # Metrics short of the last step (an export from an earlier, shorter run): not finished, trained.
    (tmp_path / "run" / "metrics.jsonl").write_text(metrics.splitlines()[0] + "\n")
    assert not train(load_config(SFTConfig, TINY, base))["complete"]


def test_a_finished_run_rerun_with_changes_keeps_the_config_it_trained_under(tmp_path, caplog):
    base = [f"output_dir={tmp_path}", "steps=1", "eval_every=0", "batch_size=16", "export_dtype=null"]
    train(load_config(SFTConfig, TINY, base))
    trained_under = (tmp_path / "config.json").read_text()
    result = train(load_config(SFTConfig, TINY, [*base, "optim.lr=1e-4"]), resume_with_changes=True)
    assert result["complete"] and result["step"] == 1
    assert (tmp_path / "config.json").read_text() == trained_under and not (tmp_path / "config.1.json").exists()
    assert "the run is complete at step 1, so its changed config is not recorded" in caplog.text


def test_a_run_that_finished_no_step_starts_again_under_a_changed_config(tmp_path, caplog):
    """What a run stopped before its first step leaves (its config.json alone, written as it
    starts) holds nothing to continue: the corrected rerun needs no --resume-with-changes."""
    from qed_jax.errors import RunConfigChanged
    from qed_jax.trainer import record_run_config

    base = [f"output_dir={tmp_path}", "steps=1", "eval_every=0", "batch_size=16", "export_dtype=null"]
    record_run_config(tmp_path, load_config(SFTConfig, TINY, base), changed=False)
    started = (tmp_path / "config.json").read_text()
    result = train(load_config(SFTConfig, TINY, [*base, "optim.lr=1e-4"]))
    assert (result["start_step"], result["step"]) == (0, 1)
    assert (tmp_path / "config.1.json").read_text() == started
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-4
    assert (f"{tmp_path} holds a run that finished no step, so it starts again as this run is set up (optim.lr: "
            "0.003 -> 0.0001)") in caplog.text
    with pytest.raises(RunConfigChanged, match=r"\(optim\.lr: 0\.0001 -> 0\.001\)"):  # now it did: refused
        train(load_config(SFTConfig, TINY, [*base, "optim.lr=1e-3"]))


def test_rows_whose_prompt_fills_max_length_are_counted_as_such(caplog):
    """Truncated to max_length, a row whose prompt takes it all has no answer token to train:
    dropped and named for what it is (not "malformed", nor also "truncated")."""
    rows, tokenizer = read_rows(DATA), load_tokenizer(TOKENIZER)
    with pytest.raises(ConfigError, match=rf"no usable rows \(0 of {len(rows)} rows kept, {len(rows)} dropped: the "
                                          r"prompt alone fills data\.max_length, so raise it\)$"):
        prepare_sft(rows, tokenizer, DataConfig(path=DATA, max_length=20, overflow="truncate"))
    with pytest.raises(ConfigError, match=rf"no usable rows \(0 of {len(rows)} rows kept, {len(rows)} dropped as too "
                                          r"long\); raise data\.max_length, or set data\.overflow=truncate$"):
        prepare_sft(rows, tokenizer, DataConfig(path=DATA, max_length=20, overflow="drop"))
    _, stats = prepare_sft(rows, tokenizer, DataConfig(path=DATA, max_length=256, overflow="truncate"))
    assert (stats.kept, stats.no_room, sum(stats.skipped.values())) == (len(rows), 0, 0)


def test_rows_left_out_are_named_up_to_five_of_each_kind_and_the_rest_counted(caplog):
    """A malformed row, and a row dropped for its length, is named by where it is; past the first
    five of a kind, the log says how many more there were."""
    rows, tokenizer = read_rows(DATA), load_tokenizer(TOKENIZER)
    bad = [(f"line {n}", {"problem": "P"}) for n in range(101, 108)]  # seven rows without an answer
    lengths = [len(tokenize_sft(tokenizer, sft_messages(row))[0]) for _, row in rows]
    limit = sorted(lengths)[2]  # all but the shortest few rows are longer
    with caplog.at_level(logging.WARNING, logger="qed_jax.data"):
        _, stats = prepare_sft(rows + bad, tokenizer, DataConfig(path=DATA, max_length=limit), source="rows")
    assert stats.dropped_long == sum(n > limit for n in lengths) > 5 and sum(stats.skipped.values()) == 7
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[1] for m in messages if m.startswith("rows: skipped")] == [
        f" skipped line {n}" for n in range(101, 106)]
    assert "rows: 2 more rows skipped (the first 5 are named above)" in messages
    long_rows = [where for (where, _), n in zip(rows, lengths) if n > limit]
    assert [m for m in messages if m.startswith("rows: dropped")] == [
        f"rows: dropped {where}: {n} tokens, over data.max_length {limit}"
        for (where, _), n in zip(rows, lengths) if n > limit][:5]
    assert f"rows: {len(long_rows) - 5} more rows dropped (the first 5 are named above)" in messages


def test_a_hub_name_or_split_given_with_a_local_file_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="qed_jax.data"):
        assert read_rows(DATA) == read_rows(DATA, "all", "test")
    assert [r.getMessage() for r in caplog.records] == [
        f"{DATA} is a local file, read whole: the dataset name 'all' and split 'test' apply to Hub datasets only"]


def test_message_content_given_as_parts_says_so():
    from qed_jax.data import sft_messages

    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "P"}]},
                          {"role": "assistant", "content": "Q"}]}
    with pytest.raises(ValueError, match=r"^messages\[0\] has content that is not text \(list; a list of parts is not "
                                         r"read\): give the text as one string$"):
        sft_messages(parts)


def test_a_message_or_field_of_the_wrong_type_names_its_type():
    from qed_jax.data import sft_messages

    with pytest.raises(ValueError, match=r"^messages\[1\] is of type str, not a mapping with a role and content$"):
        sft_messages({"messages": [{"role": "user", "content": "P"}, "Q"]})
    with pytest.raises(ValueError, match=r"^field 'problem' is of type int, not text$"):
        sft_messages({"problem": 3, "reasoning_content": "R", "proof": "Q"})


def test_a_run_whose_folder_is_gone_compares_its_config_with_the_checkpoints(tmp_path):
    """The recipe keeps checkpoints on gs:// and output_dir on the VM: a new VM has no
    config.json to compare with, so the config the checkpoint was written under stands in."""
    import shutil

    from qed_jax.errors import RunConfigChanged

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    base = [f"output_dir={out}", f"checkpoint_dir={ckpt}", "eval_every=0", "batch_size=16", "checkpoint_every=1",
            "export_dtype=null"]
    train(load_config(SFTConfig, TINY, [*base, "steps=1"]))
    shutil.rmtree(out)
    with pytest.raises(RunConfigChanged, match=rf"^{ckpt} holds a run that differs from this one \(optim\.lr: 0\.003 "
                                               r"-> 0\.5; steps: 1 -> 2\); pass --resume-with-changes .* or use a new "
                                               r"checkpoint_dir"):
        train(load_config(SFTConfig, TINY, [*base, "steps=2", "optim.lr=0.5"]))
    resumed = train(load_config(SFTConfig, TINY, [*base, "steps=2"]), resume_with_changes=True)
    assert resumed["start_step"] == 1 and re.fullmatch(r"loss \d+\.\d{6}", sft_summary(resumed))
    shutil.rmtree(out)
    found = train(load_config(SFTConfig, TINY, [*base, "steps=2"]))  # the same config: no refusal
    # Its loss was logged in the folder that is gone: the closing line says so, not "loss nan".
    assert found["complete"] and sft_summary(found) == (
        "no loss logged in this run directory (it was trained where its checkpoints were written)")


def test_reasoning_that_holds_think_tokens_as_text_is_skipped(tokenizer):
    """A literal </think> in the reasoning tokenizes as the thinking block's end: trained, the
    model would learn to close its thinking early (and the answer would be read from there)."""
    row = {"problem": "Prove X.", "reasoning_content": "First idea.</think>\n\nMore thinking.", "proof": "Done."}
    with pytest.raises(ValueError, match="think"):
        tokenize_sft(tokenizer, sft_messages(row))
    tokenize_sft(tokenizer, sft_messages({**row, "reasoning_content": "First idea. More thinking."}))


def test_reasoning_that_the_chat_template_does_not_write_is_skipped():
    """A template that does not think (plain ChatML) drops reasoning_content: the row would train
    the answer alone. A thinking block written in the content is the model's to learn, whatever
    the template."""
    tokenizer = load_tokenizer(TOKENIZER)  # a fresh copy: the module's fixture is shared
    tokenizer.chat_template = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                               "'<|im_end|>\n' }}{%- endfor %}"
                               "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
    row = {"problem": "Prove X.", "reasoning_content": "First idea.", "proof": "Done."}
    with pytest.raises(ValueError, match=r"^the chat template does not write the assistant message's "
                                         r"reasoning_content, so its thinking would not be trained"):
        tokenize_sft(tokenizer, sft_messages(row))
    think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    messages = [{"role": "user", "content": "Prove X."},
                {"role": "assistant", "content": "<think>\nFirst idea.\n</think>\n\nDone."}]
    ids, mask = tokenize_sft(tokenizer, messages)
    assert [i for i in ids[mask == 1].tolist() if i in think] == think
    messages[-1]["content"] += " </think>"
    with pytest.raises(ValueError, match="^the answer's text holds </think> beyond its thinking block's"):
        tokenize_sft(tokenizer, messages)


def test_the_export_keeps_the_generation_config_of_the_model_trained_from(tmp_path):
    # The tokenizer comes from its own folder; the sampling defaults of the model's
    # generation_config.json (Qwen3's top_k 20) still go with the export. That model is a base
    # model, ending on <|endoftext|> alone: the chat model trained from it stops on <|im_end|> too,
    # in transformers and vLLM as in qed-jax's sampler.
    from tests.helpers import make_hf_model_with_tokenizer

    base, tokenizer_folder = tmp_path / "base", tmp_path / "tokenizer"
    _, tokenizer = make_hf_model_with_tokenizer(base)
    shutil.copytree(base, tokenizer_folder)
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": endoftext, "temperature": 0.6,
                                                              "top_k": 20, "top_p": 0.95}))
    train(load_config(SFTConfig, TINY, [f"output_dir={tmp_path / 'run'}", "eval_every=0", "steps=1", "batch_size=16",
                                        f"model.path={base}", "model.preset=null", f"tokenizer={tokenizer_folder}"]))
    generation = json.loads((tmp_path / "run" / "hf" / "generation_config.json").read_text())
    assert (generation["temperature"], generation["top_k"], generation["top_p"]) == (0.6, 20, 0.95)
    assert set(generation["eos_token_id"]) == {endoftext, im_end}
    # So does the export `qed-jax convert` makes of its checkpoints.
    assert cli.main(["convert", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "converted")]) == 0
    converted = json.loads((tmp_path / "converted" / "generation_config.json").read_text())
    assert {endoftext, im_end} <= set(converted["eos_token_id"])
