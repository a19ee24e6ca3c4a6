"""`cast demo` end to end on a miniature world (scale 0.05, a few steps): every stage runs and is cached."""

from __future__ import annotations

import functools
import json

import cast_lightning.data.base_model as base_model
from cast_lightning.demo import demo


def test_demo_runs_every_stage_and_reuses_them(tmp_path, monkeypatch):
    tiny = functools.partial(base_model.ensure_base_model, cache_dir=tmp_path / "cache", scale=0.05, train_config={"steps": 10})
    monkeypatch.setattr(base_model, "ensure_base_model", tiny)
    out = tmp_path / "demo"
    experiments = demo(output_dir=str(out), seeds=[0], max_steps=3, eval_limit=4)
    assert [r["variant"] for r in experiments["runs"]] == ["base", "full", "cast", "random"]
    assert (out / "diagnosis" / "conflict_map.json").exists() and (out / "diagnosis" / "conflict_map.png").exists()
    for name in ("report.md", "report.html", "report.json", "experiments.json"):
        assert (out / name).stat().st_size > 0
    cast_run = next(r for r in experiments["runs"] if r["variant"] == "cast")
    random_run = next(r for r in experiments["runs"] if r["variant"] == "random")
    assert len(cast_run["skip_heads"]) == len(random_run["skip_heads"]) >= 1  # budget-matched
    for run in experiments["runs"]:
        assert json.loads(open(run["results"]).read())["metrics"] == run["metrics"]
    # A second run reuses every finished stage: no checkpoint is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("final.ckpt")}
    assert len(stamps) == 3
    demo(output_dir=str(out), seeds=[0], max_steps=3, eval_limit=4)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("final.ckpt")} == stamps
