"""The flags the benchmarks share: the model's shape (defaults: a ~48M-parameter Qwen3, or a
preset's) and the host's memory settings."""

from qed_jax.config import PRESETS, ModelConfig


def add_model_args(parser) -> None:
    parser.add_argument("--preset", choices=[name for name in PRESETS if name != "tiny"],
                        help="a real model's shape (random weights) in place of the shape flags below")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)


def model_config(args, dtype: str = "float32") -> ModelConfig:
    """The benchmark's model, its weights and activations in `dtype`."""
    if args.preset:
        return PRESETS[args.preset].replace(param_dtype=dtype, dtype=dtype)
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim, rope_theta=1e6,
        tie_word_embeddings=True, max_position_embeddings=4096, param_dtype=dtype, dtype=dtype,
    )


def add_host_args(parser) -> None:
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc and JAX's CPU dispatch as they are; by default a training benchmark "
                             "runs as `qed-jax sft` does, keeping freed memory for the next step (qed_jax/host.py)")


def apply_host_args(args) -> bool:
    """Before anything starts JAX's backend: the host memory settings `qed-jax sft` uses, unless
    --malloc-default. Returns whether malloc keeps freed memory (PyTorch, later in the same process,
    runs under the same settings)."""
    from qed_jax.host import keep_freed_memory

    return False if args.malloc_default else keep_freed_memory()
