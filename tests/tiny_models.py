"""Tiny random-init Hugging Face causal LMs, one per architecture CAST supports.

Every model is built offline from a config with ``AutoModelForCausalLM.from_config``: 2 layers,
hidden size 32, vocabulary 128, eager attention, float32, in eval mode. Token ids: pad 0, bos 1,
eos 2 (all inside the vocabulary).

The configs are chosen so each architecture exercises its own head layout:

===========  ==========================================================================
llama        separate q/k/v/o, GQA (4 query heads, 2 KV heads)
mistral      separate q/k/v/o, GQA (4 / 2)
mixtral      separate q/k/v/o, GQA (4 / 2), a 2-expert top-1 MoE MLP (fused expert tensors)
qwen2        separate q/k/v/o with q/k/v biases, GQA (4 / 2)
qwen3        explicit head_dim 16 != hidden/H = 8, q_norm/k_norm, GQA (4 / 2)
gemma        explicit head_dim 16 != hidden/H = 8, GQA (4 / 2), (1 + w) RMSNorm
gemma2       explicit head_dim 16 != hidden/H = 8, GQA (4 / 2), logit soft-capping
gemma3_text  explicit head_dim 16, q_norm/k_norm, GQA (4 / 2), one sliding and one full attention layer
phi3         fused ``qkv_proj`` rows [q heads | k groups | v groups], GQA (4 / 2)
gpt2         Conv1D ``c_attn`` (weight is (in, out): heads are columns), 4 heads
gpt_neox     ``query_key_value`` rows interleaved per head [q_h | k_h | v_h], 4 heads
===========  ==========================================================================

HF's default initialisation (std 0.02, zero biases) makes attention heads nearly inert in a
model this small, so ``tiny_model`` uses ``initializer_range=0.2`` and then draws every bias
(normal, std 0.1) so that bias slices matter too. Norm weights keep their default (ones; zeros for
Gemma's (1 + w) norms).

Usage::

    from tests.tiny_models import ARCHITECTURES, tiny_model
    model = tiny_model("qwen3", seed=0)
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB_SIZE = 128
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
INITIALIZER_RANGE = 0.2
BIAS_STD = 0.1

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    pad_token_id=PAD_TOKEN_ID,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    initializer_range=INITIALIZER_RANGE,
    tie_word_embeddings=False,
)

# Llama-family keyword arguments: 2 layers, hidden 32, 4 query heads, 2 KV heads.
_LLAMA_LIKE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# model_type -> config keyword arguments (on top of _COMMON).
_CONFIGS: dict[str, dict] = {
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, sliding_window=None),
    "mixtral": dict(_LLAMA_LIKE, sliding_window=None, num_local_experts=2, num_experts_per_tok=1),
    "qwen2": dict(_LLAMA_LIKE),  # Qwen2 always has q/k/v biases
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "gemma": dict(_LLAMA_LIKE, head_dim=16),
    "gemma2": dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(_LLAMA_LIKE, original_max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64),
}

ARCHITECTURES: list[str] = list(_CONFIGS)
"""Every architecture ``tiny_model`` can build (HF ``model_type`` names)."""


def tiny_config(architecture: str):
    """The ``PretrainedConfig`` of the tiny model for ``architecture`` (eager attention)."""
    if architecture not in _CONFIGS:
        raise KeyError(f"no tiny config for {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    config = AutoConfig.for_model(architecture, **_COMMON, **_CONFIGS[architecture])
    config._attn_implementation = "eager"
    return config


def tiny_model(architecture: str, seed: int = 0) -> PreTrainedModel:
    """A random-init causal LM of ``architecture`` in float32 eval mode, deterministic in ``seed``."""
    config = tiny_config(architecture)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * BIAS_STD)
    return model.float().eval()
