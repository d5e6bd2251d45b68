"""The flags the benchmarks share: the model's shape (defaults: a ~48M-parameter Qwen3, or a
preset's) and the host's memory settings."""

from qed_jax.config import PRESETS, ModelConfig

# The default benchmark model's shape, flag by flag.
SHAPE = {"vocab": 32000, "hidden": 512, "mlp": 1536, "layers": 10, "heads": 8, "kv_heads": 4, "head_dim": 64}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def add_model_args(parser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="a preset's shape (random weights) in place of the shape flags below")
    for name, default in SHAPE.items():
        parser.add_argument(_flag(name), type=int, help=f"default {default}")


def model_config(args, dtype: str = "float32") -> ModelConfig:
    """The benchmark's model, its weights and activations in `dtype`."""
    given = [_flag(name) for name in SHAPE if getattr(args, name) is not None]
    if args.preset:
        if given:
            raise SystemExit(f"error: --preset {args.preset} sets the model's shape; drop {', '.join(given)}")
        return PRESETS[args.preset].replace(param_dtype=dtype, dtype=dtype)
    shape = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in SHAPE.items()}
    return ModelConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
        num_layers=shape["layers"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=4096,
        param_dtype=dtype, dtype=dtype,
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
