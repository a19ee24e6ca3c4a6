"""The study end to end on a miniature world (`cast demo` with 1 seed and 3 steps): every stage runs through the
user's own recipe and CLI path, is cached, and its numbers are pinned (as torchtune's recipe tests pin losses), so a
refactor cannot change them silently. A run of the study is repeated bit for bit by `cast fit` from its recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.test_cli import run_cast

REPO = Path(__file__).resolve().parents[1]
FIT_RECIPE = REPO / "configs" / "world" / "fit.yaml"

# Measured on the miniature world (torch 2.13.0 CPU); a change here must be explained in the commit. The
# miniature base model is barely trained (10 steps), so its rates and accuracies are 0: the sums of the trained
# weights and of the diagnosis statistics are what pins the recipe (data mix, schedule, seed, mask).
RATES = {"refusal_rate": 0.0, "over_refusal_rate": 0.0, "utility": 0.0}
PINNED = {
    "base": {**RATES, "update_norm": 0.0, "skip_heads": []},
    "full": {**RATES, "update_norm": 0.37714952492544473, "skip_heads": []},
    "cast": {**RATES, "update_norm": 0.37532348573863566, "skip_heads": [[0, 1], [0, 2], [0, 0]]},
    "random": {**RATES, "update_norm": 0.3752100542629001, "skip_heads": [[0, 0], [0, 3], [3, 6]]},
    "diagnosis": {"oc_sum": -0.5373401540521612, "fs_sum": 0.5078336169322332, "skip": [[0, 1], [0, 2], [0, 0]]},
}


@pytest.fixture(scope="module")
def study(mini_world, tmp_path_factory):
    import cast_lightning.world.base_model as base_model
    from cast_lightning.study.commands import demo

    patch = pytest.MonkeyPatch()
    patch.setattr(base_model, "ensure_base_model", lambda seed=0, **_: mini_world)
    out = tmp_path_factory.mktemp("demo") / "demo"
    try:
        paths = demo(output_dir=str(out), seeds=[0], max_steps=3, eval_limit=4)
        yield out, paths, patch
    finally:
        patch.undo()


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _update_norm(checkpoint: Path, base_dir: Path) -> float:
    """||trained - base|| over every weight: sensitive to the schedule, the data mix, the seed and the mask."""
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    trained = {name.removeprefix("model."): t for name, t in _state(checkpoint).items()}
    return math.sqrt(math.fsum(((trained[n].double() - w.double()) ** 2).sum().item() for n, w in base.items()))


def test_every_stage_runs_and_writes_its_files(study):
    out, paths, _ = study
    experiments = json.loads((out / "experiments.json").read_text())
    assert experiments["schema_version"] == 2
    assert [r["variant"] for r in experiments["runs"]] == ["base", "full", "cast", "random"]
    for name in ("report.md", "report.html", "report.json", "diagnosis/conflict_map.json", "diagnosis/conflict_map.png",
                 "diagnosis/config.yaml"):
        assert (out / name).stat().st_size > 0, name
    cast_run, random_run = (next(r for r in experiments["runs"] if r["variant"] == v) for v in ("cast", "random"))
    assert len(cast_run["skip_heads"]) == len(random_run["skip_heads"]) >= 1  # budget-matched
    for run in experiments["runs"]:
        for key in ("run_dir", "results", "checkpoint", "config"):
            assert run[key] is None or not Path(run[key]).is_absolute(), (key, run[key])
        results = json.loads((out / run["results"]).read_text())
        assert results["metrics"] == run["metrics"]
        import hashlib

        assert hashlib.sha256((out / run["results"]).read_bytes()).hexdigest() == run["results_sha256"]
        if run["variant"] != "base":
            assert (out / run["config"]).is_file() and (out / run["checkpoint"]).is_file()
            assert run["command"].startswith("cast fit --config configs/world/fit.yaml --trainer.max_steps=3")
    text = json.dumps(json.loads((out / "report.json").read_text()))
    assert str(out) not in text and "/tmp" not in text  # every path in the report is relative


def test_metrics_are_pinned(study):
    from cast_lightning.study.utility import utility_score

    out, _, _ = study
    experiments = json.loads((out / "experiments.json").read_text())
    measured = {
        run["variant"]: {
            "refusal_rate": run["metrics"]["safety.refusal_rate"],
            "over_refusal_rate": run["metrics"]["safety.over_refusal_rate"],
            "utility": round(utility_score(run["metrics"], run["leaf_tasks"]), 6),
            "update_norm": 0.0 if run["variant"] == "base" else _update_norm(out / run["checkpoint"], out / "base_model"),
            "skip_heads": run["skip_heads"],
        }
        for run in experiments["runs"]
    }
    cmap = experiments["diagnosis"]["conflict_map"]
    measured["diagnosis"] = {"oc_sum": math.fsum(map(math.fsum, cmap["oc"])), "fs_sum": math.fsum(map(math.fsum, cmap["fs"])),
                             "skip": cmap["skip"]}
    print(json.dumps(measured))
    # Float sums over many threads' kernels agree to ~1e-6 relative across machines; recipe changes move them by %.
    assert measured.keys() == PINNED.keys()
    for name, pinned in PINNED.items():
        assert measured[name].keys() == pinned.keys(), name
        for key, value in pinned.items():
            assert measured[name][key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), (name, key)


def test_a_study_run_is_cast_fit_from_the_recipe_bit_for_bit(study, monkeypatch):
    out, _, _ = study
    monkeypatch.chdir(out)
    run = "runs/cast-r0.1-s0"
    # The run's own overrides on the shipped recipe, as experiments.json records them.
    args = ["fit", "--config", FIT_RECIPE, "--trainer.max_steps=3", "--model.conflict_map", f"{run}/conflict_map.json",
            "--seed_everything", "0", "--data.seed", "0", "--trainer.default_root_dir", "repro"]
    assert run_cast(args) == 0
    assert run_cast(["fit", "--config", f"{run}/config.yaml", "--seed_everything", "0",
                     "--trainer.default_root_dir", "repro_from_config"]) == 0
    reference = _state(Path(run) / "final.ckpt")
    for again in ("repro", "repro_from_config"):
        state = _state(Path(again) / "final.ckpt")
        assert state.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(state[name], tensor), (again, name)
    full = _state(Path("runs/full-s0/final.ckpt"))
    assert any(not torch.equal(full[name], reference[name]) for name in reference)  # the map did change the run


def test_a_second_run_reuses_every_stage_and_a_changed_recipe_reruns_the_fits(study, capsys):
    from cast_lightning.study.commands import demo

    out, _, _ = study
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("final.ckpt") if "runs" in p.parts}
    assert len(stamps) == 3
    diagnosis = (out / "diagnosis" / "conflict_map.json").stat().st_mtime_ns
    demo(output_dir=str(out), seeds=[0], max_steps=3, eval_limit=4)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    capsys.readouterr()
    demo(output_dir=str(out), seeds=[0], max_steps=4, eval_limit=4)
    assert all(p.stat().st_mtime_ns != stamps[p] for p in stamps)  # every fit reran with 4 steps
    assert (out / "diagnosis" / "conflict_map.json").stat().st_mtime_ns == diagnosis  # the diagnosis did not
    assert "its command or inputs changed" in capsys.readouterr().out
    experiments = json.loads((out / "experiments.json").read_text())
    assert all("--trainer.max_steps=4" in r["command"] for r in experiments["runs"] if r["command"])
    assert not math.isnan(experiments["runs"][1]["metrics"]["safety.refusal_rate"])


def test_the_recipes_thread_count_holds_during_a_run_and_is_restored():
    from cast_lightning.callbacks import IntraOpThreads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        callback = IntraOpThreads(threads=1)
        callback.setup(None, None, "fit")
        assert torch.get_num_threads() == 1
        callback.teardown(None, None, "fit")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_study_runs_its_variants_under_each_training_scope(mini_world, tmp_path, monkeypatch):
    import cast_lightning.world.base_model as base_model
    from cast_lightning.study.commands import report

    monkeypatch.setattr(base_model, "ensure_base_model", lambda seed=0, **_: mini_world)
    out = tmp_path / "scopes"
    report(output_dir=str(out), variants=["base", "full", "cast"], skip_ratios=[0.1], seeds=[0],
           single_head_validity=0, scopes=["attention", "lora"], max_steps=2, eval_limit=2)
    experiments = json.loads((out / "experiments.json").read_text())
    fits = [r for r in experiments["runs"] if r["variant"] != "base"]
    assert sorted((r["variant"], r["scope"]) for r in fits) == [("cast", "attention"), ("cast", "lora"),
                                                               ("full", "attention"), ("full", "lora")]
    base = {name: t for name, t in _base_state(out / "base_model").items()}
    for run in fits:
        assert run["run_dir"].endswith(f"-{run['scope']}") and f"--model.trainable={run['scope']}" in run["command"]
        config = (out / run["config"]).read_text()
        assert f"trainable: {run['scope']}" in config
        state = {n.removeprefix("model."): t for n, t in _state(out / run["checkpoint"]).items()}
        if run["scope"] == "attention":
            # Everything outside the attention projections is the base model's, bit for bit.
            mlp = "model.layers.0.mlp.down_proj.weight"
            assert mlp not in state or torch.equal(state[mlp], base[mlp])
            assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
        else:
            assert any("lora_" in name for name in state)  # the adapter is what the checkpoint holds
    report_data = json.loads((out / "report.json").read_text())
    assert {c["scope"] for c in report_data["comparisons"]} <= {"attention", "lora"}
    assert {v["label"] for v in report_data["variants"]} >= {"full fine-tuning [attention]", "full fine-tuning [lora]"}


def _base_state(base_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(base_dir / "model.safetensors"))
