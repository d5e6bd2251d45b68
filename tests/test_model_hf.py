"""The model against transformers: logits, round trips, sharding, parameter counts, bad input."""

import json
import re
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qed_jax
from qed_jax import cli
from qed_jax.checkpoint import is_checkpoint_dir
from qed_jax.config import PRESETS, ConfigError, ModelConfig
from qed_jax.hf import CheckpointError, SafetensorsFolder
from qed_jax.model import param_count
from qed_jax.sharding import DEFAULT_RULES, MeshConfig, logical_to_spec, make_mesh
from tests.helpers import hf_logits, make_hf_model, make_hf_model_with_tokenizer

# (name, overrides): tied and untied; rope_theta 1e6 and 5e6; head_dim 24 != hidden/heads;
# query/kv head ratios 1, 2 and 4; 3 or more layers.
PARITY_CONFIGS = [
    ("tied_ratio1", dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=1e6)),
    ("untied_ratio2_theta5e6", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=5e6,
                                    tie_word_embeddings=False)),
    ("tied_ratio4_4layers", dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                                 head_dim=16)),
]


def _tensors(folder):
    st = SafetensorsFolder(folder)
    return {name: np.array(st.read(name)) for name in st.names()}


@pytest.mark.parametrize("name,overrides", PARITY_CONFIGS, ids=[c[0] for c in PARITY_CONFIGS])
def test_logits_match_transformers_on_right_padded_batch(tmp_path, name, overrides):
    hf = make_hf_model(tmp_path, seed=len(name), **overrides)
    model = qed_jax.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    lengths = [13, 7, 10]
    tokens = np.zeros((3, 13), np.int64)
    mask = np.zeros((3, 13), np.int64)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(0, hf.config.vocab_size, n)
        mask[row, :n] = 1
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = hf_logits(hf, tokens, mask)
    assert ours.shape == (3, 13, hf.config.vocab_size) and ours.dtype == np.float32
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(ours[row, :n], ref[row, :n], atol=1e-4, rtol=0)


def test_segment_ids_keep_packed_rows_apart(tmp_path):
    make_hf_model(tmp_path)
    model = qed_jax.from_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 384, (1, 6)), rng.integers(0, 384, (1, 9))
    packed = jnp.asarray(np.concatenate([a, b], axis=1))
    segments = jnp.asarray([[1] * 6 + [2] * 9])
    positions = jnp.asarray([list(range(6)) + list(range(9))])
    out = np.asarray(model(packed, positions=positions, segment_ids=segments))
    np.testing.assert_allclose(out[:, :6], np.asarray(model(jnp.asarray(a))), atol=1e-5)
    np.testing.assert_allclose(out[:, 6:], np.asarray(model(jnp.asarray(b))), atol=1e-5)


def test_kv_cache_decode_matches_full_forward(tmp_path):
    make_hf_model(tmp_path)
    model = qed_jax.from_pretrained(tmp_path)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 384, (2, 12)))
    full = np.asarray(model(tokens))
    cache = qed_jax.KVCache.zeros(model.config, batch=2, max_len=16)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    logits, cache = model.decode(tokens[:, :8], positions, cache)
    steps = [np.asarray(logits)]
    for t in range(8, 12):
        logits, cache = model.decode(tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_round_trip_fp32_is_bit_identical_and_loads_in_transformers(tmp_path):
    import torch
    from transformers import Qwen3ForCausalLM

    src, out = tmp_path / "src", tmp_path / "out"
    make_hf_model(src, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = qed_jax.from_pretrained(src)
    qed_jax.save_pretrained(model, out, dtype="float32")
    original, exported = _tensors(src), _tensors(out)
    assert set(original) == set(exported)
    for name in original:
        assert original[name].dtype == exported[name].dtype
        assert np.array_equal(original[name], exported[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # from the source's generation config
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (src / "generation_config.json").read_text())

    tokens = np.random.default_rng(3).integers(0, 384, (2, 9))
    reloaded = Qwen3ForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), np.asarray(model(jnp.asarray(tokens))), atol=1e-4)

    qed_jax.save_pretrained(model, tmp_path / "bf16")  # bf16 is the default export dtype
    bf16 = Qwen3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    assert next(bf16.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(hf_logits(bf16, tokens), hf_logits(reloaded, tokens), atol=0.1)


def test_sharded_export_writes_index(tmp_path):
    make_hf_model(tmp_path / "src")
    model = qed_jax.from_pretrained(tmp_path / "src")
    qed_jax.save_pretrained(model, tmp_path / "out", dtype="float32", max_shard_bytes=120_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "out" / f).stat().st_size <= 120_000 + 4096 for f in files)
    reloaded = qed_jax.from_pretrained(tmp_path / "out")
    tokens = jnp.asarray([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(reloaded(tokens)), np.asarray(model(tokens)))


def test_an_export_over_an_earlier_one_leaves_none_of_its_weights(tmp_path):
    """Sharded, then one file, then sharded in fewer shards: each time the folder holds exactly
    the new export's files, which qed-jax and transformers both read."""
    import torch
    from transformers import Qwen3ForCausalLM

    make_hf_model(tmp_path / "src")
    tokens = jnp.asarray([[1, 2, 3, 4]])
    out = tmp_path / "out"
    for step, (dtype, shard_bytes) in enumerate([("float32", 60_000), ("bfloat16", 10**9), ("float32", 200_000)]):
        scaled = qed_jax.from_pretrained(tmp_path / "src")  # a different model each time: its embedding scaled
        scaled.embed[...] = scaled.embed[...] * (step + 2)
        qed_jax.save_pretrained(scaled, out, dtype=dtype, max_shard_bytes=shard_bytes)
        weights = sorted(p.name for p in out.glob("model*"))
        if shard_bytes == 10**9:
            assert weights == ["model.safetensors"]
        else:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert weights == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
        expected = np.asarray(qed_jax.from_pretrained(out, dtype="float32")(tokens))
        want = np.asarray(scaled(tokens)) if dtype == "float32" else expected
        np.testing.assert_array_equal(expected, want)
        torch_model = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        np.testing.assert_allclose(hf_logits(torch_model, np.asarray(tokens)), expected, atol=1e-4)


def test_a_folder_with_both_a_single_file_and_shards_loads_what_transformers_loads(tmp_path, caplog):
    """Shards copied over an older single file (or a Hub repo that holds both): transformers reads
    model.safetensors, and so does qed-jax, with a warning."""
    import shutil

    import torch
    from transformers import Qwen3ForCausalLM

    make_hf_model(tmp_path / "single", seed=1)
    sharded = make_hf_model(tmp_path / "folder", seed=2)
    sharded.save_pretrained(tmp_path / "folder", max_shard_size="100KB")
    assert (tmp_path / "folder" / "model.safetensors.index.json").is_file()
    shutil.copy(tmp_path / "single" / "model.safetensors", tmp_path / "folder")
    tokens = np.asarray([[1, 2, 3, 4, 5]])
    theirs = hf_logits(Qwen3ForCausalLM.from_pretrained(tmp_path / "folder", dtype=torch.float32).eval(), tokens)
    with caplog.at_level("WARNING"):
        ours = np.asarray(qed_jax.from_pretrained(tmp_path / "folder", dtype="float32")(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert caplog.text.count(f"{tmp_path / 'folder'} holds both model.safetensors and a sharded") == 1


def test_a_hugging_face_folder_at_a_url_is_refused_not_written_to_a_local_gs_folder(tmp_path, monkeypatch, capsys):
    make_hf_model(tmp_path / "src")
    model = qed_jax.from_pretrained(tmp_path / "src")
    monkeypatch.chdir(tmp_path)  # pathlib would have made gs://bucket/hf the local folder gs:/bucket/hf
    with pytest.raises(CheckpointError, match="Hugging Face folders on local disk only"):
        qed_jax.save_pretrained(model, "gs://bucket/hf")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "ckpt")]) == 0
    assert cli.main(["convert", str(tmp_path / "ckpt"), "gs://bucket/hf", "--overwrite"]) == 2
    assert "local disk only" in capsys.readouterr().err
    assert not (tmp_path / "gs:").exists()


def test_convert_cli_hf_orbax_hf_is_bit_identical(tmp_path):
    src = tmp_path / "hf"
    make_hf_model(src)
    (src / "tokenizer_config.json").write_text("{}")
    assert cli.main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    original, back = _tensors(src), _tensors(tmp_path / "back")
    assert set(original) == set(back)
    for name in original:
        assert original[name].dtype == back[name].dtype and np.array_equal(original[name], back[name]), name
    assert (tmp_path / "back" / "tokenizer_config.json").exists()


def test_an_export_without_a_generation_config_stops_on_the_tokenizers_end_of_turn(tmp_path):
    src = tmp_path / "hf"
    _, tokenizer = make_hf_model_with_tokenizer(src)
    (src / "generation_config.json").unlink()
    qed_jax.save_pretrained(qed_jax.from_pretrained(src), tmp_path / "out")
    end_of_turn = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == end_of_turn and None not in generation.values()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == end_of_turn


def test_an_export_cut_while_writing_its_generation_config_is_redone_whole(tmp_path, monkeypatch):
    src = tmp_path / "hf"
    _, tokenizer = make_hf_model_with_tokenizer(src)
    (src / "generation_config.json").unlink()
    model = qed_jax.from_pretrained(src)
    write_bytes = Path.write_bytes

    def killed_halfway(path, data):
        if "generation_config" in path.name:
            write_bytes(path, data[:len(data) // 2])
            raise KeyboardInterrupt
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        qed_jax.save_pretrained(model, tmp_path / "out", assets_from=src)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert not list((tmp_path / "out").glob("*generation_config*"))  # no half-written file left
    assert not (tmp_path / "out" / "config.json").exists()
    qed_jax.save_pretrained(model, tmp_path / "out", assets_from=src)  # the rerun
    end_of_turn = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == end_of_turn
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == end_of_turn


def test_an_export_cut_while_writing_its_config_leaves_none(tmp_path, monkeypatch):
    """config.json is written last so that a folder holding one is a whole export (a trainer's or
    the pipeline's rerun takes it as done): a kill or a full disk while it is written leaves none,
    not half of one."""
    make_hf_model(tmp_path / "src")
    model = qed_jax.from_pretrained(tmp_path / "src")
    write_bytes, write_text = Path.write_bytes, Path.write_text

    def cut(write):
        def killed_halfway(path, data, *args, **kwargs):
            if "config.json" in path.name and "generation" not in path.name:
                write(path, data[:len(data) // 2], *args, **kwargs)
                raise KeyboardInterrupt
            return write(path, data, *args, **kwargs)
        return killed_halfway

    monkeypatch.setattr(Path, "write_bytes", cut(write_bytes))
    monkeypatch.setattr(Path, "write_text", cut(write_text))
    with pytest.raises(KeyboardInterrupt):
        qed_jax.save_pretrained(model, tmp_path / "out", dtype="float32")
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert not [p.name for p in (tmp_path / "out").iterdir() if "config.json" in p.name and "generation" not in p.name]
    qed_jax.save_pretrained(model, tmp_path / "out", dtype="float32")  # the rerun
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen3"


def test_an_export_process_0_cannot_write_is_still_gathered_whole_and_fails_on_every_process(tmp_path, monkeypatch):
    """With several processes, every process gathers each tensor of an export together (a
    collective op) and process 0 writes it. A write that fails on process 0 (a full disk) must not
    leave the others waiting for it in their next gather: it goes on gathering, then every
    process fails (here each process of a two-process job is played in turn)."""
    import errno

    from qed_jax import hf

    make_hf_model(tmp_path / "src")
    model = qed_jax.from_pretrained(tmp_path / "src")
    gathers = []
    gather = hf._gather
    monkeypatch.setattr(hf, "_gather", lambda x: gathers.append(x.shape) or gather(x))
    qed_jax.save_pretrained(model, tmp_path / "whole", dtype="float32", max_shard_bytes=60_000)
    everything, gathers[:] = list(gathers), []

    def full_disk(path, tensors, produce):
        produce(tensors[0][0])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(hf, "write_safetensors", full_disk)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for process, error, match in [(0, OSError, "No space left on device"),
                                  (1, CheckpointError, "writing the Hugging Face export failed on process 0")]:
        agreed = []
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        monkeypatch.setattr(hf, "largest", lambda value: agreed.append(value) or 1, raising=False)  # 0 failed
        with pytest.raises(error, match=match):
            qed_jax.save_pretrained(model, tmp_path / "out", dtype="float32", max_shard_bytes=60_000)
        assert gathers == everything and agreed == [int(process == 0)], process
        gathers[:] = []


def test_a_home_relative_path_and_a_model_config_that_does_not_fit_its_arrays(tmp_path, monkeypatch):
    from qed_jax import checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    make_hf_model(tmp_path / "hf", seed=0)
    model = qed_jax.from_pretrained("~/hf")
    checkpoint.save_model(model, tmp_path / "ckpt", step=3)
    edited = tmp_path / "ckpt" / checkpoint.MODEL_CONFIG
    config = json.loads(edited.read_text())
    edited.write_text(json.dumps({**config, "num_layers": config["num_layers"] + 1}))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'ckpt'}: step 3 does not fit its model config, model_config.json (params ")):
        qed_jax.from_pretrained("~/ckpt")


def test_save_pretrained_reads_a_home_relative_path_as_from_pretrained_does(tmp_path, monkeypatch):
    """~/out is the home folder's out, not a folder named ~ in the working directory; a tokenizer
    folder given as ~/tok is copied, not silently left out."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    make_hf_model_with_tokenizer(tmp_path / "home" / "tok")
    model = qed_jax.from_pretrained(tmp_path / "home" / "tok")
    out = qed_jax.save_pretrained(model, "~/out", dtype="float32", assets_from="~/tok", generation_from="~/tok")
    assert Path(out) == tmp_path / "home" / "out" and not (tmp_path / "~").exists()
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "home" / "out" / name).read_bytes() != b""
    assert (tmp_path / "home" / "out" / "generation_config.json").read_bytes() == (
        tmp_path / "home" / "tok" / "generation_config.json").read_bytes()


@pytest.mark.parametrize("missing", ["{tmp}/missing", "~/missing", "./missing"])
def test_save_pretrained_refuses_a_tokenizer_folder_that_is_not_there(tmp_path, monkeypatch, missing):
    """A local assets_from that does not exist was ignored: the export had no tokenizer. A Hub id's
    form and a folder without tokenizer files export as before."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    make_hf_model(tmp_path / "hf", seed=0)
    model = qed_jax.from_pretrained(tmp_path / "hf")
    missing = missing.format(tmp=tmp_path)
    with pytest.raises(CheckpointError, match=rf"^assets_from: {re.escape(missing)}: no such folder; name the "
                                              r"folder that holds the model's tokenizer files$"):
        qed_jax.save_pretrained(model, tmp_path / "out", dtype="float32", assets_from=missing)
    assert not (tmp_path / "out").exists()
    for assets_from in ("org/name", tmp_path / "hf"):
        qed_jax.save_pretrained(model, tmp_path / "out", dtype="float32", assets_from=assets_from)
        assert (tmp_path / "out" / "config.json").is_file()


def test_convert_step_exports_that_step_of_a_checkpoint_and_names_the_steps_there_are(tmp_path, capsys):
    from qed_jax import checkpoint

    first, second = tmp_path / "first", tmp_path / "second"
    make_hf_model(first, seed=0)
    make_hf_model(second, seed=1)
    ckpt = tmp_path / "ckpt"
    checkpoint.save_model(qed_jax.from_pretrained(first), ckpt, step=0)
    checkpoint.save_model(qed_jax.from_pretrained(second), ckpt, step=5)
    assert cli.main(["convert", str(ckpt), str(tmp_path / "latest")]) == 0
    assert cli.main(["convert", str(ckpt), str(tmp_path / "step0"), "--step", "0"]) == 0
    for exported, source in ((tmp_path / "latest", second), (tmp_path / "step0", first)):
        original, back = _tensors(source), _tensors(exported)
        assert all(np.array_equal(original[name], back[name]) for name in original), exported

    assert cli.main(["convert", str(ckpt), str(tmp_path / "none"), "--step", "3"]) == 2
    assert f"{ckpt}: has no step 3; its steps are 0, 5" in capsys.readouterr().err
    assert cli.main(["convert", str(first), str(tmp_path / "none"), "--step", "0"]) == 2
    only = "a step can only be chosen in a qed-jax checkpoint directory"
    assert f"{first}: a Hugging Face model folder; {only}" in capsys.readouterr().err
    assert cli.main(["convert", "Qwen/Qwen3-0.6B", str(tmp_path / "none"), "--step", "0"]) == 2  # nothing downloaded
    assert f"Qwen/Qwen3-0.6B: no such local folder, so read as a Hugging Face Hub id; {only}" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    with pytest.raises(CheckpointError, match=re.escape(
            f"{ckpt}/0: one step of the checkpoint directory {ckpt}; pass that directory (its latest step is "
            f"loaded; to use this one, export it: `qed-jax convert {ckpt} OUT --step 0`)")):
        qed_jax.from_pretrained(ckpt / "0")


def test_an_unreadable_step_names_the_step_before_it_or_that_there_is_none(tmp_path, capsys):
    from qed_jax import checkpoint

    make_hf_model(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    model = qed_jax.from_pretrained(tmp_path / "hf")
    checkpoint.save_model(model, ckpt, step=0)
    checkpoint.save_model(model, ckpt, step=5)

    def damage(step):
        for f in (ckpt / str(step) / "params").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[:16])

    damage(5)
    capsys.readouterr()
    assert cli.main(["convert", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{ckpt}: step 5 is unreadable (" in err[0], err
    assert err[0].endswith("); move that step's folder aside to load the one before it (step 0)")
    damage(0)
    assert cli.main(["convert", str(ckpt), str(tmp_path / "out"), "--step", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("); choose another of its steps (5)")
    shutil.rmtree(ckpt / "5")
    assert cli.main(["convert", str(ckpt), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith("); it is the checkpoint's only step: write the model there again")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_only_step_was_cut_off_says_how_to_write_it_again(tmp_path, capsys):
    # `convert` killed (kill -9) while Orbax wrote the step: model_config.json is there, the step
    # only under Orbax's temporary name.
    make_hf_model(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    assert cli.main(["convert", str(tmp_path / "hf"), str(ckpt)]) == 0
    (ckpt / "0").rename(ckpt / "0.orbax-checkpoint-tmp-1")
    capsys.readouterr()
    assert cli.main(["convert", str(ckpt), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qed-jax convert: error: {ckpt}: holds a model config but no whole step (its first save was cut off); "
        "write the model there again")
    assert not (tmp_path / "out").exists()
    assert cli.main(["convert", str(tmp_path / "hf"), str(ckpt), "--overwrite"]) == 0
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["0"]


def test_a_hugging_face_export_cut_off_before_its_config_says_so(tmp_path, capsys):
    # An export killed (kill -9) before its config.json, written last: the weights are there.
    make_hf_model(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "export")]) == 0
    (tmp_path / "export" / "config.json").unlink()
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "export"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qed-jax convert: error: {tmp_path / 'export'}: holds safetensors but no config.json, which an export "
        "writes last (an export cut off part-way, or a copy that left it out); export the model there again, or "
        "copy in its config.json")
    assert not (tmp_path / "out").exists()


def test_convert_to_a_bucket_it_cannot_reach_fails_in_one_line(tmp_path, capsys, monkeypatch):
    """The storage client's network error, raised while the destination is looked at, names the
    bucket path and what to check (gcsfs's own error names neither)."""
    class ClientConnectorDNSError(Exception):  # as aiohttp's, under gcsfs, says it
        pass

    def unreachable(source, dest, overwrite):
        raise ClientConnectorDNSError("Cannot connect to host storage.googleapis.com:443 ssl:default "
                                      "[Name or service not known]")

    make_hf_model(tmp_path / "hf")
    monkeypatch.setattr(cli, "_check_destination", unreachable)
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "hf"), "gs://no-such-bucket/ckpt"]) == 1  # not a path to fix
    assert capsys.readouterr().err.strip().splitlines() == [
        "qed-jax convert: error: cannot reach gs://no-such-bucket/ckpt (ClientConnectorDNSError: Cannot connect to "
        "host storage.googleapis.com:443 ssl:default [Name or service not known]); check the network and the "
        "storage credentials (`gcloud auth application-default login`)"]
    # A local path's error, beside a bucket path, is still that path's.
    def local_denied(source, dest, overwrite):
        raise PermissionError(13, "Permission denied", str(tmp_path / "hf"))

    monkeypatch.setattr(cli, "_check_destination", local_denied)
    assert cli.main(["convert", str(tmp_path / "hf"), "gs://no-such-bucket/ckpt"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qed-jax convert: error: {tmp_path / 'hf'}: Permission denied; choose another path, or change its permissions"]


def test_convert_refuses_an_occupied_destination_unless_overwrite_replaces_it(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    make_hf_model(first, seed=0)
    make_hf_model(second, seed=1)
    assert cli.main(["convert", str(first), str(tmp_path / "ckpt")]) == 0
    for source, dest in ((second, tmp_path / "ckpt"), (tmp_path / "ckpt", second)):  # a checkpoint, an HF folder
        before = sorted(p.name for p in dest.iterdir())
        assert cli.main(["convert", str(source), str(dest)]) == 2
        assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
        assert sorted(p.name for p in dest.iterdir()) == before
    assert cli.main(["convert", str(second), str(tmp_path / "ckpt"), "--overwrite"]) == 0
    tokens = jnp.asarray([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(qed_jax.from_pretrained(tmp_path / "ckpt")(tokens)),
                                  np.asarray(qed_jax.from_pretrained(second)(tokens)))
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()] == ["0"]


def test_convert_overwrite_never_deletes_the_source_or_a_destination_it_cannot_replace(tmp_path, capsys):
    outer = tmp_path / "outer"
    source = outer / "src"
    make_hf_model(source)
    (outer / "notes.txt").write_text("keep me")
    link = tmp_path / "link"  # the source under another name
    link.symlink_to(source)
    for src, dest, why in ((source, outer, "would hold or lie inside the source"),
                           (source, source / "ckpt", "would hold or lie inside the source"),
                           (link, outer, "would hold or lie inside the source"),
                           (link, source / "ckpt", "would hold or lie inside the source"),
                           (source, source, "is the source itself"), (link, source, "is the source itself"),
                           (source, link, "is the source itself")):
        assert cli.main(["convert", str(src), str(dest), "--overwrite"]) == 2
        assert f"{dest}: the destination {why}" in capsys.readouterr().err
    assert (outer / "notes.txt").read_text() == "keep me" and (source / "model.safetensors").is_file()
    assert not (source / "ckpt").exists()

    assert cli.main(["convert", str(source), str(tmp_path / "export")]) == 0
    before = sorted(p.name for p in (tmp_path / "export").iterdir())
    cut = tmp_path / "cut"
    make_hf_model(cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    for source in (tmp_path / "typo", cut):  # sources that fail to load: the old destination stays
        assert cli.main(["convert", str(source), str(tmp_path / "export"), "--overwrite"]) == 2
        capsys.readouterr()
        assert sorted(p.name for p in (tmp_path / "export").iterdir()) == before


def test_convert_overwrite_replaces_only_a_model(tmp_path, capsys, monkeypatch):
    """An empty DEST (an unset shell variable) would name the working directory: refused. A
    folder that holds no model is never emptied by --overwrite; a model behind a link is."""
    source = tmp_path / "src"
    make_hf_model(source)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for args, name in ((["convert", str(source), "", "--overwrite"], "dest"), (["convert", " ", "out"], "source")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"qed-jax convert: error: argument {name}: empty; give a path (an unset shell variable?); "
            "`qed-jax convert --help` shows the usage")
    (work / "config.json").write_text("{}")  # a run directory has a config.json too
    (work / ".lock").write_text("")  # named after what is not hidden
    for dest, overwrite in ((work, ["--overwrite"]), (".", ["--overwrite"]), (work, [])):  # never "pass --overwrite"
        assert cli.main(["convert", str(source), str(dest), *overwrite]) == 2
        assert (f"{dest} holds config.json, notes.txt, .lock and no model (neither a Hugging Face folder nor a qed-jax "
                "checkpoint), so --overwrite leaves it alone") in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == [".lock", "config.json", "notes.txt"]

    target, link = tmp_path / "target", tmp_path / "link"
    assert cli.main(["convert", str(source), str(target)]) == 0
    link.symlink_to(target)
    (target / "stale.txt").write_text("from before")
    (target / "my-sft-run" / "checkpoints").mkdir(parents=True)  # a folder kept beside the model: not its to delete
    for overwrite in (["--overwrite"], []):
        assert cli.main(["convert", str(source), str(link), *overwrite]) == 2
        assert (f"{link} holds the folder my-sft-run, which is no part of a model, so --overwrite leaves it alone"
                in capsys.readouterr().err)
    (target / "my-sft-run" / "checkpoints").rmdir()
    (target / "my-sft-run").rmdir()
    (target / ".git").mkdir()  # a git clone's history: not the model's to delete either
    assert cli.main(["convert", str(source), str(link), "--overwrite"]) == 2
    assert f"{link} holds the folder .git, which is no part of a model" in capsys.readouterr().err
    (target / ".git").rmdir()
    (target / ".cache" / "huggingface").mkdir(parents=True)  # a download's (`hf download --local-dir`): replaced
    assert cli.main(["convert", str(source), str(link), "--overwrite"]) == 0
    assert link.is_symlink() and not (target / "stale.txt").exists() and is_checkpoint_dir(target)

    cut = tmp_path / "cut"  # an export stopped before its config.json, which is written last: replaced
    assert cli.main(["convert", str(target), str(cut)]) == 0
    (cut / "config.json").unlink()
    assert cli.main(["convert", str(target), str(cut), "--overwrite"]) == 0 and (cut / "config.json").exists()
    run = tmp_path / "run_checkpoints"  # a trainer's: never replaced
    shutil.copytree(target, run)
    (run / "0" / "opt_state").mkdir()
    assert cli.main(["convert", str(source), str(run), "--overwrite"]) == 2
    assert "holds a training run's checkpoints (step 0 has optimizer state)" in capsys.readouterr().err
    export = tmp_path / "sft_run" / "hf"  # a trainer's export, which the stages after it load: never replaced
    assert cli.main(["convert", str(target), str(export)]) == 0
    (export.parent / "config.json").write_text(json.dumps({"optim": {"lr": 1e-5}, "steps": 2}))
    refusal = (f"qed-jax convert: error: {export} is the export of the training run in {export.parent}, which its "
               "trainer makes from its last checkpoint and the stages after it load, so convert leaves it alone; "
               "choose another destination")
    assert cli.main(["convert", str(source), str(export), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == refusal
    shutil.rmtree(export)
    export.mkdir()  # cut off before it wrote anything: its trainer's to write still
    assert cli.main(["convert", str(source), str(export)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == refusal
    (export.parent / "config.json").write_text(json.dumps({"benchmark": {}}))  # another command's folder: replaced
    assert cli.main(["convert", str(source), str(export), "--overwrite"]) == 0


def test_sharded_model_matches_unsharded_and_follows_rules(tmp_path):
    make_hf_model(tmp_path, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    plain = qed_jax.from_pretrained(tmp_path)
    sharded = qed_jax.from_pretrained(tmp_path, mesh=mesh)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 384, (4, 10)))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t: sharded(t))(tokens)),
                               np.asarray(plain(tokens)), atol=1e-5)

    expected = {  # what DEFAULT_RULES say for this mesh, written out by hand
        "embed": P("tensor", "fsdp"), "lm_head": P("tensor", "fsdp"), "final_norm": P(None),
        "q": P(None, "fsdp", "tensor", None), "k": P(None, "fsdp", "tensor", None),
        "o": P(None, "tensor", None, "fsdp"), "gate": P(None, "fsdp", "tensor"),
        "down": P(None, "tensor", "fsdp"), "attn_norm": P(None, None),
    }
    for name, spec in expected.items():
        owner = sharded.layers if hasattr(sharded.layers, name) else sharded
        param = getattr(owner, name)
        assert param[...].sharding.spec == spec, name
        assert spec == logical_to_spec(param.get_metadata()["axes"], param.shape, mesh, DEFAULT_RULES)


def test_rules_replicate_an_indivisible_axis_and_say_so_once(caplog):
    from qed_jax import sharding

    sharding._warn_replicated.cache_clear()  # what earlier tests in this process were told
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    for _ in range(3):  # as every parameter with that axis asks
        assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp", None, None)
        assert logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)
    warnings = [r.getMessage() for r in caplog.records if "not divisible" in r.getMessage()]
    assert warnings == ["axis 'kv_heads' of size 1 is not divisible by mesh ('tensor',) (2); replicating it",
                        "axis 'kv_heads' of size 3 is not divisible by mesh ('tensor',) (2); replicating it"]


def test_param_counts_from_abstract_shapes():
    import torch
    from transformers import Qwen3ForCausalLM

    assert param_count(PRESETS["qwen3-4b"]) == 4_022_468_096
    assert param_count(PRESETS["qwen3-4b-thinking-2507"]) == 4_022_468_096
    for name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-8b"):
        config = PRESETS[name]
        from transformers import Qwen3Config

        with torch.device("meta"):
            hf = Qwen3ForCausalLM(Qwen3Config(**config.to_hf()))
        assert param_count(config) == hf.num_parameters(), name


def test_convert_from_a_hub_id_or_a_home_relative_path_keeps_the_tokenizer(tmp_path, monkeypatch, capsys):
    """The source is read where from_pretrained found it: a Hub id's download (here a local folder
    standing in for the Hub), a `~` path expanded, so its tokenizer goes along and a checkpoint
    under `~` is exported as a Hugging Face folder."""
    import huggingface_hub
    from tests.helpers import make_hf_model_with_tokenizer

    make_hf_model_with_tokenizer(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.main(["convert", "some-org/some-model", "~/ckpt"]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert cli.main(["convert", "~/ckpt", "~/out"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote Hugging Face folder {tmp_path}/out (float32)"
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "config.json").is_file()


def test_config_round_trips_through_hf_dict():
    from transformers import Qwen3Config

    for config in PRESETS.values():
        hf = config.to_hf(torch_dtype="float32")
        back = ModelConfig.from_hf(hf, param_dtype=config.param_dtype, dtype=config.dtype)
        assert back == config
        # Both generations of field names: transformers 4 reads these two at the top level.
        assert (hf["rope_theta"], hf["torch_dtype"]) == (config.rope_theta, "float32")
        loaded = Qwen3Config.from_dict(hf)
        rope = loaded.rope_parameters
        assert rope["rope_theta"] == config.rope_theta and rope["rope_type"] == "default"
    # A config.json that leaves fields out (hand-written, or another tool's): what transformers
    # takes for them, not a guess of ours (head_dim 128, not hidden_size / heads).
    hf = PRESETS["qwen3-4b-thinking-2507"].to_hf()  # 32 query heads of 128 in a 2,560-wide model
    for key in ("head_dim", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        del hf[key]
    ours, theirs = ModelConfig.from_hf(hf), Qwen3Config.from_dict(hf)
    assert (ours.head_dim, ours.num_kv_heads, ours.max_position_embeddings, ours.rms_norm_eps,
            ours.tie_word_embeddings) == (theirs.head_dim, theirs.num_key_value_heads, theirs.max_position_embeddings,
                                          theirs.rms_norm_eps, theirs.tie_word_embeddings)
    hf = PRESETS["qwen3-0.6b"].to_hf()  # 16 query heads: transformers' 32 kv heads do not divide them
    del hf["num_key_value_heads"]
    with pytest.raises(ConfigError, match=r"^config has no num_key_value_heads, and the 32 that transformers takes "
                                          r"for it does not divide num_attention_heads \(16\): add "):
        ModelConfig.from_hf(hf)
    # RoPE scaling is refused wherever it is set: transformers 5 runs a rope_scaling added beside
    # the rope_parameters it writes (the Qwen3 model card's way to turn on YaRN).
    for key, rope in [("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
                      ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
                      ("rope_scaling", {"type": "linear", "factor": 2.0})]:
        hf = PRESETS["qwen3-0.6b"].to_hf()
        assert hf["rope_parameters"]["rope_type"] == "default"
        hf[key] = rope
        kind = rope.get("rope_type", rope.get("type"))
        with pytest.raises(ConfigError, match=f"^{key}: rope type '{kind}' is not supported"):
            ModelConfig.from_hf(hf)
    # A field of the wrong type or value is named as config.json names it.
    for key, value, message in [("num_hidden_layers", "2", "num_hidden_layers must be a positive integer, got '2'"),
                                ("num_attention_heads", "16",
                                 "num_attention_heads must be a positive integer, got '16'"),
                                ("head_dim", 0, "head_dim must be a positive integer, got 0"),
                                ("num_key_value_heads", 5, "num_attention_heads (16) must be a multiple of "
                                                           "num_key_value_heads (5)"),
                                ("rope_theta", "abc", "rope_theta must be a positive number, got 'abc'"),
                                ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got "
                                                                 "'false'"),
                                ("rope_parameters", 1000000.0, "rope_parameters must be a mapping (rope_type, "
                                                               "rope_theta, ...), got 1000000.0"),
                                ("rope_scaling", "yarn", "rope_scaling must be a mapping (rope_type, rope_theta, "
                                                         "...), got 'yarn'")]:
        hf = PRESETS["qwen3-0.6b"].to_hf()
        hf.pop("rope_parameters", None)
        hf[key] = value
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            ModelConfig.from_hf(hf)


def test_config_fields_are_read_as_transformers_reads_them():
    """Where transformers makes a config.json mean something other than its fields' face value,
    the model is read as transformers reads it, or refused: never loaded as a different model."""
    import copy

    from transformers import Qwen3Config

    def both(changes, drop=()):
        hf = {k: v for k, v in {**PRESETS["qwen3-0.6b"].to_hf(), **changes}.items() if k not in drop}
        return hf, Qwen3Config.from_dict(copy.deepcopy(hf))  # which fills in the dicts it is given

    # A rope_scaling beside rope_parameters replaces it, rope_theta included.
    hf, theirs = both({"rope_scaling": {"rope_type": "default", "rope_theta": 5e6}}, drop=("rope_theta",))
    assert ModelConfig.from_hf(hf).rope_theta == theirs.rope_parameters["rope_theta"] == 5e6
    hf, _ = both({"rope_scaling": {"rope_type": "default"}}, drop=("rope_theta",))
    with pytest.raises(ConfigError, match=r"^config has no rope_theta \(looked in rope_scaling, rope_parameters"):
        ModelConfig.from_hf(hf)  # transformers would take 10,000, not the 1e6 of the rope_parameters beside it
    # Sliding windows: refused in the layers transformers makes slide, and only there.
    layers = PRESETS["qwen3-0.6b"].num_layers
    hf, theirs = both({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": layers},
                        drop=("layer_types",))
    assert set(theirs.layer_types) == {"full_attention"} and ModelConfig.from_hf(hf) == PRESETS["qwen3-0.6b"]
    hf, theirs = both({"use_sliding_window": True, "max_window_layers": 0}, drop=("layer_types",))  # no window
    assert set(theirs.layer_types) == {"full_attention"} and ModelConfig.from_hf(hf) == PRESETS["qwen3-0.6b"]
    hf, theirs = both({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": layers - 2},
                        drop=("layer_types",))
    assert theirs.layer_types[-3:] == ["full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ConfigError, match=rf"^config has sliding-window attention in layers \[{layers - 2}, "
                                          rf"{layers - 1}\] \(use_sliding_window, max_window_layers, layer_types\)"):
        ModelConfig.from_hf(hf)
    hf, _ = both({"layer_types": ["sliding_attention"] + ["full_attention"] * (layers - 1)})
    with pytest.raises(ConfigError, match=r"^config has sliding-window attention in layers \[0\]"):
        ModelConfig.from_hf(hf)
    # "swish" is transformers' other name of SiLU.
    hf, theirs = both({"hidden_act": "swish"})
    assert ModelConfig.from_hf(hf) == PRESETS["qwen3-0.6b"]
    # A head that is not the language model's, and quantized weights, are refused by name.
    hf, _ = both({"architectures": ["Qwen3ForSequenceClassification"], "num_labels": 1})
    with pytest.raises(ConfigError, match=r"^architectures is \['Qwen3ForSequenceClassification'\]: qed-jax loads "
                                          r"a Qwen3ForCausalLM"):
        ModelConfig.from_hf(hf)
    hf, _ = both({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(ConfigError, match=r"^config has a quantization_config \(gptq\): qed-jax loads unquantized"):
        ModelConfig.from_hf(hf)


# --- bad input: one clear line naming the problem ---------------------------------------------


def _drop_tensor(folder, name, reshape=None):
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    if reshape is None:
        del tensors[name]
    else:
        tensors[name] = tensors[name][:reshape]
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case,expected", [
    ("missing", "tensor model.layers.1.mlp.up_proj.weight is missing"),
    ("untied head missing", "tensor lm_head.weight is missing from the safetensors files (config.json does not tie "
                            "the output head to the embedding: if this model does, set tie_word_embeddings true"),
    ("misshaped", "tensor model.layers.0.self_attn.k_proj.weight has shape [40, 64], but config.json implies [48, 64]"),
    ("moe", "unsupported model_type 'qwen3_moe'"),
    ("bias", "attention_bias=true"),
    ("nonexistent", "no such file or directory"),
    ("truncated data", "model.safetensors: not a readable safetensors file: its tensors need"),
    ("truncated header", "model.safetensors: not a readable safetensors file (its header runs past the end"),
    ("short offsets", "model.safetensors: not a readable safetensors file (tensor model.norm.weight's data offsets "),
    ("no hidden_size", "config.json: config has no hidden_size (a Qwen3 config gives each of vocab_size, "),
    ("bad json", "config.json: not valid JSON"),
    ("json list", "config.json: not a model config (a JSON object of settings)"),
    ("string field", "config.json: num_hidden_layers must be a positive integer, got '3'"),
    ("fewer layers", "config.json says num_hidden_layers 2, but the safetensors files hold layers up to "
                     "model.layers.2; fix config.json"),
])
def test_bad_input_fails_with_one_clear_line(tmp_path, case, expected, capsys):
    folder = tmp_path / "model"
    make_hf_model(folder)
    if case == "missing":
        _drop_tensor(folder, "model.layers.1.mlp.up_proj.weight")
    elif case == "untied head missing":  # a tied model whose config.json lost tie_word_embeddings
        make_hf_model(folder, tie_word_embeddings=True)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    elif case == "misshaped":
        _drop_tensor(folder, "model.layers.0.self_attn.k_proj.weight", reshape=40)
    elif case in ("moe", "bias"):
        config = json.loads((folder / "config.json").read_text())
        config.update({"model_type": "qwen3_moe", "num_experts": 8} if case == "moe" else {"attention_bias": True})
        (folder / "config.json").write_text(json.dumps(config))
    elif case.startswith("truncated"):
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(f.seek(0, 2) - 100 if case == "truncated data" else 200)
    elif case == "short offsets":  # a header whose offsets give a tensor half its bytes: it would read the next's
        data = (folder / "model.safetensors").read_bytes()
        length = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8: 8 + length])
        start, end = header["model.norm.weight"]["data_offsets"]
        header["model.norm.weight"]["data_offsets"] = [start, start + (end - start) // 2]
        table = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(table)) + table + data[8 + length:])
    elif case == "no hidden_size":
        config = json.loads((folder / "config.json").read_text())
        del config["hidden_size"]
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "bad json":
        (folder / "config.json").write_text('{"model_type": "qwen3",')
    elif case == "json list":
        (folder / "config.json").write_text('["qwen3"]')
    elif case == "string field":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "3"}))
    elif case == "fewer layers":  # a 3-layer model
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    else:
        shutil.rmtree(folder)
    with pytest.raises((CheckpointError, ConfigError), match=re.escape(expected)) as err:
        qed_jax.from_pretrained(folder)
    assert "\n" not in str(err.value)
    capsys.readouterr()
    assert cli.main(["convert", str(folder), str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and expected.split(" [")[0] in stderr[0]


def test_unreachable_hub_id_fails_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"^no-such-org/no-such-model: not a local path, and downloading"):
        qed_jax.from_pretrained("no-such-org/no-such-model")


def test_models_from_different_folders_share_one_graph_and_export_their_own_tokenizer(tmp_path):
    """Jitted functions key their cache on the graph: where a model came from must not be in it."""
    from flax import nnx
    from tests.helpers import make_hf_model_with_tokenizer

    for name, seed in (("a", 0), ("b", 1)):
        make_hf_model_with_tokenizer(tmp_path / name, seed=seed)
    a, b = qed_jax.from_pretrained(tmp_path / "a"), qed_jax.from_pretrained(tmp_path / "b")
    assert nnx.graphdef(a) == nnx.graphdef(b)
    qed_jax.save_pretrained(a, tmp_path / "out", dtype="float32")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()


def test_a_trainer_run_directory_given_as_a_model_names_the_models_inside(tmp_path):
    run = tmp_path / "run"
    make_hf_model(run / "hf")
    (run / "checkpoints").mkdir()
    (run / "config.json").write_text(json.dumps({"steps": 3}))  # the trainer's config, not a model's
    with pytest.raises(CheckpointError, match=re.escape(
            f"{run}: a trainer's run directory, not a model; pass {run}/hf (its exported model) or "
            f"{run}/checkpoints (its latest checkpoint)")):
        qed_jax.from_pretrained(run)
    make_hf_model(run)  # a model folder that happens to hold such folders is a model
    assert qed_jax.from_pretrained(run).config.num_layers == qed_jax.from_pretrained(run / "hf").config.num_layers


def test_a_damaged_checkpoint_model_config_is_one_line(tmp_path, capsys):
    make_hf_model(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/ckpt/0: one step of the checkpoint directory "
                       f"{tmp_path}/ckpt; pass that directory"):
        qed_jax.from_pretrained(tmp_path / "ckpt" / "0")
    model_config = tmp_path / "ckpt" / "model_config.json"
    for text, reason in (("{", "Expecting property name enclosed in double quotes"),
                         ('{"hidden_size": 12}', "missing 8 required positional arguments"),
                         (json.dumps({**json.loads(model_config.read_text()), "num_layers": 0}),
                          "num_layers must be a positive integer, got 0")):
        original = model_config.read_text()
        model_config.write_text(text)
        capsys.readouterr()
        assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"qed-jax convert: error: {model_config}: not a model config (")
        assert reason in err[0]
        model_config.write_text(original)


def test_a_folder_of_mixed_dtypes_loads_in_the_widest(tmp_path):
    """bfloat16 weights with float32 norms: nothing is rounded (the dtype was the embedding's)."""
    import torch
    from safetensors.torch import load_file, save_file

    make_hf_model(tmp_path, dtype="bfloat16")
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    norms = {name: t.float() + 1e-4 for name, t in tensors.items() if "norm" in name}  # not bfloat16 values
    save_file({**tensors, **norms}, path, metadata={"format": "pt"})
    model = qed_jax.from_pretrained(tmp_path)
    assert model.config.param_dtype == "float32"
    np.testing.assert_array_equal(np.asarray(model.final_norm[...]), norms["model.norm.weight"].numpy())
    assert torch.equal(torch.from_numpy(np.array(model.embed[...])),
                       tensors["model.embed_tokens.weight"].float())


def test_a_folder_of_float16_beside_bfloat16_loads_in_float32(tmp_path):
    """Neither 16-bit type holds the other's values: loaded in either, one of them would be rounded."""
    import torch
    from safetensors.torch import load_file, save_file

    make_hf_model(tmp_path, dtype="bfloat16")
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    norms = {name: (t.float() + 1e-3).half() for name, t in tensors.items() if "norm" in name}
    assert not all(torch.equal(n.to(torch.bfloat16).float(), n.float()) for n in norms.values())
    save_file({**tensors, **norms}, path, metadata={"format": "pt"})
    model = qed_jax.from_pretrained(tmp_path)
    assert model.config.param_dtype == "float32"
    np.testing.assert_array_equal(np.asarray(model.final_norm[...]), norms["model.norm.weight"].float().numpy())
    assert torch.equal(torch.from_numpy(np.array(model.embed[...])),
                       tensors["model.embed_tokens.weight"].float())


def test_a_tied_config_with_a_head_of_its_own_loads_as_transformers_does(tmp_path, caplog):
    from safetensors.numpy import load_file, save_file
    from transformers import Qwen3ForCausalLM

    make_hf_model(tmp_path)  # tied
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    head = np.random.default_rng(1).normal(0, 0.08, tensors["model.embed_tokens.weight"].shape).astype(np.float32)
    save_file({**tensors, "lm_head.weight": head}, path, metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        model = qed_jax.from_pretrained(tmp_path)
    assert not model.config.tie_word_embeddings and "using it, untied" in caplog.text
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9))
    ref = hf_logits(Qwen3ForCausalLM.from_pretrained(tmp_path).eval(), tokens)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_convert_writes_finishes_the_output_then_exits(tmp_path, signame):
    """Ctrl-C or SIGTERM arrives while the checkpoint is being written (sent by the save itself,
    so that the moment is certain): the write finishes, the output is whole, the command stops."""
    import signal
    import subprocess
    import sys

    from tests.helpers import REPO, cli_env

    make_hf_model(tmp_path / "hf")
    script = f"""
import signal, sys
from qed_jax import checkpoint, cli
save = checkpoint.save_model
def interrupted_save(*args, **kwargs):
    signal.raise_signal(signal.{signame})
    save(*args, **kwargs)
checkpoint.save_model = interrupted_save
sys.exit(cli.main(["convert", "{tmp_path / 'hf'}", "{tmp_path / 'ckpt'}"]))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert result.returncode == 128 + getattr(signal, signame), result.stderr[-3000:]
    assert f"{signame}: finishing the output being written, then stopping" in result.stderr
    how = "interrupted" if signame == "SIGINT" else "stopped by SIGTERM"
    assert result.stderr.strip().splitlines()[-1] == f"qed-jax convert: {how}"
    assert "Traceback" not in result.stderr
    assert result.stdout == f"wrote qed-jax checkpoint {tmp_path / 'ckpt'} (float32), whole: {signame} came while it was written\n"
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0  # whole
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # the caller's, back
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert all(np.array_equal(original[name], back[name]) for name in original)


def test_a_second_ctrl_c_while_convert_writes_names_the_unfinished_output_and_the_way_out(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO, cli_env

    make_hf_model(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    script = f"""
import signal, sys
from qed_jax import checkpoint, cli
def twice_interrupted_save(*args, **kwargs):
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)
checkpoint.save_model = twice_interrupted_save
sys.exit(cli.main(["convert", "{tmp_path / 'hf'}", "{ckpt}"]))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"SIGINT again: exiting at once; {ckpt} is unfinished: rerun the same command with --overwrite")


def test_convert_to_a_checkpoint_that_cannot_be_written_fails_in_one_line(tmp_path):
    """A full disk (here a file-size limit) while Orbax writes: one line, not its threads' tracebacks."""
    import subprocess

    from tests.helpers import REPO, cli_env, cli_with_file_size_limit

    make_hf_model(tmp_path / "hf")
    command = cli_with_file_size_limit(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt")], 16 * 1024)
    result = subprocess.run(command, cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"qed-jax convert: error: {tmp_path / 'ckpt'}: writing step 0 failed (file too large); fix that and run the "
        "command again (with --overwrite)")


def test_an_export_that_cannot_be_written_names_the_file(tmp_path):
    """A full disk (here a file-size limit) while the safetensors are written: the OS's error
    names no file, so the one-line error named none."""
    import subprocess

    from tests.helpers import REPO, cli_env, cli_with_file_size_limit

    make_hf_model(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    command = cli_with_file_size_limit(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back")], 16 * 1024)
    result = subprocess.run(command, cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"qed-jax convert: error: {tmp_path / 'back' / 'model.safetensors'}: File too large\n" in result.stderr
    # (a progress bar's last line may follow)


def test_a_ctrl_c_that_python_drops_still_stops_the_command():
    """SIGINT handled inside a finalizer: Python drops the KeyboardInterrupt ("Exception ignored",
    shown only with -v) and goes on; the command still ends as interrupted (exit 130), not with 0,
    and its line says that it had done all its work (not "rerun to continue")."""
    import subprocess
    import sys

    from tests.helpers import REPO, cli_env

    script = """
import signal, sys
from qed_jax import cli
class Finalized:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)
def report(args):
    Finalized()
    print("went on", flush=True)
cli._report = report
sys.exit(cli.main(["report", "somewhere"]))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert "went on" in result.stdout  # Python dropped the KeyboardInterrupt
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [  # nothing else without -v
        "qed-jax report: interrupted, after the command had done all its work: nothing was cut short"]


def test_an_export_of_a_base_models_generation_config_stops_where_the_sampler_stops(tmp_path):
    # A base model's generation config ends on <|endoftext|> alone (Qwen3-*-Base); the chat model
    # trained from it ends its turns on <|im_end|>, where qed-jax's sampler stops: so must
    # transformers and vLLM reading the export.
    from qed_jax.tokenizer import load_tokenizer, stop_ids

    src = tmp_path / "base"
    make_hf_model_with_tokenizer(src)
    tokenizer = load_tokenizer(src)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": endoftext, "top_k": 20}))
    out = qed_jax.save_pretrained(qed_jax.from_pretrained(src), tmp_path / "out", dtype="float32",
                                  stop_on_turn_end=True)  # as the trainers' exports do
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["top_k"] == 20
    assert set(stop_ids(tokenizer)) <= set(generation["eos_token_id"])
    from transformers import AutoModelForCausalLM

    assert set(stop_ids(tokenizer)) <= set(AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id)


def test_a_damaged_safetensors_index_is_one_line(tmp_path):
    """An index that is not JSON, or whose weight_map is not tensor names to file names, names
    the index instead of failing on it with a TypeError deep in the reader."""
    from qed_jax.hf import CheckpointError, SafetensorsFolder

    index = tmp_path / "model.safetensors.index.json"
    for text in ("{not json", '{"weight_map": {"lm_head.weight": 1}}', '{"weight_map": ["a.safetensors"]}',
                 '{"weight_map": {"lm_head.weight": ["a.safetensors"]}}'):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=rf"^{index}: not a safetensors index"):
            SafetensorsFolder(tmp_path)
