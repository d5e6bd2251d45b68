"""`qed-jax plan`: Cloud slice names, FLOP counting, wave sizing and model resolution (pure, fast);
ahead-of-time compiles for a TPU topology where libtpu is installed; and the 4B acceptance check
that activation memory grows linearly in sequence length."""

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from qed_jax import cli, plan
from qed_jax.config import ConfigError, PRESETS
from qed_jax.sft import ModelSpec
from qed_jax.trainer import open_model

from tests.helpers import make_hf_model

REPO = Path(__file__).resolve().parent.parent
SFT_TINY = str(REPO / "configs" / "sft" / "tiny.yaml")
RL_TINY = str(REPO / "configs" / "rl" / "tiny.yaml")
SFT_4B = str(REPO / "configs" / "sft" / "qed_nano_4b.yaml")


@pytest.mark.parametrize("name, generation, chips, topology", [
    ("v5p-8", "v5p", 4, "v5p:2x2x1"),
    ("v5p-16", "v5p", 8, "v5p:2x2x2"),
    ("v5p-32", "v5p", 16, "v5p:2x2x4"),
    ("v5p-64", "v5p", 32, "v5p:2x4x4"),
    ("v5p-128", "v5p", 64, "v5p:4x4x4"),
    ("v5p-256", "v5p", 128, "v5p:4x4x8"),
    ("v5p-1024", "v5p", 512, "v5p:8x8x8"),
    ("v4-8", "v4", 4, "v4:2x2x1"),
    ("v4-32", "v4", 16, "v4:2x2x4"),
    ("v5e-1", "v5e", 1, "v5e:1x1"),
    ("v5e-4", "v5e", 4, "v5e:2x2"),
    ("v5e-8", "v5e", 8, "v5e:2x4"),
    ("v5litepod-16", "v5e", 16, "v5e:4x4"),
    ("v5e-256", "v5e", 256, "v5e:16x16"),
    ("v6e-32", "v6e", 32, "v6e:4x8"),
    ("V6E-64", "v6e", 64, "v6e:8x8"),
    ("v5p:4x4x12", "v5p", 192, "v5p:4x4x12"),
    ("v6e:2x4", "v6e", 8, "v6e:2x4"),
])
def test_cloud_slice_names_map_to_topologies(name, generation, chips, topology):
    tpu = plan.parse_slice(name)
    assert (tpu.generation, tpu.chips, tpu.topology) == (generation, chips, topology)


@pytest.mark.parametrize("name, accelerator_type", [
    ("v5p-8", "v5p-8"), ("v4-32", "v4-32"), ("v5e-8", "v5litepod-8"), ("v5litepod-16", "v5litepod-16"),
    ("V6E-64", "v6e-64"), ("v5p:4x4x12", "v5p-384"), ("v6e:2x4", "v6e-8"),
])
def test_a_slice_knows_the_accelerator_type_a_tpu_vm_of_it_reports(name, accelerator_type):
    assert plan.parse_slice(name).accelerator_type == accelerator_type


@pytest.mark.tpu_compile
@pytest.mark.parametrize("name,chips,hosts", [("v6e-8", 8, 1), ("v6e-16", 16, 4), ("v5e-8", 8, 1), ("v6e-1", 1, 1),
                                              ("v5e-2", 2, 1), ("v5p:1x1x1", 1, 1), ("v5p-16", 8, 2)])
def test_building_a_topology_off_a_tpu_vm_logs_nothing(libtpu, name, chips, hosts):
    """libtpu, unable to ask a metadata server, warns about the accelerator type and errors
    about the workers' hostnames unless the plan tells it both. Hosts are as Cloud builds them
    (tpu_scripts/README.md): 4 chips each (libtpu's default), except that a slice of one or two
    chips, or a v5e or v6e slice of up to 8, is one host."""
    code = ("from qed_jax import plan; devices = plan.topology_devices(plan.parse_slice(%r)); "
            "print(len(devices), len({d.process_index for d in devices}))" % name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == [str(chips), str(hosts)], done.stderr
    assert done.stderr == ""


@pytest.mark.tpu_compile
def test_each_host_holds_the_rows_it_feeds_on_a_multi_host_mesh(libtpu, caplog):
    """Each process feeds rows of its own (`to_global`), so the devices that hold the same rows
    (those along `tensor`) must share a host. On a v6e-16 (4 hosts of 2 x 2 chips) the chip
    grid's layout put tensor=4 along a row of the grid, over two hosts, and tensor=2 on no layout
    at all (JAX raised); both now take the devices host by host, saying so. A tensor axis wider
    than a host leaves some hosts no rows of their own, which is refused."""
    from collections import defaultdict

    from qed_jax.sharding import MeshConfig, make_mesh
    from qed_jax.trainer import batch_sharding, check_rows_divide

    devices = plan.topology_devices(plan.parse_slice("v6e-16"))
    for mesh_config in (MeshConfig(data=1, fsdp=4, tensor=4), MeshConfig(data=2, fsdp=4, tensor=2),
                        MeshConfig(data=1, fsdp=16, tensor=1)):
        caplog.clear()
        mesh = make_mesh(mesh_config, devices)
        rows = 2 * mesh.shape["data"] * mesh.shape["fsdp"]
        check_rows_divide(rows, mesh, "rows", 4)
        held = defaultdict(set)  # process → the rows its devices hold
        for device, index in batch_sharding(mesh).devices_indices_map((1, rows, 1)).items():
            held[device.process_index].update(range(*index[1].indices(rows)))
        assert sorted(len(r) for r in held.values()) == [rows // 4] * 4, (mesh_config, held)
        assert set().union(*held.values()) == set(range(rows))
        moved = [r.getMessage() for r in caplog.records if "host by host" in r.getMessage()]
        assert len(moved) == (mesh_config.tensor > 1), moved  # tensor=1: the grid's own layout
    with pytest.raises(ConfigError, match=r"^the 2 data-parallel devices .* do not split over the 4 processes, .*; for "
                       r"that, mesh.tensor must divide each host's 4 devices$"):
        check_rows_divide(4, make_mesh(MeshConfig(data=1, fsdp=2, tensor=8), devices), "rows", 4)


@pytest.mark.parametrize("name, message", [
    ("v5p-7", "odd"),
    ("v5p-24", "no standard 3-D slice of 12 chips"),
    ("v6e-12", r"no standard 2-D slice of 12 chips .*, e\.g\. v6e:4x4$"),
    ("v5p-0", r"no standard 3-D slice of 0 chips .*, e\.g\. v5p:2x4x4$"),
    ("v7x-8", "cannot read TPU slice"),
    ("v9:2x2", "unknown TPU generation"),
    ("v5e:2x2x2", "has 2 sides"),
])
def test_bad_slice_names_say_what_is_accepted(name, message):
    with pytest.raises(ConfigError, match=message):
        plan.parse_slice(name)


def test_program_flops_multiplies_scans_and_counts_while_and_cond_bodies_once():
    B, D, L = 4, 8, 3

    def f(x, w):  # x [B, D], w [L, D, D]
        x, _ = jax.lax.scan(lambda h, wl: (h @ wl, None), x, w)  # L matmuls
        x = jax.lax.while_loop(lambda c: c[1] < 5, lambda c: (c[0] @ w[0], c[1] + 1), (x, 0))[0]  # 1 counted
        return jax.lax.cond(x.sum() > 0, lambda y: y @ w[0] @ w[1], lambda y: y, x)  # costlier branch: 2

    jaxpr = jax.make_jaxpr(f)(jnp.ones((B, D)), jnp.ones((L, D, D)))
    assert plan.program_flops(jaxpr) == (L + 1 + 2) * 2 * B * D * D


def test_program_flops_count_the_decode_kernels_attention_over_the_whole_cache():
    from qed_jax import attention

    L, B, S, K, G, H = 2, 2, 256, 2, 3, 8
    cache = jnp.zeros((L, B, S, K, H), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q: attention.kernel_cached_attention(
        q, cache, cache, jnp.array([[5], [200]]), 1, block=128))(jnp.zeros((B, 1, K * G, H)))
    assert plan.program_flops(jaxpr) == 4 * B * K * G * S * H  # scores and values: an upper bound


@pytest.mark.parametrize("T, computed", [(512, 1.0), (1024, 3 / 4), (2048, 10 / 16)])
def test_program_flops_count_the_splash_kernels_as_the_xla_attention_they_replace(T, computed):
    """The splash kernels carry no cost estimate. Counted against XLA's attention, which forms
    every score: the kernels compute only the 512-slot block pairs on and below the diagonal
    (all of them at T = 512, 3 of 4 at 1,024, 10 of 16 at 2,048), and the backward kernels form
    the scores again, dq and dkv each (9 products per block pair against XLA's 6)."""
    from qed_jax import attention

    B, N, K, H = 2, 2, 1, 32  # packed rows: the kernels also take the segment ids, as int32 [T, 128] per row
    q, kv, segment_ids = jnp.zeros((B, T, N, H)), jnp.zeros((B, T, K, H)), jnp.ones((B, T), jnp.int32)

    def flops(implementation, grad):
        def f(q, k, v):
            out = implementation(q, k, v, segment_ids)
            return out.sum() if grad else out
        return plan.program_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)) if grad else f)(q, kv, kv))

    splash = partial(attention.splash_attention, interpret=True)
    assert flops(splash, grad=False) == computed * flops(attention.xla_attention, grad=False)
    # (and an einsum outside the kernels, sum(out x d_out) per query: under 0.03 %)
    assert flops(splash, grad=True) == pytest.approx(computed * 9 / 6 * flops(attention.xla_attention, grad=True),
                                                     rel=1e-3)


def test_program_flops_of_a_gradient_counts_forward_backward_and_remat():
    B, D, L = 4, 8, 3

    def loss(w, x, remat):  # layers as the model runs them: a scan over stacked weights [L, D, D]
        layer = lambda h, wl: (jnp.tanh(h @ wl), None)  # noqa: E731
        return jnp.sum(jax.lax.scan(jax.checkpoint(layer) if remat else layer, x, w)[0])

    one = 2 * B * D * D
    args = jnp.ones((L, D, D)), jnp.ones((B, D))
    plain = jax.make_jaxpr(jax.grad(partial(loss, remat=False), argnums=(0, 1)))(*args)
    assert plan.program_flops(plain) == L * 3 * one  # forward, and two products backward
    remat = jax.make_jaxpr(jax.grad(partial(loss, remat=True), argnums=(0, 1)))(*args)
    assert plan.program_flops(remat) == L * 4 * one  # and the forward again, recomputed


def test_wave_size_fits_free_memory_in_multiples_of_the_batch_axes():
    assert plan.wave_size(free_bytes=100, kv_bytes_per_row=10, multiple=4, rows_wanted=64) == 8
    assert plan.wave_size(free_bytes=1000, kv_bytes_per_row=10, multiple=4, rows_wanted=64) == 64
    assert plan.wave_size(free_bytes=30, kv_bytes_per_row=10, multiple=4, rows_wanted=64) == 0
    assert plan.wave_size(free_bytes=-5, kv_bytes_per_row=10, multiple=1, rows_wanted=64) == 0


def test_model_config_from_a_hub_name_a_folder_or_an_explicit_preset(hf_tiny, tmp_path):
    spec = ModelSpec(path="Qwen/Qwen3-4B-Thinking-2507", param_dtype="float32", dtype="bfloat16", remat="full")
    config, source = plan.model_config(spec)
    assert config == PRESETS["qwen3-4b-thinking-2507"].replace(param_dtype="float32", dtype="bfloat16", remat="full")
    assert "preset qwen3-4b-thinking-2507" in source and "not a local folder" in source

    with pytest.raises(ConfigError, match="--preset"):
        plan.model_config(ModelSpec(path=str(tmp_path / "runs" / "sft-4b" / "hf")))
    config, source = plan.model_config(ModelSpec(path=str(tmp_path / "missing")), preset_name="qwen3-0.6b")
    assert config.hidden_size == PRESETS["qwen3-0.6b"].hidden_size and "--preset" in source

    hf_tiny.save_pretrained(tmp_path / "hf")  # float32 tensors: planned as the trainers load them
    config, source = plan.model_config(ModelSpec(path=str(tmp_path / "hf")))
    loaded = open_model(ModelSpec(path=str(tmp_path / "hf")), 0)(None).config
    assert (config.num_layers, config.head_dim, config.param_dtype, config.dtype) == (3, 24, "float32", "float32")
    assert (loaded.param_dtype, loaded.dtype) == (config.param_dtype, config.dtype)
    assert source.endswith("config.json")
    assert plan.model_config(ModelSpec(path=str(tmp_path / "hf"), param_dtype="bfloat16"))[0].dtype == "bfloat16"
    (tmp_path / "config_only").mkdir()  # no weights to read: the default dtype
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "config_only")
    assert plan.model_config(ModelSpec(path=str(tmp_path / "config_only")))[0].param_dtype == "bfloat16"


def test_the_trainer_is_the_one_whose_config_loads(tmp_path):
    assert plan.trainer_config(SFT_TINY, [], None)[0] == "sft"
    assert plan.trainer_config(RL_TINY, ["max_new_tokens=8"], None)[0] == "grpo"
    with pytest.raises(ConfigError, match="pass --trainer"):
        plan.trainer_config(None, [], None)
    eval_yaml = str(Path(SFT_TINY).parent.parent / "eval" / "proofbench.yaml")
    with pytest.raises(ConfigError, match=r"is neither an SFT nor a GRPO config \(benchmark is not a key of SFTConfig; "
                       r"benchmark is not a key of GRPOConfig\)$"):
        plan.trainer_config(eval_yaml, [], None)
    pipeline_yaml = str(Path(SFT_TINY).parent.parent / "pipeline" / "tiny.yaml")
    with pytest.raises(ConfigError, match=r"tiny.yaml is a pipeline config: plan its trainer stages one at a time, "
                       r"`--config configs/sft/tiny.yaml` \(sft\) and "
                       r"`--config configs/rl/tiny.yaml 'optim=\{\"lr\": 0.001\}'` \(grpo\)$"):
        plan.trainer_config(pipeline_yaml, [], None)
    (tmp_path / "pipeline.yaml").write_text("sft: {config: my sft.yaml}\n")  # not a whole pipeline: no judge
    with pytest.raises(ConfigError, match=r"is a pipeline config: .*`--config 'my sft.yaml'` \(sft\) and "
                                          r"`--config configs/rl/tiny.yaml` \(grpo\)$"):
        plan.trainer_config(str(tmp_path / "pipeline.yaml"), [], None)
    with pytest.raises(ConfigError, match="^steps must be at least 1, got -1$"):  # an SFT file's own error
        plan.trainer_config(SFT_TINY, ["steps=-1"], None)
    with pytest.raises(ConfigError, match=r"^config file no/such.yaml does not exist \(relative to the working "
                       r"directory [^)]+\)$"):  # said once, not per trainer
        plan.trainer_config("no/such.yaml", [], None)
    with pytest.raises(ConfigError, match="^--wave-size must be at least 1 row, got 0"):
        plan.plan(RL_TINY, "v5p-8", wave=0)
    with pytest.raises(ConfigError, match="^--wave-size sizes the GRPO sampler; an SFT plan has none$"):
        plan.plan(SFT_TINY, "v5p-8", wave=4)


def test_ctrl_c_stops_a_plan_while_it_compiles(tmp_path):
    """A compilation blocks the thread that runs it without running Python's signal handlers
    (a 4B plan: a minute); Ctrl-C waited for it to end. The stand-in for the compilation here
    is a C call that never ends and that signals do not cut short (a second lock of a pthread
    mutex, as glibc's zeroed mutex deadlocks), so the plan stops at Ctrl-C or not at all."""
    import signal

    from tests.helpers import cli_env

    script = f"""
import sys
import ctypes
from qed_jax import cli, plan
def compiling_forever(*args, **kwargs):
    libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)
    libc.pthread_mutex_lock(mutex)
    print("compiling", flush=True)
    libc.pthread_mutex_lock(mutex)
plan.plan = compiling_forever
sys.exit(cli.main(["plan", "--config", "{SFT_TINY}", "--topology", "v5p-8"]))
"""
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "compiling\n"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "qed-jax plan: interrupted", err[-2000:]


# --------------------------------------------------------------------------------------------
# Compiling for a TPU topology (libtpu compiles without chips)


def _plan_json(capsys, *args):
    assert cli.main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.tpu_compile
def test_tiny_sft_step_compiles_for_four_v5p_chips(libtpu, capsys):
    report = _plan_json(capsys, "--config", SFT_TINY, "--topology", "v5p-8", "data.max_length=128")
    (step,) = report["programs"]
    assert report["fits"] and step["fits"] and report["slice"]["chips"] == 4
    assert report["hbm_source"] == "compiler" and 90 * plan.GiB < report["hbm_bytes_per_chip"] < 96 * plan.GiB
    c = PRESETS["tiny"]
    matmul_params = c.num_layers * (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                                    + c.num_heads * c.head_dim * c.hidden_size
                                    + 3 * c.hidden_size * c.intermediate_size) + c.vocab_size * c.hidden_size
    norms = c.num_layers * (2 * c.hidden_size + 2 * c.head_dim) + c.hidden_size
    # float32 params + two Adam moments on every chip (a data-parallel mesh replicates them)
    assert step["arguments"] >= 3 * 4 * (matmul_params + norms)
    assert step["outputs"] < step["arguments"]  # the donated params and moments are reused
    assert 0 < step["temporaries"] < plan.GiB
    # forward + backward: 3 x (2 per weight + 4 L N H T for the T x T scores and their use), per
    # token, plus the output projection once more: the chunked loss recomputes it in the backward
    T, tokens = 128, 8 * 128
    assert 6 * matmul_params * tokens <= step["flops"] <= (3 * (2 * matmul_params + 4 * c.num_layers * c.num_heads
                                                                 * c.head_dim * T) + 2 * c.vocab_size * c.hidden_size) * tokens

@pytest.mark.tpu_compile
def test_a_plan_leaves_the_persistent_compilation_cache_alone(libtpu, tmp_path):
    """A program compiled for a topology without chips cannot be read back from JAX's persistent
    cache: with one set (common on TPU VMs), a second plan warned and compiled again."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "qed_jax.cli", "plan", "--config", SFT_TINY, "--topology", "v5p-8"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]


@pytest.mark.tpu_compile
def test_a_wave_larger_than_a_step_is_refused_before_compiling(libtpu):
    with pytest.raises(ConfigError, match=r"^--wave-size 1000 is more rows than the sampler ever runs at once: 64 "
                       r"samples per step on each host$"):
        plan.plan(RL_TINY, "v5p-8", wave=1000)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology,overrides,message", [
    ("v5p-16", ["prompts_per_step=3"], r"^prompts_per_step \(3\) must split evenly over the 2 processes"),
    ("v5p-8", ["micro_batch_rows=6"], r"^micro_batch_rows gives 6 rows per micro-batch, which do not split over the 4 "),
    ("v5p-8", ["sampling.max_concurrent=6"], r"^sampling\.max_concurrent must be a multiple of the sampling mesh's 4 "),
    ("v5p-16", ["mesh.data=1", "mesh.tensor=8", "sampling.mesh.tensor=4"],
     r"^the 1 data-parallel devices \(mesh data x fsdp\) do not split over the 2 processes, which each feed"),
    ("v5p-16", ["mesh.data=1", "mesh.fsdp=8"], r"^sampling\.mesh \(default: mesh\): with several processes, each "
                                               r"samples on its own devices: .*needs 8 devices, not the 4 devices"),
])
def test_what_grpo_refuses_at_start_the_plan_refuses_before_compiling(libtpu, topology, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan.plan(RL_TINY, topology, overrides)


@pytest.mark.tpu_compile
def test_what_sft_refuses_at_start_the_plan_refuses_before_compiling(libtpu):
    # A plan runs as one process: the slice's hosts, not this job's, feed the rows.
    with pytest.raises(ConfigError, match=r"^the 1 data-parallel devices \(mesh data x fsdp\) do not split over the 2 "):
        plan.plan(SFT_TINY, "v5p-16", ["mesh.data=1", "mesh.tensor=-1"])


@pytest.mark.tpu_compile
def test_an_rc_prompt_that_leaves_a_problem_no_room_is_refused_before_compiling(libtpu):
    """As `qed-jax grpo` refuses it when it reads the prompts: counted by the run's tokenizer."""
    with pytest.raises(ConfigError, match=r"^max_prompt_length \(300\) leaves no room for a problem next to "
                                          r"rc\.summary_tokens \(8\) and the reasoning template's own \d+ tokens"):
        plan.plan(str(REPO / "configs" / "rl" / "tiny_rc.yaml"), "v5p-8",
                  ["max_prompt_length=300", f"tokenizer={REPO / 'configs' / 'tiny' / 'tokenizer'}"])


@pytest.mark.slow  # two plans of four programs: ~35 s of CPU compiling
@pytest.mark.tpu_compile
def test_tiny_grpo_update_and_sampler_compile_with_a_wave_that_fits(libtpu, capsys):
    report = _plan_json(capsys, "--config", RL_TINY, "--topology", "v5e-4", "max_new_tokens=8")
    assert [p["name"] for p in report["programs"]] == ["accumulate", "apply", "prefill", "decode_loop"]
    assert report["fits"] and all(p["fits"] for p in report["programs"])
    assert report["wave_size"] == report["samples_per_step"] == 64
    c = PRESETS["tiny"]
    assert report["kv_bytes_per_token"] == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # float32 sampling
    assert report["kv_cache_length"] == 256  # the tiny config's prompt bucket 128 + max_new_tokens 8, rounded up
    assert report["programs"][2]["resident"] == report["trainer_state_bytes_per_chip"] > 0
    assert report["programs"][1]["resident"] == 0  # no KL term: nothing beside the optimizer step
    # With a KL term the frozen reference model stays in memory through every program, the
    # optimizer step's too.
    with_kl = _plan_json(capsys, "--config", RL_TINY, "--topology", "v5e-4", "max_new_tokens=8", "loss.kl_coef=0.1")
    reference = with_kl["trainer_state_bytes_per_chip"] - report["trainer_state_bytes_per_chip"]
    assert reference > 0 and with_kl["programs"][1]["name"] == "apply"
    assert with_kl["programs"][1]["resident"] == reference


@pytest.mark.tpu_compile
def test_grpo_sampler_compiles_for_one_host_of_a_multi_host_v6e_slice(libtpu):
    """The sampler runs on one host's 4 chips. On v6e those are a 2x2 block of the slice's grid
    (chips 0, 1, 4 and 5 of a v6e-16), and libtpu aborted the process while lowering the weights'
    all-gather over them; the plan compiles the sampler for a host-sized topology instead. In a
    subprocess, so that an abort fails this test and not the whole run."""
    done = subprocess.run([sys.executable, "-m", "qed_jax.cli", "plan", "--config", RL_TINY, "--topology", "v6e-16",
                           "mesh.data=1", "mesh.fsdp=-1", "max_new_tokens=8", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]  # the old plan died here (SIGABRT)
    report = json.loads(done.stdout)
    assert report["fits"] and report["hosts"] == 4 and report["sampling_mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert [p["name"] for p in report["programs"]] == ["accumulate", "apply", "prefill", "decode_loop"]


@pytest.mark.tpu_compile
@pytest.mark.parametrize("name", ["v5p-16", "v6e-16", "v5p-128", "v6e-64"])
def test_the_sampler_is_planned_on_chips_0_to_3_of_one_host(libtpu, name):
    tpu = plan.parse_slice(name)
    host = plan.one_host_devices(tpu, plan.topology_devices(tpu))
    assert sorted(d.id for d in host) == [0, 1, 2, 3] and {d.process_index for d in host} == {0}


@pytest.mark.tpu_compile
def test_tiny_rc_grpo_plans_its_trajectory_loop(libtpu, capsys, tmp_path):
    # A frozen summarizer from a local folder: its weights stay resident in every other program.
    hf_tiny = tmp_path / "summarizer"
    make_hf_model(hf_tiny)
    report = _plan_json(capsys, "--config", str(REPO / "configs" / "rl" / "tiny_rc.yaml"), "--topology", "v5e-4",
                        f"rc.summarizer.path={hf_tiny}", "rc.summarizer.dtype=float32")
    assert [p["name"] for p in report["programs"]] == ["accumulate", "apply", "rc_trajectory", "prefill",
                                                       "decode_loop"]
    assert report["fits"] and report["samples_per_step"] == 4 * 2 * 8
    assert report["rc_trajectory_rows"] == 4 and report["rc_problem_tokens"] == 512  # bucket of 448 - 8
    assert report["rc_summarizer"] == f"{hf_tiny}/config.json"
    by_name = {p["name"]: p for p in report["programs"]}
    summarizer = by_name["apply"]["resident"]
    assert summarizer > 0 and by_name["prefill"]["resident"] == report["trainer_state_bytes_per_chip"] + summarizer
    # Two caches (policy, summarizer): each role's widest prompt (template bytes + 2 x 16 for the
    # chat wrappers bound its own tokens; problem bucket 512; summary 8) plus its budgets,
    # rounded up to a multiple of 128 slots.
    from qed_jax import sampling
    from qed_jax.reasoning_cache import load_rc_template

    def template_bound(name, slots):
        text = load_rc_template(name)
        for slot in slots:
            text = text.replace("{%s}" % slot, "")
        return len(text.encode()) + 2 * 16

    problem, summary, h_r, h_s = 512, 8, 16, 12
    assert report["rc_cache_lengths"] == [
        sampling.cache_slots(template_bound("rc_reasoning", ("problem", "summary")) + problem + summary + h_r),
        sampling.cache_slots(template_bound("rc_summarize", ("problem", "summary", "reasoning"))
                             + problem + summary + h_r + h_s)]


@pytest.mark.tpu_compile
def test_a_program_that_does_not_fit_is_reported_in_one_line_and_exits_1(libtpu, capsys):
    # 64k tokens per row with the reference attention: its [heads, T, T] scores alone exceed 16 GiB.
    assert cli.main(["plan", "--config", SFT_TINY, "--topology", "v5e-4", "batch_size=4", "micro_batches=1",
                     "data.max_length=65536", "model.attention=xla"]) == 1
    out = capsys.readouterr().out
    failing = [line for line in out.splitlines() if line.startswith("train_step: does not fit")]
    assert len(failing) == 1 and "RESOURCE_EXHAUSTED" in failing[0] and "Traceback" not in out
    assert out.rstrip().endswith("does NOT fit")


@pytest.mark.tpu_compile
def test_a_wave_whose_cache_exceeds_hbm_is_reported_with_its_own_temporaries(libtpu):
    """XLA's out-of-memory message counts a program's arguments among the "HLO temporaries" it
    needs; the plan reports the rest as temporaries, so what it needs counts the arguments once.
    Qwen3-0.6B's sampler on v6e-8 (31.25 GiB per chip), 65,536 slots per row: at 5 rows per chip
    the KV cache alone (35 GiB) does not fit; at 2 it does. Either way the temporaries are a
    small share of the arguments (before: the whole cache again)."""
    from qed_jax.sharding import MeshConfig, make_mesh

    tpu = plan.parse_slice("v6e-8")
    devices = plan.topology_devices(tpu)
    hbm = plan.hbm_per_chip(devices[0], tpu)[0]
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1), devices=devices)
    model = PRESETS["qwen3-0.6b"].replace(param_dtype="bfloat16", dtype="bfloat16")
    for rows_per_chip in (2, 5):
        for program in plan.sampler_programs(model, mesh, 8 * rows_per_chip, 1024, 65536 - 1024, hbm, 0):
            assert (program.error is None) == (rows_per_chip == 2), program.error
            assert program.temporaries < program.arguments / 10, (program.name, rows_per_chip)
            if program.error:
                assert "RESOURCE_EXHAUSTED" in program.error and program.arguments > hbm and not program.fits
                assert plan.sum_known(program) < 1.1 * program.arguments  # what `plan` prints it needs


# --------------------------------------------------------------------------------------------
# Acceptance (the issue "The 4B recipe fits on TPU"): ~3 minutes of compiling per length on a
# small CPU machine, hence slow.


def _sft_4b_step(tokens: int, remat: str = "full") -> plan.ProgramPlan:
    """The 4B SFT step, one row of `tokens` per chip (4 rows, 4 chips). At the default matmul
    precision, as `qed-jax plan` compiles (the suite sets "highest")."""
    with jax.default_matmul_precision("default"):
        report = plan.plan(SFT_4B, "v5p-8", ["batch_size=4", "micro_batches=1", f"data.max_length={tokens}",
                                             f"model.remat={remat}"])
    (step,) = report.programs
    assert step.temporaries is not None, step.error
    return step


def _sft_4b_temporaries(tokens: int) -> int:
    return _sft_4b_step(tokens).temporaries


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_4b_sft_activation_memory_grows_linearly_in_sequence_length(libtpu):
    """Doubling T at most ~doubles the temporaries: no buffer quadratic in T (attention scores)
    and none of T x vocab (full logits) dominates, as they would at these lengths (a [T, T]
    float32 score matrix per head, or [T, vocab] float32 logits, alone quadruple or double)."""
    short, long = _sft_4b_temporaries(4096), _sft_4b_temporaries(8192)
    assert long <= 2.2 * short, (f"temporaries {short / plan.GiB:.2f} GiB at 4096 tokens, "
                                 f"{long / plan.GiB:.2f} GiB at 8192")


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_4b_remat_offload_moves_the_layer_inputs_off_the_chip(libtpu):
    """`remat: offload` keeps what the layer scan saves for the backward pass, each layer's input,
    in host memory: exactly L x T x D bfloat16 per chip there, and at least as much less on the
    chip than with `remat: full` (1.40 GiB less for 0.70 GiB moved, when measured)."""
    c = PRESETS["qwen3-4b-thinking-2507"]
    full, offload = _sft_4b_step(4096, "full"), _sft_4b_step(4096, "offload")
    layer_inputs = c.num_layers * 4096 * c.hidden_size * 2
    assert full.host_temporaries == 0 and offload.host_temporaries == layer_inputs
    assert full.temporaries - offload.temporaries >= layer_inputs


@pytest.mark.tpu_compile
def test_remat_offload_puts_exactly_the_layer_inputs_in_host_memory(libtpu):
    c = PRESETS["tiny"]
    for remat, host_bytes in (("full", 0), ("offload", c.num_layers * 2048 * c.hidden_size * 4)):
        # one float32 row of 2,048 tokens per chip and micro-batch
        report = plan.plan(SFT_TINY, "v5p-8", [f"model.remat={remat}", "data.max_length=2048"])
        assert report.programs[0].host_temporaries == host_bytes and report.chips_per_host == 4


def test_host_memory_is_reported_per_chip_and_per_host():
    step = plan.ProgramPlan("accumulate", hbm=32 * plan.GiB, arguments=plan.GiB, outputs=0,
                            temporaries=20 * plan.GiB, host_temporaries=3 * plan.GiB, code=0)
    report = plan.Plan("c.yaml", "sft", plan.parse_slice("v6e-16"), "TPU v6 lite", 32 * plan.GiB, "compiler",
                       [step], {"model": "m", "mesh": {}}, chips_per_host=4)
    assert ("accumulate: also 3.00 GiB per chip of the host's memory (12.00 GiB per host of 4 chips; "
            "model.remat: offload keeps the layers' inputs there)") in plan.format_report(report).splitlines()


@pytest.mark.parametrize("too_big,fitting,advice", [
    ("decode_loop", 888, "sample in waves: set sampling.max_concurrent (about 888 rows fit, an estimate: check it "
                         "with --wave-size) or sampling.kv_cache_gib"),
    ("decode_loop", 0, "not even one row per batch shard of the sampling mesh fits beside the trainer's state: use "
                       "more chips, or a smaller model or max_new_tokens"),
    ("accumulate", 888, None),  # the learner's own memory: no wave would help
])
def test_a_grpo_plan_whose_one_wave_does_not_fit_says_what_to_set(too_big, fitting, advice):
    programs = [plan.ProgramPlan(name, hbm=16 * plan.GiB, arguments=(20 if name == too_big else 1) * plan.GiB,
                                 outputs=0, temporaries=0, code=0) for name in ("accumulate", "prefill", "decode_loop")]
    info = {"model": "m", "mesh": {}, "sampling_mesh": {}, "samples_per_host": 1024, "samples_per_step": 1024,
            "hosts": 1, "wave_size": 1024, "wave_from": plan.ALL_SAMPLES, "wave_size_that_fits": fitting,
            "kv_bytes_per_token": 1, "kv_cache_length": 256, "kv_cache_bytes_per_chip": 0,
            "trainer_state_bytes_per_chip": 0, "sampler_weights_bytes_per_chip": 0}
    lines = plan.format_report(plan.Plan("c.yaml", "grpo", plan.parse_slice("v5e-4"), "TPU v5 lite", 16 * plan.GiB,
                                         "compiler", programs, info, chips_per_host=4)).splitlines()
    assert "wave 1024 rows (one wave of all samples: no sampling.max_concurrent or kv_cache_gib)" in lines[3]
    assert lines[-1] == "does NOT fit" and (lines[-2] == advice if advice else "sample in waves" not in lines[-2])


@pytest.mark.tpu_compile
def test_4b_decode_loop_keeps_one_copy_of_the_kv_cache(libtpu):
    """The sampler's decode loop for four layers of the 4B model, 32 rows of 10,240 slots on a
    v5p-8: its temporaries stay below the size of the cache it updates in place. A cache layout the
    TPU could not update in place once made it keep two more copies (115 GiB for the recipe)."""
    from qed_jax.sharding import MeshConfig, make_mesh

    model = PRESETS["qwen3-4b-thinking-2507"].replace(num_layers=4, dtype="bfloat16", param_dtype="bfloat16")
    mesh = make_mesh(MeshConfig(data=4), plan.topology_devices(plan.parse_slice("v5p-8")))
    with jax.default_matmul_precision("default"):  # as `qed-jax plan` compiles (see the 4B SFT test)
        prefill, decode = plan.sampler_programs(model, mesh, wave=32, prompt_len=2048, max_new_tokens=8192,
                                                hbm=96 * plan.GiB, resident=0)
    cache_per_chip = 2 * 4 * 32 * 10240 * model.num_kv_heads * model.head_dim * 2 / 4
    assert decode.error is None and decode.arguments > cache_per_chip
    assert decode.temporaries < cache_per_chip  # 0.39x here; 1.39x with the cache copied twice


@pytest.mark.tpu_compile
@pytest.mark.parametrize("reader", ["kernel", "chunk loop"])
def test_tpu_decode_loop_reads_the_cache_in_place(libtpu, monkeypatch, fresh_jit_caches, reader):
    """Compiled for v5p-8, the decode loop over a 4,096-slot cache: the Pallas decode kernel
    (TPU's default) reads the cache where it lies, with no copy of any of it; XLA's chunk loop
    (`cached_attention` elsewhere) has XLA:TPU copy the slots it reads into [B, K, S, H] order,
    one 512-slot chunk at a time, never a whole layer (as it did at every step while attention
    read the whole cache)."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec

    from qed_jax import attention, sampling
    from qed_jax.sharding import MeshConfig, make_mesh

    if reader == "chunk loop":
        monkeypatch.setattr(attention, "use_decode_kernel", lambda q, k: False)

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1), devices=libtpu)
    model = PRESETS["qwen3-0.6b"].replace(param_dtype="bfloat16", dtype="bfloat16")
    rows, slots = 8, 4096
    graphdef, weights = plan.abstract_params(model, mesh)
    cache = plan.kv_cache(model, rows, slots, model.dtype, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    key = plan.sharded(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    controls = [plan.by_rows((rows,), dtype, mesh) for dtype in (jnp.float32, jnp.int32, jnp.float32, jnp.int32)]
    with jax.set_mesh(mesh):
        hlo = sampling.decode_loop.trace(
            graphdef, slots - 64, weights, plan.by_rows((rows, model.vocab_size), jnp.float32, mesh),
            plan.by_rows((rows,), jnp.int32, mesh), cache, key, *controls,
            jax.ShapeDtypeStruct((2,), jnp.int32, sharding=replicated)).lower().compile().as_text()
    # Copies of a chip's rows of cache slots, [..., rows, slots, K, H] (the new token's keys and
    # values, one slot per row, are copied either way).
    copied_slots = {int(m.group(1)) for m in re.finditer(
        rf"= bf16\[(?:\d+,)*{rows // mesh.size},(\d+),{model.num_kv_heads},{model.head_dim}\]\{{[^}}]*\}} copy\(",
        hlo)} - {1}
    assert copied_slots == ({512} if reader == "chunk loop" else set())
    assert ("tpu_custom_call" in hlo) == (reader == "kernel")


def test_model_config_without_a_model_names_what_to_set(tmp_path):
    # Neither model.path nor model.preset (nor --preset): what to set, not "unknown preset None".
    with pytest.raises(ConfigError, match="set model.path .* or model.preset"):
        plan.model_config(ModelSpec())
    # A local folder that holds no model is not "not a local folder".
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ConfigError, match="a local folder, but neither"):
        plan.model_config(ModelSpec(path=str(tmp_path / "notamodel")))
    (tmp_path / "weights.safetensors").write_bytes(b"")  # a file: not "a local folder"
    with pytest.raises(ConfigError, match="is a file, not a model folder"):
        plan.model_config(ModelSpec(path=str(tmp_path / "weights.safetensors")))
    (tmp_path / "run" / "hf").mkdir(parents=True)  # a trainer's run directory: its models named, as a run says
    with pytest.raises(ConfigError, match=rf"is a trainer's run directory, not a model; pass {tmp_path}/run/hf "
                                          r"\(its exported model\)$"):
        plan.model_config(ModelSpec(path=str(tmp_path / "run")))


def test_a_folder_whose_config_ties_a_head_it_holds_is_planned_untied(tmp_path):
    """A config.json that ties the head to the embedding beside an lm_head.weight of its own is
    loaded untied (as transformers does): planned so, with the head's memory counted."""
    folder = tmp_path / "hf"
    make_hf_model(folder, tie_word_embeddings=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    planned, _ = plan.model_config(ModelSpec(path=str(folder)))
    assert planned.tie_word_embeddings is False
    assert open_model(ModelSpec(path=str(folder)), seed=0)(None).config.tie_word_embeddings is False  # as trained
