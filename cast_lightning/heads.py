"""HeadLayout: which slices of which parameters belong to attention head (layer, head).

Every slice is a contiguous range ``[start, stop)`` along one dimension of one parameter, named as in
``model.named_parameters()`` of the Hugging Face causal LM. Three families of layout are supported:

* separate projections (Llama, Mistral, Qwen2/3, Gemma 1-3, ...): q/k/v rows, o_proj columns;
* fused ``qkv_proj`` rows (Phi-3): [q heads | k groups | v groups];
* GPT-2 ``c_attn`` Conv1D (weight is (in, out), so heads are *columns*) and ``c_proj`` rows;
* GPT-NeoX ``query_key_value`` rows interleaved per head: [q_h | k_h | v_h] for h = 0..H-1.

Shared per-layer parameters (o_proj bias, Qwen3/Gemma3 q_norm/k_norm over head_dim) belong to no
single head and are never frozen by a head mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cast_lightning.errors import CastError


@dataclass(frozen=True)
class ParamSlice:
    """Rows (``dim=0``) or columns (``dim=1``) ``[start, stop)`` of the parameter ``name``."""

    name: str
    dim: int
    start: int
    stop: int


# model_type -> (layer prefix, attention family). The layer prefix is formatted with the layer index.
_SEPARATE = "separate"  # q_proj/k_proj/v_proj/o_proj
_FUSED_QKV = "fused_qkv"  # Phi-3 qkv_proj + o_proj
_GPT2 = "gpt2"  # Conv1D c_attn + c_proj
_NEOX = "neox"  # interleaved query_key_value + dense

_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("model.layers.{}.self_attn", _SEPARATE),
    "mistral": ("model.layers.{}.self_attn", _SEPARATE),
    "mixtral": ("model.layers.{}.self_attn", _SEPARATE),
    "qwen2": ("model.layers.{}.self_attn", _SEPARATE),
    "qwen3": ("model.layers.{}.self_attn", _SEPARATE),
    "gemma": ("model.layers.{}.self_attn", _SEPARATE),
    "gemma2": ("model.layers.{}.self_attn", _SEPARATE),
    "gemma3_text": ("model.layers.{}.self_attn", _SEPARATE),
    "phi3": ("model.layers.{}.self_attn", _FUSED_QKV),
    "gpt2": ("transformer.h.{}.attn", _GPT2),
    "gpt_neox": ("gpt_neox.layers.{}.attention", _NEOX),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_ARCHITECTURES))

KV_POLICIES = ("all", "any", "never")


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


@dataclass(frozen=True)
class HeadLayout:
    """The attention-head geometry of a model and the parameter slices of each head."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config) -> HeadLayout:
        """Build the layout from a transformers ``PretrainedConfig``."""
        architecture = getattr(config, "model_type", None)
        if architecture not in _ARCHITECTURES:
            raise CastError(
                f"unsupported architecture {architecture!r}: CAST knows the head layout of "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}; use one of these or add it to cast_lightning/heads.py"
            )
        num_layers = _config_int(config, "num_hidden_layers", "n_layer")
        num_heads = _config_int(config, "num_attention_heads", "n_head")
        hidden_size = _config_int(config, "hidden_size", "n_embd")
        num_kv_heads = _config_int(config, "num_key_value_heads") or num_heads
        if _ARCHITECTURES[architecture][1] in (_GPT2, _NEOX):
            num_kv_heads = num_heads  # no GQA in these layouts
        # head_dim from the config where set (Gemma, Qwen3 differ from hidden/H).
        head_dim = _config_int(config, "head_dim") or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise CastError(f"config has {num_heads} query heads not divisible by {num_kv_heads} KV heads")
        return cls(architecture, num_layers, num_heads, num_kv_heads, head_dim, hidden_size)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> HeadLayout:
        """Build the layout of a loaded HF causal LM and check it against the model's parameters."""
        layout = cls.from_config(model.config)
        layout.check_parameters(dict(model.named_parameters()))
        return layout

    # -- geometry -------------------------------------------------------------------------------------------------

    @property
    def num_query_heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def family(self) -> str:
        return _ARCHITECTURES[self.architecture][1]

    def kv_group(self, head: int) -> int:
        """The KV group that query head ``head`` reads keys and values from."""
        return head // self.num_query_heads_per_group

    def group_heads(self, group: int) -> range:
        """The query heads that share KV group ``group``."""
        n = self.num_query_heads_per_group
        return range(group * n, (group + 1) * n)

    def check_head(self, layer: int, head: int) -> None:
        if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
            raise CastError(
                f"head [{layer}, {head}] is out of range for this model ({self.num_layers} layers x "
                f"{self.num_heads} heads): use layer in 0..{self.num_layers - 1} and head in 0..{self.num_heads - 1}"
            )

    def check_group(self, layer: int, group: int) -> None:
        if not (0 <= layer < self.num_layers and 0 <= group < self.num_kv_heads):
            raise CastError(
                f"KV group [{layer}, {group}] is out of range for this model ({self.num_layers} layers x "
                f"{self.num_kv_heads} KV groups): use layer in 0..{self.num_layers - 1} and group in "
                f"0..{self.num_kv_heads - 1}"
            )

    def shape_dict(self) -> dict:
        """The identity a conflict map must match: architecture and head geometry."""
        return {
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }

    # -- module names ---------------------------------------------------------------------------------------------

    def attention_prefix(self, layer: int) -> str:
        return _ARCHITECTURES[self.architecture][0].format(layer)

    def output_proj_name(self, layer: int) -> str:
        """The module whose input is the concatenated head outputs (head h at ``[h*d, (h+1)*d)``)."""
        leaf = {_SEPARATE: "o_proj", _FUSED_QKV: "o_proj", _GPT2: "c_proj", _NEOX: "dense"}[self.family]
        return f"{self.attention_prefix(layer)}.{leaf}"

    def _qkv_names(self, layer: int) -> dict[str, str]:
        p = self.attention_prefix(layer)
        if self.family == _SEPARATE:
            return {"q": f"{p}.q_proj", "k": f"{p}.k_proj", "v": f"{p}.v_proj"}
        fused = {_FUSED_QKV: "qkv_proj", _GPT2: "c_attn", _NEOX: "query_key_value"}[self.family]
        return {"q": f"{p}.{fused}", "k": f"{p}.{fused}", "v": f"{p}.{fused}"}

    # -- slices ---------------------------------------------------------------------------------------------------

    def _projection_slices(self, layer: int, role: str, index: int) -> list[ParamSlice]:
        """Output-feature range of head (role q) or KV group (roles k, v) in the input projection(s)."""
        d, H, G = self.head_dim, self.num_heads, self.num_kv_heads
        module = self._qkv_names(layer)[role]
        if self.family == _SEPARATE:
            start = index * d
        elif self.family == _FUSED_QKV:
            start = {"q": 0, "k": H * d, "v": H * d + G * d}[role] + index * d
        elif self.family == _GPT2:
            start = {"q": 0, "k": H * d, "v": 2 * H * d}[role] + index * d
        else:  # NeoX: per head [q | k | v], each d wide
            start = index * 3 * d + {"q": 0, "k": d, "v": 2 * d}[role]
        weight_dim = 1 if self.family == _GPT2 else 0  # Conv1D stores (in, out)
        return [
            ParamSlice(f"{module}.weight", weight_dim, start, start + d),
            ParamSlice(f"{module}.bias", 0, start, start + d),
        ]

    def query_slices(self, layer: int, head: int) -> list[ParamSlice]:
        """Head ``head``'s rows of the query projection (weight and bias where present)."""
        self.check_head(layer, head)
        return self._projection_slices(layer, "q", head)

    def kv_slices(self, layer: int, group: int) -> list[ParamSlice]:
        """KV group ``group``'s rows of the key and value projections."""
        self.check_group(layer, group)
        return self._projection_slices(layer, "k", group) + self._projection_slices(layer, "v", group)

    def value_slices(self, layer: int, group: int) -> list[ParamSlice]:
        """KV group ``group``'s rows of the value projection only."""
        self.check_group(layer, group)
        return self._projection_slices(layer, "v", group)

    def output_slices(self, layer: int, head: int) -> list[ParamSlice]:
        """Head ``head``'s input features of the output projection (o_proj columns, GPT-2 c_proj rows)."""
        self.check_head(layer, head)
        d = self.head_dim
        dim = 0 if self.family == _GPT2 else 1
        return [ParamSlice(f"{self.output_proj_name(layer)}.weight", dim, head * d, (head + 1) * d)]

    def projection_module_names(self, layer: int) -> list[str]:
        """The attention projection modules of ``layer``: q/k/v (or the fused one), then the output projection."""
        return [*dict.fromkeys(self._qkv_names(layer).values()), self.output_proj_name(layer)]

    def projection_leaves(self) -> list[str]:
        """The projection module names relative to a decoder layer, e.g. ``self_attn.q_proj`` or ``attn.c_attn``:
        as LoRA target names they match the attention projections of every layer and nothing else (GPT-2's MLP has
        a ``c_proj`` too, so a bare ``c_proj`` would not do)."""
        layer_prefix = _ARCHITECTURES[self.architecture][0].split("{}", 1)[0] + "0."
        return [name.removeprefix(layer_prefix) for name in self.projection_module_names(0)]

    def projection_parameter_names(self) -> list[str]:
        """Every weight and bias of every attention projection, the output projection's bias included (which no
        head owns): the ``attention`` training scope. May name biases the model does not have."""
        return [f"{module}.{kind}" for layer in range(self.num_layers) for module in self.projection_module_names(layer)
                for kind in ("weight", "bias")]

    def attention_parameter_names(self) -> list[str]:
        """Every parameter name that holds head slices (biases included; may name absent biases)."""
        names = []
        for layer in range(self.num_layers):
            for module in dict.fromkeys(self._qkv_names(layer).values()):
                names += [f"{module}.weight", f"{module}.bias"]
            names.append(f"{self.output_proj_name(layer)}.weight")
        return names

    def frozen_slices(self, skip: list[tuple[int, int]] | set, kv_policy: str = "all") -> list[ParamSlice]:
        """All slices to freeze for the skipped heads.

        q rows and o columns are per head. A KV group's k/v rows are shared by its query heads, so
        ``kv_policy`` decides: ``all`` (default) freezes them only when every query head of the group
        is skipped, ``any`` when at least one is, ``never`` leaves them trainable.
        """
        if kv_policy not in KV_POLICIES:
            raise CastError(f"unknown kv_policy {kv_policy!r}: use one of {', '.join(KV_POLICIES)}")
        skip = {(int(layer), int(head)) for layer, head in skip}
        slices = []
        for layer, head in sorted(skip):
            slices += self.query_slices(layer, head) + self.output_slices(layer, head)
        groups = sorted({(layer, self.kv_group(head)) for layer, head in skip})
        for layer, group in groups:
            skipped = [(layer, h) in skip for h in self.group_heads(group)]
            if (kv_policy == "all" and all(skipped)) or (kv_policy == "any" and any(skipped)):
                slices += self.kv_slices(layer, group)
        return slices

    def check_parameters(self, parameters: dict[str, torch.Tensor]) -> None:
        """Fail clearly when the model's parameters do not have the shapes this layout expects.

        The head slices of a layer must tile each sliced dimension exactly: a parameter that is
        larger than the slices (e.g. a config whose head_dim is smaller than the weights') is as
        wrong as one that is too small, since every head would then map to the wrong features.
        """
        for layer in range(self.num_layers):
            slices = [s for h in range(self.num_heads) for s in self.query_slices(layer, h)]
            slices += [s for h in range(self.num_heads) for s in self.output_slices(layer, h)]
            slices += [s for g in range(self.num_kv_heads) for s in self.kv_slices(layer, g)]
            extent: dict[tuple[str, int], int] = {}
            for s in slices:
                extent[s.name, s.dim] = extent.get((s.name, s.dim), 0) + (s.stop - s.start)
            for (name, dim), expected in extent.items():
                p = parameters.get(name)
                if p is None:
                    if name.endswith(".bias"):
                        continue
                    raise CastError(f"model has no parameter {name}: its layout is not the {self.architecture} layout")
                if p.dim() <= dim or p.shape[dim] != expected:
                    raise CastError(
                        f"parameter {name} has shape {tuple(p.shape)} but {self.architecture} with {self.num_heads} "
                        f"heads, {self.num_kv_heads} KV heads and head_dim {self.head_dim} needs size {expected} "
                        f"along dim {dim}: the config does not match the weights"
                    )
