"""LoRA through peft, head-exact: the options, their checks, the adapters, the head mask's LoRA slices, merging and
adapter directories.

A LoRA layer computes ``W x + s * B (A x)`` with ``A`` (r x in), ``B`` (out x r) and ``s = alpha / r`` (``alpha /
sqrt(r)`` with rsLoRA); merged, its weight is ``W + s * B @ A`` (transposed for GPT-2's Conv1D, whose weight is (in,
out)). A head that owns **output** features of a layer (q rows; k/v rows of a frozen KV group; Phi-3's fused qkv
rows; GPT-2 ``c_attn`` columns; NeoX's interleaved rows) keeps its merged weight exactly when the matching **rows of
B** are zero: each merged row is ``W[i] + s * B[i] @ A``. A head that owns **input** features (o_proj columns; GPT-2
``c_proj`` rows) keeps it exactly when the matching **columns of A** are zero. ``mask_slices`` turns the head mask's
base slices into these LoRA slices; ``masking.HeadMask`` holds them at exactly zero (zeroed when the mask is built,
gradients zeroed before clipping, values restored to zero after every optimizer step, so AdamW weight decay and
clipping cannot move them). The base weights are frozen (``requires_grad=False``).

Refused, each with one line naming the fix: a target that matches no module or a module LoRA cannot adapt, a rank
larger than a targeted layer allows, and DoRA with skipped heads (its magnitude vector rescales each output row by
the norm of the whole row of ``W + s B A``; an o_proj row mixes every head's columns, so training the other heads
would move the skipped ones).

QLoRA (``load_in_4bit``) loads the frozen base in 4-bit NF4 through bitsandbytes (CUDA only,
``pip install 'cast-lightning[qlora]'``). The LoRA factors and their mask are the same. A QLoRA checkpoint is merged
into the full-precision base on export and eval (the usual QLoRA practice), where the skipped heads are the base's
bit for bit.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, fields

import torch

from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout, ParamSlice
from cast_lightning.masking import clean_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # peft's; CAST trains one adapter


@dataclass
class LoraOptions:
    """LoRA adapters through peft, used with ``--model.trainable lora``.

    Args:
        r: adapter rank, at most min(in, out) of every targeted layer.
        alpha: scale numerator: the update is (alpha / r) * B @ A, or (alpha / sqrt(r)) with use_rslora.
        dropout: dropout on the adapters' input during training (the merged weights do not depend on it).
        target_modules: module names, each matching a module whose name equals it or ends with "." + it (peft's
            rule); every name must match. Default: the attention projections (e.g. self_attn.q_proj, self_attn.k_proj,
            self_attn.v_proj, self_attn.o_proj). MLP modules may be added; no head owns them.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        use_dora: weight-decomposed LoRA (DoRA). Refused with skipped heads: it cannot keep a head exact.
        load_in_4bit: QLoRA: load the frozen base in 4-bit NF4 with double quantisation (bitsandbytes, CUDA only;
            pip install 'cast-lightning[qlora]'); the compute dtype is --model.dtype.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    load_in_4bit: bool = False


def lora_options(value) -> LoraOptions:
    """``LoraOptions`` from None (the defaults), a mapping (a checkpoint's hyper_parameters) or itself."""
    if value is None:
        return LoraOptions()
    if isinstance(value, LoraOptions):
        return value
    if hasattr(value, "__dict__") and not isinstance(value, dict):  # a jsonargparse Namespace
        value = vars(value)
    known = {f.name for f in fields(LoraOptions)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise CastError(f"unknown LoRA option(s) {', '.join(unknown)}: use {', '.join(sorted(known))}")
    return LoraOptions(**value)


def options_dict(options: LoraOptions) -> dict:
    """Plain data for hyper_parameters and checkpoints (read back with ``weights_only=True``)."""
    data = asdict(options)
    data["target_modules"] = None if options.target_modules is None else list(options.target_modules)
    return data


def target_modules(options: LoraOptions, layout: HeadLayout) -> list[str]:
    """The configured targets, or the architecture's attention projections."""
    return list(options.target_modules) if options.target_modules is not None else layout.projection_leaves()


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def _adaptable(module: torch.nn.Module) -> tuple[int, int] | None:
    """(out, in) of a layer LoRA can adapt (Linear, GPT-2 Conv1D, Embedding), None for any other module."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    if isinstance(module, torch.nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):  # bitsandbytes (QLoRA)
        return module.out_features, module.in_features
    return None


def check_options(model: torch.nn.Module, layout: HeadLayout, options: LoraOptions) -> list[str]:
    """Every refusal that does not need the skip list, before peft touches the model; returns the targets."""
    if options.r < 1:
        raise CastError(f"--model.lora.r {options.r} is not a rank: use a positive integer such as 8")
    if options.alpha <= 0:
        raise CastError(f"--model.lora.alpha {options.alpha} must be positive (e.g. 2 * r)")
    if not 0 <= options.dropout < 1:
        raise CastError(f"--model.lora.dropout {options.dropout} is outside [0, 1): use e.g. 0.05")
    targets = target_modules(options, layout)
    if not targets:
        raise CastError("--model.lora.target_modules is empty: name the modules to adapt or drop the option for the attention projections")
    modules = [(clean_name(n), m) for n, m in model.named_modules() if n]
    adaptable_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules if _adaptable(m) is not None})
    tightest: tuple[int, str, tuple[int, int]] | None = None  # (max rank, layer, (out, in)) over every target
    for target in targets:
        matched = [(n, m) for n, m in modules if _matches(n, target)]
        if not matched:
            raise CastError(
                f"LoRA target {target!r} matches no module of this {layout.architecture} model: name modules by their "
                f"name or dotted suffix, e.g. {', '.join(adaptable_leaves[:12])} (default: {', '.join(layout.projection_leaves())})"
            )
        for name, module in matched:
            shape = _adaptable(module)
            if shape is None:
                raise CastError(
                    f"LoRA target {target!r} matches {name}, a {type(module).__name__}: LoRA adapts Linear, Conv1D and "
                    f"Embedding layers; target those instead (e.g. {', '.join(adaptable_leaves[:8])})"
                )
            if tightest is None or min(shape) < tightest[0]:
                tightest = (min(shape), name, shape)
    limit, name, shape = tightest
    if options.r > limit:
        raise CastError(
            f"--model.lora.r {options.r} is larger than the rank of {name} ({shape[0]} x {shape[1]}, at most {limit}), "
            f"the smallest targeted layer: use --model.lora.r {limit} or less"
        )
    return targets


def check_exact(options: LoraOptions, skip_heads) -> None:
    """Refuse adapter variants that cannot keep a skipped head exact."""
    if options.use_dora and list(skip_heads):
        raise CastError(
            "DoRA cannot keep a skipped head exact: its magnitude vector rescales every output row of a targeted layer "
            "by the norm of the whole row, and an o_proj row mixes all heads' columns, so training the other heads moves "
            "the skipped ones; use plain LoRA (--model.lora.use_dora false) or skip no heads"
        )


def peft_config(options: LoraOptions, layout: HeadLayout, targets: list[str], base: str | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=targets,
        use_rslora=options.use_rslora, use_dora=options.use_dora, bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=layout.family == "gpt2", base_model_name_or_path=base,
    )


def add_lora(model: torch.nn.Module, layout: HeadLayout, options: LoraOptions, base: str | None = None):
    """The peft model (a ``PeftModelForCausalLM``) with LoRA adapters on the targets; the HF model inside it
    (``.base_model.model``, changed in place) keeps its class and names, its base weights frozen."""
    from peft import get_peft_model

    targets = check_options(model, layout, options)
    if options.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with warnings.catch_warnings():
        # peft switches fan_in_fan_out per layer type (GPT-2's Conv1D vs a Linear lm_head) and says so each time;
        # it also probes a transformers attribute that transformers has renamed.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, peft_config(options, layout, targets, base))


def is_lora_layer(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


def has_lora(model: torch.nn.Module) -> bool:
    return any(is_lora_layer(m) for m in model.modules())


def mask_slices(model: torch.nn.Module, slices: list[ParamSlice]) -> tuple[list[ParamSlice], list[ParamSlice]]:
    """The head mask's base slices on a model with LoRA adapters: (slices to keep at their values, named as the model
    names them; LoRA factor slices to hold at zero). Output-feature slices of an adapted layer become rows of B,
    input-feature slices columns of A (see the module docstring); a layer without adapters keeps its slices."""
    modules = {clean_name(n): m for n, m in model.named_modules()}
    held: list[ParamSlice] = []
    zero: list[ParamSlice] = []
    for s in slices:
        module_name, _, kind = s.name.rpartition(".")
        layer = modules.get(module_name)
        if not is_lora_layer(layer):
            held.append(s)
            continue
        held.append(ParamSlice(f"{module_name}.base_layer.{kind}", s.dim, s.start, s.stop))
        if kind != "weight":
            continue  # biases stay in the frozen base layer (peft bias="none")
        output_dim = 1 if getattr(layer, "fan_in_fan_out", False) else 0  # Conv1D weight is (in, out)
        for adapter in layer.lora_A:
            if s.dim == output_dim:
                zero.append(ParamSlice(f"{module_name}.lora_B.{adapter}.weight", 0, s.start, s.stop))
            else:
                zero.append(ParamSlice(f"{module_name}.lora_A.{adapter}.weight", 1, s.start, s.stop))
    return held, zero


def merge(peft_model) -> torch.nn.Module:
    """The plain HF model with the adapters merged into the base weights (``W + s * B @ A``)."""
    return peft_model.merge_and_unload()


# -- QLoRA ---------------------------------------------------------------------------------------------------------


def load_4bit(pretrained: str, dtype: str = "bfloat16", attn_implementation: str | None = None, trust_remote_code: bool = False):
    """The causal LM with its Linear layers in 4-bit NF4 (double quantisation, compute in ``dtype``) on this CUDA
    device."""
    if not torch.cuda.is_available():
        raise CastError("--model.lora.load_in_4bit (QLoRA) needs a CUDA GPU: drop it to train LoRA on a full-precision base")
    try:
        import bitsandbytes  # noqa: F401  (transformers imports it; fail here with the fix named)
    except ImportError as error:
        raise CastError("--model.lora.load_in_4bit (QLoRA) needs bitsandbytes: pip install 'cast-lightning[qlora]'") from error
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cast_lightning.loading import resolve_dtype

    compute = resolve_dtype(dtype)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute)
    kwargs = {"quantization_config": quantization, "dtype": compute, "trust_remote_code": trust_remote_code,
              "device_map": {"": torch.cuda.current_device()}}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    except OSError as error:
        raise CastError(f"cannot load {pretrained} in 4 bits: {str(error).splitlines()[0]}") from error


def logical_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the parameter, or a meta tensor of its unquantised shape for a 4-bit one (packed bytes otherwise)."""
    out = {}
    for name, p in model.named_parameters():
        state = getattr(p, "quant_state", None)
        out[name] = torch.empty(tuple(state.shape), device="meta") if state is not None else p
    return out


def is_quantized(param: torch.Tensor) -> bool:
    return getattr(param, "quant_state", None) is not None or not param.is_floating_point()


# -- adapter directories (cast export --adapter_only) ---------------------------------------------------------------


def is_adapter_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_adapter_directory(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(merged model, tokenizer, adapter config) of a peft adapter directory: its base model
    (``base_model_name_or_path``) with the adapter merged in. The tokenizer is the directory's when it has one."""
    from peft import PeftModel

    from cast_lightning.loading import load_causal_lm, load_tokenizer

    try:
        config = json.loads(open(os.path.join(path, ADAPTER_CONFIG)).read())
    except (OSError, ValueError) as error:
        raise CastError(f"cannot read {os.path.join(path, ADAPTER_CONFIG)} ({error.__class__.__name__}): give a directory written by cast export --adapter_only") from error
    base = config.get("base_model_name_or_path")
    if not base:
        raise CastError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path: the adapter cannot be applied to a base model")
    model = load_causal_lm(base, dtype, None, trust_remote_code)
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(path if has_tokenizer else base, trust_remote_code)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = PeftModel.from_pretrained(model, path)
    return merge(peft_model), tokenizer, config
