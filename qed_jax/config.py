"""Typed configuration: the model config with its presets and Hugging Face mapping, and a strict
loader that builds any config dataclass from YAML plus `key=value` overrides."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import numbers
import os
import re
import secrets
import socket
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from qed_jax.errors import ConfigError, first_line, json_error


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "blockwise")
REMAT_POLICIES = ("none", "full", "dots", "offload")
DTYPES = ("float32", "bfloat16", "float16")  # of weights, activations and exports


def check_dtype(value: str | None, key: str) -> None:
    """A dtype option: one of DTYPES, or None where the key has a default to fall back on."""
    if value is not None and value not in DTYPES:
        raise ConfigError(f"{key} must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {value!r}")


def check_choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


# ModelConfig's fields that config.json names otherwise.
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}


def sliding_layers(hf: dict[str, Any], field) -> list[int]:
    """The layers a transformers Qwen3 config makes sliding-window ones: those its layer_types
    name so, or else, with use_sliding_window and a sliding_window, layers max_window_layers on.
    `field(key)`: the config's value, or transformers' default where it has none."""
    if hf.get("layer_types") is not None:
        if not isinstance(hf["layer_types"], list):
            raise ConfigError(f"layer_types must be a list of 'full_attention' per layer, got {hf['layer_types']!r}")
        return [i for i, kind in enumerate(hf["layer_types"]) if kind != "full_attention"]
    if not hf.get("use_sliding_window") or field("sliding_window") is None:
        return []
    first = field("max_window_layers")
    if type(first) is not int:
        raise ConfigError(f"max_window_layers must be an integer, got {first!r}")
    return list(range(max(first, 0), hf["num_hidden_layers"]))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Qwen3 dense decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    param_dtype: str = "bfloat16"  # storage dtype of the weights
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls
    # What a scanned block saves for the backward pass: none (everything), full (only its input),
    # dots (its input and its matmuls' outputs), offload (as full, with the inputs in host memory)
    remat: str = "none"
    # auto | xla | splash | blockwise: how full-sequence attention (training, prefill) is computed;
    # a runtime choice like remat: the weights do not depend on it (see qed_jax.attention)
    attention: str = "auto"

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        for field in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, field)
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise ConfigError(f"{field} must be a positive number, got {value!r}")
        if type(self.tie_word_embeddings) is not bool:
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        check_choice(self.remat, REMAT_POLICIES, "remat")
        check_choice(self.attention, ATTENTION_IMPLEMENTATIONS, "attention")
        for field in ("param_dtype", "dtype"):
            check_dtype(getattr(self, field), field)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Build from a transformers `config.json` dict; refuses what this model does not implement."""
        model_type = hf.get("model_type")
        if model_type != "qwen3":
            raise ConfigError(
                f"unsupported model_type {model_type!r}: qed-jax implements the dense Qwen3 decoder "
                "(model_type 'qwen3'); MoE and other families are not supported"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if missing := [key for key in required if key not in hf]:
            raise ConfigError(f"config has no {', '.join(missing)} (a Qwen3 config gives each of {', '.join(required)})")
        if hf.get("num_experts") or hf.get("num_local_experts"):
            raise ConfigError("config describes a mixture-of-experts model; only dense Qwen3 is supported")
        architectures = hf.get("architectures") or ["Qwen3ForCausalLM"]
        if architectures != ["Qwen3ForCausalLM"]:  # a reward model's head (score.weight) is not a vocabulary's
            raise ConfigError(f"architectures is {architectures!r}: qed-jax loads a Qwen3ForCausalLM (a language "
                              "model head over the vocabulary); use the causal language model's folder")
        if hf.get("quantization_config"):
            method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
            raise ConfigError(f"config has a quantization_config{f' ({method})' if method else ''}: qed-jax loads "
                              "unquantized weights (float32, bfloat16, float16); use the unquantized model")
        if hf.get("attention_bias"):
            raise ConfigError("config has attention_bias=true; Qwen3 attention has no biases")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' two names of one function
            raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (expected 'silu' or 'swish')")
        for key in ("rope_parameters", "rope_scaling"):  # transformers 5 runs rope_scaling over rope_parameters
            rope = hf.get(key) or {}
            if not isinstance(rope, dict):
                raise ConfigError(f"{key} must be a mapping (rope_type, rope_theta, ...), got {rope!r}")
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(f"{key}: rope type {rope_type!r} is not supported (only the default RoPE)")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers' order
        rope_theta = rope.get("rope_theta", hf.get("rope_theta"))
        if rope_theta is None:
            raise ConfigError("config has no rope_theta (looked in rope_scaling, rope_parameters and at the top level)")
        from transformers import Qwen3Config

        default = Qwen3Config()  # a field config.json leaves out is what transformers takes for it

        def field(key):
            return hf[key] if key in hf else getattr(default, key)

        for key in (*required, "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if hf.get(key) is not None and (type(hf[key]) is not int or hf[key] < 1):
                raise ConfigError(f"{key} must be a positive integer, got {hf[key]!r}")
        if sliding := sliding_layers(hf, field):
            raise ConfigError(f"config has sliding-window attention in layers {sliding} (use_sliding_window, "
                              "max_window_layers, layer_types); qed-jax implements full attention in every layer")
        heads = hf["num_attention_heads"]
        if "num_key_value_heads" not in hf and heads % default.num_key_value_heads:
            raise ConfigError(f"config has no num_key_value_heads, and the {default.num_key_value_heads} that "
                              f"transformers takes for it does not divide num_attention_heads ({heads}): add "
                              "num_key_value_heads to config.json")
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=field("num_key_value_heads") or heads,  # null: one kv head per query head
                head_dim=field("head_dim") or hf["hidden_size"] // heads,
                rope_theta=float(rope_theta) if type(rope_theta) is int else rope_theta,
                tie_word_embeddings=field("tie_word_embeddings"),
                rms_norm_eps=field("rms_norm_eps"),
                max_position_embeddings=field("max_position_embeddings"),
                **overrides,
            )
        except ConfigError as e:  # with the fields named as config.json names them
            renamed = re.sub(r"\b(" + "|".join(HF_NAMES) + r")\b", lambda m: HF_NAMES[m[0]], str(e))
            raise ConfigError(renamed) from None

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """A `config.json` dict with the field names of the installed transformers, and the older
        names beside them: transformers 4 (and the servers built on it) read RoPE's base from a
        top-level rope_theta, and without one take 10,000."""
        from transformers import Qwen3Config

        hf = Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            attention_bias=False,
            torch_dtype=torch_dtype,
        )
        hf.architectures = ["Qwen3ForCausalLM"]
        return {**hf.to_dict(), "rope_theta": self.rope_theta, "torch_dtype": torch_dtype}


_QWEN3_COMMON = dict(vocab_size=151936, num_kv_heads=8, head_dim=128)

PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": ModelConfig(
        **_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
        rope_theta=1e6, tie_word_embeddings=True,
    ),
    "qwen3-1.7b": ModelConfig(
        **_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
        rope_theta=1e6, tie_word_embeddings=True,
    ),
    "qwen3-4b": ModelConfig(
        **_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
        rope_theta=1e6, tie_word_embeddings=True,
    ),
    "qwen3-4b-thinking-2507": ModelConfig(
        **_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
        rope_theta=5e6, tie_word_embeddings=True, max_position_embeddings=262144,
    ),
    "qwen3-8b": ModelConfig(
        **_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
        rope_theta=1e6, tie_word_embeddings=False,
    ),
    # For tests and CPU smoke runs: every structural feature of the real models, in kilobytes.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=True,
        max_position_embeddings=2048, param_dtype="float32", dtype="float32",
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Strict loading of nested config dataclasses from YAML + key=value overrides.


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str, default: Any = None) -> Any:
    """`value` as type `typ`; a section (a dataclass) starts from `default`, the instance the
    enclosing config would have had, so that setting one of its fields keeps the others."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise FieldError(f"{where}: expected a section (keys {', '.join(_field_types(typ))}), got {value!r}",
                             where)
        return from_dict(typ, value, prefix=f"{where}.", base=default if isinstance(default, typ) else None)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, default)
    if origin is dict:
        key_type, value_type = typing.get_args(typ) or (Any, Any)
        if not isinstance(value, dict):
            raise FieldError(f"{where}: expected a mapping, got {value!r}", where)
        if key_type is str and (bad := [k for k in value if not isinstance(k, (str, datetime.date))]):
            # not the hint for a value below, whose `where key 1=...` is no override
            raise FieldError(f"{where}: its keys are text, but YAML read the key {bad[0]!r} as "
                             f"{type(bad[0]).__name__}; quote it (\"{bad[0]}\": ...)", where)
        return {_coerce(k, key_type, f"{where} key {k!r}"): _coerce(v, value_type, f"{where}.{k}")
                for k, v in value.items()}
    if origin in (list, tuple):
        (item,) = typing.get_args(typ)[:1]
        if not isinstance(value, (list, tuple)):
            raise FieldError(f"{where}: expected a list, got {value!r}", where)
        return origin(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise FieldError(f"{where}: expected true or false, got {value!r}", where)
        return value
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise FieldError(f"{where}: expected a number, got {value!r}", where)
        try:
            number = float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer past float's range
            raise FieldError(f"{where}: expected a number, got {value!r}", where) from None
        if typ is int:
            if not number.is_integer():  # 3.5 steps is a typo, not 3
                raise FieldError(f"{where}: expected a whole number, got {value!r}", where)
            number = int(value) if isinstance(value, int) else int(number)
        return number
    if typ is str:
        if value is None:  # `key=` or `key: null` for a key that has no "none": str(None) would be "None"
            raise FieldError(f"{where} must be set (it has no empty value); leave it out for its default", where)
        if type(value) is datetime.date:  # a date's text is the one YAML read (2025-01-15); a time's is not
            return str(value)
        if not isinstance(value, str):  # YAML read it as something else: 0123 is 123, 2024_01 is 202401, no is false
            raise FieldError(f"{where}: expected text, but YAML read the value as {type(value).__name__} {value!r}; "
                             f"quote it (\"...\" in a YAML file, {where}='\"...\"' on the command line)", where)
        return value
    return value


def _field_default(cls, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


# Fields that name a local file or folder (or a Hub id or gs:// path, which never start with "~"):
# a leading "~" is the user's home, as in a shell.
PATH_FIELDS = frozenset({"path", "cache_path", "output_dir", "checkpoint_dir", "tokenizer", "rows", "template",
                         "prompt_template", "reasoning_template", "summarize_template", "config", "summarizer"})


def expand_path_field(key: str, value: Any) -> Any:
    """`value` with a leading `~` expanded when `key` is one of PATH_FIELDS and it is text."""
    return os.path.expanduser(value) if key in PATH_FIELDS and isinstance(value, str) else value


def recorded_path(key: str, value: Any, recorded_in: str | None) -> Any:
    """A setting as recorded in the working directory `recorded_in`: for one of PATH_FIELDS, a
    relative path is what it named there, while that is still there (a project moved since,
    its old folder gone, is read where it is now)."""
    if (key in PATH_FIELDS and isinstance(value, str) and recorded_in and "://" not in value
            and not os.path.isabs(value) and os.path.exists(os.path.join(recorded_in, value))):
        return os.path.join(recorded_in, value)
    return value


def same_as_recorded(key: str, recorded: Any, value: Any, recorded_in: str | None, as_spelt: bool = True,
                     moved: tuple[str, str] | None = None) -> bool:
    """Whether a setting a run recorded (in the working directory `recorded_in`) is `value` now:
    what it named there (`recorded_path`), or with `as_spelt` the same spelling, or, when the run
    directory has `moved` (`run_moved`), what it named there now stands where it moved to."""
    return (same_setting(key, recorded_path(key, recorded, recorded_in), value)
            or (as_spelt and same_setting(key, recorded, value))
            or (moved is not None and key in PATH_FIELDS
                and same_setting(key, moved_path(recorded, moved, recorded_in), value)))


def run_moved(recorded_out: Any, out: Path | str, recorded_in: str | None) -> tuple[str, str] | None:
    """(before, now): where a moved or copied run directory stood with what moved along with it,
    and where that stands now; None when it has not moved. Its output_dir as recorded and as it is
    now, both absolute, less the trailing folders they share: runs/a/sft now runs/b/sft gives
    (runs/a, runs/b), so that a pipeline's GRPO stage p1/grpo, moved with its pipeline to p2/grpo,
    finds the SFT export it started from, p1/sft/hf, at p2/sft/hf."""
    if not isinstance(recorded_out, str) or "://" in recorded_out + str(out):
        return None
    before = Path(os.path.normpath(os.path.join(recorded_in or os.getcwd(), os.path.expanduser(recorded_out))))
    now = Path(os.path.abspath(out))
    if before == now:
        return None
    while before.name == now.name and before.parent.name and now.parent.name:  # never up to the root
        before, now = before.parent, now.parent
    return str(before), str(now)


def moved_path(value: Any, moved: tuple[str, str], recorded_in: str | None) -> Any:
    """A local path a run recorded, where it stands since the run moved (`run_moved`) when it was
    inside what moved; else `value`."""
    if not isinstance(value, str) or "://" in value:
        return value
    path = os.path.normpath(os.path.join(recorded_in or os.getcwd(), os.path.expanduser(value)))
    inside = os.path.relpath(path, moved[0])
    if inside == os.pardir or inside.startswith(os.pardir + os.sep):
        return value
    return os.path.normpath(os.path.join(moved[1], inside))


def same_setting(key: str, a: Any, b: Any) -> bool:
    """Whether a setting recorded as `a` is `b` now: equal, or for one of PATH_FIELDS two
    spellings of one existing file or folder (a relative path and its absolute one, a link)."""
    if a == b:
        return True
    return (key in PATH_FIELDS and isinstance(a, str) and isinstance(b, str) and "://" not in a + b
            and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def expand_paths(data: Any) -> Any:
    """A config's JSON values (config.json) with `~` expanded in PATH_FIELDS, as `from_dict`
    does: what a run directory recorded before it did so compares equal to the same setting now."""
    if isinstance(data, dict):
        return {k: expand_path_field(k, v) if isinstance(v, str) else expand_paths(v) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_paths(v) for v in data]
    return data


def from_dict(cls, data: dict[str, Any], prefix: str = "", base=None):
    """Build dataclass `cls` from a nested dict, starting from `base` (an instance of `cls`) or
    from the field defaults; unknown keys fail and list the valid ones."""
    types_ = _field_types(cls)
    check_keys_are_text(data, prefix)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        # A key of one of the sections, given outside it (lr for optim.lr), else a typo of a key here,
        # else one (or a typo of one) of the config class a mapping here holds overrides for.
        close = keys_named(cls, unknown[0], prefix) or [prefix + k for k in difflib.get_close_matches(
            unknown[0], types_, n=1)] or overridden_keys(cls, unknown[0], prefix)
        raise FieldError(
            f"unknown config key {prefix}{unknown[0]}" + (f" (did you mean {' or '.join(close)}?)" if close else "")
            + "; valid keys here: " + ", ".join(f"{prefix}{k}" for k in types_), key=f"{prefix}{unknown[0]}",
            unknown=not close)
    defaults = {k: getattr(base, k) if base is not None else _field_default(cls, k) for k in data}
    kwargs = {k: _coerce(v, types_[k], f"{prefix}{k}", defaults[k]) for k, v in data.items()}
    kwargs = {k: expand_path_field(k, v) for k, v in kwargs.items()}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if base is None and required:  # not the TypeError of __init__'s missing positional argument
        raise FieldError(f"{prefix}{required[0]} is missing: set it (it has no default)", f"{prefix}{required[0]}")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def keys_named(cls, name: str, prefix: str = "") -> list[str]:
    """The dotted keys (after `prefix`) of every field called `name` in the sections of config
    class `cls`, at any depth: where a key given at the wrong level belongs."""
    found = []
    for field, typ in _field_types(cls).items():
        section = without_none(typ)[0]
        if dataclasses.is_dataclass(section):
            inner = f"{prefix}{field}."
            found += [inner + name] if name in _field_types(section) else []
            found += keys_named(section, name, inner)
    return found


def overridden_keys(cls, name: str, prefix: str = "") -> list[str]:
    """The dotted keys (after `prefix`) nearest `name` in each mapping field of config class `cls`
    that holds overrides for another config class (`overrides_of`): where a pipeline's stage
    setting given outside its overrides belongs (sft.steps for sft.overrides.steps)."""
    return [f"{prefix}{f.name}.{k}" for f in dataclasses.fields(cls) if "overrides_of" in f.metadata
            for k in difflib.get_close_matches(name, _field_types(f.metadata["overrides_of"]()), n=1)]


def check_keys_are_text(data: dict, prefix: str = "") -> None:
    """FieldError for a key that YAML read as something other than text (`1:`, `null:`)."""
    for key in data:
        if not isinstance(key, str):
            raise FieldError(f"{prefix}{key!r}: a config key is text, but YAML read this one as "
                             f"{type(key).__name__}; quote it or remove it", f"{prefix}{key!r}")


def not_found(what: str, path: str | Path) -> ConfigError:
    """ConfigError: `what` (e.g. "data file") `path` does not exist; for a relative path, where
    it was looked for (the bundled configs name files relative to the repository's root)."""
    relative = not Path(path).expanduser().is_absolute()
    return ConfigError(f"{what} {path} does not exist" + (f" (relative to the working directory {Path.cwd()})"
                                                          if relative else ""))


def require_file(path: Path, what: str) -> None:
    """ConfigError unless `path` is a file: `what` (e.g. "data file") does not exist, or is a folder."""
    if not path.is_file():
        if path.is_dir():
            raise ConfigError(f"{what} {path} is a folder: name a file in it")
        raise not_found(what, path)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face Hub repository ("owner/name") rather than a path:
    not an existing path, not a URL, not starting with ".", "/" or "~", exactly one "/"."""
    return not (Path(name).exists() or "://" in name or name.startswith((".", "/", "~")) or name.count("/") != 1)


def is_missing_local_path(name: str) -> bool:
    """Whether `name` reads as a local path that does not exist: it starts with ".", "/" or "~",
    or has two "/" or more (not a URL; "owner/name" and "gpt2" may be Hub ids)."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") >= 2
    return looks_local and "://" not in name and not Path(name).expanduser().exists()


def check_url(url: str | None, key: str) -> None:
    """ConfigError for an endpoint's base URL that no request could be sent to: not http(s), no
    host, a port out of range, a malformed address. None (no endpoint) passes."""
    if url is None:
        return
    try:
        if any(c.isspace() for c in url):
            raise ValueError("it holds a space")
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- parses the port: a ValueError when it is out of range or not a number
        host = parts.hostname or ""
        if host.replace(".", "").isdigit():  # an IPv4 address, which may be short (127.1, 0)
            try:
                socket.inet_aton(host)
            except OSError:
                raise ValueError(f"{host} is not an IPv4 address") from None
    except ValueError as e:
        raise ConfigError(f"{key}: {url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{key}: {url!r} is not an http:// or https:// URL with a host, "
                          "e.g. http://localhost:8000/v1")


def require_range(value, key: str, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """ConfigError unless `value` lies between `low` and `high` (either may be None: no bound),
    each bound included unless `low_open` / `high_open`; None (a value derived from others)
    passes. `key` names the field, e.g. "optim.lr"."""
    if value is None:
        return
    if isinstance(value, float) and math.isinf(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    # Written so that NaN, which compares false with everything, is out of range.
    too_low = low is not None and not (value > low if low_open else value >= low)
    too_high = high is not None and not (value < high if high_open else value <= high)
    if too_low or too_high:
        if high is None:
            wanted = f"above {low}" if low_open else f"at least {low}"
        elif low is None:
            wanted = f"below {high}" if high_open else f"at most {high}"
        else:
            wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be {wanted}, got {value}")


# Grain's shuffle and JAX's keys take 32-bit seeds (JAX keeps a larger one's low bits: 2**32 would
# draw as 0 does).
SEED_MAX = 2 ** 32 - 1


def check_seed(value: int, key: str) -> None:
    require_range(value, key, 0, SEED_MAX)


def hashed_seed(*parts) -> int:
    """A seed below 2**31 (servers may keep one in a signed 32-bit integer) hashed from `parts`:
    a stream's seed, e.g. ("data order", seed), so that streams and nearby seeds share nothing."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def check_local_output_dir(value: str, advice: str = "") -> None:
    """ConfigError for an output_dir that is a URL (gs://...): it holds the run's lock, config and
    appended logs, which need a local file system (`advice`: where a URL may go instead). An empty
    one would put them in the current folder."""
    if not value.strip():
        raise ConfigError(f"output_dir is empty ({value!r}); name a folder, or leave it out for its default")
    if "://" in value:
        raise ConfigError(f"output_dir must be a local folder (it holds the run's lock, config and logs), got "
                          f"{value}" + (f"; {advice}" if advice else ""))


# Counts (tokens, rows, steps) and top_k become int32 arrays on the device.
MAX_INT32 = 2**31 - 1


def is_whole_number(value) -> bool:
    """An int, numpy's integers included; not a bool (True would count as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_at_least_one(config, names, prefix: str = "") -> None:
    """ConfigError unless each named field of `config` is a count from 1 to MAX_INT32; a field
    set to None (its default is derived from others) passes. `prefix` names the section, e.g.
    "rc."."""
    for name in names:
        value = getattr(config, name)
        # A fraction or a bool (a Python caller's; a config's fields are read as whole numbers) would
        # pass the range and fail later, naming nothing.
        if value is not None and not is_whole_number(value):
            raise ConfigError(f"{prefix}{name} must be a whole number, got {value!r}")
        require_range(value, f"{prefix}{name}", 1)
        require_range(value, f"{prefix}{name}", high=MAX_INT32)


# Sampling below this is greedy in all but name; far below it (under ~1e-35), logits / temperature
# overflows float32 and log-probs turn NaN, and subnormal temperatures flush to 0 on some backends.
MIN_TEMPERATURE = 1e-5


def check_sampling(params, prefix: str = "") -> None:
    """ConfigError unless `params` (SamplingParams or a config section with the same fields)
    asks for at least one token, a temperature of 0 or in [MIN_TEMPERATURE, inf), top_k >= 0 and
    0 < top_p <= 1."""
    require_at_least_one(params, ("max_new_tokens",), prefix)
    check_temperature_and_filters(params, prefix)


def check_temperature_and_filters(params, prefix: str = "") -> None:
    """The part of `check_sampling` that is not the token budget (which the reasoning cache
    names otherwise)."""
    if not (params.temperature == 0 or MIN_TEMPERATURE <= params.temperature < math.inf):
        raise ConfigError(f"{prefix}temperature must be 0 (greedy) or a finite number of at least "
                          f"{MIN_TEMPERATURE:g}, got {params.temperature}")
    if not is_whole_number(params.top_k):  # a Python caller's fraction would be cut to a whole number unsaid
        raise ConfigError(f"{prefix}top_k must be a whole number, got {params.top_k!r}")
    if params.top_k < 0:
        raise ConfigError(f"{prefix}top_k must be at least 0 (0 is off), got {params.top_k}")
    require_range(params.top_k, f"{prefix}top_k", high=MAX_INT32)
    if not 0 < params.top_p <= 1:
        raise ConfigError(f"{prefix}top_p must be in (0, 1] (1 is off), got {params.top_p}")


def not_utf8(text: str) -> str | None:
    """Where a command-line argument's text is not UTF-8 (Python keeps such bytes as lone
    surrogates), as "byte 0xe9 at character 4"; None when it is."""
    bad = re.search("[\udc80-\udcff]", text)
    return None if bad is None else f"byte {ord(bad.group()) - 0xdc00:#04x} at character {bad.start() + 1}"


def apply_override(data: dict[str, Any], override: str, cls) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to the nested dict `data` of config
    class `cls` in place; a mapping given for a section is merged into it."""
    if "=" not in override:
        config_file = override.lower().endswith((".yaml", ".yml")) or os.path.isfile(override)
        raise ConfigError(f"override {override!r} is not of the form key=value"
                          + ("; a config file is given as --config FILE" if config_file else ""))
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: {key.strip()!r} is not a key (names joined by single dots, "
                          "e.g. optim.lr=1e-4)")
    if where := not_utf8(raw):
        raise ConfigError(f"override {key.strip()}: the value is not UTF-8 text ({where}); convert it, e.g. with "
                          "iconv -t UTF-8")
    node = data
    for n, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or a section left empty in the file (`data:` and nothing under it)
            typ = field_type(cls, parts[:n + 1])  # None: not a field (from_dict names it) or inside a mapping
            if typ is not None and not (dataclasses.is_dataclass(typ) or typing.get_origin(typ) is dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        value = parse_yaml(raw)
    except (yaml.YAMLError, ValueError, LookupError, AttributeError) as e:  # a tag its text does not fit
        hint = "" if isinstance(e, DuplicateKey) else "; mend its YAML, or quote it if it is text"
        raise ConfigError(f"override {override!r}: the value is not valid YAML "
                          f"({getattr(e, 'problem', None) or first_line(e)}){hint}") from None
    if str(value).count("#") < raw.count("#"):  # YAML read ` #...` as a comment and dropped it
        raise ConfigError(f"override {override!r}: YAML reads a # after a space as the start of a comment, which "
                          f"would leave {value!r}; quote the value ({key}='\"...\"') or drop the comment")
    merge(node, {parts[-1]: value}, parts[:-1], cls)


# A mapping field marked so (`dataclasses.field(metadata=WHOLE)`) is one value, which a mapping
# given for it replaces: benchmark.groups, whose order and catch-all pattern go together.
WHOLE = {"replaced_whole": True}


def overrides_of(config_class) -> dict:
    """The metadata of a mapping field that holds overrides for another config class
    (`config_class()` gives it: a pipeline stage's overrides), so that merging into it
    keeps that class's WHOLE fields whole."""
    return {"overrides_of": config_class}


def merge(into: dict, update: dict, path: list[str], cls) -> None:
    """`update` (at key path `path` of config class `cls`) merged into `into` in place: a mapping
    given for a section or a mapping field is merged key by key, keeping the keys it does not
    set, unless the field is marked WHOLE; any other value replaces what was there."""
    for key, value in update.items():
        here = [*path, key]
        if isinstance(value, dict) and isinstance(into.get(key), dict) and not replaced_whole(cls, here):
            merge(into[key], value, here, cls)
        else:
            into[key] = value


def replaced_whole(cls, parts: list[str]) -> bool:
    """Whether the field at the key path `parts` of config class `cls` is marked WHOLE (in the
    class a mapping of overrides on the path is for, `overrides_of`)."""
    for n, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        metadata = fields[part].metadata
        if n == len(parts) - 1:
            return metadata.get("replaced_whole", False)
        if "overrides_of" in metadata:
            return replaced_whole(metadata["overrides_of"](), parts[n + 1:])
        cls = without_none(_field_types(cls)[part])[0]
    return False


def without_none(typ) -> tuple[Any, bool]:
    """(X, True) for a field typed `X | None`, else (typ, False)."""
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return typ, False


def field_type(cls, parts: list[str]):
    """The type of the field at the key path `parts` of config class `cls` (a section's class
    for an optional section), or None."""
    typ = cls
    for part in parts:
        if not dataclasses.is_dataclass(typ) or part not in _field_types(typ):
            return None
        typ = without_none(_field_types(typ)[part])[0]
    return typ


PROMPTS_DIR = Path(__file__).resolve().parent.parent / "configs" / "prompts"


def load_template(name_or_path: str, what: str = "prompt template", fits=lambda text: True) -> str:
    """A prompt template: a file, or the name of one in configs/prompts/ (without .txt). `what`
    names it in the error (e.g. "judge template"), which lists the bundled templates whose text
    `fits` (e.g. the judge's: those with a {{proof}} placeholder)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROMPTS_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        bundled = sorted(p.stem for p in PROMPTS_DIR.glob("*.txt") if fits(p.read_text()))
        raise ConfigError(f"{what} {name_or_path!r} is neither a file nor one of {bundled}")
    return path.read_text()


# The kinds of bundled template, told apart by their fields (a misspelt name lists its kind's).
def is_prompt_template(text: str) -> bool:
    """Whether a template asks the policy a problem (not a judge's, which shows it a proof)."""
    return "{{problem}}" in text and "{{proof}}" not in text


def is_judge_template(text: str) -> bool:
    """Whether a template shows a judge the proof to grade."""
    return "{{proof}}" in text


def is_rc_template(text: str) -> bool:
    """Whether a template is a reasoning-cache turn's: single-brace fields ({problem}, {summary}),
    where the benchmarks' and the judge's have double ({{problem}})."""
    return "{problem}" in text and "{{" not in text


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    copy, so a second `data:` block would replace the first whole, in silence. The keys are
    checked as the file wrote them, before merge keys (`<<: *anchor`, whose keys a mapping may
    override) are applied."""

    def construct_document(self, root):
        seen, stack = set(), [root]
        while stack:
            node = stack.pop()
            if id(node) in seen:  # an alias of a node already checked
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                first_line = {}
                for key, value in node.value:
                    stack += [key, value]
                    if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                        continue
                    if (key.tag, key.value) in first_line:
                        raise DuplicateKey(None, None, f"the key {key.value!r} appears twice in one mapping, first "
                                           f"on line {first_line[key.tag, key.value]}: keep one", key.start_mark)
                    first_line[key.tag, key.value] = key.start_mark.line + 1
            elif isinstance(node, yaml.SequenceNode):
                stack += node.value
        return super().construct_document(root)


# YAML 1.1 (PyYAML) reads an exponent only after a dot and with a sign: `1e-05`, `3e4`, `1.0e5`
# and `.5e3` would be text, which a number field converts but a free-form mapping (a pipeline's
# stage overrides) would keep as text. Read them as YAML 1.2 does.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _construct_int(loader, node):
    """An integer; one written with leading zeros is decimal, as YAML 1.2 reads it: YAML 1.1's
    octal made seed: 017 a 15 (and 019, no octal, a 19)."""
    text = loader.construct_scalar(node)
    if re.fullmatch(r"[-+]?0[0-9_]+", text):
        return int(text.replace("_", ""))
    return loader.construct_yaml_int(node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents; a syntax error is one line naming the file, line and column."""
    try:
        data = parse_yaml(Path(path).read_text(encoding="utf-8"))
        return {} if data is None else data  # an empty file; [] or false is refused as not a mapping
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except (yaml.YAMLError, ValueError, LookupError, AttributeError) as e:  # a tag its text does not fit
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None


def empty_sections_as_defaults(data: dict, cls) -> None:
    """A section of `cls` left empty in a YAML file (`data:` with every key under it commented
    out, which YAML reads as null) becomes a section of defaults, in place. An optional section's
    null stays: it turns the section off."""
    for key, value in data.items():
        section, optional = without_none(_field_types(cls).get(key))
        if not dataclasses.is_dataclass(section):
            continue
        if value is None and not optional:
            data[key] = {}
        elif isinstance(value, dict):
            empty_sections_as_defaults(value, section)


def load_config(cls, path: str | Path | None, overrides: list[str] = (), section: str | None = None):
    """Read YAML (or start from defaults), apply overrides, and validate into `cls`. With
    `section`, a file that has that key is read from there (a trainer config's judge section)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        require_file(path, "config file")
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        if section is not None and section in data:
            data = {} if data[section] is None else data[section]  # a section left empty: its defaults
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: {section} must be a mapping")
        try:
            check_keys_are_text(data)
        except FieldError as e:
            raise ConfigError(f"{path}: {e}") from None
        unknown = sorted(set(data) - set(_field_types(cls)))
        known = set(data) & set(_field_types(cls))
        misplaced = keys_named(cls, unknown[0]) if unknown and len(unknown) < len(known) else []  # one stray key
        if unknown and not difflib.get_close_matches(unknown[0], _field_types(cls), n=1) and not misplaced:
            # Not a typo (from_dict below names those): most often a config for another command.
            other = f" (a config for another command works here only with a {section}: section, which this one " \
                    "does not have)" if section else ""
            raise ConfigError(f"{path}: {unknown[0]} is not a key of {cls.__name__} (its keys: "
                              + ", ".join(_field_types(cls)) + f"); is this file for another command?{other}")
        empty_sections_as_defaults(data, cls)
    in_file = copy.deepcopy(data)
    for override in overrides:
        apply_override(data, override, cls)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if isinstance(e, FieldError):
            key = e.key.split("[")[0]  # a list's item: the list's key
        else:  # a value its config class refused: the message starts with its key
            key = str(e).split(" ", 1)[0].rstrip(":")
            # Checks across keys (batch_size and micro_batches): the file's only if the section is as in the file.
            key = key.rpartition(".")[0]
        message = str(e)
        if isinstance(e, FieldError) and e.unknown and key in getattr(cls, "KEYS_ELSEWHERE", {}):
            message += f"; in this config that is {cls.KEYS_ELSEWHERE[key]}"  # e.g. GRPO's sampling temperature
        in_file_value = get_dotted(in_file, key, _ABSENT)
        if path is not None and in_file_value is not _ABSENT and in_file_value == get_dotted(data, key, _ABSENT):
            message = f"{path}: {message}"  # from the file, not from an override: name the file
        raise ConfigError(message) from None


class FieldError(ConfigError):
    """A config key that its dataclass does not have, or a value of the wrong type; `key` is its
    dotted path; `unknown`: a key not in its section, and not a typo of one that is (a config
    class may say where such a key lives in it: a KEYS_ELSEWHERE class attribute)."""

    def __init__(self, message: str, key: str, unknown: bool = False):
        super().__init__(message)
        self.key, self.unknown = key, unknown


_ABSENT = object()


def get_dotted(data: dict, dotted: str, default=None):
    """The value at the dotted key path `dotted` (e.g. "judge.model") of the nested dict `data`
    (the whole of it for ""), or `default` where any part of the path is missing."""
    for part in dotted.split(".") if dotted else ():
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def without_non_finite(value):
    """A value as JSON can hold it (it has no NaN or infinity): such floats become null, in
    dicts, lists and tuples too."""
    if isinstance(value, dict):
        return {k: without_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_non_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def dump_json(config) -> str:
    # A date that YAML read in a free-form mapping (a pipeline's overrides) is written as its text.
    return json.dumps(to_dict(config), indent=2, default=str)


def json_values(config) -> dict:
    """A config as the JSON values its config.json holds (what run records compare)."""
    return json.loads(dump_json(config))


def read_json_object(path: Path, damaged: str) -> dict:
    """A JSON object from `path` (a run's config.json); anything else is a ConfigError naming
    the file, then `damaged` (what to do about it)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({json_error(e, line=True)}); {damaged}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.reason}); {damaged}") from None
    except OSError as e:  # unreadable (permissions, a folder of that name): every process of a pod must hear it
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e}); {damaged}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object; {damaged}")
    return data


def temporary_beside(path: Path) -> Path:
    """A new empty file next to `path`, to be renamed over it: named for this writer alone, so two
    writers of one path never write into the same file. Its mode is a new file's under the umask
    (mkstemp's 0600 would make every rewritten file readable by its owner alone). An OSError
    names `path`, the file the user asked for, not this one."""
    while True:
        name = Path(path).parent / f".{Path(path).name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return name
        except FileExistsError:
            continue
        except OSError as e:
            raise type(e)(e.errno, e.strerror, os.fspath(path)) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a kill mid-write leaves the old file (or none)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`write_text_atomic` for bytes."""
    tmp = temporary_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
