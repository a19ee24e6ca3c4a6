"""Training scopes (``--model.trainable``): which parameters train besides the head mask, and the record a
checkpoint keeps of them.

* ``all`` (default): every parameter, as loaded.
* ``attention``: the attention projections' weights and biases (q/k/v or the fused qkv, and the output projection
  with its bias, from ``HeadLayout.projection_parameter_names``). Everything else, including Qwen3/Gemma3's
  q_norm/k_norm, gets ``requires_grad=False``, so the optimizer keeps no state for it.
* ``lora``: LoRA adapters (``lora.py``, options ``--model.lora.*``); the whole base is frozen.
* a list of module-name patterns: the parameters any pattern matches train. A plain pattern matches whole dotted
  components of the parameter name (``mlp`` matches ``model.layers.0.mlp.up_proj.weight``; ``norm`` matches
  ``model.norm.weight`` but not ``input_layernorm``; ``layers.1`` matches all of layer 1); a pattern with ``*``,
  ``?`` or ``[`` is a glob over the whole parameter name (``model.layers.1*.mlp.*``). The word ``attention`` in the
  list stands for the attention scope. Every pattern must match something.

The head mask applies inside every scope: its slices of frozen parameters need nothing, the others are masked.

A checkpoint of a scope that freezes parameters, written by a strategy that holds whole tensors (one device, DDP),
leaves the frozen tensors out: they are the base model's and are read from ``pretrained`` again. The checkpoint
keeps a fingerprint of them (per tensor, 64 evenly spaced values) so that a base model that changed since training
is an error, not a silent mismatch.
"""

from __future__ import annotations

import hashlib
from fnmatch import fnmatchcase

import torch

from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout

ALL, ATTENTION, LORA = "all", "attention", "lora"
KEYWORDS = (ALL, ATTENTION, LORA)
_GLOB = set("*?[")
FINGERPRINT_SAMPLES = 64


def normalize(trainable) -> str | list[str]:
    """``all``, ``attention``, ``lora`` or a non-empty list of patterns (a single other string is one pattern)."""
    if isinstance(trainable, str):
        return trainable if trainable in KEYWORDS else [trainable]
    patterns = [str(p) for p in trainable]
    if not patterns:
        raise CastError("--model.trainable [] selects no parameter: nothing would train; give all, attention, lora or module-name patterns")
    for word in (ALL, LORA):
        if word in patterns:
            raise CastError(f"--model.trainable {word} stands alone: write --model.trainable {word}, not inside a list of patterns")
    return patterns


def describe(trainable) -> str:
    return trainable if isinstance(trainable, str) else "[" + ", ".join(trainable) + "]"


def pattern_matches(name: str, pattern: str) -> bool:
    if _GLOB & set(pattern):
        return fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}."


def attention_names(model: torch.nn.Module, layout: HeadLayout) -> set[str]:
    present = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n for n in layout.projection_parameter_names() if n in present}


def scope_names(model: torch.nn.Module, layout: HeadLayout, trainable: str | list[str]) -> set[str] | None:
    """Parameter names the scope trains (None: all of them). ``lora`` is not a scope over base parameters."""
    if trainable == ALL:
        return None
    if trainable == ATTENTION:
        return attention_names(model, layout)
    if trainable == LORA:
        return set()
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    chosen: set[str] = set()
    for pattern in trainable:
        matched = attention_names(model, layout) if pattern == ATTENTION else {n for n in names if pattern_matches(n, pattern)}
        if not matched:
            components = sorted({part for n in names for part in n.split(".") if not part.isdigit()})
            raise CastError(
                f"--model.trainable pattern {pattern!r} matches no parameter: use dotted module names such as "
                f"{', '.join(c for c in components if c not in ('weight', 'bias'))[:300]}, or a glob over parameter names "
                f"(e.g. '*.mlp.*')"
            )
        chosen |= matched
    return chosen


def apply(model: torch.nn.Module, layout: HeadLayout, trainable, lora=None, pretrained: str | None = None):
    """Freeze what the scope does not train; ``lora``: add the adapters (returns the peft model, whose
    ``.base_model.model`` is ``model`` changed in place). Returns ``(model or peft model, normalized trainable)``."""
    trainable = normalize(trainable)
    if trainable == LORA:
        from cast_lightning.lora import add_lora, lora_options

        return add_lora(model, layout, lora_options(lora), pretrained), trainable
    names = scope_names(model, layout, trainable)
    if names is not None:
        for name, parameter in model.named_parameters(remove_duplicate=False):
            parameter.requires_grad_(False)
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if name in names:
                parameter.requires_grad_(True)
    return model, trainable


def frozen_names(model: torch.nn.Module) -> list[str]:
    """Every name (tied duplicates included, as in ``state_dict``) of a parameter that does not train."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]


@torch.no_grad()
def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """name -> a short digest of the frozen parameter's shape and 64 evenly spaced values (quantised tensors are left
    out: a 4-bit base is merged into its full-precision weights later)."""
    from cast_lightning.lora import is_quantized

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad or is_quantized(p) or p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        # Integer spacing: float32 linspace rounds past the last element of a tensor over 2^24 values (embeddings).
        count = min(flat.numel(), FINGERPRINT_SAMPLES)
        index = ((torch.arange(count, dtype=torch.long) * (flat.numel() - 1)) // max(count - 1, 1)).to(flat.device)
        values = flat.index_select(0, index).to(torch.float64).cpu().numpy().tobytes()
        out[name] = hashlib.sha256(str(tuple(p.shape)).encode() + values).hexdigest()[:16]
    return out


def check_fingerprint(saved: dict[str, str] | None, own: dict[str, str], pretrained: str, where: str, fix: str) -> None:
    """The frozen tensors a checkpoint left out (``saved``: their fingerprint at training) must be the ones this
    model has (``own``: ``fingerprint`` of it)."""
    if not saved:
        return
    changed = [name for name, digest in saved.items() if own.get(name) != digest]
    if changed:
        raise CastError(
            f"{where} stores only the trained parameters; its frozen ones come from {pretrained}, but {len(changed)} of "
            f"them differ from the ones it was trained on (e.g. {changed[0]}): {fix}"
        )
