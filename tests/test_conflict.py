"""ConflictMap arithmetic on hand-built numbers with known answers, JSON I/O, layout checks and the heatmap."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cast_lightning.conflict import (
    SCHEMA_VERSION,
    ConflictMap,
    check_finite,
    combine_scores,
    conflict_from_stats,
    optimization_conflict,
    select_heads,
)
from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout

# -- Optimization Conflict ---------------------------------------------------------------------------------------------


def test_oc_cosine_known_answers():
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    orthogonal = torch.tensor([2.0, 1.0, 0.0, 0.0])  # <g, o> = 2 - 2 = 0
    assert optimization_conflict(g, g).item() == pytest.approx(-1.0)  # identical: no conflict
    assert optimization_conflict(g, 3 * g).item() == pytest.approx(-1.0)  # scale does not matter
    assert optimization_conflict(g, -g).item() == pytest.approx(1.0)  # opposite: full conflict
    assert optimization_conflict(g, -0.1 * g).item() == pytest.approx(1.0)
    assert optimization_conflict(g, orthogonal).item() == pytest.approx(0.0, abs=1e-12)
    # 45 degrees apart, opposing: -cos(135 deg) = +1/sqrt(2)
    assert optimization_conflict(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])).item() == pytest.approx(
        1 / math.sqrt(2)
    )


def test_oc_projection_known_answers():
    gs = torch.tensor([3.0, 4.0])
    gu = torch.tensor([-2.0, 0.0])  # ||gu|| = 2, <gs, gu> = -6 -> OC = 6 / 2 = 3
    assert optimization_conflict(gs, gu, "projection").item() == pytest.approx(3.0)
    assert optimization_conflict(gs, -gu, "projection").item() == pytest.approx(-3.0)
    assert optimization_conflict(gs, torch.tensor([0.0, 5.0]), "projection").item() == pytest.approx(-4.0)
    assert optimization_conflict(gs, torch.tensor([4.0, -3.0]), "projection").item() == pytest.approx(0.0)


def test_oc_batched_heads_and_zero_gradient():
    # (layers=1, heads=3, P=2): identical, opposite, orthogonal in one call.
    gs = torch.tensor([[[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]])
    gu = torch.tensor([[[1.0, 2.0], [-1.0, -2.0], [-2.0, 1.0]]])
    assert torch.allclose(optimization_conflict(gs, gu), torch.tensor([[-1.0, 1.0, 0.0]], dtype=torch.float64))
    # A head with no gradient has no direction to conflict with.
    assert optimization_conflict(torch.zeros(3), torch.ones(3)).item() == 0.0
    assert conflict_from_stats(0.0, 0.0, 0.0, "projection").item() == 0.0


def test_oc_unknown_variant():
    with pytest.raises(CastError, match="use one of cosine, projection"):
        optimization_conflict(torch.ones(2), torch.ones(2), "angle")


# -- scores ------------------------------------------------------------------------------------------------------------

OC = torch.tensor([[0.5, -0.2, 1.0], [0.0, 0.25, 0.8]], dtype=torch.float64)
FS = torch.tensor([[2.0, 4.0, 1.0], [3.0, 4.0, 0.0]], dtype=torch.float64)


def test_product_score():
    expected = torch.tensor([[0.5 * 0.5, 0.0, 1.0 * 0.25], [0.0, 0.25 * 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(combine_scores(OC, FS, "product"), expected)
    # negative FS (ablation: removing the head helps) counts as 0; all-zero FS gives all-zero scores
    assert torch.equal(combine_scores(OC, -FS, "product"), torch.zeros_like(OC))


def test_weighted_score():
    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    assert torch.allclose(combine_scores(OC, FS, "weighted", lam=0.3), 0.3 * z(OC) + 0.7 * z(FS))
    assert torch.allclose(combine_scores(OC, FS, "weighted", lam=1.0), z(OC))
    with pytest.raises(CastError, match=r"\[0, 1\]"):
        combine_scores(OC, FS, "weighted", lam=1.5)


def test_rank_oc_fs_scores():
    # OC ranks (0..5): 0.5->3, -0.2->0, 1.0->5, 0.0->1, 0.25->2, 0.8->4
    # FS ranks with ties averaged: 2->2, 4->4.5, 1->1, 3->3, 4->4.5, 0->0
    oc_rank = torch.tensor([[3, 0, 5], [1, 2, 4]], dtype=torch.float64) / 5
    fs_rank = torch.tensor([[2, 4.5, 1], [3, 4.5, 0]], dtype=torch.float64) / 5
    assert torch.allclose(combine_scores(OC, FS, "rank"), (oc_rank + fs_rank) / 2)
    assert torch.equal(combine_scores(OC, FS, "oc"), OC)
    assert torch.equal(combine_scores(OC, FS, "fs"), FS)


def test_random_score_reproducible_and_seed_dependent():
    a = combine_scores(OC, FS, "random", seed=7)
    assert torch.equal(a, combine_scores(OC, FS, "random", seed=7))
    assert not torch.equal(a, combine_scores(OC, FS, "random", seed=8))
    big = torch.zeros(8, 8)
    picks = {tuple(map(tuple, select_heads(combine_scores(big, big, "random", seed=s), top_k=6))) for s in range(5)}
    assert len(picks) == 5  # every seed skips a different set of heads
    again = select_heads(combine_scores(big, big, "random", seed=3), top_k=6, seed=3)
    assert again == select_heads(combine_scores(big, big, "random", seed=3), top_k=6, seed=3)


def test_unknown_score():
    with pytest.raises(CastError, match="unknown score 'sum'"):
        combine_scores(OC, FS, "sum")


# -- selection ---------------------------------------------------------------------------------------------------------

SCORE = torch.tensor([[0.1, 0.9, 0.3], [0.7, 0.2, 0.5]])


def test_select_top_k_ratio_threshold():
    assert select_heads(SCORE, top_k=2) == [[0, 1], [1, 0]]
    assert select_heads(SCORE, skip_ratio=0.5) == [[0, 1], [1, 0], [1, 2]]  # round(0.5 * 6) = 3
    assert select_heads(SCORE, skip_ratio=0.01) == [[0, 1]]  # > 0 skips at least one head
    assert select_heads(SCORE, skip_ratio=0.0) == []
    assert select_heads(SCORE, skip_ratio=1.0) == [[0, 1], [1, 0], [1, 2], [0, 2], [1, 1], [0, 0]]
    assert select_heads(SCORE, threshold=0.5) == [[0, 1], [1, 0], [1, 2]]  # >= threshold
    assert select_heads(SCORE, threshold=2.0) == []
    # top_k / threshold win over skip_ratio
    assert select_heads(SCORE, skip_ratio=0.5, top_k=1) == [[0, 1]]


def test_select_errors():
    with pytest.raises(CastError, match="only one"):
        select_heads(SCORE, top_k=1, threshold=0.5)
    with pytest.raises(CastError, match="skip_ratio"):
        select_heads(SCORE, skip_ratio=1.5)
    with pytest.raises(CastError, match="top_k 7 exceeds"):
        select_heads(SCORE, top_k=7)


def test_ties_broken_by_seed_not_by_index():
    flat = torch.zeros(4, 4)
    chosen = {tuple(map(tuple, select_heads(flat, top_k=3, seed=s))) for s in range(6)}
    assert len(chosen) > 1
    assert select_heads(flat, top_k=3, seed=2) == select_heads(flat, top_k=3, seed=2)


def test_check_finite_lists_heads():
    values = torch.zeros(3, 4)
    values[1, 2] = float("nan")
    values[2, 0] = float("inf")
    with pytest.raises(CastError) as info:
        check_finite(oc=torch.zeros(3, 4), fs=values)
    message = str(info.value)
    assert "fs at 2 head(s) [1, 2], [2, 0]" in message and "oc" not in message.split(":")[1]
    assert "\n" not in message
    check_finite(oc=torch.zeros(3, 4))


# -- the map -----------------------------------------------------------------------------------------------------------

LAYOUT = HeadLayout("llama", num_layers=2, num_heads=3, num_kv_heads=1, head_dim=4, hidden_size=12)


def make_map(**overrides) -> ConflictMap:
    fields = dict(
        model={"name": "tiny", "path": None, **LAYOUT.shape_dict()},
        oc=OC,
        fs=FS,
        score=combine_scores(OC, FS),
        skip=select_heads(combine_scores(OC, FS), top_k=2, seed=3),
        options={"conflict": "cosine", "sensitivity": "taylor", "score": "product", "top_k": 2},
        data={"safety_samples": 4, "utility_samples": 5},
        seed=3,
        timing={"total_s": 1.0},
    )
    fields.update(overrides)
    return ConflictMap(**fields)


def test_json_roundtrip(tmp_path):
    cmap = make_map()
    path = cmap.to_json(tmp_path / "sub" / "conflict_map.json")
    assert [p.name for p in path.parent.iterdir()] == ["conflict_map.json"]  # no temp file left behind
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and list(raw)[0] == "schema_version"
    assert raw["skip"] == cmap.skip and len(cmap.skip) == 2 and raw["model"]["num_kv_heads"] == 1
    back = ConflictMap.from_json(path)
    assert back == cmap
    assert back.skip_heads == [tuple(h) for h in cmap.skip]
    assert back.check_layout(LAYOUT) is back


def test_from_json_errors(tmp_path):
    with pytest.raises(CastError, match="does not exist: run cast diagnose first"):
        ConflictMap.from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CastError, match="not valid JSON"):
        ConflictMap.from_json(bad)
    raw = make_map().to_dict()
    for mutate, match in [
        (lambda d: d.update(schema_version=99), "schema version 99, this cast reads version 1"),
        (lambda d: d.pop("oc"), "lacks oc"),
        (lambda d: d.update(fs=[[1.0, 2.0]]), "fs is not a 2 x 3"),
        (lambda d: d.update(skip=[[5, 0]]), r"skipped head \[5, 0\] is outside"),
    ]:
        d = json.loads(json.dumps(raw))
        mutate(d)
        (tmp_path / "m.json").write_text(json.dumps(d))
        with pytest.raises(CastError, match=match):
            ConflictMap.from_json(tmp_path / "m.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CastError, match="not a JSON object"):
        ConflictMap.from_json(tmp_path / "list.json")


@pytest.mark.parametrize(
    "other",
    [
        HeadLayout("llama", 3, 3, 1, 4, 12),  # more layers
        HeadLayout("llama", 2, 3, 3, 4, 12),  # other KV heads
        HeadLayout("qwen2", 2, 3, 1, 4, 12),  # other architecture
    ],
)
def test_check_layout_mismatch(other):
    with pytest.raises(CastError) as info:
        make_map().check_layout(other)
    message = str(info.value)
    assert "computed for tiny: llama 2 layers x 3 heads (1 KV heads, head_dim 4)" in message
    assert f"this model is {other.architecture} {other.num_layers} layers" in message
    assert message.endswith("run cast diagnose on this model")


def test_rescore_derives_variants_from_one_diagnosis():
    cmap = make_map()
    oc_only = cmap.rescore(score="oc", skip_ratio=0.5)
    assert oc_only.skip == [[0, 2], [1, 2], [0, 0]]
    assert oc_only.options["score"] == "oc" and oc_only.options["selection"] == {"rule": "skip_ratio", "skip_ratio": 0.5}
    assert oc_only.oc == cmap.oc and oc_only.fs == cmap.fs
    same = cmap.rescore()  # keeps the map's own rule (top_k=2)
    assert same.skip == cmap.skip
    r1, r2 = cmap.rescore(score="random", seed=1), cmap.rescore(score="random", seed=2)
    assert len(r1.skip) == len(r2.skip) == 2 and r1.score != r2.score


def test_plot_writes_png(tmp_path):
    from PIL import Image

    big = make_map(
        model={"name": "wide", "path": None, **HeadLayout("llama", 12, 20, 4, 8, 160).shape_dict()},
        oc=torch.rand(12, 20) * 2 - 1,
        fs=torch.rand(12, 20),
        score=torch.rand(12, 20),
        skip=[[0, 0], [11, 19], [5, 7]],
    )
    path = big.plot(tmp_path / "conflict_map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = Image.open(path).size
    assert width > 600 and height > 200
    assert [p.name for p in tmp_path.iterdir()] == ["conflict_map.png"]
