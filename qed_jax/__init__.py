"""qed-jax: post-training small Qwen3 models to write olympiad proofs, in JAX."""

from qed_jax.config import ModelConfig, preset
from qed_jax.model import KVCache, Qwen3
from qed_jax.pretrained import from_pretrained, save_pretrained
from qed_jax.sampling import SamplingParams, generate

__all__ = ["KVCache", "ModelConfig", "Qwen3", "from_pretrained", "SamplingParams", "generate", "preset", "save_pretrained"]
