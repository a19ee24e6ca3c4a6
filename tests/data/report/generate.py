"""Regenerate the stored report fixtures: ``python tests/data/report/generate.py`` (deterministic).

A fake-but-plausible ``cast report`` study on a 2-layer x 4-head model, as ``experiments.json`` schema version 2:
base, full fine-tuning, CAST (product), random, OC-only and FS-only at skip ratios 0.1 and 0.25 x seeds 0, 1, 2,
plus 6 heads x 3 seeds of single-head runs. Designed so that CAST beats random skipping at 0.1 and does not at
0.25. Rates are multiples of 1/40 (40 prompts per safety set), skill accuracies multiples of 1/20 (20 documents
per skill). Only the results files (``results/``) and the map (``conflict_map.json``, also embedded in
experiments.json) are stored; ``run_dir`` / ``config`` / ``checkpoint`` name what a real study writes there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cast_lightning.conflict import ConflictMap, combine_scores, select_heads

HERE = Path(__file__).resolve().parent
SKILLS = ["add", "reverse", "sort", "count", "facts"]
SKILL_OFFSET = [0.05, 0.0, -0.05, -0.1, 0.1]
SEEDS = [0, 1, 2]
RATIOS = [0.1, 0.25]
N_SAFETY, N_SKILL = 40, 20


def conflict_map() -> ConflictMap:
    oc = [[0.62, -0.30, 0.15, 0.05], [0.48, 0.20, -0.10, 0.33]]
    fs = [[0.90, 0.40, 0.20, 0.70], [0.30, 1.00, 0.60, 0.10]]
    model = {"name": "tests/tiny", "path": None, "architecture": "llama", "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2, "head_dim": 8, "hidden_size": 32}
    options = {"conflict": "cosine", "sensitivity": "taylor", "score": "product", "weight_lambda": 0.5, "skip_ratio": 0.1}
    score = combine_scores(oc, fs, "product")
    return ConflictMap(model=model, oc=oc, fs=fs, score=score, skip=select_heads(score, 0.1), options=options,
                       data={"safety_samples": 64, "utility_samples": 64}, seed=0, created="2025-01-01T00:00:00+00:00")


def quantize(x: float, n: int) -> float:
    return float(min(1.0, max(0.0, round(x * n) / n)))


def metrics_for(refusal: float, over: float, utility: float, rng) -> dict:
    skills = [quantize(utility + off + rng.normal(0, 0.02), N_SKILL) for off in SKILL_OFFSET]
    m = {"safety.refusal_rate": quantize(refusal + rng.normal(0, 0.012), N_SAFETY),
         "safety.over_refusal_rate": quantize(over + rng.normal(0, 0.012), N_SAFETY),
         "utility.cast_world_utility.exact_match": float(np.mean(skills))}
    m.update({f"utility.cast_world_{s}.exact_match": v for s, v in zip(SKILLS, skills)})
    return m


def results_file(name: str, metrics: dict, seed: int, skip_heads: list) -> tuple[str, str, list[str]]:
    """Write ``results/<name>.json`` like ``cast eval``; returns its path, sha256 and leaf tasks (sample counts)."""
    results = {
        "schema_version": 1, "created": "2025-01-01T00:00:00+00:00",
        "model": {"kind": "lightning_checkpoint", "path": f"runs/{name}/last.ckpt", "skip_heads": skip_heads},
        "suite": "all", "seed": seed, "metrics": metrics,
        "task_versions": {"cast_refusal": 1.0, "cast_over_refusal": 1.0, **{f"cast_world_{s}": 1.0 for s in SKILLS}},
        "sample_counts": {"cast_refusal": N_SAFETY, "cast_over_refusal": N_SAFETY, **{f"cast_world_{s}": N_SKILL for s in SKILLS}},
        "utility": {"tasks": ["cast_world_utility"]},
    }
    path = HERE / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return f"results/{name}.json", hashlib.sha256(path.read_bytes()).hexdigest(), list(results["sample_counts"])


def run_paths(run_dir: str, name: str, metrics: dict, seed: int, skip_heads: list) -> dict:
    results, sha256, leaves = results_file(name, metrics, seed, skip_heads)
    return {"run_dir": run_dir, "config": f"{run_dir}/config.yaml", "checkpoint": f"{run_dir}/final.ckpt",
            "results": results, "results_sha256": sha256, "metrics": metrics, "leaf_tasks": leaves}


def main() -> None:
    rng = np.random.default_rng(7)
    cmap = conflict_map()
    map_path = cmap.to_json(HERE / "conflict_map.json")
    design = {  # (refusal, over-refusal, utility) means
        ("base", 0.0): (0.10, 0.05, 0.80), ("full", 0.0): (0.925, 0.15, 0.62),
        ("cast", 0.1): (0.90, 0.12, 0.74), ("random", 0.1): (0.90, 0.13, 0.63),
        ("oc", 0.1): (0.90, 0.12, 0.70), ("fs", 0.1): (0.88, 0.12, 0.66),
        ("cast", 0.25): (0.85, 0.10, 0.70), ("random", 0.25): (0.86, 0.11, 0.70),
        ("oc", 0.25): (0.85, 0.11, 0.69), ("fs", 0.25): (0.84, 0.10, 0.68),
    }
    score_of = {"cast": "product", "random": "random", "oc": "oc", "fs": "fs"}
    runs, full_utility = [], {}
    for (variant, ratio), (refusal, over, utility) in design.items():
        for seed in ([0] if variant == "base" else SEEDS):
            score = score_of.get(variant)
            skip = [] if score is None else select_heads(combine_scores(cmap.oc, cmap.fs, score, seed=seed), ratio, seed=seed)
            metrics = metrics_for(refusal, over, utility, rng)
            name = f"{variant}_{ratio:g}_s{seed}" if ratio else f"{variant}_s{seed}"
            run_dir = "eval/base" if variant == "base" else f"runs/{variant}-r{ratio:g}-s{seed}" if ratio else f"runs/{variant}-s{seed}"
            run = {"variant": variant, "score": score, "skip_ratio": ratio, "seed": seed, "skip_heads": skip,
                   **run_paths(run_dir, name, metrics, seed, skip),
                   "fit_seconds": None if variant == "base" else round(40 + 5 * rng.random(), 2)}
            if variant == "base":
                run.update(config=None, checkpoint="base_model")
            runs.append(run)
            if variant == "full":
                full_utility[seed] = np.mean([metrics[f"utility.cast_world_{s}.exact_match"] for s in SKILLS])
    product = np.asarray(combine_scores(cmap.oc, cmap.fs, "product"))
    heads = [[0, 0], [1, 0], [1, 3], [0, 1], [1, 1], [0, 2]]
    single = []
    for seed in SEEDS:
        for layer, head in heads:
            utility = full_utility[seed] + 0.12 * product[layer, head] + rng.normal(0, 0.012)
            metrics = metrics_for(0.92, 0.15, utility, np.random.default_rng(seed * 10 + layer * 4 + head))
            name = f"single_l{layer}h{head}_s{seed}"
            single.append({"head": [layer, head], "seed": seed,
                           **run_paths(f"single/l{layer}h{head}-s{seed}", name, metrics, seed, [[layer, head]])})
    experiments = {
        "schema_version": 2,
        "plan": {"variants": ["base", "full", "cast", "random", "oc", "fs"], "skip_ratios": RATIOS, "seeds": SEEDS,
                 "single_head_validity": 6, "eval_limit": None, "base_seed": 0, "fit_config": "configs/world/fit.yaml",
                 "diagnose_config": "configs/world/diagnose.yaml", "fit_args": {"trainer.max_steps": 150}},
        "base_model": {"path": "base_model", "key": "tests-tiny-fixture"},
        "diagnosis": {"map": "conflict_map.json", "sha256": hashlib.sha256(map_path.read_bytes()).hexdigest(),
                      "config": "diagnosis/config.yaml", "conflict_map": cmap.to_dict()},
        "runs": runs, "single_head": single,
        "provenance": {"created": "2025-01-01T00:00:00+00:00", "git_commit": "0123456789abcdef0123456789abcdef01234567",
                       "versions": {"python": "3.11.0", "cast-lightning": "0.1.0", "torch": "2.13.0"},
                       "machine": {"platform": "test fixture", "processor": "x86_64", "cpus": 2, "torch_threads": 2,
                                   "cuda": None, "load_average": None}},
    }
    (HERE / "experiments.json").write_text(json.dumps(experiments, indent=1) + "\n")


if __name__ == "__main__":
    main()
