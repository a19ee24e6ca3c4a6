"""HeadLayout: the (layer, head) -> parameter-slice maps are proven against real HF models.

Every architecture in ``tests.tiny_models`` is checked by behaviour, not by restating the index
arithmetic: zeroing a head's o-slice must equal a hook that zeroes the head's output before the
output projection; zeroing a KV group's value rows must equal silencing all of the group's query
heads; and a loss that reads only head h's output must have q/k/v gradients only inside head h's
query slices and its KV group's slices.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from transformers import BertConfig, PretrainedConfig

from cast_lightning.errors import CastError
from cast_lightning.heads import SUPPORTED_ARCHITECTURES, HeadLayout, ParamSlice
from tests.tiny_models import ARCHITECTURES, tiny_config, tiny_model

# (num_heads, num_kv_heads, head_dim) each tiny model must report.
EXPECTED_GEOMETRY = {
    "llama": (4, 2, 8),
    "mistral": (4, 2, 8),
    "mixtral": (4, 2, 8),
    "qwen2": (4, 2, 8),
    "qwen3": (4, 2, 16),
    "gemma": (4, 2, 16),
    "gemma2": (4, 2, 16),
    "gemma3_text": (4, 2, 16),
    "phi3": (4, 2, 8),
    "gpt2": (4, 4, 8),
    "gpt_neox": (4, 4, 8),
}

# The output projection of layer {} as the transformers modeling files name it.
PUBLISHED_OUTPUT_PROJ = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"),
                    "model.layers.{}.self_attn.o_proj"),
    "gpt2": "transformer.h.{}.attn.c_proj",
    "gpt_neox": "gpt_neox.layers.{}.attention.dense",
}


@functools.lru_cache(maxsize=None)
def _cached_model(architecture: str):
    return tiny_model(architecture, seed=0)


def fresh_model(architecture: str):
    """An independent copy of the tiny model (tests mutate weights and gradients)."""
    return copy.deepcopy(_cached_model(architecture))


INPUT_IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(123))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def zero_slices(model, slices: list[ParamSlice]) -> int:
    """Zero every slice in place; returns how many existed (absent biases are skipped)."""
    params = dict(model.named_parameters())
    found = 0
    with torch.no_grad():
        for s in slices:
            if s.name not in params:
                assert s.name.endswith(".bias"), f"slice names a missing parameter {s.name}"
                continue
            params[s.name].narrow(s.dim, s.start, s.stop - s.start).zero_()
            found += 1
    return found


def logits_with_heads_silenced(model, layout: HeadLayout, layer: int, heads) -> torch.Tensor:
    """Logits with a pre-hook zeroing features [h*d, (h+1)*d) of the output projection's input."""
    d = layout.head_dim

    def hook(module, args):
        x = args[0].clone()
        for h in heads:
            x[..., h * d : (h + 1) * d] = 0
        return (x, *args[1:])

    handle = model.get_submodule(layout.output_proj_name(layer)).register_forward_pre_hook(hook)
    try:
        return logits(model)
    finally:
        handle.remove()


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- geometry ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_layout_geometry_and_names(architecture):
    model = _cached_model(architecture)
    layout = HeadLayout.from_model(model)
    assert layout.architecture == architecture
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim) == EXPECTED_GEOMETRY[architecture]
    assert layout.num_layers == 2 and layout.hidden_size == 32
    assert layout == HeadLayout.from_config(model.config)
    assert layout.shape_dict() == {
        "architecture": architecture,
        "num_layers": 2,
        "num_heads": layout.num_heads,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
    }
    params = dict(model.named_parameters())
    names = layout.attention_parameter_names()
    assert names and len(names) == len(set(names))
    for name in names:
        assert name in params or name.endswith(".bias"), name
    # The output projection is the published module (the transformers modeling file's name) whose input is the
    # concatenation of the H heads' d features.
    for layer in range(layout.num_layers):
        name = layout.output_proj_name(layer)
        assert name == PUBLISHED_OUTPUT_PROJ[architecture].format(layer)
        weight = params[f"{name}.weight"]
        inputs = weight.shape[0] if architecture == "gpt2" else weight.shape[1]  # Conv1D stores (in, out)
        assert inputs == layout.num_heads * layout.head_dim, (name, tuple(weight.shape))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_slices_tile_each_parameter_exactly_once(architecture):
    """Across all heads and groups, q/k/v and o slices cover every sliced feature exactly once."""
    model = _cached_model(architecture)
    layout = HeadLayout.from_model(model)
    params = dict(model.named_parameters())
    for layer in range(layout.num_layers):
        slices = [s for h in range(layout.num_heads) for s in layout.query_slices(layer, h)]
        slices += [s for g in range(layout.num_kv_heads) for s in layout.kv_slices(layer, g)]
        slices += [s for h in range(layout.num_heads) for s in layout.output_slices(layer, h)]
        cover = {}
        for s in slices:
            if s.name not in params:
                continue
            count = cover.setdefault((s.name, s.dim), torch.zeros(params[s.name].shape[s.dim], dtype=torch.int))
            count[s.start : s.stop] += 1
        assert cover, "no slice names an existing parameter"
        for (name, dim), count in cover.items():
            assert torch.all(count == 1), f"{name} dim {dim} coverage {count.tolist()}"


def test_kv_group_mapping_for_gqa():
    layout = HeadLayout.from_config(tiny_config("llama"))  # 4 query heads, 2 KV heads
    assert [layout.kv_group(h) for h in range(4)] == [0, 0, 1, 1]
    assert list(layout.group_heads(0)) == [0, 1] and list(layout.group_heads(1)) == [2, 3]
    mha = HeadLayout.from_config(tiny_config("gpt2"))
    assert [mha.kv_group(h) for h in range(4)] == [0, 1, 2, 3]


# -- 1. zeroing a head's o-slice == zeroing its output before the output projection ----------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_output_slices_equal_output_hook(architecture):
    model = _cached_model(architecture)
    layout = HeadLayout.from_model(model)
    base = logits(model)
    H = layout.num_heads
    for layer, head in [(0, 0), (0, H - 1), (1, 1), (1, 2)]:
        hooked = logits_with_heads_silenced(model, layout, layer, [head])
        assert (hooked - base).abs().max() > 1e-3, f"head ({layer}, {head}) has no effect: the test is vacuous"
        ablated = fresh_model(architecture)
        assert zero_slices(ablated, layout.output_slices(layer, head)) == 1
        assert_close(logits(ablated), hooked)


# -- 2. zeroing a KV group's value rows == silencing all of the group's query heads ----------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_value_slices_equal_silencing_group_heads(architecture):
    model = _cached_model(architecture)
    layout = HeadLayout.from_model(model)
    base = logits(model)
    has_bias = f"{layout._qkv_names(0)['v']}.bias" in dict(model.named_parameters())
    for layer in range(layout.num_layers):
        for group in range(layout.num_kv_heads):
            hooked = logits_with_heads_silenced(model, layout, layer, layout.group_heads(group))
            assert (hooked - base).abs().max() > 1e-3
            ablated = fresh_model(architecture)
            assert zero_slices(ablated, layout.value_slices(layer, group)) == (2 if has_bias else 1)
            assert_close(logits(ablated), hooked)


# -- 3. gradient locality: head h's output depends only on its q slice and its KV group's k/v slices -----------------


def _mask_of(param: torch.Tensor, slices: list[ParamSlice]) -> torch.Tensor:
    mask = torch.zeros_like(param, dtype=torch.bool)
    for s in slices:
        mask.narrow(s.dim, s.start, s.stop - s.start).fill_(True)
    return mask


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_qkv_gradient_is_local_to_head_and_group(architecture):
    model = fresh_model(architecture)
    layout = HeadLayout.from_model(model)
    params = dict(model.named_parameters())
    d = layout.head_dim
    for layer in range(layout.num_layers):
        qkv_params = {
            name: params[name]
            for module in dict.fromkeys(layout._qkv_names(layer).values())
            for name in (f"{module}.weight", f"{module}.bias")
            if name in params
        }
        for head in range(layout.num_heads):
            captured = []
            handle = model.get_submodule(layout.output_proj_name(layer)).register_forward_pre_hook(
                lambda module, args: captured.append(args[0])
            )
            try:
                model.zero_grad(set_to_none=True)
                model(input_ids=INPUT_IDS)
            finally:
                handle.remove()
            captured[0][..., head * d : (head + 1) * d].sum().backward()

            group = layout.kv_group(head)
            q, kv = layout.query_slices(layer, head), layout.kv_slices(layer, group)
            k, v = kv[:2], kv[2:]
            for name, param in qkv_params.items():
                own = [s for s in q + kv if s.name == name]
                assert own, f"{name} holds none of head {head}'s slices"
                outside = param.grad[~_mask_of(param, own)]
                assert torch.count_nonzero(outside) == 0, (
                    f"{architecture} layer {layer} head {head}: {name} has gradient outside the head's "
                    f"q slice and KV group {group}'s k/v slices"
                )
            # ...and the gradient really flows through each of the head's own slices. (The key bias is
            # exempt: softmax is invariant to it, so its true gradient is zero.)
            for s in q + k[:1] + v:
                if s.name in params:
                    region = params[s.name].grad.narrow(s.dim, s.start, s.stop - s.start)
                    assert region.abs().sum() > 0, f"{architecture} ({layer}, {head}): no gradient in {s}"


def _features(slices: list[ParamSlice], module: str, width: int) -> torch.Tensor:
    """Output features of ``module`` (a q/k/v projection) covered by the slices of its weight."""
    mask = torch.zeros(width, dtype=torch.bool)
    for s in slices:
        if s.name == f"{module}.weight":
            mask[s.start : s.stop] = True
    return mask


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_q_k_v_roles_follow_causal_structure(architecture):
    """Tell q, k and v apart by *which positions* of the projection output head h's output depends on.

    Zeroing cannot separate q from k (scores are symmetric in them), so use causality instead:
    the output at position 0 attends only to itself with weight 1, so it depends on v_0 and on no
    q or k feature; the output at the last position depends on q only there, but on k and v at every
    earlier position too. The slices must name exactly these features.
    """
    model = fresh_model(architecture)
    layout = HeadLayout.from_model(model)
    d, T = layout.head_dim, INPUT_IDS.shape[1]
    layer = 1
    modules = list(dict.fromkeys(layout._qkv_names(layer).values()))
    for head in range(layout.num_heads):
        q = layout.query_slices(layer, head)
        k, v = layout.kv_slices(layer, layout.kv_group(head))[:2], layout.value_slices(layer, layout.kv_group(head))
        for position in (0, T - 1):
            outputs, attn_in = {}, []

            def keep(name):
                def hook(module, args, output):
                    output.retain_grad()
                    outputs[name] = output

                return hook

            handles = [model.get_submodule(m).register_forward_hook(keep(m)) for m in modules]
            handles.append(
                model.get_submodule(layout.output_proj_name(layer)).register_forward_pre_hook(
                    lambda module, args: attn_in.append(args[0])
                )
            )
            try:
                model(input_ids=INPUT_IDS)
            finally:
                for handle in handles:
                    handle.remove()
            attn_in[0][:, position, head * d : (head + 1) * d].sum().backward()

            for module in modules:
                grad = outputs[module].grad.abs().sum(0)  # (T, features)
                width = grad.shape[1]
                q_f, k_f, v_f = (_features(s, module, width) for s in (q, k, v))
                if position == 0:
                    assert torch.equal(grad.sum(0) != 0, v_f), f"{architecture} head {head}: v features of {module}"
                else:
                    earlier, last = grad[: T - 1].sum(0) != 0, grad[T - 1] != 0
                    assert torch.equal(earlier, k_f | v_f), f"{architecture} head {head}: k/v features of {module}"
                    assert torch.equal(last & ~earlier, q_f), f"{architecture} head {head}: q features of {module}"


# -- 4. frozen_slices policies and errors ----------------------------------------------------------------------------


def _expected(layout, skip, kv_groups):
    out = set()
    for layer, head in skip:
        out |= set(layout.query_slices(layer, head) + layout.output_slices(layer, head))
    for layer, group in kv_groups:
        out |= set(layout.kv_slices(layer, group))
    return out


def _frozen(layout, skip, policy):
    slices = layout.frozen_slices(skip, kv_policy=policy)
    assert len(slices) == len(set(slices)), "frozen_slices returned a slice twice"
    return set(slices)


def test_frozen_slices_kv_policies_gqa():
    layout = HeadLayout.from_config(tiny_config("llama"))  # groups: {0,1}, {2,3}

    one = [(0, 0)]
    assert _frozen(layout, one, "all") == _expected(layout, one, [])
    assert _frozen(layout, one, "any") == _expected(layout, one, [(0, 0)])
    assert _frozen(layout, one, "never") == _expected(layout, one, [])
    assert _frozen(layout, one, "all") == _frozen(layout, [[0, 0]], "all")  # JSON-style lists work too
    assert layout.frozen_slices([], kv_policy="any") == []

    # layer 0: group 0 fully skipped; layer 1: only head 2 of group 1 skipped.
    many = [(0, 0), (0, 1), (1, 2)]
    assert _frozen(layout, many, "all") == _expected(layout, many, [(0, 0)])
    assert _frozen(layout, many, "any") == _expected(layout, many, [(0, 0), (1, 1)])
    assert _frozen(layout, many, "never") == _expected(layout, many, [])
    assert _frozen(layout, many, "all") == _frozen(layout, set(reversed(many)), "all")  # order-free

    # q and o slices are per head: skipping head 0 never touches head 1's rows.
    frozen = _frozen(layout, one, "any")
    assert not frozen & set(layout.query_slices(0, 1) + layout.output_slices(0, 1))
    assert not frozen & set(layout.kv_slices(0, 1))


def test_frozen_slices_without_gqa_freeze_the_head_kv():
    layout = HeadLayout.from_config(tiny_config("gpt_neox"))  # one query head per KV group
    skip = [(1, 3)]
    assert _frozen(layout, skip, "all") == _frozen(layout, skip, "any") == _expected(layout, skip, [(1, 3)])
    assert _frozen(layout, skip, "never") == _expected(layout, skip, [])


def test_frozen_slices_rejects_unknown_policy():
    layout = HeadLayout.from_config(tiny_config("llama"))
    with pytest.raises(CastError, match=r"kv_policy.*all, any, never"):
        layout.frozen_slices([(0, 0)], kv_policy="some")


@pytest.mark.parametrize("bad", [(0, 4), (2, 0), (-1, 0), (0, -1)])
def test_out_of_range_head_names_valid_ranges(bad):
    layout = HeadLayout.from_config(tiny_config("llama"))  # 2 layers x 4 heads
    with pytest.raises(CastError, match=r"0\.\.1.*0\.\.3"):
        layout.frozen_slices([(0, 0), bad])
    with pytest.raises(CastError, match=r"0\.\.1.*0\.\.3"):
        layout.query_slices(*bad)
    with pytest.raises(CastError, match=r"0\.\.1.*0\.\.3"):
        layout.output_slices(*bad)


@pytest.mark.parametrize("bad", [(0, 2), (2, 0), (0, -1)])
def test_out_of_range_kv_group_is_an_error(bad):
    layout = HeadLayout.from_config(tiny_config("llama"))  # 2 layers x 2 KV groups
    with pytest.raises(CastError, match=r"0\.\.1.*0\.\.1"):
        layout.kv_slices(*bad)
    with pytest.raises(CastError, match=r"0\.\.1.*0\.\.1"):
        layout.value_slices(*bad)


class _MadeUpConfig(PretrainedConfig):
    model_type = "made_up_lm"


@pytest.mark.parametrize(
    "config", [BertConfig(vocab_size=128, hidden_size=32), _MadeUpConfig()], ids=["bert", "made_up"]
)
def test_unknown_architecture_lists_supported(config):
    with pytest.raises(CastError) as info:
        HeadLayout.from_config(config)
    message = str(info.value)
    assert repr(config.model_type) in message
    for name in SUPPORTED_ARCHITECTURES:
        assert name in message
    assert set(ARCHITECTURES) <= set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("head_dim", [8, 32])
def test_check_parameters_catches_head_dim_mismatch(head_dim):
    """A config head_dim smaller or larger than the weights' must fail, not map heads to wrong features."""
    model = fresh_model("qwen3")  # real head_dim 16
    model.config.head_dim = head_dim
    with pytest.raises(CastError, match=r"head_dim.*does not match the weights"):
        HeadLayout.from_model(model)


def test_check_parameters_catches_other_mismatches():
    model = _cached_model("llama")
    params = dict(model.named_parameters())
    layout = HeadLayout.from_model(model)
    layout.check_parameters(params)  # the true layout passes
    with pytest.raises(CastError, match="does not match the weights"):
        dataclasses.replace(layout, num_kv_heads=4).check_parameters(params)
    with pytest.raises(CastError, match="does not match the weights"):
        dataclasses.replace(layout, num_heads=2, num_kv_heads=1).check_parameters(params)
    with pytest.raises(CastError, match="has no parameter"):
        dataclasses.replace(layout, architecture="gpt2").check_parameters(params)
