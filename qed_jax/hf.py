"""Hugging Face ⇄ qed-jax: tensor names and layouts, safetensors streaming, folder export.

Loading reads each parameter shard straight from memory-mapped safetensors into its device, so
host memory peaks near one (layer-stacked) parameter shard, and torch is never imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from qed_jax.config import ConfigError, ModelConfig, check_dtype, write_bytes_atomic, write_text_atomic
from qed_jax.errors import CheckpointError
from qed_jax.model import Qwen3
from qed_jax.multihost import largest
from qed_jax.sharding import DEFAULT_RULES, state_shardings

log = logging.getLogger(__name__)

# Files that travel with a model folder in both formats (tokenizer, chat template, generation).
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
MAX_SHARD_BYTES = 5 * 10**9

_ST_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Tensor names and layouts


@dataclass(frozen=True)
class TensorMap:
    """How one qed-jax parameter is stored in Hugging Face: ours = hf.reshape(split).transpose(perm)."""

    hf_name: str  # with "{}" for the layer index when the parameter is layer-stacked
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def stacked(self) -> bool:
        return "{}" in self.hf_name

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        return hf.reshape(self.split).transpose(self.perm)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape)


def tensor_maps(c: ModelConfig) -> dict[str, TensorMap]:
    """Our parameter path ('layers/q') → its Hugging Face tensor, in Hugging Face file order."""
    D, F, N, K, H, V = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                        c.head_dim, c.vocab_size)
    layer = "model.layers.{}."
    same = lambda *shape: (shape, shape, tuple(range(len(shape))))  # noqa: E731
    maps = {
        "embed": TensorMap("model.embed_tokens.weight", *same(V, D)),
        "layers/attn_norm": TensorMap(layer + "input_layernorm.weight", *same(D)),
        "layers/q": TensorMap(layer + "self_attn.q_proj.weight", (N * H, D), (N, H, D), (2, 0, 1)),
        "layers/k": TensorMap(layer + "self_attn.k_proj.weight", (K * H, D), (K, H, D), (2, 0, 1)),
        "layers/v": TensorMap(layer + "self_attn.v_proj.weight", (K * H, D), (K, H, D), (2, 0, 1)),
        "layers/o": TensorMap(layer + "self_attn.o_proj.weight", (D, N * H), (D, N, H), (1, 2, 0)),
        "layers/q_norm": TensorMap(layer + "self_attn.q_norm.weight", *same(H)),
        "layers/k_norm": TensorMap(layer + "self_attn.k_norm.weight", *same(H)),
        "layers/mlp_norm": TensorMap(layer + "post_attention_layernorm.weight", *same(D)),
        "layers/gate": TensorMap(layer + "mlp.gate_proj.weight", (F, D), (F, D), (1, 0)),
        "layers/up": TensorMap(layer + "mlp.up_proj.weight", (F, D), (F, D), (1, 0)),
        "layers/down": TensorMap(layer + "mlp.down_proj.weight", (D, F), (D, F), (1, 0)),
        "final_norm": TensorMap("model.norm.weight", *same(D)),
    }
    if not c.tie_word_embeddings:
        maps["lm_head"] = TensorMap("lm_head.weight", *same(V, D))
    return maps


def _flat(tree) -> dict[str, object]:
    """{'layers/q': leaf, ...} from a nested pure dict."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(p.key) for p in path)] = leaf
    return out


def _unflat(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, leaf in flat.items():
        node = tree
        *parents, last = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


# ---------------------------------------------------------------------------------------------
# safetensors, read through memory maps and written as a stream


def has_safetensors(folder) -> bool:
    return any((folder / name).exists() for name in ("model.safetensors", "model.safetensors.index.json"))


class SafetensorsFolder:
    """The tensors of a folder's `model.safetensors` or its sharded `*.safetensors` + index."""

    def __init__(self, folder: Path):
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if index.is_file() and single.is_file():  # e.g. shards copied over an older single file
            log.warning("%s holds both model.safetensors and a sharded model.safetensors.index.json; reading "
                        "model.safetensors, as transformers does (delete the one that is not this model)", folder)
        if index.is_file() and not single.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); copy or "
                                      "export the model again") from None
            if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
                raise CheckpointError(f"{index}: not a safetensors index (its weight_map is not a table of tensor "
                                      "names to file names); copy or export the model again")
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json found")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{index}: lists shard {name}, which does not exist")
            header, data_start = _read_header(path)
            for tensor, info in header.items():
                self._where[tensor] = (path, info, data_start)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        path, info, _ = self._where[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        return _ST_DTYPES[info["dtype"]]

    def read(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view (no copy until it is transformed)."""
        path, info, base = self._where[name]
        start, end = info["data_offsets"]
        return np.memmap(path, dtype=self.dtype(name), mode="r", offset=base + start,
                         shape=tuple(info["shape"])) if end > start else np.zeros(info["shape"], self.dtype(name))


def _holds_its_tensor(info: dict) -> bool:
    """Whether a header entry's data offsets are two whole numbers 0 <= start <= end whose span
    is its shape in its dtype (an unknown dtype passes here: reading the tensor refuses it)."""
    offsets, shape = info["data_offsets"], info["shape"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)):
        return False
    dtype = _ST_DTYPES.get(info["dtype"])
    return dtype is None or offsets[1] - offsets[0] == math.prod(shape) * dtype.itemsize


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table and where its data starts, checked against the file's
    size: a cut-off download fails here, naming the file, not in the middle of loading."""
    damaged = f"{path}: not a readable safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        header_len = struct.unpack("<Q", first)[0] if len(first) == 8 else size  # under 8 bytes: cut off
        if 8 + header_len > size:
            raise CheckpointError(f"{damaged} (its header runs past the end of the file: cut off?); "
                                  "copy or export it again")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:  # bad JSON or bad UTF-8
            raise CheckpointError(f"{damaged} (its header is not valid JSON: {e}); copy or export it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{damaged} (its header is not a table of tensors); copy or export it again")
    header.pop("__metadata__", None)
    for tensor, info in header.items():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
            raise CheckpointError(f"{damaged} (tensor {tensor} lacks its dtype, shape or data offsets); "
                                  "copy or export it again")
        if not _holds_its_tensor(info):
            raise CheckpointError(f"{damaged} (tensor {tensor}'s data offsets {info['data_offsets']} do not hold its "
                                  f"{info['dtype']} shape {info['shape']}); copy or export it again")
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{damaged}: its tensors need {8 + header_len + data_end:,} bytes but the file has "
                              f"{size:,} (cut off?); copy or export it again")
    return header, 8 + header_len


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype]], produce) -> None:
    """Write tensors (name, shape, dtype) in order; `produce(name)` returns each array in turn,
    so only one tensor is on the host at a time."""
    header, offset = {}, 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with named_on_failure(path), open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in tensors:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise AssertionError(f"{name}: produced shape {array.shape}, planned {shape}")
            f.write(array.tobytes())


@contextlib.contextmanager
def named_on_failure(path):
    """A failed write (a full disk) raised with the file it was writing: the OS names none, and
    the command's one-line error names the path."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or not e.errno:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


# ---------------------------------------------------------------------------------------------
# Loading


def read_model_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder's `config.json`; an error names the file."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        hf_config = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{path}: not a model config (a JSON object of settings)")
    try:
        return ModelConfig.from_hf(hf_config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _widest_dtype(tensors: SafetensorsFolder, names) -> str | None:
    """The dtype a folder's parameters load as by default: the widest among the model's tensors
    (an unsupported one is refused here), so bfloat16 weights with float32 norms lose nothing;
    float16 beside bfloat16 (neither holds the other's values) loads as float32."""
    dtypes = {tensors.dtype(name) for name in names if name in tensors}
    if {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)} <= dtypes:
        return "float32"
    widest = max(dtypes, key=lambda d: d.itemsize, default=None)
    return None if widest is None else widest.name


def safetensors_of(folder: Path) -> SafetensorsFolder | None:
    """The folder's safetensors headers; None when it holds no weights (a config.json alone)."""
    try:
        return SafetensorsFolder(folder)
    except CheckpointError:
        if any(folder.glob("*.safetensors*")):
            raise  # weights that cannot be read: the error names the file
        return None


def stored_param_dtype(folder: Path, config: ModelConfig) -> str | None:
    """What `open_hf`'s loader gives the parameters of `folder` unless told a dtype, read from the
    safetensors headers; None when the folder holds no weights (a config.json alone)."""
    tensors = safetensors_of(folder)
    return None if tensors is None else _widest_dtype(tensors, _expected_shapes(tensor_maps(config), config))


def holds_own_head(tensors: SafetensorsFolder) -> bool:
    """Whether a folder holds an output head beside its embedding: one whose config.json ties
    them is loaded untied when the two differ (`open_hf`), and planned untied (`plan`)."""
    return "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors


def open_hf(folder: str | Path):
    """A Hugging Face Qwen3 folder, checked (its config.json, and each tensor the model reads
    present, of the right shape, in files not cut off) on this host alone: no device is touched.
    Returns load(mesh=None, rules=DEFAULT_RULES, dtype=None, compute_dtype=None) → a qed-jax
    model, sharded on `mesh` when given; parameters keep the checkpoint's dtype unless `dtype`
    is set, and compute follows the parameters unless `compute_dtype` is set."""
    folder = Path(folder)
    config = read_model_config(folder)
    tensors = SafetensorsFolder(folder)
    if config.tie_word_embeddings and holds_own_head(tensors) \
            and not np.array_equal(tensors.read("lm_head.weight"), tensors.read("model.embed_tokens.weight")):
        # As transformers loads such a folder: a head of its own is used, not tied to the embedding.
        log.warning("%s: config.json ties the output head to the embedding, but the folder holds a different "
                    "lm_head.weight; using it, untied (as transformers does)", folder)
        config = config.replace(tie_word_embeddings=False)
    maps = tensor_maps(config)
    expected = _expected_shapes(maps, config)
    _check_tensors(folder, tensors, expected, config.num_layers)
    stored_dtype = _widest_dtype(tensors, expected)

    def load(mesh=None, rules=DEFAULT_RULES, dtype: str | None = None, compute_dtype: str | None = None) -> Qwen3:
        param_dtype = dtype or stored_dtype
        return _load_hf(folder, config.replace(param_dtype=param_dtype, dtype=compute_dtype or param_dtype),
                        tensors, maps, mesh, rules)

    return load


def _load_hf(folder: Path, config: ModelConfig, tensors: SafetensorsFolder, maps: dict[str, TensorMap], mesh,
             rules) -> Qwen3:
    param_dtype = config.param_dtype
    abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = _flat(nnx.to_pure_dict(state_shardings(abstract_state, mesh, rules)))
    shapes = _flat(nnx.to_pure_dict(abstract_state))

    arrays = {}
    for path, spec in tqdm(list(shapes.items()), desc=f"loading {folder.name}", unit="tensor",
                           disable=jax.process_index() != 0):
        tmap = maps[path]
        target = np.dtype(param_dtype)

        def read(index, tmap=tmap, target=target, shape=spec.shape):
            index = index if index else tuple(slice(None) for _ in shape)
            if not tmap.stacked:
                return tmap.to_ours(tensors.read(tmap.hf_name))[index].astype(target)
            layers = range(config.num_layers)[index[0]]
            return np.stack([tmap.to_ours(tensors.read(tmap.hf_name.format(i)))[index[1:]].astype(target)
                             for i in layers])

        if mesh is None:
            arrays[path] = jax.device_put(read(()))
        else:
            arrays[path] = jax.make_array_from_callback(spec.shape, shardings[path], read)
    nnx.replace_by_pure_dict(abstract_state, _unflat(arrays))
    return nnx.merge(graphdef, abstract_state)


def _expected_shapes(maps: dict[str, TensorMap], config: ModelConfig) -> dict[str, tuple]:
    """Each Hugging Face tensor the model reads, with its shape."""
    expected = {}
    for tmap in maps.values():
        names = [tmap.hf_name.format(i) for i in range(config.num_layers)] if tmap.stacked else [tmap.hf_name]
        expected.update({n: tmap.hf_shape for n in names})
    return expected


def _check_tensors(folder: Path, tensors: SafetensorsFolder, expected: dict[str, tuple], num_layers: int) -> None:
    layers = {int(m[1]) for name in tensors.names() if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if layers and max(layers) >= num_layers:  # a model cut short without a word
        raise CheckpointError(f"{folder}: config.json says num_hidden_layers {num_layers}, but the safetensors files "
                              f"hold layers up to model.layers.{max(layers)}; fix config.json (or the files)")
    for name, shape in expected.items():
        if name not in tensors:
            tied = " (config.json does not tie the output head to the embedding: if this model does, set " \
                   "tie_word_embeddings true there)" if name == "lm_head.weight" else ""
            raise CheckpointError(f"{folder}: tensor {name} is missing from the safetensors files{tied}")
        if tensors.shape(name) != shape:
            raise CheckpointError(
                f"{folder}: tensor {name} has shape {list(tensors.shape(name))}, but config.json "
                f"implies {list(shape)}"
            )
    unused = tensors.names() - set(expected) - {"lm_head.weight"}
    if unused:
        log.warning("%s: ignoring %d tensors that Qwen3 does not use, e.g. %s", folder, len(unused),
                    sorted(unused)[0])


# ---------------------------------------------------------------------------------------------
# Saving


def require_local(folder, verb: str) -> None:
    """CheckpointError for a Hugging Face folder named by a URL (gs://...): qed-jax `verb`s
    those only on local disk (qed-jax checkpoints may live in gs://)."""
    if "://" in str(folder):
        raise CheckpointError(f"{folder}: qed-jax {verb} Hugging Face folders on local disk only; use a local folder "
                              "and copy it (e.g. gcloud storage cp -r), or a qed-jax checkpoint directory, which "
                              "may be in gs://")


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf(model: Qwen3, folder: str | Path, dtype: str = "bfloat16", assets_from: str | Path | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES, generation_from: str | Path | None = None,
            stop_on_turn_end: bool = False) -> Path:
    """Write `model` as a Hugging Face Qwen3 folder (config, generation config, safetensors shards
    with an index when there is more than one, and the tokenizer files of `assets_from`). The
    generation config is `generation_from`'s (the folder the model was trained from) where it has
    one, else `assets_from`'s. With `stop_on_turn_end` (a trained model's export), its
    eos_token_id gains the end-of-turn ids qed-jax's sampler stops on, so that transformers and
    vLLM stop where qed-jax does.
    Every process must call this; process 0 writes."""
    folder = Path(folder)
    config: ModelConfig = model.config
    check_dtype(np.dtype(dtype).name if not isinstance(dtype, str) else dtype, "export dtype")
    target = np.dtype(dtype)
    params = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    maps = tensor_maps(config)

    plan = [(maps["embed"].hf_name, "embed", None)]  # (hf name, our path, layer or None), HF's order
    for i in range(config.num_layers):
        plan += [(t.hf_name.format(i), p, i) for p, t in maps.items() if t.stacked]
    plan += [(maps[p].hf_name, p, None) for p in ("final_norm", "lm_head") if p in maps]

    shards, size = [[]], 0
    for entry in plan:
        nbytes = math.prod(maps[entry[1]].hf_shape) * target.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    writer, many = jax.process_index() == 0, jax.process_count() > 1
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    failure: Exception | None = None

    def on_writer(write) -> None:
        """One of process 0's writes. With several processes, its error is kept until every tensor
        is gathered: the others gather each one with process 0 (a collective op), and would wait
        for it in the next gather forever."""
        nonlocal failure
        if writer and failure is None:
            try:
                write()
            except Exception as e:
                if not many:
                    raise
                failure = e

    def prepare() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").unlink(missing_ok=True)  # written last: until then, no whole export here
        # An earlier export's weights that this one does not overwrite: left there, a loader
        # could read them instead (both qed-jax and transformers read a single file over an index).
        for old in [folder / "model.safetensors", folder / "model.safetensors.index.json",
                    *folder.glob("model-*-of-*.safetensors")]:
            if old.name not in names:
                old.unlink(missing_ok=True)

    on_writer(prepare)
    progress = tqdm(total=len(plan), desc=f"writing {folder.name}", unit="tensor", disable=not writer)
    gathered = 0  # every process gathers each tensor of `plan`, in its order

    def produce(hf_name):
        nonlocal gathered
        hf, path, layer = plan[gathered]
        assert hf == hf_name, (hf, hf_name)
        gathered += 1
        value = params[path] if layer is None else params[path][layer]
        progress.update()
        return maps[path].to_hf(_gather(value).astype(target))

    end = 0
    for file_name, shard in zip(names, shards):
        end += len(shard)
        planned = [(hf, maps[path].hf_shape, target) for hf, path, _ in shard]
        on_writer(lambda: write_safetensors(folder / file_name, planned, produce))
        for hf, _, _ in plan[gathered:end]:  # the other processes' share, or what a failed write left
            produce(hf)
    progress.close()

    def finish() -> None:
        if len(shards) > 1:
            total = sum(math.prod(maps[p].hf_shape) * target.itemsize for _, p, _ in plan)
            index = {"metadata": {"total_size": total},
                     "weight_map": {hf: n for n, shard in zip(names, shards) for hf, _, _ in shard}}
            write_whole(folder / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
        copy_assets(assets_from, folder)
        if generation_from is not None and (epath.Path(generation_from) / "generation_config.json").exists():
            copy_assets(generation_from, folder, names=("generation_config.json",))
        if not (folder / "generation_config.json").exists():  # whole or absent: a cut write is redone
            write_text_atomic(folder / "generation_config.json", json.dumps(_generation_config(folder), indent=2))
        if stop_on_turn_end:
            _add_turn_end_ids(folder / "generation_config.json")
        # Last, so that a folder with a config.json is whole (a trainer's rerun takes it as its
        # finished export): a kill before this line leaves a folder that is redone. Whole or not at
        # all, so that a kill or a full disk while it is written leaves none rather than half of one.
        write_whole(folder / "config.json", json.dumps({**config.to_hf(torch_dtype=target.name),
                                                        **_special_ids(folder / "generation_config.json")},
                                                       indent=2).encode())

    on_writer(finish)
    # Every process ends as process 0's writes did: the others fail with it, not exit as if exported.
    if many and largest(int(failure is not None)) and failure is None:
        raise CheckpointError(f"{folder}: writing the Hugging Face export failed on process 0 (its log says why)")
    if failure is not None:
        raise failure
    return folder


def copy_assets(source, dest, names=ASSET_FILES) -> None:
    """The tokenizer and generation files (ASSET_FILES, or `names`) of the folder `source`, local
    or remote (gs://; None: nothing), copied into `dest`."""
    if source is None:
        return
    source, dest = epath.Path(source), epath.Path(dest)
    remote = "://" in str(source) or "://" in str(dest)  # resolve() is for local paths only
    if str(source) == str(dest) or (not remote and source.resolve() == dest.resolve()):
        return
    for name in names:
        if (source / name).exists():
            write_whole(dest / name, (source / name).read_bytes())


def write_whole(path: epath.Path, data: bytes) -> None:
    """`path` written whole or not at all, so that a full disk or a kill mid-write leaves no
    truncated file behind: a local file through a temporary file renamed over it, an object in a
    bucket (gs://) as one write, which a bucket makes whole anyway."""
    with named_on_failure(path):
        if "://" in str(path):
            path.write_bytes(data)
        else:
            write_bytes_atomic(Path(path), data)


def _turn_end_ids(folder: Path) -> list[int]:
    """The ids of the Qwen end-of-turn tokens the folder's tokenizer.json names."""
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        return []
    added = {t["content"]: t["id"] for t in json.loads(tok.read_text()).get("added_tokens", [])}
    return [added[t] for t in ("<|im_end|>", "<|endoftext|>") if t in added]


def _generation_config(folder: Path) -> dict:
    """Stop on the Qwen end-of-turn tokens when the tokenizer files name them."""
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=_turn_end_ids(folder) or None).to_diff_dict()


def _add_turn_end_ids(path: Path) -> None:
    """A copied generation config (e.g. a base model's, eos <|endoftext|> alone) made to stop on
    <|im_end|> too, as qed-jax's sampler does (`tokenizer.stop_ids`): a model trained on the chat
    template ends its turns there."""
    try:
        generation = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(generation, dict):
        return
    eos = generation.get("eos_token_id")
    eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    missing = [i for i in _turn_end_ids(path.parent) if i not in eos]
    if missing:
        generation["eos_token_id"] = eos + missing
        write_text_atomic(path, json.dumps(generation, indent=2))


def _special_ids(generation_config: Path) -> dict:
    """The bos and eos ids of an export's generation config, for its config.json too (readers of
    `config.eos_token_id` find none otherwise; the model's own config does not hold them)."""
    try:
        generation = json.loads(generation_config.read_text())
    except (OSError, ValueError):  # a source's file that is not JSON: its config.json goes without
        return {}
    if not isinstance(generation, dict):
        return {}
    return {key: generation[key] for key in ("bos_token_id", "eos_token_id") if generation.get(key) is not None}
