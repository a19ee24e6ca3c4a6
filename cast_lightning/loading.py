"""Load a Hugging Face causal LM and its tokenizer by hub name or local directory, the one path for every model."""

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


def read_checkpoint(ckpt_path: str) -> dict:
    """A Lightning checkpoint loaded without executing code (``weights_only=True``)."""
    if not os.path.exists(ckpt_path):
        raise CastError(f"checkpoint {ckpt_path} does not exist: give the .ckpt written by cast fit")
    if os.path.isdir(ckpt_path):
        # Sharded (distributed checkpoint) directory: consolidate it in memory.
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(__import__("pathlib").Path(ckpt_path))
    else:
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CastError(f"cannot read checkpoint {ckpt_path} safely ({error.__class__.__name__}): give a checkpoint written by cast fit") from error
    if "state_dict" not in checkpoint or "pretrained" not in checkpoint.get("hyper_parameters", {}):
        raise CastError(f"{ckpt_path} is not a CASTModule checkpoint (no state_dict/hyper_parameters.pretrained)")
    return checkpoint


def load_checkpoint_model(ckpt_path: str):
    """(model, tokenizer, checkpoint) from a CASTModule checkpoint: the base model with the trained weights."""
    checkpoint = read_checkpoint(ckpt_path)
    hp = checkpoint["hyper_parameters"]
    model = load_causal_lm(hp["pretrained"], hp.get("dtype", "float32"), hp.get("attn_implementation"), hp.get("trust_remote_code", False))
    tokenizer = load_tokenizer(hp["pretrained"], hp.get("trust_remote_code", False))
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embed_tokens) may be stored once; anything else missing means another model.
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise CastError(
            f"checkpoint {ckpt_path} does not fit the model {hp['pretrained']} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors): pair it with the model it was trained from"
        )
    return model, tokenizer, checkpoint


def is_lightning_checkpoint(path: str) -> bool:
    return path.endswith(".ckpt") or (os.path.isdir(path) and os.path.exists(os.path.join(path, "meta.pt")))
