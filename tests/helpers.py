"""Builders for offline test fixtures: tiny random transformers Qwen3 models."""

from pathlib import Path

import numpy as np

TINY_HF = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
    rope_theta=1e6, max_position_embeddings=512,
)


def make_hf_model(path: Path, seed: int = 0, dtype: str = "float32", **overrides):
    """Save a random Qwen3ForCausalLM (norm weights perturbed too) to `path`; returns the model."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kwargs = {**TINY_HF, **overrides}
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()
