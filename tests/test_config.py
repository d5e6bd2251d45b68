"""Config loading: nested sections keep their defaults under overrides, YAML errors are one
clear line, and --print-config shows what will be loaded."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from qed_jax.config import ConfigError, load_config
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
            return f.name, value + 1
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
    assert '"model": "load runs/sft-4b/hf"' in result.stdout
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
