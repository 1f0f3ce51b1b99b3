"""LLaMA models for the benchmark, built from ``transformers.LlamaConfig``.

The named sizes copy hidden size, intermediate (MLP) size, layer count and
head count from the GaLore / Subset-Norm-Subspace-Momentum ``configs/llama_*.json``
files; the vocabulary comes from our own tokenizer instead of their 32000-token
T5 vocabulary. Weights are randomly initialised (nothing is downloaded) and the
output head is untied from the embedding, as in those configs.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import BenchError


@dataclasses.dataclass(frozen=True)
class ModelSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int


MODEL_SIZES: dict[str, ModelSize] = {
    "llama_9m": ModelSize(128, 352, 4, 4),
    "llama_20m": ModelSize(256, 688, 4, 4),
    "llama_35m": ModelSize(384, 1024, 6, 8),
    "llama_60m": ModelSize(512, 1376, 8, 8),
    "llama_130m": ModelSize(768, 2048, 12, 12),
    "llama_350m": ModelSize(1024, 2736, 24, 16),
    "llama_1b": ModelSize(2048, 5461, 24, 32),
}


def model_size(name: str) -> ModelSize:
    try:
        return MODEL_SIZES[name]
    except KeyError:
        raise BenchError(f"unknown model size {name!r}; choose from {', '.join(MODEL_SIZES)}") from None


def build_model(name: str, vocab_size: int, max_len: int, seed: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the named size (deterministic in ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = model_size(name)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max(max_len, 1024),
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        hidden_act="silu",
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=vocab_size - 1 if vocab_size > 0 else None,
        pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, in ``nn.Linear`` weights (where SN/SM act), in embeddings."""
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return {"total": total, "linear": linear, "embedding": emb}


def lm_loss(model: nn.Module, block: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``block`` (batch, seq_len + 1)."""
    inputs, targets = block[:, :-1], block[:, 1:]
    logits = model(input_ids=inputs, use_cache=False).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
