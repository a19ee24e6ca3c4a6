"""Layer freezing (SPPFT-style, ``--model.skip_layers``) and locating the layers to freeze from a conflict map.

* ``parse_skip_layers``: ``[2, 3]``, ``"2-3"``, ``"1,3-4"``, ``["2-3", 5]`` -> sorted layer indices, each checked
  against the model's number of decoder layers.
* ``layer_parameter_names`` / ``freeze_layers``: every parameter under the decoder layer's module (attention, MLP,
  norms; LoRA factors inside it too) gets ``requires_grad=False``: no gradient, no optimizer state, no weight decay,
  so the layer is bit-identical by construction, like parameters outside the training scope (``scopes.py``).
* ``layer_gap`` / ``locate_layers``: the project's formulation of "Safety Layers in Aligned LLMs" (docs/formulas.md,
  "Layer freezing"): per layer, the cosine gap between benign and harmful prompts' last-prompt-token hidden states,
  and the located contiguous range. ``cast diagnose --model.scorers '[layer_gap]'`` records both in the map's
  ``data["layer_gap"]``; ``--model.skip_layers from_map`` reads the range back (``located_layers``).
"""

from __future__ import annotations

import re

import torch

from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout

FROM_MAP = "from_map"
LAYER_GAP_KEY = "layer_gap"
_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


def layer_prefix(layout: HeadLayout, layer: int) -> str:
    """The decoder layer's module name with a trailing dot (``model.layers.3.``, ``transformer.h.3.``)."""
    return layout.attention_prefix(layer).rsplit(".", 1)[0] + "."


def _check(layer: int, layout: HeadLayout, given) -> int:
    if not 0 <= layer < layout.num_layers:
        raise CastError(
            f"--model.skip_layers {given!r}: layer {layer} is out of range; this {layout.architecture} model has "
            f"layers 0-{layout.num_layers - 1} (give indices or a range such as \"0-{min(1, layout.num_layers - 1)}\")"
        )
    return layer


def parse_skip_layers(spec, layout: HeadLayout) -> list[int]:
    """Layer indices from a list of ints and/or range strings, or one string of comma-separated ranges."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else [spec]
    layers: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise CastError(f"--model.skip_layers {spec!r}: {item!r} is not a layer index: give e.g. [2, 3] or \"2-3\"")
        if isinstance(item, int):
            layers.add(_check(item, layout, spec))
            continue
        match = _RANGE.match(str(item))
        if match is None:
            raise CastError(f"--model.skip_layers {spec!r}: {item!r} is not a layer index or range: give e.g. [2, 3] or \"2-3\"")
        start = _check(int(match.group(1)), layout, spec)
        stop = _check(int(match.group(2)), layout, spec) if match.group(2) is not None else start
        if stop < start:
            raise CastError(f"--model.skip_layers {spec!r}: the range {item!r} runs backwards: write \"{stop}-{start}\"")
        layers.update(range(start, stop + 1))
    return sorted(layers)


def located_layers(data: dict, source: str, layout: HeadLayout) -> list[int]:
    """The layer range a map's ``data["layer_gap"]`` located (``cast diagnose --model.scorers '[layer_gap]'``)."""
    record = (data or {}).get(LAYER_GAP_KEY)
    if not isinstance(record, dict) or "located" not in record:
        raise CastError(
            f"--model.skip_layers from_map: {source} has no located layers: run cast diagnose with "
            f"--model.scorers '[layer_gap]' to locate them, or give the layers, e.g. --model.skip_layers \"2-3\""
        )
    located = [int(layer) for layer in record["located"]]
    if not located:
        raise CastError(
            f"--model.skip_layers from_map: {source} located no layer (its cosine gap is never positive): give the "
            f"layers, e.g. --model.skip_layers \"2-3\", or diagnose with other data"
        )
    return parse_skip_layers(located, layout)


def layer_parameter_names(model: torch.nn.Module, layout: HeadLayout, layers: list[int]) -> list[str]:
    """Every parameter name (tied duplicates included) inside the given decoder layers."""
    prefixes = tuple(layer_prefix(layout, layer) for layer in layers)
    if not prefixes:
        return []
    return [n for n, _ in model.named_parameters(remove_duplicate=False) if n.startswith(prefixes)]


def freeze_layers(model: torch.nn.Module, layout: HeadLayout, layers: list[int]) -> list[str]:
    """``requires_grad=False`` on every parameter of ``layers``; returns their names."""
    names = layer_parameter_names(model, layout, layers)
    if layers and not names:
        raise CastError(f"no parameter found under {layer_prefix(layout, layers[0])}: the {layout.architecture} "
                        f"layout does not match this model's module names")
    wanted = set(names)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in wanted:
            parameter.requires_grad_(False)
    return names


# -- locating the layers ---------------------------------------------------------------------------------------------


def layer_gap(benign_sum: torch.Tensor, benign_count: int, harmful_sum: torch.Tensor, harmful_count: int) -> dict:
    """Per layer, from the sums of *unit* last-prompt-token hidden states (``(L, hidden)``) of each set:

        benign_cos_l = mean over i != j of cos(b_i, b_j) = (||sum_i b_i||^2 - N_b) / (N_b (N_b - 1))
        cross_cos_l  = mean over i, j of cos(b_i, h_j)   = <sum_i b_i, sum_j h_j> / (N_b N_h)
        gap_l        = benign_cos_l - cross_cos_l

    (the sums are additive, so they reduce across processes like every other diagnosis accumulator)."""
    if benign_count < 2 or harmful_count < 1:
        raise CastError(f"the layer gap needs at least 2 utility (benign) and 1 safety (harmful) prompts, got "
                        f"{benign_count} and {harmful_count}: give more --data.utility_files / --data.safety_files rows")
    b, h = benign_sum.double(), harmful_sum.double()
    benign_cos = ((b * b).sum(-1) - benign_count) / (benign_count * (benign_count - 1))
    cross_cos = (b * h).sum(-1) / (benign_count * harmful_count)
    return {"benign_cos": benign_cos.tolist(), "cross_cos": cross_cos.tolist(), "gap": (benign_cos - cross_cos).tolist()}


def locate_layers(gap: list[float], fraction: float = 0.5) -> list[int]:
    """The located range (docs/formulas.md): M = max gap (none located when M <= 0); start = the first layer with
    gap >= fraction * M; l_inc = the layer l >= 1 with the largest increase gap_l - gap_{l-1} (the first on ties; 0 for
    a one-layer model); the range is start .. max(start, l_inc)."""
    if not 0.0 < fraction <= 1.0:
        raise CastError(f"layer_gap_fraction {fraction} must be in (0, 1]: the share of the largest gap a layer must reach")
    if not gap:
        return []
    top = max(gap)
    if not top > 0:
        return []
    start = next(layer for layer, value in enumerate(gap) if value >= fraction * top)
    increases = [gap[layer] - gap[layer - 1] for layer in range(1, len(gap))]
    l_inc = 1 + max(range(len(increases)), key=lambda i: (increases[i], -i)) if increases else 0
    return list(range(start, max(start, l_inc) + 1))
