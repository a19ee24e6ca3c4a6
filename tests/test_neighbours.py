"""The neighbouring methods' head scorers on known-answer constructions: ``ships`` (the safety-loss change when a
head's output is scaled down) and ``snip`` (the SNIP set difference), and the ``train_only`` selection."""

from __future__ import annotations

import math

import pytest
import torch

from cast_lightning.conflict import ConflictMap, combine_scores, select_heads
from cast_lightning.data.formatting import collate, per_sample_loss
from cast_lightning.diagnosis import DiagnosisOptions, HeadStatistics, diagnose
from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout
from tests.test_diagnosis import SAFETY, UTILITY, loader
from tests.tiny_models import tiny_model

ONLY = (1, 2)  # the one head whose output reaches the residual stream in the construction below


def _one_head_model():
    """A tiny Llama where every head's output-projection columns are zero except head ONLY's: scaling any other
    head's output cannot change any loss, scaling ONLY's must."""
    model = tiny_model("llama", seed=3)
    layout = HeadLayout.from_model(model)
    d = layout.head_dim
    with torch.no_grad():
        for layer in range(layout.num_layers):
            o_proj = model.model.layers[layer].self_attn.o_proj.weight
            for head in range(layout.num_heads):
                if (layer, head) != ONLY:
                    o_proj[:, head * d : (head + 1) * d] = 0
                else:
                    o_proj[:, head * d : (head + 1) * d] *= 20  # make its contribution large
    return model, layout


def _loss_with_head_scaled(model, layout, rows, layer: int, head: int, scale: float) -> torch.Tensor:
    """Each row's response loss with head (layer, head)'s input to o_proj scaled (an independent hook)."""
    d = layout.head_dim

    def hook(module, args):
        x = args[0].clone()
        x[..., head * d : (head + 1) * d] *= scale
        return (x, *args[1:])

    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            losses = [per_sample_loss(model(input_ids=collate([r], 0)["input_ids"]).logits, collate([r], 0)["labels"])
                      for r in rows]
    finally:
        handle.remove()
    return torch.cat(losses).double()


def test_ships_finds_the_one_head_that_matters_and_equals_an_explicit_scaling():
    """Scaling any head but ONLY changes nothing (ships exactly 0); ONLY's ships equals the explicit computation."""
    model, layout = _one_head_model()
    cmap = diagnose(model, loader(SAFETY, 3), loader(UTILITY, 4), scorers=("ships",), ships_scale=0.01,
                    score="ships", top_k=1)
    ships = torch.tensor(cmap.extra["ships"])
    for layer in range(layout.num_layers):
        for head in range(layout.num_heads):
            if (layer, head) != ONLY:
                assert ships[layer, head] == pytest.approx(0.0, abs=1e-9), (layer, head)
    base = _loss_with_head_scaled(model, layout, SAFETY, *ONLY, scale=1.0)
    scaled = _loss_with_head_scaled(model, layout, SAFETY, *ONLY, scale=0.01)
    expected = float((scaled - base).abs().mean())  # Ships' per-prompt magnitude of change, averaged
    assert expected > 1e-3
    assert ships[ONLY] == pytest.approx(expected, rel=1e-5)
    # As a skip score the least safety-relevant heads go first, so the one head that matters is never the one
    # skipped; under train_only with k = 1 it is the one head that trains.
    assert list(map(tuple, cmap.skip)) != [ONLY]
    trained_only = cmap.rescore(score="ships", top_k=1, selection_mode="train_only")
    assert len(trained_only.skip) == layout.num_layers * layout.num_heads - 1 and list(ONLY) not in trained_only.skip
    assert trained_only.options["selection_mode"] == "train_only"


def _planted_statistics():
    """HeadStatistics on a tiny Llama with every attention weight 1 and planted gradients: the SNIP importance
    |W * G| is then |G|, known exactly."""
    model = tiny_model("llama", seed=0)
    layout = HeadLayout.from_model(model)
    stats = HeadStatistics(model, layout, DiagnosisOptions(scorers=("snip",))).attach()
    with torch.no_grad():
        for p in stats._params:
            p.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    stats._flat_s.copy_(torch.rand(stats._flat_s.shape, generator=g))  # background below 1: never in a top set
    stats._flat_u.copy_(torch.rand(stats._flat_u.shape, generator=g))
    return model, layout, stats


def test_snip_share_of_planted_top_sets():
    model, layout, stats = _planted_statistics()
    d, hidden = layout.head_dim, model.config.hidden_size
    name_q = "model.layers.0.self_attn.q_proj.weight"
    # Safety's top set: every q weight of head (0, 1); utility's top set: the first half of those rows.
    stats.grad_s[name_q][d : 2 * d] += 10.0
    stats.grad_u[name_q][d : d + d // 2] += 10.0
    n = stats._flat_s.numel()
    planted_s, planted_u = d * hidden, (d // 2) * hidden
    stats.options.snip_safety_top = planted_s / n
    stats.options.snip_utility_top = planted_u / n
    shares = stats.snip_shares()
    stats.detach()
    # Head (0, 1) owns d q rows and d o columns (2 * d * hidden weights); the difference is the other half of its q rows.
    expected = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    expected[0, 1] = ((d - d // 2) * hidden) / (2 * d * hidden)
    assert torch.allclose(shares, expected, atol=0, rtol=0)


def test_snip_end_to_end_is_recorded_and_scores_skip_the_least_safety_specific_heads():
    model = tiny_model("llama", seed=1)
    cmap = diagnose(model, loader(SAFETY, 3), loader(UTILITY, 4), scorers=("snip",), score="snip", top_k=2)
    snip = torch.tensor(cmap.extra["snip"])
    assert snip.shape == (len(cmap.oc), len(cmap.oc[0])) and bool(((snip >= 0) & (snip <= 1)).all())
    assert cmap.options["scorers"] == ["snip"] and cmap.options["snip_safety_top"] == 0.05
    expected = select_heads(-snip, top_k=2, seed=cmap.seed)
    assert cmap.skip == expected
    again = ConflictMap.from_dict(cmap.to_dict())
    assert again.extra["snip"] == cmap.extra["snip"]
    assert again.rescore(score="snip", top_k=2).skip == expected


def test_train_only_selection_by_hand():
    score = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.7, 0.2]])
    # skip: the k highest; train_only: train the k lowest (0.1 at [0, 1], 0.2 at [1, 2]) and skip the rest.
    assert select_heads(score, top_k=2) == [[0, 0], [1, 1]]
    assert sorted(select_heads(score, top_k=2, mode="train_only")) == [[0, 0], [0, 2], [1, 0], [1, 1]]
    assert len(select_heads(score, skip_ratio=0.5, mode="train_only")) == 3  # round(0.5 * 6) = 3 heads train
    with pytest.raises(CastError, match="selection mode"):
        select_heads(score, top_k=1, mode="freeze")


def test_attribution_scores_need_their_grids():
    oc = fs = torch.zeros(2, 3)
    with pytest.raises(CastError, match="--model.scorers"):
        combine_scores(oc, fs, "ships")
    assert torch.equal(combine_scores(oc, fs, "snip", extra={"snip": torch.ones(2, 3)}), -torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(CastError, match="needs its attribution"):
        DiagnosisOptions(score="ships").validate()
    with pytest.raises(CastError, match="ships_scale"):
        DiagnosisOptions(scorers=("ships",), ships_scale=1.5).validate()
    assert math.isclose(DiagnosisOptions(scorers=("ships",)).validate().ships_scale, 0.01)


# -- the study: neighbour variants beside CAST, each against its own random control --------------------------------


def test_head_set_overlaps_by_hand():
    from cast_lightning.study.analysis import head_set_overlaps

    runs = [
        {"variant": "cast", "skip_ratio": 0.25, "seed": 0, "skip_heads": [[0, 0], [0, 1]]},
        {"variant": "ships", "skip_ratio": 0.25, "seed": 0, "skip_heads": [[0, 1], [1, 1]]},
        # train-only: trains [1, 0] and [1, 1] of the 2 x 2 heads, i.e. skips the other two
        {"variant": "ships_train", "skip_ratio": 0.25, "seed": 0, "skip_heads": [[0, 0], [0, 1]]},
        {"variant": "cast", "skip_ratio": 0.25, "seed": 1, "skip_heads": [[0, 0], [0, 1]]},
        {"variant": "ships", "skip_ratio": 0.25, "seed": 1, "skip_heads": [[0, 0], [0, 1]]},
        {"variant": "full", "skip_ratio": 0.0, "seed": 0, "skip_heads": []},
    ]
    rows = {(r["a"], r["b"]): r for r in head_set_overlaps(runs, (2, 2))}
    assert rows[("cast", "ships")]["jaccard"]["mean"] == round((1 / 3 + 1.0) / 2, 4)  # seed 0: 1/3, seed 1: 1 (4 decimals)
    assert rows[("cast", "ships")]["seeds"] == [0, 1]
    assert rows[("cast", "ships_train")]["jaccard"]["mean"] == 0.0  # {00, 01} vs trained {10, 11}
    assert rows[("ships", "ships_train")]["jaccard"]["mean"] == round(1 / 3, 4)  # {01, 11} vs {10, 11}
    assert ("cast", "full") not in rows


def test_neighbour_variants_are_compared_with_their_own_control():
    import copy
    import json
    from pathlib import Path

    from cast_lightning.study.analysis import build_report

    fixture = Path(__file__).resolve().parent / "data" / "report" / "experiments.json"
    experiments = json.loads(fixture.read_text())
    extra = []
    for run in experiments["runs"]:
        renamed = {"cast": "ships_train", "random": "random_train", "oc": "snip"}.get(run["variant"])
        if renamed:
            copied = copy.deepcopy(run)
            copied["variant"] = renamed
            extra.append(copied)
    experiments["runs"] += extra
    data = build_report(experiments, provenance={})
    rows = {(c["variant"], c["skip_ratio"]): c for c in data["comparisons"]}
    ships_train = rows[("ships_train", 0.25)]
    cast = rows[("cast", 0.25)]
    # ships_train copies CAST's numbers and random_train random's, so the paired advantages are equal.
    assert ships_train["control"] == "random_train" and cast["control"] == "random"
    assert ships_train["advantage_per_seed"] == cast["advantage_per_seed"]
    assert "training as many random heads alone" in ships_train["sentence"]
    assert rows[("snip", 0.25)]["control"] == "random"
    assert ("random_train", 0.25) not in rows  # a control is not compared with itself
    assert {v["variant"] for v in data["variants"]} >= {"ships_train", "random_train", "snip"}
    assert data["verdict"] == build_report(json.loads(fixture.read_text()), provenance={})["verdict"]  # about CAST only


def test_each_training_scope_is_compared_within_itself():
    import copy
    import json
    from pathlib import Path

    from cast_lightning.study.analysis import build_report
    from cast_lightning.study.plan import StudyPlan
    from cast_lightning.study.stages import fit_command

    fixture = Path(__file__).resolve().parent / "data" / "report" / "experiments.json"
    experiments = json.loads(fixture.read_text())
    attention = []
    for run in experiments["runs"]:
        if run["variant"] in ("full", "cast", "random"):
            copied = copy.deepcopy(run)
            copied["scope"] = "attention"
            if run["variant"] == "random":  # random loses 0.1 more utility in this scope: CAST's advantage grows by 0.1
                key = "utility.cast_world_add.exact_match"
                copied["metrics"][key] = copied["metrics"][key] - 0.5  # 1 of 5 skills: utility - 0.1
            attention.append(copied)
    experiments["runs"] += attention
    data = build_report(experiments, provenance={})
    rows = {(c["scope"], c["variant"], c["skip_ratio"]): c for c in data["comparisons"]}
    plain, scoped = rows[("all", "cast", 0.25)], rows[("attention", "cast", 0.25)]
    assert scoped["label"].endswith("[attention]") and not plain["label"].endswith("]")
    for a, b in zip(scoped["advantage_per_seed"], plain["advantage_per_seed"]):
        assert a == pytest.approx(b + 0.1, abs=1e-4)
    assert {v["label"] for v in data["variants"]} >= {"full fine-tuning [attention]", "random skip @ 0.25 [attention]"}

    plan = StudyPlan(output_dir="x", fit_config="configs/world/fit.yaml", diagnose_config="configs/world/diagnose.yaml",
                     variants=["cast"], skip_ratios=[0.1], seeds=[0], scopes=["attention"])
    argv = fit_command(plan, Path("runs/cast-r0.1-s0-attention"), 0, scope="attention")
    assert "--model.trainable=attention" in argv and fit_command(plan, Path("r"), 0).count("--model.trainable=all") == 0
    with pytest.raises(CastError, match="training scope"):
        StudyPlan(output_dir="x", fit_config="configs/world/fit.yaml", diagnose_config="configs/world/diagnose.yaml",
                  variants=["cast"], skip_ratios=[0.1], seeds=[0], scopes=["mlp"]).check()


def test_methods_without_a_head_map_are_compared_with_full_fine_tuning():
    import copy
    import json
    from pathlib import Path

    from cast_lightning.study.analysis import build_report
    from cast_lightning.study.plan import VARIANTS
    from cast_lightning.study.stages import fit_command
    from cast_lightning.study.plan import StudyPlan

    fixture = Path(__file__).resolve().parent / "data" / "report" / "experiments.json"
    experiments = json.loads(fixture.read_text())
    for run in [r for r in experiments["runs"] if r["variant"] == "full"]:
        copied = copy.deepcopy(run)
        copied["variant"] = "pcgrad"
        copied["metrics"]["utility.cast_world_add.exact_match"] += 0.25  # 1 of 5 skills: utility + 0.05
        experiments["runs"].append(copied)
    data = build_report(experiments, provenance={})
    (row,) = [c for c in data["comparisons"] if c["variant"] == "pcgrad"]
    assert row["control"] == "full" and row["skip_ratio"] == 0.0
    assert all(a == pytest.approx(0.05, abs=1e-4) for a in row["advantage_per_seed"])  # loses 0.05 less than full
    assert row["sentence"].startswith("PCGrad (global)") and "full fine-tuning" in row["sentence"]
    plan = StudyPlan(output_dir="x", fit_config="configs/world/fit.yaml", diagnose_config="configs/world/diagnose.yaml",
                     variants=["pcgrad", "sppft"], skip_ratios=[0.1], seeds=[0])
    argv = fit_command(plan, Path("runs/sppft-s0"), 0, extra=VARIANTS["sppft"].fit_args)
    assert "--model.skip_layers=from_map:diagnosis/conflict_map.json" in argv
