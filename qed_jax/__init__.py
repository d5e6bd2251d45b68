"""qed-jax: post-training small Qwen3 models to write olympiad proofs, in JAX."""

from qed_jax.config import ModelConfig, preset
from qed_jax.model import KVCache, Qwen3
from qed_jax.pretrained import from_pretrained, save_pretrained

__all__ = ["KVCache", "ModelConfig", "Qwen3", "from_pretrained", "preset", "save_pretrained"]
