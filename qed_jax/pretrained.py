"""`from_pretrained` / `save_pretrained`: the one entry point for both checkpoint formats."""

from __future__ import annotations

import os
import weakref
from functools import partial
from pathlib import Path

from etils import epath

from qed_jax import checkpoint, hf
from qed_jax.config import is_hub_id, is_missing_local_path
from qed_jax.errors import first_line
from qed_jax.hf import CheckpointError
from qed_jax.model import Qwen3
from qed_jax.sharding import DEFAULT_RULES


_HUB_FILES = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.jinja"]
# The models inside a trainer's run directory (output_dir), for an error when given the run itself.
_RUN_DIR_MODELS = (("hf", "its exported model"), ("checkpoints", "its latest checkpoint"))


def run_dir_models(where) -> list[str]:
    """The models a trainer's run directory holds (its export, its checkpoints), each as
    "PATH (what it is)"; none for another folder."""
    return [f"{where / d} ({what})" for d, what in _RUN_DIR_MODELS if (where / d).is_dir()]


def resolve(path) -> str:
    """A local folder (`~` expanded), a gs:// path, or a Hugging Face Hub id (downloaded once
    into the HF cache)."""
    text = str(path)
    if not is_hub_id(text):
        return os.path.expanduser(text)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(text, allow_patterns=_HUB_FILES)
    except Exception as e:  # offline, unknown repo, no access: say which and why
        raise CheckpointError(f"{text}: not a local path, and downloading it from the Hugging Face Hub "
                              f"failed ({type(e).__name__}: {first_line(e)})") from None


def from_pretrained(path, mesh=None, rules=DEFAULT_RULES, dtype: str | None = None,
                    compute_dtype: str | None = None, step: int | None = None) -> Qwen3:
    """Load a Hugging Face Qwen3 folder (or Hub id) or a qed-jax checkpoint directory (its latest
    step, or `step`).

    mesh/rules: shard the parameters on a device mesh as they load (default: one device).
    dtype: parameter dtype (default: the checkpoint's own). compute_dtype: default = dtype.
    The folder is remembered outside the model (see `_SOURCES`) so exports can carry its tokenizer.
    """
    return open_pretrained(path, step)(mesh, rules, dtype, compute_dtype)


def open_pretrained(path, step: int | None = None):
    """The half of `from_pretrained` that touches no device: find the model (a Hub id is
    downloaded), read its config and check its files on this host. Returns load(mesh=None,
    rules=DEFAULT_RULES, dtype=None, compute_dtype=None) → the model. Multi-host trainers call
    it where one host's missing or damaged copy stops every host (`multihost.set_up_together`)."""
    only_in_checkpoints = "a step can only be chosen in a qed-jax checkpoint directory"
    if step is not None and is_hub_id(str(path)):
        raise CheckpointError(f"{path}: no such local folder, so read as a Hugging Face Hub id; {only_in_checkpoints}")
    path = resolve(path)
    where = epath.Path(path)
    if not where.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if checkpoint.is_checkpoint_dir(where):
        checkpoint.read_model_config(where)
        load = partial(checkpoint.load_model, where, step=step)
    elif not hf.has_safetensors(where) and (
            inside := run_dir_models(where)):
        raise CheckpointError(f"{path}: a trainer's run directory, not a model; pass {' or '.join(inside)}")
    elif (where / "config.json").exists():
        if step is not None:
            raise CheckpointError(f"{path}: a Hugging Face model folder; {only_in_checkpoints}")
        hf.require_local(path, "reads")
        load = hf.open_hf(Path(path))
    elif where.name.isdigit() and checkpoint.is_checkpoint_dir(where.parent):
        raise CheckpointError(f"{path}: one step of the checkpoint directory {where.parent}; pass that directory "
                              f"(its latest step is loaded; to use this one, export it: "
                              f"`qed-jax convert {where.parent} OUT --step {where.name}`)")
    elif where.is_dir() and any(p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json"
                                for p in where.iterdir()):
        raise CheckpointError(f"{path}: holds safetensors but no config.json, which an export writes last (an "
                              "export cut off part-way, or a copy that left it out); export the model there again, "
                              "or copy in its config.json")
    else:
        raise CheckpointError(
            f"{path}: neither a Hugging Face model folder (config.json + safetensors) nor a qed-jax "
            f"checkpoint directory ({checkpoint.MODEL_CONFIG} + Orbax steps)"
        )

    def remembered(mesh=None, rules=DEFAULT_RULES, dtype: str | None = None,
                   compute_dtype: str | None = None) -> Qwen3:
        model = load(mesh, rules, dtype, compute_dtype)
        _SOURCES[model] = str(path)
        return model

    return remembered


# Model → the folder it was loaded from. Not an attribute: that would be static graph data, part
# of every jit cache key, so models of one architecture from different folders would recompile.
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def loaded_from(model: Qwen3) -> str | None:
    """The local folder `from_pretrained` read the model from (a Hub id's download, `~` expanded)."""
    return _SOURCES.get(model)


def _home(path):
    """A leading ~ as the home folder, as `from_pretrained` reads paths (left alone: else)."""
    return os.path.expanduser(path) if isinstance(path, (str, Path)) and str(path).startswith("~") else path


def save_pretrained(model: Qwen3, path, dtype: str = "bfloat16", assets_from=None,
                    max_shard_bytes: int = hf.MAX_SHARD_BYTES, generation_from=None,
                    stop_on_turn_end: bool = False) -> Path:
    """Write a Hugging Face folder that transformers and vLLM load as Qwen3ForCausalLM.
    Tokenizer files come from `assets_from`, by default the folder the model was loaded from."""
    hf.require_local(path, "writes")
    # A local folder that is not there would leave the export without its tokenizer, silently.
    if assets_from is not None and is_missing_local_path(str(assets_from)):
        raise CheckpointError(f"assets_from: {assets_from}: no such folder; name the folder that holds the "
                              "model's tokenizer files")
    if assets_from is None:
        assets_from = loaded_from(model)
    path, assets_from, generation_from = (_home(p) for p in (path, assets_from, generation_from))
    return hf.save_hf(model, path, dtype=dtype, assets_from=assets_from, max_shard_bytes=max_shard_bytes,
                      generation_from=generation_from, stop_on_turn_end=stop_on_turn_end)
