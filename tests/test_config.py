"""Config loading: nested sections keep their defaults under overrides, YAML errors are one
clear line, and --print-config shows what will be loaded."""

import contextlib
import dataclasses
import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qed_jax import cli
from qed_jax.errors import os_error_line, quoted
from qed_jax.config import ConfigError, load_config, parse_yaml, read_yaml
from qed_jax.evaluate import EvalConfig
from qed_jax.grpo import GRPOConfig
from qed_jax.sft import SFTConfig
from tests.helpers import cli_env

REPO = Path(__file__).resolve().parent.parent

STRING_ALTERNATIVES = {"remat": ("dots", "full"), "dtype": ("float32", "bfloat16")}
FIXED = {"top_k", "top_p"}  # GRPO refuses any other value


def _sections(config):
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if dataclasses.is_dataclass(getattr(config, f.name))}


def _one_override(section) -> tuple[str, object]:
    """A field of `section` and a new valid value for it (the first number field, or else a
    string field with a known alternative)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name in FIXED:
            continue
        if isinstance(value, float):
            return f.name, value / 2 + 0.001
        if isinstance(value, int) and not isinstance(value, bool):
            return f.name, value + 1 if value != -1 else 2  # -1: a mesh axis of the devices left
    for f in dataclasses.fields(section):
        if f.name in STRING_ALTERNATIVES:
            return f.name, next(v for v in STRING_ALTERNATIVES[f.name] if v != getattr(section, f.name))
    raise AssertionError(f"no number field in {type(section).__name__}")


@pytest.mark.parametrize("cls,path", [(SFTConfig, None), (GRPOConfig, None),
                                      (SFTConfig, "configs/sft/qed_nano_4b.yaml"),
                                      (GRPOConfig, "configs/rl/qed_nano_4b.yaml")])
def test_overriding_one_field_of_a_section_keeps_the_others(cls, path):
    base = load_config(cls, REPO / path if path else None)
    for name, section in _sections(base).items():
        field, value = _one_override(section)
        changed = load_config(cls, REPO / path if path else None, [f"{name}.{field}={value}"])
        assert getattr(changed, name) == dataclasses.replace(section, **{field: value}), (name, field)


def test_grpo_optimizer_defaults_survive_an_lr_override():
    optim = load_config(GRPOConfig, None, ["optim.lr=2e-6"]).optim
    assert (optim.lr, optim.schedule, optim.warmup_ratio, optim.weight_decay, optim.grad_clip) == \
        (2e-6, "constant", 0.0, 0.01, 0.3)


def test_a_key_given_twice_is_refused_not_kept_last(tmp_path):
    """PyYAML keeps the last copy of a key: a second `data:` block would replace the first whole,
    and training would run on the default data."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("data:\n  path: one.jsonl\nsteps: 10\ndata:\n  eval_rows: 4\n")
    with pytest.raises(ConfigError, match=rf"^{twice}:4:1: invalid YAML \(the key 'data' appears twice in one "
                                          r"mapping, first on line 1: keep one\)$"):
        load_config(SFTConfig, twice)
    with pytest.raises(ConfigError, match=r"^override 'data=\{max_length: 8, max_length: 9\}': the value is not "
                                          r"valid YAML \(the key 'max_length' appears twice .*: keep one\)$"):
        load_config(SFTConfig, None, ["data={max_length: 8, max_length: 9}"])
    # A merge key's values may be overridden by the mapping that merges them.
    merged = tmp_path / "merged.yaml"
    merged.write_text("optim: &base {lr: 0.001, weight_decay: 0.1}\neval_optim:\n  <<: *base\n  lr: 0.01\n")
    assert read_yaml(merged)["eval_optim"] == {"lr": 0.01, "weight_decay": 0.1}
    merged.write_text("defaults:\n  mid: &m\n    <<: {lr: 1, wd: 2}\n    lr: 3\ntop:\n  <<: *m\n  wd: 4\n")
    assert read_yaml(merged) == {"defaults": {"mid": {"lr": 3, "wd": 2}}, "top": {"lr": 3, "wd": 4}}


def test_a_section_left_empty_in_the_file_is_a_section_of_defaults(tmp_path):
    """`data:` with every key under it commented out is read by YAML as null."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("data:\n#  path: mine.jsonl\nsteps: 3\n")
    assert load_config(SFTConfig, empty).data == SFTConfig().data
    assert load_config(SFTConfig, empty, ["data.path=one.jsonl"]).data.path == "one.jsonl"
    assert load_config(GRPOConfig, None, ["rc=null"]).rc is None  # an optional section: null is off
    nested = tmp_path / "nested.yaml"  # inside an optional section, which the file turns on
    nested.write_text("max_prompt_length: 4096\nrc:\n  turns: 2\n  summarizer:\n#    path: x\n")
    from qed_jax.grpo import RCSummarizerConfig

    assert load_config(GRPOConfig, nested).rc.summarizer == RCSummarizerConfig()
    with pytest.raises(ConfigError, match=r"^data: expected a section"):  # not the file's: no silent reset
        load_config(SFTConfig, REPO / "configs/sft/tiny.yaml", ["data=null"])


def test_a_leading_tilde_in_a_path_is_the_home_folder(tmp_path, monkeypatch):
    """As in a shell: `output_dir: ~/runs/x` in a YAML file must not make a folder named `~` in
    the working directory. Texts that are not paths keep theirs."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(SFTConfig, None, ["output_dir=~/runs/x", "data.path=~/rows.jsonl", "tokenizer=~/tok",
                                           "checkpoint_dir=~/ckpt", "model.path=~/model"])
    assert (config.output_dir, config.data.path, config.tokenizer, config.checkpoint_dir, config.model.path) == (
        f"{tmp_path}/runs/x", f"{tmp_path}/rows.jsonl", f"{tmp_path}/tok", f"{tmp_path}/ckpt", f"{tmp_path}/model")
    grpo_config = load_config(GRPOConfig, None, ["judge.cache_path=~/j.sqlite", "data.task_template=~/{problem}"])
    assert (grpo_config.judge.cache_path, grpo_config.data.task_template) == (f"{tmp_path}/j.sqlite", "~/{problem}")
    # A run directory whose config.json kept the ~ (written before it was expanded) is the same run.
    from qed_jax.config import expand_paths, json_values
    from qed_jax.trainer import config_changes

    recorded = {**json_values(config), "output_dir": "~/runs/x", "data": {**json_values(config)["data"],
                                                                           "path": "~/rows.jsonl"}}
    assert config_changes(expand_paths(recorded), json_values(config)) == []


def test_malformed_yaml_is_one_line_with_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\n  remat: [full\nsteps: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:\d+:\d+: invalid YAML"):
        load_config(SFTConfig, bad)
    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", str(bad)],
                            cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(bad) in result.stderr


def test_print_config_shows_the_task_template_the_model_and_the_resolved_optimizer():
    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "grpo", "--config", "configs/rl/qed_nano_4b.yaml",
                             "optim.lr=2e-6", "--print-config"], cwd=REPO, env=cli_env(1), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Generate a rigorous proof to the following question:" in result.stdout
    assert '"model": "load runs/sft-4b/hf"' in result.stderr  # the derived numbers, beside the JSON
    assert '"preset": null' in result.stdout and "tiny" not in result.stdout
    for line in ('"lr": 2e-06', '"schedule": "constant"', '"weight_decay": 0.01', '"grad_clip": 0.3',
                 '"warmup_ratio": 0.0'):
        assert line in result.stdout, line


def test_a_model_needs_a_path_or_a_preset_and_not_both():
    with pytest.raises(ConfigError, match="both path"):
        load_config(SFTConfig, None, ["model.path=x", "model.preset=tiny"])


def test_the_cli_imports_no_heavy_package_for_help():
    code = ("import sys, qed_jax.cli; heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'jax', 'transformers', 'torch', 'orbax', 'openai', 'grain', 'flax'}); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("cls,overrides,message", [
    (SFTConfig, ["steps=-5"], "^steps must be at least 1, got -5$"),
    (SFTConfig, ["output_dir=/tmp/run #2"], r"^override 'output_dir=/tmp/run #2': YAML reads a # after a space as "
                                             r"the start of a comment, which would leave '/tmp/run'; quote the value"),
    (SFTConfig, ["optim.lr=1e39"], r"^optim\.lr must be at most 3\.4028234663852886e\+38, got 1e\+39$"),  # inf in f32
    (SFTConfig, ["optim.eps=0"], r"^optim\.eps must be above 0, got 0\.0$"),  # AdamW would update by 0/0
    (SFTConfig, [".steps=3"], r"^override '\.steps=3': '\.steps' is not a key \(names joined by single dots"),
    (SFTConfig, ["optim..lr=1"], r"^override 'optim\.\.lr=1': 'optim\.\.lr' is not a key"),
    (SFTConfig, ["checkpoint_every=0"], "^checkpoint_every must be at least 1, got 0$"),
    (GRPOConfig, ["samples_per_prompt=0"], "^samples_per_prompt must be at least 1, got 0$"),
    (GRPOConfig, ["samples_per_prompt=1"], "^samples_per_prompt must be at least 2: a rollout's advantage is"),
    (SFTConfig, ["steps=3.5"], r"^steps: expected a whole number, got 3\.5$"),
    (GRPOConfig, ["rc.summarizer.top_p=0"], r"^rc\.summarizer\.top_p must be in \(0, 1\]"),
    (GRPOConfig, ["rc.trajectory_batch=0"], r"^rc\.trajectory_batch must be at least 1, got 0$"),
    (SFTConfig, ["steps=120", "epochs=3"], r"^steps \(120\) and epochs \(3\) both size the run: set steps=null "
                                           r"to train for epochs, or epochs=1 to train for steps$"),
    (SFTConfig, ["eval_every=20"], r"^eval_every \(20\) asks for an eval loss on held-out rows, and data\.eval_rows "
                                      r"is 0: set data\.eval_rows \(e\.g\. 64\), or eval_every=0$"),
    (SFTConfig, ["seed=-1"], r"^seed must be in \[0, 4294967295\], got -1$"),
    (SFTConfig, ["data.seed=4294967296"], r"^data\.seed must be in \[0, 4294967295\], got 4294967296$"),
    (GRPOConfig, ["seed=18446744073709551616"], r"^seed must be in \[0, 4294967295\], got 18446744073709551616$"),
    (GRPOConfig, ["data.seed=-2"], r"^data\.seed must be in \[0, 4294967295\], got -2$"),
    (GRPOConfig, ["max_prompt_length=270000"], r"^max_prompt_length \(270000\) is longer than the sampler's "
                                               r"longest prompt bucket \(262144 tokens\): lower it$"),
    (GRPOConfig, ["rc.summary_tokens=1024"], r"^max_prompt_length \(1024\) must be longer than rc\.summary_tokens "
                                             r"\(1024\): the reasoning prompt holds the problem beside the summary; "),
    (GRPOConfig, ["rc.summarizer.temperature=1.0"], r"^rc\.summarizer\.temperature is for a separate summarizer "
                                                    r"\(rc\.summarizer\.path\): without one the policy summarizes"),
    (GRPOConfig, ["rc.summarizer.dtype=float32"], r"^rc\.summarizer\.dtype is for a separate summarizer .*; set "
                                                  r"rc\.summarizer\.path, or leave it out \(a run started with it goes "
                                                  r"on without it, given --resume-with-changes\)$"),
    (GRPOConfig, ["max_prompt_length=4096", "data.task_template=Prove this. {problem}", "rc.turns=2"],
     r"^data\.task_template is not used with an rc: section: the bare problem goes into the PROBLEM section of "
     r"rc\.reasoning_template"),
    (GRPOConfig, ["data.task_template=Prove {{problem}}"], r"^data\.task_template: \{\{problem\}\} has doubled "
                                                         r"braces; the task template writes its placeholder with "
                                                         r"single ones \(\{problem\}\)$"),
    (GRPOConfig, ["loss.temperature=0"], r"^loss\.temperature must be a finite number of at least 1e-05"),
    (GRPOConfig, ["loss.temperature=.nan"], r"^loss\.temperature must be a finite number .*, got nan$"),
    (EvalConfig, ["model.path=m", "sampling.temperature=-1"], r"^sampling\.temperature must be 0 \(greedy\) or"),
    (EvalConfig, ["model.path=m", "rc.turns=0"], r"^rc\.turns must be at least 1, got 0$"),
    # names checked when the config loads, not when a run reaches them (an export after training)
    (SFTConfig, ["export_dtype=bf16"], r"^export_dtype must be float32, bfloat16 or float16, got 'bf16'$"),
    (GRPOConfig, ["export_dtype=fp16"], r"^export_dtype must be float32, bfloat16 or float16, got 'fp16'$"),
    (GRPOConfig, ["sampling.dtype=bf16"], r"^sampling\.dtype must be float32, bfloat16 or float16"),
    (GRPOConfig, ["rc.summarizer.dtype=half"], r"^rc\.summarizer\.dtype must be float32, bfloat16 or float16"),
    (SFTConfig, ["model.param_dtype=fp32"], r"^model\.param_dtype must be float32, bfloat16 or float16"),
    (EvalConfig, ["model.path=m", "model.dtype=bf16"], r"^model\.dtype must be float32, bfloat16 or float16"),
    (SFTConfig, ["model.preset=tinyy"], r"^unknown model preset 'tinyy'; choose one of: .*, tiny$"),
    (SFTConfig, ["output_dir="], r"^output_dir must be set \(it has no empty value\); leave it out for its default$"),
    (GRPOConfig, ["reward_rule=closes_think"], r"^unknown reward_rule 'closes_think'; choose one of: closes_thinking, "
                                               r"or null \(grade with the judge\)$"),
    (SFTConfig, ["optim.lr=-1"], r"^optim\.lr must be above 0, got -1\.0$"),
    (SFTConfig, ["optim.warmup_ratio=2"], r"^optim\.warmup_ratio must be in \[0, 1\], got 2\.0$"),
    (SFTConfig, ["optim.b2=1"], r"^optim\.b2 must be in \[0, 1\), got 1\.0$"),
    (SFTConfig, ["optim.eps=.nan"], r"^optim\.eps must be above 0, got nan$"),
    (SFTConfig, ["data.eval_rows=-3"], r"^data\.eval_rows must be at least 0, got -3$"),
    (SFTConfig, ["eval_every=-5"], r"^eval_every must be at least 0, got -5$"),
    (GRPOConfig, ["loss.kl_coef=-1"], r"^loss\.kl_coef must be at least 0, got -1\.0$"),
    (GRPOConfig, ["loss.entropy_coef=.nan"], r"^loss\.entropy_coef must be at least 0, got nan$"),
    (GRPOConfig, ["loss.entropy_coef=.inf"], r"^loss\.entropy_coef must be a finite number, got inf$"),
    (GRPOConfig, ["loss.kl_coef=1" + "0" * 400], r"^loss\.kl_coef: expected a number, got 10{400}$"),
    (SFTConfig, ["steps=1" + "0" * 400], r"^steps: expected a number, got 10{400}$"),
    (SFTConfig, ['output_dir=""'], r"^output_dir is empty \(''\); name a folder, or leave it out for its default$"),
    (EvalConfig, ["model.path=m", "output_dir=' '"], r"^output_dir is empty \(' '\); name a folder"),
    (GRPOConfig, ['judge.cache_path=""'], r"^judge\.cache_path is empty \(''\); name an SQLite file, or set it to "
                                          r"null to grade without a cache"),
    (GRPOConfig, ["sampling.kv_cache_gib=-1"], r"^sampling\.kv_cache_gib must be above 0, got -1\.0$"),
    (EvalConfig, ["model.path=m", "benchmark.limit=-1"], r"^benchmark\.limit must be at least 1, got -1$"),
    (SFTConfig, ["output_dir=0123"], r"^output_dir: expected text, but YAML read the value as int 123; quote it"),
    (SFTConfig, ["data.name=no"], r"^data\.name: expected text, but YAML read the value as bool False; quote it"),
    (SFTConfig, ["optim={lr: 3"], r"^override 'optim=\{lr: 3': the value is not valid YAML \(.*\); mend its YAML, or "
                                  r"quote it if it is text$"),
    (SFTConfig, [b"output_dir=/tmp/caf\xe9".decode("utf-8", "surrogateescape")],  # a Latin-1 shell's bytes
     r"^override output_dir: the value is not UTF-8 text \(byte 0xe9 at character 9\); convert it"),
    # A time's text is not the one YAML read (2025-01-15T10:00:00 would be "2025-01-15 10:00:00").
    (SFTConfig, ["output_dir=2025-01-15T10:00:00Z"], r"^output_dir: expected text, but YAML read the value as "
                                                     r"datetime "),
    (SFTConfig, ["model=tiny"], r"^model: expected a section \(keys path, preset, param_dtype, dtype, remat, "
                                r"attention\), got 'tiny'$"),
    (GRPOConfig, ["sampling.temperature=0.5"], r"^unknown config key sampling\.temperature; valid keys here: .*; "
                                               r"in this config that is loss\.temperature \(rollouts are sampled"),
])
def test_counts_below_one_and_impossible_sampling_values_fail_when_the_config_loads(cls, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cls, None, overrides)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": 0}, "^max_new_tokens must be at least 1, got 0$"),
    ({"temperature": -1.0}, r"^temperature must be 0 \(greedy\) or a finite number of at least 1e-05, got -1.0$"),
    ({"temperature": float("nan")}, r"^temperature must be 0 \(greedy\) or .*, got nan$"),
    ({"temperature": float("inf")}, r"^temperature must be 0 \(greedy\) or .*, got inf$"),
    ({"temperature": 1e-30}, r"^temperature must be 0 \(greedy\) or .*, got 1e-30$"),
    ({"top_k": -1}, r"^top_k must be at least 0"),
    ({"top_k": 2**32}, r"^top_k must be at most 2147483647, got 4294967296$"),  # int32 on the device
    ({"max_new_tokens": 5 * 10**9}, r"^max_new_tokens must be at most 2147483647, got 5000000000$"),
    ({"top_p": 0.0}, r"^top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"^top_p must be in \(0, 1\]"),
])
def test_sampling_params_refuse_values_that_cannot_sample(kwargs, message):
    from qed_jax.sampling import SamplingParams

    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


def test_a_hash_in_an_override_is_kept_when_quoted_or_not_after_a_space():
    assert load_config(SFTConfig, None, ['output_dir="/tmp/run #2"']).output_dir == "/tmp/run #2"  # a shell's '"..."'
    assert load_config(SFTConfig, None, ["output_dir=runs/a#2"]).output_dir == "runs/a#2"


def test_an_exponent_is_a_number_in_free_form_overrides_too(tmp_path):
    """YAML 1.1 reads `1e-05` and `1.0e5` as text (an exponent needs a dot and a sign there); a
    number field converted it, but a pipeline's stage overrides (free-form) kept it as text in
    --print-config and in the pipeline's own config."""
    from qed_jax.pipeline import PipelineConfig

    config = load_config(PipelineConfig, None, ["judge=standin", "grpo.overrides.optim.lr=1e-05",
                                                "sft.overrides.optim.lr=-2E+3"])
    assert config.grpo.overrides == {"optim": {"lr": 1e-05}} and config.sft.overrides == {"optim": {"lr": -2000.0}}
    (tmp_path / "c.yaml").write_text("optim: {lr: 3e-4}\nrun_name: 1e5x\n")
    assert read_yaml(tmp_path / "c.yaml") == {"optim": {"lr": 3e-4}, "run_name": "1e5x"}
    assert load_config(SFTConfig, None, ["optim.lr=5e-6"]).optim.lr == 5e-6
    numbers = {"1.0e5": 1e5, "2.5E4": 2.5e4, ".5e3": 500.0, "-1.e2": -100.0, "+7e0": 7.0, "1_000e1": 1e4,
               "1.5e-3": 1.5e-3, ".5": 0.5}
    assert {text: parse_yaml(text) for text in numbers} == numbers
    assert [parse_yaml(text) for text in ("e5", "1e", ".e5", "1.2.3e4", "0x1e5", "1e5.0")] == [
        "e5", "1e", ".e5", "1.2.3e4", 0x1e5, "1e5.0"]  # no number in YAML 1.2 either (0x1e5: hexadecimal)


def test_two_writers_of_one_path_write_separate_files_and_the_last_replaces_it(tmp_path):
    from qed_jax.config import temporary_beside, write_text_atomic

    first, second = temporary_beside(tmp_path / "out.jsonl"), temporary_beside(tmp_path / "out.jsonl")
    assert first != second and first.parent == second.parent == tmp_path  # as two judge runs with one --output
    first.unlink(), second.unlink()
    with pytest.raises(OSError) as error:  # a folder nothing can be made in: the error names the path asked for
        temporary_beside(Path("/proc/qed-jax-out.jsonl"))
    assert error.value.filename == "/proc/qed-jax-out.jsonl"
    write_text_atomic(tmp_path / "config.json", "one")
    write_text_atomic(tmp_path / "config.json", "two")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"] and (tmp_path / "config.json").read_text() == "two"
    # A rewritten file is readable as a new one would be (0600, from a temporary file, hid an
    # export's generation_config.json from a server run by another user).
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "config.json", "three")
    finally:
        os.umask(umask)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


def test_overrides_may_stand_on_both_sides_of_an_option():
    args = cli.parse_args(["grpo", "--config", "c.yaml", "steps=3", "--resume-with-changes", "optim.lr=1e-4"])
    assert args.overrides == ["steps=3", "optim.lr=1e-4"] and args.resume_with_changes
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["grpo", "steps=3", "--bogus"])
    assert exit_.value.code == 2


def test_a_config_file_given_without_config_is_pointed_to_the_option(capsys):
    assert cli.main(["sft", "configs/sft/tiny.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qed-jax sft: error: override 'configs/sft/tiny.yaml' is not of the form key=value; a config file is given "
        "as --config FILE")
    assert cli.main(["sft", "steps"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qed-jax sft: error: override 'steps' is not of the form key=value")


@pytest.mark.parametrize("argv, name", [
    (["sft", "--config", ""], "--config"), (["report", "runs/a", ""], "RUN_DIR"),
    (["report", "runs/a", "--output", " "], "--output"), (["generate", "--model", "", "--prompt", "Hi"], "--model"),
    (["generate", "--model", "m", "--prompt", "Hi", "--reasoning-cache", "--summarizer", ""], "--summarizer"),
    (["judge", "--input", "", "--output", "graded.jsonl"], "--input"),
    (["judge", "--input", "rows.jsonl", "--output", ""], "--output")])
def test_an_empty_path_argument_is_refused_before_it_names_the_working_directory(argv, name, capsys):
    """`--output "$OUT"` with OUT unset: a report written into the working directory (and its
    old plots deleted there), the working directory read as a config or a model."""
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"qed-jax {argv[0]}: error: argument {name}: empty; give a path (an unset shell variable?); "
        f"`qed-jax {argv[0]} --help` shows the usage")


@pytest.mark.parametrize("command", ["sft", "grpo", "eval", "judge", "pipeline", "plan"])
def test_a_second_config_is_refused_not_silently_taken_alone(command, capsys):
    """argparse keeps the last of two values: the first config would be dropped unsaid."""
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args([command, "--config", "a.yaml", "steps=3", "--config=b.yaml"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"qed-jax {command}: error: --config given twice (a.yaml and b.yaml): give one; set single keys on top of "
        f"it as key=value; `qed-jax {command} --help` shows the usage")
    required = {"judge": ["--input", "rows.jsonl", "--output", "graded.jsonl"], "plan": ["--topology", "v5p-8"]}
    args = cli.parse_args([command, "--config", "a.yaml", *required.get(command, [])])
    assert args.config == "a.yaml"


def test_an_os_error_without_a_path_is_one_line(monkeypatch, capsys):
    def unreachable(args):
        raise ConnectionRefusedError(111, "Cannot connect to host storage.googleapis.com:443")

    monkeypatch.setattr(cli, "_convert", unreachable)
    assert cli.main(["convert", "a", "gs://bucket/b"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qed-jax convert: error: ConnectionRefusedError: [Errno 111] Cannot connect to host "
                   "storage.googleapis.com:443 (-v shows the traceback)"]


def test_gcsfs_retry_tracebacks_are_left_to_verbose_runs(monkeypatch, capsys):
    def unreachable(args):
        try:
            raise ConnectionError("Cannot connect to host storage.googleapis.com:443")
        except ConnectionError as e:
            logging.getLogger("gcsfs").exception("_request out of retries on exception: %s", e)
            raise

    monkeypatch.setattr(cli, "_convert", unreachable)
    for verbose in ([], ["-v"]):
        with contextlib.suppress(ConnectionError):
            cli.main([*verbose, "convert", "a", "gs://bucket/b"])
        err = capsys.readouterr().err
        assert "ERROR gcsfs: _request out of retries on exception: Cannot connect" in err
        assert ("Traceback" in err) == bool(verbose)


def test_running_out_of_device_memory_is_one_line(monkeypatch, capsys):
    import jax.numpy as jnp

    def too_large(args):
        jnp.zeros((1 << 40,), jnp.float32).block_until_ready()  # 4 TiB: XLA cannot allocate it

    # The advice is the command's own: a config's sharding and lengths, or the flags that set them.
    for command, argv, advice in (
            ("_sft", ["sft", "--config", "c.yaml"], r"`qed-jax plan` shows what a config needs per chip: .*"),
            ("_convert", ["convert", "a", "b"], r"--fsdp shards the parameters over all devices while converting"),
            ("_generate", ["generate", "--model", "m", "--prompt", "p"], r".*give a lower --max-new-tokens or fewer "
                                                                         r"prompts .*--dtype bfloat16")):
        monkeypatch.setattr(cli, command, too_large)
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.fullmatch(rf"qed-jax {argv[0]}: error: out of device memory \(RESOURCE_EXHAUSTED: "
                                              rf".*\); {advice} \(-v shows the traceback\)", err[0]), err


def test_another_process_stopping_is_told_from_what_jax_and_gloo_say():
    """What the survivor of a kill -9 sees (as measured on CPU with two processes): Gloo's broken
    connection at its next collective, or a barrier failed by the coordination service once the
    dead process missed its heartbeats, raised as it is or behind our checkpoint error. A judge's
    connection reset is about the judge."""
    from qed_jax.errors import CheckpointError, JudgeUnavailable, lost_process

    gloo = ValueError("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
                      "[127.0.0.1]:38787: Connection reset by peer")
    assert lost_process(gloo) == str(gloo)
    heartbeat = RuntimeError("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat "
                             "timeout.\nThis indicates that the remote task has failed")
    try:
        raise CheckpointError("writing checkpoint step 10 failed") from heartbeat
    except CheckpointError as e:
        assert lost_process(e) == "INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 " \
                                  "heartbeat timeout."
    assert lost_process(JudgeUnavailable("the judge at http://a/v1: Connection reset by peer")) is None
    assert lost_process(ValueError("Connection reset by peer")) is None  # not a collective's
    assert lost_process(None) is None


def test_a_folder_given_as_the_config_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=f"^config file {tmp_path} is a folder"):
        load_config(SFTConfig, tmp_path)


def test_a_config_for_another_command_is_named_as_such():
    from qed_jax.pipeline import PipelineConfig

    sft_yaml = REPO / "configs" / "sft" / "tiny.yaml"
    with pytest.raises(ConfigError, match=re.escape(
            f"{sft_yaml}: batch_size is not a key of PipelineConfig (its keys: judge, sft, grpo, eval, output_dir); "
            "is this file for another command?")):
        load_config(PipelineConfig, sft_yaml)
    with pytest.raises(ConfigError, match=r"^unknown config key stpes \(did you mean steps\?\); valid keys here"):  # a typo in an override
        load_config(SFTConfig, sft_yaml, ["stpes=3"])


def test_a_key_given_outside_its_section_is_answered_with_where_it_lives(tmp_path):
    from qed_jax.evaluate import EvalConfig
    from qed_jax.grpo import GRPOConfig

    sft_yaml = REPO / "configs" / "sft" / "tiny.yaml"
    for cls, override, hint in ((SFTConfig, "lr=1e-3", "optim.lr"),
                                (SFTConfig, "eval_rows=3", "data.eval_rows"),  # not eval_every, the closest here
                                (GRPOConfig, "kl_coef=0.1", "loss.kl_coef"),
                                (GRPOConfig, "summary_tokens=8", "rc.summary_tokens"),
                                (EvalConfig, "max_new_tokens=5", "sampling.max_new_tokens"),
                                (GRPOConfig, "temperature=0.5", "loss.temperature or judge.temperature or "
                                                                "rc.summarizer.temperature")):
        with pytest.raises(ConfigError, match=f"^unknown config key {override.split('=')[0]} "
                                              f"\\(did you mean {re.escape(hint)}\\?\\); valid keys here: "):
            load_config(cls, None, [override])
    in_file = tmp_path / "sft.yaml"  # in a file: named as such, not as a file for another command
    in_file.write_text(sft_yaml.read_text() + "lr: 0.001\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(in_file))}: unknown config key lr \\(did you mean optim.lr\\?\\)"):
        load_config(SFTConfig, in_file)
    judge_yaml = REPO / "configs" / "judge" / "answer.yaml"  # a whole section's keys: another command's file
    with pytest.raises(ConfigError, match=f"^{re.escape(str(judge_yaml))}: .* is not a key of EvalConfig .*is this file "
                                          "for another command\\?"):
        load_config(EvalConfig, judge_yaml)


def test_a_trainer_without_config_or_overrides_says_where_to_start(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sft"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qed-jax sft: error: no --config: start from one, e.g. --config configs/sft/tiny.yaml (the defaults alone "
        "name no model, tokenizer or data)")
    assert cli.main(["eval"]) == 2  # an evaluation too
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qed-jax eval: error: no --config: start from one, e.g. --config configs/eval/imo_proofbench.yaml (the "
        "defaults alone name no model)")
    assert cli.main(["grpo", "--print-config"]) == 0  # the defaults can still be shown
    capsys.readouterr()
    assert cli.main(["eval", "--print-config"]) == 2  # not an evaluation's: they name no model
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("qed-jax eval: error: no --config: ")
    (tmp_path / "empty.yaml").write_text("")
    for command in ("sft", "grpo"):  # a config with no model is refused there, as the run would refuse it
        assert cli.main([command, "--config", "empty.yaml", "--print-config"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"qed-jax {command}: error: model: set model.path (a checkpoint to load) or model.preset (a random init)")
    (tmp_path / "empty.yaml").unlink()
    assert cli.main(["sft", "model.preset=tiny"]) == 2  # overrides alone: the config's own error
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qed-jax sft: error: no tokenizer: set tokenizer (or model.path, whose tokenizer is used)")
    assert not list(tmp_path.iterdir())  # nothing was written


def test_generate_checks_every_flag_before_loading_a_model(tmp_path, capsys):
    missing = tmp_path / "no-model"  # loading it would fail with a path error instead
    for flags, message in [(["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
                           (["--top-k", "5000000000"], "--top-k must be at most 2147483647, got 5000000000"),
                           (["--top-p", "2"], "--top-p must be in (0, 1] (1 is off), got 2.0"),
                           (["--reasoning-cache", "--turns", "0"], "--turns must be at least 1, got 0"),
                           (["--turns", "2"], "--turns is for --reasoning-cache; add that flag or drop --turns"),
                           (["--summary-tokens", "64"], "--summary-tokens is for --reasoning-cache; add that flag or "
                            "drop --summary-tokens"),
                           (["--summarizer", str(missing)], "--summarizer is for --reasoning-cache; add that flag or "
                            "drop --summarizer"),
                           (["--reasoning-cache", "--summarizer-top-k", "5"], "--summarizer-top-k is for --summarizer "
                            "(a separate summarizer model); add one or drop --summarizer-top-k"),
                           (["--reasoning-cache", "--summarizer-thinking"], "--summarizer-thinking is for --summarizer "
                            "(a separate summarizer model); add one or drop --summarizer-thinking"),
                           (["--reasoning-cache", "--summarizer", str(missing), "--summarizer-top-p", "0"],
                            "--summarizer-top-p must be in (0, 1] (1 is off), got 0.0"),
                           (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
                           (["--reasoning-cache", "--seed", "4294967296"],
                            "--seed must be in [0, 4294967295], got 4294967296"),
                           (["--reasoning-cache", "--chat"], "--chat is for plain prompts: --reasoning-cache always "
                            "puts each problem in the model's chat template; drop --chat"),
                           (["--prompt", ""], "prompt 2 (--prompt) is empty: a plain prompt needs some text "
                            "(or pass --chat)"),
                           (["--reasoning-cache", "--prompt", ""], "prompt 2 (--prompt) is empty: a problem needs "
                            "some text"),
                           # Bytes not UTF-8 (a Latin-1 file's text) reach Python as surrogates.
                           (["--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], "prompt 2 (--prompt) is "
                            "not UTF-8 text (byte 0xe9 at character 4); convert it, e.g. with iconv -t UTF-8")]:
        assert cli.main(["generate", "--model", str(missing), "--prompt", "p", *flags]) == 2
        assert capsys.readouterr().err.strip() == f"qed-jax generate: error: {message}"


def test_verbose_is_accepted_before_and_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "sft"]).verbose and parser.parse_args(["sft", "-v"]).verbose
    assert not parser.parse_args(["sft"]).verbose


def test_a_flag_is_never_taken_from_a_prefix_and_multi_host_flags_go_together(tmp_path, capsys):
    # A user's "--resume" (continue this run) must not turn on --resume-with-changes.
    with pytest.raises(SystemExit):
        cli.parse_args(["sft", "--resume"])
    assert capsys.readouterr().err.strip().endswith(
        "unrecognized arguments: --resume; `qed-jax sft --help` shows the usage")  # and no guess
    base = ["sft", "--config", str(REPO / "configs/sft/tiny.yaml"), f"output_dir={tmp_path / 'run'}"]
    for flags, message in [(["--num-processes", "2", "--process-id", "1"], "--num-processes goes with --coordinator "
                            "(the coordinator's host:port); add it, or drop --num-processes and --process-id"),
                           (["--coordinator", "localhost:1"], "--coordinator needs --num-processes and --process-id "
                            "too")]:
        assert cli.main([*base, *flags]) == 2  # else each worker would train a run of its own
        assert capsys.readouterr().err.strip() == f"qed-jax sft: error: {message}"
    # --distributed off a TPU pod slice: JAX cannot find the coordinator (a fresh process: JAX must not have started).
    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", *base, "--distributed"], cwd=REPO, env=cli_env(1),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "qed-jax sft: error: jax.distributed.initialize: "), result.stderr[-2000:]
    assert "--distributed finds the slice itself; elsewhere give --coordinator, --num-processes and --process-id" in \
        result.stderr
    assert not (tmp_path / "run").exists()


def test_a_misspelt_flag_command_or_choice_is_answered_with_what_it_resembles(capsys):
    for argv, message in [
        (["generate", "--model", "m", "--prompt", "p", "--max-new-tokns", "5"],
         "qed-jax generate: error: unrecognized arguments: --max-new-tokns 5 (did you mean --max-new-tokens?)"),
        (["sft", "--step"], "qed-jax sft: error: unrecognized arguments: --step"),  # not --help
        (["eval", "--print-confg"], "qed-jax eval: error: unrecognized arguments: --print-confg (did you mean "
                                    "--print-config?)"),
        (["generate", "--model", "m", "--prompt", "p", "--temprature=0", "--top_p", "1"],
         "qed-jax generate: error: unrecognized arguments: --temprature=0 --top_p 1 (did you mean --temperature "
         "for --temprature, --top-p for --top_p?)"),
        # a misspelt required flag is also seen as the real one missing: both are said
        (["pipeline", "--confg", "c.json"], "qed-jax pipeline: error: the following arguments are required: --config; "
                                            "unrecognized arguments: --confg (did you mean --config?)"),
        (["plan", "--config", "c.json"], "qed-jax plan: error: the following arguments are required: --topology"),
        (["evl"], "qed-jax: error: argument COMMAND: invalid choice: 'evl' (did you mean 'eval'? choose from 'convert', "
                  "'generate', 'judge', 'sft', 'grpo', 'eval', 'report', 'pipeline', 'plan')"),
        (["xyzzy"], "qed-jax: error: argument COMMAND: invalid choice: 'xyzzy' (choose from 'convert', 'generate', "
                    "'judge', 'sft', 'grpo', 'eval', 'report', 'pipeline', 'plan')"),
        (["convert", "a", "b", "--dtype", "float23"], "qed-jax convert: error: argument --dtype: invalid choice: "
                                                      "'float23' (did you mean 'float32'? choose from 'float32', "
                                                      "'bfloat16', 'float16')"),
    ]:
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        prog = message.split(": error: ")[0]
        assert capsys.readouterr().err.strip().splitlines() == [f"{message}; `{prog} --help` shows the usage"]


def test_a_path_error_is_one_line_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "none.jsonl"
    assert cli.main(["judge", "--input", str(missing), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"qed-jax judge: error: --input {missing} does not exist"]
    compressed = tmp_path / "rows.jsonl.gz"
    compressed.write_bytes(gzip.compress(b'{"problem": "P", "proof": "Q.E.D."}\n'))
    assert cli.main(["judge", "--input", str(compressed), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qed-jax judge: error: --input {compressed}: cannot read '.gz' files; use JSON lines (.jsonl or .json), "
        "a JSON array (.json) or Parquet (.parquet), named so"]
    folder = tmp_path / "no_rows"  # a folder is read as the data files in it; here there are none
    folder.mkdir()
    assert cli.main(["judge", "--input", str(folder), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qed-jax judge: error: --input (a folder) {folder}: read as one Hugging Face dataset of its "
        f"data files, which failed (The directory at {folder} doesn't contain any data files); or give one "
        ".jsonl/.json/.parquet file instead"]
    # A bad line in one of its files: datasets names it in a log line of its own, with the row
    # counted from 0 and blank lines left out; the error names the file and its line.
    (folder / "a.jsonl").write_text(json.dumps({"problem": "P", "proof": "Q.E.D."}) + "\n")
    (folder / ".c.jsonl").write_text("hidden, so not read\n")
    (folder / "c.jsonl").write_text(json.dumps({"problem": "P", "proof": "Q.E.D."}) + '\n\n{"problem": bad\n')
    assert cli.main(["judge", "--input", str(folder), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"qed-jax judge: error: --input (a folder) {folder}: {folder / 'c.jsonl'}:3: not valid JSON (Expecting value "
        "at column 13), so its files do not read as one Hugging Face dataset; fix or delete that line")
    for name in ("a.jsonl", ".c.jsonl", "c.jsonl"):
        (folder / name).unlink()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"problem": "P", "proof": "Q.E.D."}) + "\n")
    under_a_file = ["judge", "--input", str(rows), "--output", str(a_file / "out.jsonl")]
    assert cli.main(under_a_file) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qed-jax judge: error: {a_file} is a file where a folder is needed; choose another path"]
    result = subprocess.run([sys.executable, "-m", "qed_jax.cli", "sft", "--config", "configs/sft/tiny.yaml",
                             f"output_dir={a_file}"], cwd=REPO, env=cli_env(1), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"qed-jax sft: error: output_dir: {a_file} is a file where a folder is needed; choose another path")
    verbose = subprocess.run([sys.executable, "-m", "qed_jax.cli", "-v", *under_a_file], cwd=REPO, env=cli_env(1),
                             capture_output=True, text=True)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr  # -v: the traceback, for a bug report
    # Every command's run folder is named as the output_dir it is, whatever stops its making.
    from qed_jax.rundir import run_lock

    with pytest.raises(ConfigError, match="^output_dir: /proc/qed-jax-run: No such file or directory$"):
        with run_lock(Path("/proc/qed-jax-run")):
            pass


def test_a_path_error_names_a_descriptor_or_both_paths():
    import errno

    assert os_error_line(OSError(errno.EBADF, "Bad file descriptor", 3)) == "3: Bad file descriptor"
    assert os_error_line(OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b")) == \
        "a (and b): Invalid cross-device link"
    # What to do where the usual fix is the user's (root, as tests run here, passes permission checks).
    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "runs/x/.lock")) == \
        "runs/x/.lock: Read-only file system; choose a path on a writable disk"
    assert os_error_line(PermissionError(errno.EACCES, "Permission denied", "runs/x")) == \
        "runs/x: Permission denied; choose another path, or change its permissions"


def test_a_run_folder_linked_to_a_folder_that_is_not_there_says_so(tmp_path):
    """A run or checkpoint folder that is a link to a disk not mounted: making it, or a folder
    inside it, fails on the link with "File exists", which says nothing of the link."""
    from qed_jax.rundir import run_lock

    link, target = tmp_path / "run", tmp_path / "unmounted" / "run"
    link.symlink_to(target)
    message = (f"output_dir: {link} is a link to {target}, which does not exist (a disk not mounted?); make that "
               "folder, or choose another path")
    for out in (link, link / "sft"):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            with run_lock(out):
                pass
    # A folder made with os.makedirs (Orbax's checkpoint folder) fails on the folder inside the link.
    assert os_error_line(FileNotFoundError(2, "No such file or directory", str(link / "ck"))) == \
        f"{link / 'ck'}: {message.removeprefix('output_dir: ')}"


def test_a_tokenizer_that_is_not_there_is_one_line(tmp_path, capsys):
    from qed_jax.tokenizer import load_tokenizer

    a_file, empty = tmp_path / "a_file", tmp_path / "empty"
    a_file.write_text("")
    empty.mkdir()
    for path, message in [(tmp_path / "none", "does not exist"),
                          (a_file, "is a file: name the folder that holds tokenizer.json"),
                          (empty, ": the folder holds no tokenizer (tokenizer.json, tokenizer_config.json, "
                                  "vocab.json)")]:
        with pytest.raises(ConfigError, match=f"^tokenizer {re.escape(str(path))} ?{re.escape(message)}$"):
            load_tokenizer(path)
    assert len(load_tokenizer(REPO / "configs/tiny/tokenizer")) > 256
    for name, damage, error in [("tokenizer.json", b"garbage", "JSONDecodeError"),
                                ("tokenizer.json", b"{}", "KeyError"),
                                ("chat_template.jinja", b"\xff\xfe", "UnicodeDecodeError")]:
        damaged = tmp_path / f"damaged_{error}"
        shutil.copytree(REPO / "configs/tiny/tokenizer", damaged)
        (damaged / name).write_bytes(damage)
        with pytest.raises(ConfigError, match=f"^tokenizer {re.escape(str(damaged))}: its files cannot be read "
                                              rf"\({error}: .*\); they are damaged or incomplete: copy or export"):
            load_tokenizer(damaged)
    assert cli.main(["sft", "--config", str(REPO / "configs/sft/tiny.yaml"), f"tokenizer={tmp_path / 'none'}",
                     f"output_dir={tmp_path / 'run'}", "batch_size=16"]) == 2  # rows for the 8 devices here
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"qed-jax sft: error: tokenizer {tmp_path / 'none'} does not exist"
    assert not (tmp_path / "run").exists()
    # A model folder without its tokenizer: the message names the setting that names one.
    assert cli.main(["sft", "--config", str(REPO / "configs/sft/tiny.yaml"), f"tokenizer={empty}",
                     f"output_dir={tmp_path / 'run'}", "batch_size=16"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"qed-jax sft: error: tokenizer {empty}: the folder holds no tokenizer (tokenizer.json, tokenizer_config.json, "
        "vocab.json); name the folder of the model's tokenizer with tokenizer=PATH")
    # A model folder that is not there is named as the model, not as its tokenizer.
    assert cli.main(["grpo", "--config", str(REPO / "configs/rl/qed_nano_4b.yaml"), f"model.path={tmp_path / 'none'}",
                     f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"qed-jax grpo: error: model.path {tmp_path / 'none'} does not exist")


def test_a_typo_in_a_config_file_names_the_file_and_the_likely_key(tmp_path):
    text = (REPO / "configs/sft/tiny.yaml").read_text()
    top, nested = tmp_path / "top.yaml", tmp_path / "nested.yaml"
    top.write_text(text.replace("\nsteps:", "\nstepz:"))
    nested.write_text(text.replace("max_length:", "max_lenght:"))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(top))}: unknown config key stepz \\(did you mean steps\\?\\)"):
        load_config(SFTConfig, top)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(nested))}: unknown config key data.max_lenght \\(did you "
                                          "mean data.max_length\\?\\)"):
        load_config(SFTConfig, nested)
    with pytest.raises(ConfigError, match=r"^unknown config key data.max_lenght \(did you mean"):  # an override's own
        load_config(SFTConfig, REPO / "configs/sft/tiny.yaml", ["data.max_lenght=3"])
    # A value of the wrong type in the file names the file too; the same value from an override does not.
    top.write_text(text.replace("\nsteps: 120", "\nsteps: many"))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(top))}: steps: expected a number, got 'many'$"):
        load_config(SFTConfig, top)
    with pytest.raises(ConfigError, match="^steps: expected a number, got 'lots'$"):
        load_config(SFTConfig, top, ["steps=lots"])


def test_a_model_path_over_a_config_preset_says_how_to_drop_the_preset():
    rl_yaml = REPO / "configs/rl/tiny.yaml"
    with pytest.raises(ConfigError, match=r"both path \(runs/x\) and preset \(tiny\) are set; keep one \(model.preset=null"):
        load_config(GRPOConfig, rl_yaml, ["model.path=runs/x"])
    assert load_config(GRPOConfig, rl_yaml, ["model.path=runs/x", "model.preset=null"]).model.path == "runs/x"


def test_a_config_file_yaml_cannot_key_or_decode_is_one_line(tmp_path):
    binary, numbered = tmp_path / "binary.yaml", tmp_path / "numbered.yaml"
    binary.write_bytes(b"steps: 3\xff\n")
    numbered.write_text("model: {preset: tiny}\n1: 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(binary))}: not UTF-8 text \(byte 0xff at offset 8\)$"):
        load_config(SFTConfig, binary)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(numbered))}: 1: a config key is text, but YAML read this "
                                          r"one as int; quote it or remove it$"):
        load_config(SFTConfig, numbered)
    with pytest.raises(ConfigError, match=r"^optim\.None: a config key is text"):
        load_config(SFTConfig, None, ["optim={null: 1}"])


def test_a_mapping_field_takes_a_mapping_of_text():
    base = ["model.path=m"]
    for override, message in (("benchmark.groups=5", r"^benchmark\.groups: expected a mapping, got 5$"),
                              ("benchmark.fields=[a]", r"^benchmark\.fields: expected a mapping, got \['a'\]$"),
                              ("benchmark.groups.Basic=5", r"^benchmark\.groups\.Basic: expected text, but YAML read")):
        with pytest.raises(ConfigError, match=message):
            load_config(EvalConfig, REPO / "configs/eval/imo_proofbench.yaml", [*base, override])
    # A mapping given for a section or a mapping field merges into it, keeping the keys it does not
    # set; benchmark.groups (an ordered classification with a catch-all) is replaced whole.
    for override in ("benchmark.groups={A: x}", "benchmark={groups: {A: x}}"):
        config = load_config(EvalConfig, REPO / "configs/eval/imo_proofbench.yaml", [*base, override])
        assert config.benchmark.groups == {"A": "x"} and config.benchmark.name == "imo_proofbench", override
    for override in ("benchmark.fields={solution: ref}", "benchmark={fields: {solution: ref}}",
                     "benchmark.fields.solution=ref"):
        config = load_config(EvalConfig, REPO / "configs/eval/proofbench.yaml", [*base, override])
        assert config.benchmark.fields == {"id": "problem_id", "problem": "problem", "solution": "ref",
                                           "guidelines": "grading_scheme"}, override


def test_a_mapping_given_for_a_section_keeps_the_files_other_keys(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text((REPO / "configs/sft/tiny.yaml").read_text())
    from_file = load_config(SFTConfig, path).optim
    merged = load_config(SFTConfig, path, ["optim={lr: 0.001}"]).optim
    assert merged == dataclasses.replace(from_file, lr=0.001)


def test_infinite_numbers_are_refused_and_a_files_bad_value_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^optim\.lr must be a finite number, got inf$"):
        load_config(SFTConfig, REPO / "configs/sft/tiny.yaml", ["optim.lr=.inf"])
    path = tmp_path / "sft.yaml"
    path.write_text(re.sub(r"\n(\s+)lr: \S+", r"\n\1lr: -1", (REPO / "configs/sft/tiny.yaml").read_text(), count=1))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: optim\.lr must be above 0, got -1\.0$"):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match=r"^optim\.lr must be above 0, got -2\.0$"):  # an override's own
        load_config(SFTConfig, path, ["optim.lr=-2"])
    # A check across keys that an override broke is not the file's doing.
    with pytest.raises(ConfigError, match=r"^batch_size \(8\) must be divisible by micro_batches \(3\)"):
        load_config(SFTConfig, REPO / "configs/sft/tiny.yaml", ["micro_batches=3"])


def test_verbose_shows_a_config_errors_traceback(capsys):
    assert cli.main(["sft", "--config", "configs/sft/tiny.yaml", "steps=0", "--print-config"]) == 2
    try:
        with pytest.raises(ConfigError, match="^steps must be at least 1"):
            cli.main(["-v", "sft", "--config", "configs/sft/tiny.yaml", "steps=0", "--print-config"])
    finally:  # -v logged DEBUG to this test's captured stderr: not to it once it is closed
        logging.basicConfig(level=logging.WARNING, force=True, stream=sys.__stderr__)
        logging.getLogger("qed_jax").setLevel(logging.INFO)


def test_bench_ab_refuses_what_it_cannot_compare_before_running_anything():
    for args, message in ((["--", "bench/reasoning_cache.py"], "bench/reasoning_cache.py: ab.py compares "
                           "bench/train_step.py and bench/sampling.py only"),
                          (["--rounds", "0", "--", "bench/train_step.py"], "--rounds must be at least 1, got 0")):
        result = subprocess.run([sys.executable, "bench/ab.py", "--base", "HEAD", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"ab.py: error: {message}"


def test_an_output_dir_that_is_a_url_is_refused_when_the_config_loads():
    """A run's lock, config.json and appended logs need a local folder: gs://... would become a
    local folder named gs: (or an error deep in a trainer). Checkpoints may go there instead."""
    from qed_jax.evaluate import EvalConfig
    from qed_jax.grpo import GRPOConfig
    from qed_jax.pipeline import PipelineConfig
    from qed_jax.sft import SFTConfig

    for cls, advice in ((SFTConfig, "; put the checkpoints there with checkpoint_dir"),
                        (GRPOConfig, "; put the checkpoints there with checkpoint_dir"),
                        (EvalConfig, ""), (PipelineConfig, "")):
        overrides = ["output_dir=gs://bucket/run"] + (["model.path=m"] if cls is EvalConfig else [])
        with pytest.raises(ConfigError, match=re.escape("output_dir must be a local folder (it holds the run's lock, "
                                                        f"config and logs), got gs://bucket/run{advice}") + "$"):
            load_config(cls, None, overrides)


def test_quoted_text_is_one_line_and_says_where_it_was_cut():
    assert quoted("line one\n  line two\t end", 200) == "line one line two end"
    assert quoted("a" * 10, 10) == "a" * 10
    assert quoted("/a/long/path/to/a/file", 8) == "/a/long/ [...]"


def test_an_infinite_rope_theta_or_rms_norm_eps_is_refused():
    """Python's json reads Infinity (and 1e999) as inf: an infinite RoPE base leaves every
    dimension but the first unrotated, an infinite eps zeroes every norm's output."""
    from qed_jax.config import PRESETS, ModelConfig

    for key in ("rope_theta", "rms_norm_eps"):
        hf = PRESETS["tiny"].to_hf()
        hf.pop("rope_parameters")  # which transformers reads rope_theta from first
        hf[key] = json.loads("1e999")
        with pytest.raises(ConfigError, match=f"^{key} must be a positive number, got inf$"):
            ModelConfig.from_hf(hf)


def test_a_mapping_fields_key_that_yaml_reads_as_a_number_says_to_quote_the_key():
    """The hint for a value (quote it as `key='"..."'`) named `benchmark.groups key 1` as the key
    to set, which no override is."""
    with pytest.raises(ConfigError, match=r"^benchmark\.groups: its keys are text, but YAML read the key 2024 as "
                                          r"int; quote it \(\"2024\": \.\.\.\)$"):
        load_config(EvalConfig, None, ["model.path=m", "benchmark.group_field=year", "benchmark.groups={2024: x}"])


def test_an_override_under_a_field_that_is_not_a_section_is_refused_whether_or_not_the_file_sets_it():
    """checkpoint_dir.x=1 with no checkpoint_dir in the file said to quote the value, as if
    checkpoint_dir had been given a mapping; with one in the file, that it is not a section."""
    for override, field in (("checkpoint_dir.x=1", "checkpoint_dir"), ("steps.x=1", "steps"),
                            ("data.name.x=1", "name")):
        with pytest.raises(ConfigError, match=f"^override '{re.escape(override)}': {field} is not a section$"):
            load_config(SFTConfig, REPO / "configs/sft/tiny.yaml", [override])
    # Inside a mapping field (a pipeline stage's overrides) any key may hold a mapping.
    from qed_jax.pipeline import PipelineConfig

    config = load_config(PipelineConfig, None, ["judge=standin", "sft.overrides.optim.lr=1e-4"])
    assert config.sft.overrides == {"optim": {"lr": 1e-4}}


def test_a_path_argument_given_with_an_equals_sign_has_its_tilde_expanded():
    """The shell expands ~ in `--output ~/x` but not in `--output=~/x`: judge's and report's
    output went to a folder named ~ in the working directory, --config was not found."""
    home = os.path.expanduser("~")
    args = cli.parse_args(["judge", "--config=~/judge.yaml", "--input=~/rows.jsonl", "--output=~/graded.jsonl"])
    assert (args.config, args.input, args.output) == (f"{home}/judge.yaml", f"{home}/rows.jsonl",
                                                      f"{home}/graded.jsonl")
    args = cli.parse_args(["report", "--output=~/report", "~/runs/a"])
    assert (args.output, args.run_dirs) == (f"{home}/report", [f"{home}/runs/a"])
    assert cli.parse_args(["generate", "--model", "Qwen/Qwen3-0.6B", "--prompt", "p"]).model == "Qwen/Qwen3-0.6B"


def test_a_section_in_a_list_without_its_required_key_names_the_key():
    """It was the dataclass's TypeError: `BenchmarkStage.__init__() missing 1 required positional
    argument: 'config'`."""
    from qed_jax.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=r"^eval\.benchmarks\[0\]\.config is missing: set it \(it has no "
                                          r"default\)$"):
        load_config(PipelineConfig, None, ["judge=standin", "eval.benchmarks=[{rows: x.jsonl}]"])


def test_an_integer_with_leading_zeros_is_decimal(tmp_path):
    """YAML 1.1 reads 017 as octal 15 (and 019, no octal, as text that a number field read as 19)."""
    path = tmp_path / "sft.yaml"
    path.write_text("model: {preset: tiny}\nseed: 017\nsteps: 0100\n")
    config = load_config(SFTConfig, path, ["batch_size=08"])
    assert (config.seed, config.steps, config.batch_size) == (17, 100, 8)
    assert parse_yaml("[017, 019, -0_10, 0x10, 0b11, 0, 10]") == [17, "019", -10, 16, 3, 0, 10]
