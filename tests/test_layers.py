"""Layer freezing (``--model.skip_layers``, SPPFT-style) and the layer-gap diagnosis that locates the layers.

Freezing: every parameter of the skipped decoder layers bit-identical after 5 AdamW steps (weight decay 0.1,
accumulation 2, clipping 1.0), no optimizer state for them, every other trainable parameter changed, with the head mask
(the oracle of tests/test_mask_contract.py) and with --model.trainable attention. Location: a planted cosine gap (a
forward hook adds one large direction to the harmful prompts' hidden states from one layer on) is found there, and the
gap equals an explicit pairwise-cosine computation from hidden states captured independently.
"""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from cast_lightning.data.formatting import collate
from cast_lightning.diagnosis import diagnose
from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout
from cast_lightning.layers import locate_layers, parse_skip_layers
from cast_lightning.module import CASTModule
from tests.conftest import state_copy
from tests.test_mask_contract import SKIP, assert_contract, datamodule, make_trainer
from tests.tiny_models import tiny_config

STEPS = 5


def _layout(layers: int = 4) -> HeadLayout:
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    return HeadLayout.from_config(config)


# -- parsing -----------------------------------------------------------------------------------------------------------


def test_skip_layers_accepts_indices_and_ranges_and_names_the_valid_range():
    layout = _layout(4)
    assert parse_skip_layers([2, 3], layout) == [2, 3]
    assert parse_skip_layers("2-3", layout) == [2, 3]
    assert parse_skip_layers("0,2-3", layout) == [0, 2, 3]
    assert parse_skip_layers(["1-2", 0], layout) == [0, 1, 2]
    assert parse_skip_layers("1", layout) == [1]
    assert parse_skip_layers(None, layout) == []
    with pytest.raises(CastError, match=r"layer 4 is out of range; this llama model has layers 0-3"):
        parse_skip_layers("2-4", layout)
    with pytest.raises(CastError, match="layer -1 is out of range"):
        parse_skip_layers([-1], layout)
    with pytest.raises(CastError, match="runs backwards"):
        parse_skip_layers("3-2", layout)
    with pytest.raises(CastError, match="not a layer index or range"):
        parse_skip_layers("two", layout)


# -- freezing through training ---------------------------------------------------------------------------------------


def _layer_names(names, layers) -> set[str]:
    return {n for n in names for layer in layers if n.startswith(f"model.layers.{layer}.")}


@pytest.mark.parametrize("scope, skip_layers", [("all", [1]), ("attention", "0-0")], ids=["all-layer1", "attention-layer0"])
def test_skipped_layers_bit_identical_with_the_head_mask(scope, skip_layers, tiny_llama_dir, tiny_data, tmp_path):
    L.seed_everything(0)
    module = CASTModule(str(tiny_llama_dir), skip_heads=SKIP, skip_layers=skip_layers, trainable=scope,
                        learning_rate=1e-2, weight_decay=0.1, warmup_steps=1)
    layers = [1] if scope == "all" else [0]
    assert module.skip_layers == layers
    before = state_copy(module.model)
    frozen_layer = _layer_names(before, layers)
    assert len(frozen_layer) >= 9  # q/k/v/o, gate/up/down, two norms
    attention = {n for n in before if ".self_attn." in n and n.endswith((".weight", ".bias"))}
    scope_names = set(before) if scope == "all" else attention
    trainable = scope_names - frozen_layer
    trainer = make_trainer(tmp_path, max_steps=STEPS)
    trainer.fit(module, datamodule(tiny_llama_dir, tiny_data))
    assert trainer.global_step == STEPS
    after = state_copy(module.model)
    for name in frozen_layer:
        assert torch.equal(before[name], after[name]), f"{name} of a skipped layer changed"
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == trainable
    optimizer = trainer.optimizers[0]
    assert {id(p) for p in optimizer.state} == {id(p) for n, p in module.model.named_parameters() if n in trainable}
    # The head mask on the layers that still train (its slices in a frozen layer need nothing); everything else moved.
    assert_contract(module.model.config, before, after, SKIP, trainable=trainable)
    # The checkpoint keeps the layer list, and a resume asking for other layers is refused.
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}, "hyper_parameters": {}}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["cast_skip_layers"] == layers
    assert all(f"model.{n}" in checkpoint["state_dict"] for n in frozen_layer)  # kept: export rebuilds the scope alone
    other = CASTModule(str(tiny_llama_dir), skip_layers=[0, 1] if scope == "all" else "1-1", trainable=scope)
    with pytest.raises(CastError, match="resume with the checkpoint's --model.skip_layers"):
        other.on_load_checkpoint(checkpoint)


def test_skipping_every_layer_of_the_attention_scope_leaves_nothing_to_train(tiny_llama_dir):
    with pytest.raises(CastError, match="nothing would train"):
        CASTModule(str(tiny_llama_dir), skip_layers="0-1", trainable="attention")


# -- the located range -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap, fraction, expected", [
    ([0.0, 0.1, 0.3, 0.55, 0.9, 1.0], 0.5, [3, 4]),  # start 3 (0.55 >= 0.5); largest rise 0.35 lands on 4
    ([0.0, 0.0, 0.8, 0.8], 0.5, [2]),  # one jump onto layer 2
    ([0.0, 0.3, 0.55, 1.0], 0.5, [2, 3]),  # start 2; the largest rise (0.45) lands on 3
    ([0.0, 0.6, 0.7, 1.0], 0.5, [1]),  # start 1; the largest rise (0.6) lands on 1
    ([0.0, 0.25, 0.75, 1.25], 0.5, [2]),  # rises 0.25, 0.5, 0.5 (exact): the first of the tie lands on 2
    ([0.0, 0.6, 0.7, 1.0], 0.9, [3]),
    ([0.9, 1.0, 0.2], 0.5, [0, 1]),  # start 0; the only rise lands on 1
    ([-0.1, -0.2], 0.5, []),  # never positive: nothing located
    ([0.4], 0.5, [0]),
])
def test_locate_layers_rule(gap, fraction, expected):
    assert locate_layers(gap, fraction) == expected


MARK = 3  # the first prompt token of every harmful (safety) row


def _rows(n: int, harmful: bool, seed: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(4, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        if harmful:
            prompt[0] = MARK
        response = torch.randint(4, vocab, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def _plant(model, layer: int, scale: float = 50.0):
    """Hooks: remember the input ids; at ``layer``'s output add ``scale * v`` to the harmful rows (prompt starting with
    MARK) and ``scale * u`` to the benign ones, at every position, with u, v orthogonal unit directions. From that layer
    on, benign states cluster along u (cosine near 1 with each other) and lie near orthogonal to the harmful ones (near
    0): a planted gap near 1."""
    state = {}
    basis, _ = torch.linalg.qr(torch.randn(model.config.hidden_size, 2, generator=torch.Generator().manual_seed(7)))
    u, v = basis[:, 0], basis[:, 1]

    def remember(module, args, kwargs):
        state["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        harmful = (state["ids"][:, 0] == MARK).to(hidden.dtype)[:, None, None]
        hidden = hidden + scale * (harmful * v.to(hidden.dtype) + (1 - harmful) * u.to(hidden.dtype))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return [model.register_forward_pre_hook(remember, with_kwargs=True),
            model.model.layers[layer].register_forward_hook(add)]


def _explicit_gap(model, benign: list[dict], harmful: list[dict]) -> list[float]:
    """Independently: each row alone, every layer's output captured by its own hooks at the last prompt token, then
    mean pairwise cosines written out as loops (i != j for benign-benign)."""
    states: dict[int, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda m, a, o, i=i: states.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach()))
               for i, block in enumerate(model.model.layers)]
    try:
        def last_prompt_states(rows):
            out = []
            for row in rows:
                prompt_len = sum(1 for label in row["labels"] if label == -100)
                with torch.no_grad():
                    model(input_ids=torch.tensor([row["input_ids"]]))
                out.append([states[i][0, prompt_len - 1].double() for i in range(len(model.model.layers))])
            return out

        b, h = last_prompt_states(benign), last_prompt_states(harmful)
    finally:
        for handle in handles:
            handle.remove()
    cos = torch.nn.functional.cosine_similarity
    gaps = []
    for layer in range(len(model.model.layers)):
        same = [float(cos(b[i][layer], b[j][layer], dim=0)) for i in range(len(b)) for j in range(len(b)) if i != j]
        cross = [float(cos(b[i][layer], h[j][layer], dim=0)) for i in range(len(b)) for j in range(len(h))]
        gaps.append(sum(same) / len(same) - sum(cross) / len(cross))
    return gaps


def _loader(rows, batch_size=3):
    return DataLoader(rows, batch_size=batch_size, collate_fn=partial(collate, pad_token_id=0))


def test_layer_gap_finds_the_planted_layer_and_equals_explicit_cosines():
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    vocab = config.vocab_size
    safety, utility = _rows(7, True, seed=1, vocab=vocab), _rows(8, False, seed=2, vocab=vocab)
    handles = _plant(model, layer=2)
    try:
        cmap = diagnose(model, _loader(safety), _loader(utility), scorers=["layer_gap"], layer_gap_fraction=0.5, plot=False)
        expected = _explicit_gap(model, utility, safety)
    finally:
        for handle in handles:
            handle.remove()
    record = cmap.data["layer_gap"]
    assert record["gap"] == pytest.approx(expected, abs=1e-6)  # float32 forwards, batched vs one row
    # The known answer: no gap before the planted layer (both sets are the same random-token distribution), a large one
    # from it on, and the located range is the planted layer.
    assert max(abs(g) for g in record["gap"][:2]) < 0.2 and min(record["gap"][2:]) > 0.8
    assert record["located"] == [2]
    assert cmap.options["layer_gap_fraction"] == 0.5 and "layer_gap" in cmap.options["scorers"]
    # Without the plant the same data locate no layer 2 jump: the gap stays small everywhere.
    plain = diagnose(model, _loader(safety), _loader(utility), scorers=["layer_gap"], plot=False)
    assert max(abs(g) for g in plain.data["layer_gap"]["gap"]) < 0.5 * record["gap"][2]
    # Batching does not change it (sums of unit vectors): one batch per set gives the same gap.
    handles = _plant(model, layer=2)
    try:
        whole = diagnose(model, _loader(safety, 7), _loader(utility, 8), scorers=["layer_gap"], plot=False)
    finally:
        for handle in handles:
            handle.remove()
    assert whole.data["layer_gap"]["gap"] == pytest.approx(record["gap"], abs=1e-6)


def test_skip_layers_from_map_reads_the_located_range(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    safety, utility = _rows(6, True, seed=3, vocab=vocab), _rows(6, False, seed=4, vocab=vocab)
    handles = _plant(model, layer=1)
    try:
        path = tmp_path / "conflict_map.json"
        diagnose(model, _loader(safety), _loader(utility), scorers=["layer_gap"], output=path, plot=False)
    finally:
        for handle in handles:
            handle.remove()
    assert json.loads(path.read_text())["data"]["layer_gap"]["located"] == [1]
    module = CASTModule(str(tiny_llama_dir), skip_layers=f"from_map:{path}")
    assert module.skip_layers == [1] and module.skip_heads == []
    both = CASTModule(str(tiny_llama_dir), conflict_map=str(path), skip_layers="from_map")
    assert both.skip_layers == [1] and both.skip_heads == sorted(map(tuple, json.loads(path.read_text())["skip"]))
    assert not any(p.requires_grad for n, p in both.model.named_parameters() if n.startswith("model.layers.1."))
    # A map made without the layer gap names the fix.
    plain = tmp_path / "plain.json"
    diagnose(model, _loader(safety), _loader(utility), output=plain, plot=False)
    with pytest.raises(CastError, match=r"has no located layers: run cast diagnose with --model.scorers '\[layer_gap\]'"):
        CASTModule(str(tiny_llama_dir), skip_layers=f"from_map:{plain}")
    with pytest.raises(CastError, match="needs a map"):
        CASTModule(str(tiny_llama_dir), skip_layers="from_map")
