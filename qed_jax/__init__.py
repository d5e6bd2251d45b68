"""qed-jax: post-training small Qwen3 models to write olympiad proofs, in JAX.

The public names load on first use, so that `import qed_jax.cli` (and `qed-jax --help`) does not
pay for importing JAX, Orbax and transformers."""

import importlib

_EXPORTS = {
    "KVCache": "qed_jax.model",
    "ModelConfig": "qed_jax.config",
    "Qwen3": "qed_jax.model",
    "RCParams": "qed_jax.reasoning_cache",
    "SamplingParams": "qed_jax.sampling",
    "Summarizer": "qed_jax.reasoning_cache",
    "from_pretrained": "qed_jax.pretrained",
    "generate": "qed_jax.sampling",
    "load_tokenizer": "qed_jax.tokenizer",
    "preset": "qed_jax.config",
    "reasoning_cache": "qed_jax.reasoning_cache",
    "save_pretrained": "qed_jax.pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qed_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
