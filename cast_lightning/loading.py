"""Load a Hugging Face causal LM and its tokenizer by hub name or local directory: the one path for every model.

Remote code stays off unless asked for; a model or tokenizer that cannot be found is one ``CastError`` naming what to
do. ``cast fit`` checkpoints are read by ``cast_lightning.checkpoints``.
"""

from __future__ import annotations

import os

import torch

from cast_lightning.errors import CastError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise CastError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(pretrained: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (the EOS token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise CastError(_not_found(pretrained, error)) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise CastError(f"the tokenizer of {pretrained} has no chat template: use an instruct/chat model's tokenizer")
    return tokenizer


def load_causal_lm(
    pretrained: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the project's defaults (remote code off)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    except OSError as error:
        raise CastError(_not_found(pretrained, error)) from error
    except ValueError as error:  # e.g. an unknown model_type or attention implementation
        raise CastError(f"cannot load {pretrained}: {str(error).splitlines()[0]}") from error


def _not_found(pretrained: str, error: Exception) -> str:
    if os.path.sep in pretrained or pretrained.startswith("."):
        return f"cannot load model/tokenizer from {pretrained}: give a directory written by save_pretrained ({error.__class__.__name__})"
    return (
        f"cannot load {pretrained!r} from the hub or its cache: download it first (HF_HUB_OFFLINE needs a cached copy) "
        f"or give a local directory"
    )


def load_model_and_tokenizer(
    pretrained: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) of a hub name or ``save_pretrained`` directory."""
    model = load_causal_lm(pretrained, dtype, attn_implementation, trust_remote_code)
    return model, load_tokenizer(pretrained, trust_remote_code)
