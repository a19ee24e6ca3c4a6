"""The experiment pipeline on the embedded world: base model -> diagnose -> fit variants x seeds -> eval.

Every stage writes its result atomically and is skipped when that result already exists, so re-running
``cast demo`` or ``cast report`` does no finished work twice; a result file that cannot be read (damaged
outside cast) is recomputed, with one progress line saying so. Layout of ``output_dir``::

    base_model -> cached base model directory (symlink)      world -> its generated data (symlink)
    diagnosis/conflict_map.json (+ .png)                     eval/base.json
    runs/<variant>-r<ratio>-s<seed>/{conflict_map.json, final.ckpt, eval.json}
    single/l<L>h<H>-s<seed>/{final.ckpt, eval.json}          experiments.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch

from cast_lightning.errors import CastError
from cast_lightning.io import atomic_save, atomic_write_json

MAP_VARIANTS = {"cast": "product", "random": "random", "oc": "oc", "fs": "fs", "rank": "rank", "weighted": "weighted"}
VARIANTS = ("base", "full", *MAP_VARIANTS)
T = TypeVar("T")


def stage(message: str, started: float | None = None) -> float:
    """One progress line per stage (with its time when it ends)."""
    now = time.perf_counter()
    suffix = f" ({now - started:.1f}s)" if started is not None else ""
    print(f"[cast] {message}{suffix}", flush=True)
    return now


def _cached(path: Path, read: Callable[[Path], T]) -> T | None:
    """A finished stage's result from its file, or None when the stage must run: the file is missing, or it
    cannot be read (every stage writes atomically, so that means damage from outside, e.g. a copy cut short or
    an edit): one progress line says so and the stage is recomputed rather than stopping the whole study."""
    if not path.exists():
        return None
    try:
        return read(path)
    except (CastError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        stage(f"cached {path} is unreadable ({reason}); recomputing it")
        return None


def _read_results(path: Path) -> dict:
    results = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise CastError(f"{path} has no 'metrics' object")
    return results


def _read_checkpoint(path: Path) -> Path:
    from cast_lightning.module import check_resume_checkpoint

    check_resume_checkpoint(str(path))  # memory-mapped: checks the file is whole without reading the tensors
    return path


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


def prepare(output_dir: Path, base_seed: int = 0) -> tuple[Path, object]:
    """Build (or reuse) the embedded world's base model; link it and its world into ``output_dir``."""
    from cast_lightning.data.base_model import ensure_base_model, world_paths

    started = stage("base model: building or reusing the cached one")
    base = ensure_base_model(seed=base_seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    _link(base, output_dir / "base_model")
    _link(base / "world", output_dir / "world")
    stage(f"base model ready: {base}", started)
    return base, world_paths(base)


def _datamodule(base: Path, world, seed: int, batch_size: int = 16, utility_replay: float = 0.5):
    from cast_lightning.data.datamodule import SafetyUtilityDataModule

    return SafetyUtilityDataModule(
        # Benign look-alikes with helpful answers beside the refusals: without that contrast the shared
        # prompt frames make the model refuse ~70% of benign look-alikes (measured by the world's --measure).
        safety_files=[str(world.safety_train), str(world.benign_train)],
        utility_files=[str(world.utility_train)],
        tokenizer=str(base),
        utility_replay=utility_replay,
        batch_size=batch_size,
        max_length=160,
        seed=seed,
    )


def diagnose_stage(base: Path, world, output: Path, samples: int = 256, batch_size: int = 32) -> object:
    """The conflict map of the base model (cosine OC, taylor FS; every score is derived from it)."""
    from cast_lightning.conflict import ConflictMap
    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.diagnosis import diagnose
    from cast_lightning.loading import load_causal_lm

    cached = _cached(output, ConflictMap.from_json)
    if cached is not None:
        return cached
    started = stage("diagnose: safety and utility gradients per head")
    data = SafetyUtilityDataModule(
        safety_files=[str(world.safety_diagnosis)], utility_files=[str(world.utility_diagnosis)],
        tokenizer=str(base), batch_size=batch_size, max_length=160, diagnosis_samples=samples,
    )
    safety, utility = data.diagnosis_dataloaders()
    cmap = diagnose(load_causal_lm(str(base)), safety, utility, name=str(base), output=output, skip_ratio=0.1)
    stage(f"diagnose: map written to {output}", started)
    return cmap


def variant_map(cmap, score: str, skip_ratio: float, seed: int, output: Path) -> object:
    """The diagnosis map re-scored and re-selected for one variant (no new gradients needed)."""
    from cast_lightning.conflict import ConflictMap, combine_scores, select_heads

    cached = _cached(output, ConflictMap.from_json)
    if cached is not None:
        return cached
    scores = combine_scores(cmap.oc, cmap.fs, score, seed=seed)
    skip = select_heads(scores, skip_ratio=skip_ratio, seed=seed)
    options = {**cmap.options, "score": score, "skip_ratio": skip_ratio, "seed": seed}
    derived = replace(cmap, score=scores.tolist(), skip=skip, options=options, seed=seed)
    derived.to_json(output)
    return derived


def fit_stage(
    base: Path, world, run_dir: Path, seed: int, max_steps: int, conflict_map: Path | None = None,
    skip_heads: list[list[int]] | None = None, learning_rate: float = 1e-3,
) -> tuple[Path, float | None]:
    """Safety fine-tuning (CAST when a map or skip list is given, else full FT) -> ``final.ckpt``."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from cast_lightning.module import CASTModule

    final = run_dir / "final.ckpt"
    if _cached(final, _read_checkpoint) is not None:
        return final, None
    if final.exists():  # unreadable: its results came from weights that are gone, so they are redone too
        (run_dir / "eval.json").unlink(missing_ok=True)
    started = stage(f"fit {run_dir.name}: {max_steps} steps")
    L.seed_everything(seed, verbose=False)
    module = CASTModule(
        str(base), conflict_map=str(conflict_map) if conflict_map else None, skip_heads=skip_heads,
        learning_rate=learning_rate, weight_decay=0.01, warmup_steps=max(1, max_steps // 10),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, gradient_clip_val=1.0, logger=CSVLogger(run_dir, name="logs"),
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=run_dir, log_every_n_steps=10,
        deterministic=True,
    )
    trainer.fit(module, _datamodule(base, world, seed))
    atomic_save(final, trainer.save_checkpoint)
    return final, stage(f"fit {run_dir.name}: done", started) - started


def eval_stage(model: Path, output: Path, limit: int | None = None) -> dict:
    """Safety and utility suites on ``model`` -> results JSON (cached)."""
    from cast_lightning.evaluation import evaluate

    cached = _cached(output, _read_results)
    if cached is not None:
        return cached
    started = stage(f"eval {output.parent.name if output.name == 'eval.json' else output.stem}")
    results = evaluate(model=str(model), suite="all", output=str(output), limit=limit, batch_size=64)
    summary = ", ".join(f"{k}={v:.3f}" for k, v in results["metrics"].items() if isinstance(v, float))
    stage(f"eval done: {summary}", started)
    return results


def _provenance() -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("cast-lightning", "torch", "lightning", "transformers", "lm_eval", "datasets"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        ).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "versions": versions,
        "git_commit": commit,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
    }


def run_experiments(
    output_dir: str = "cast_runs/report",
    variants: list[str] | None = None,
    skip_ratios: list[float] | None = None,
    seeds: list[int] | None = None,
    single_head_validity: int = 0,
    max_steps: int = 150,
    eval_limit: int | None = None,
    base_seed: int = 0,
) -> dict:
    """Run every (variant, skip ratio, seed) through diagnose/fit/eval, reusing cached stages.

    ``single_head_validity`` > 0 also fine-tunes with each of that many heads skipped alone (the heads
    spread evenly over the product-score ranking, every seed) for the diagnosis-validity section.
    """
    variants = list(variants or ["base", "full", "cast", "random"])
    skip_ratios = list(skip_ratios or [0.1])
    seeds = list(seeds or [0])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise CastError(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    if max_steps < 1:
        raise CastError("max_steps must be >= 1")
    out = Path(output_dir)
    base, world = prepare(out, base_seed)
    diagnosis_map = out / "diagnosis" / "conflict_map.json"
    cmap = diagnose_stage(base, world, diagnosis_map)
    runs = []

    def record(variant, score, ratio, seed, skip, run_dir, model, fit_seconds):
        results_path = run_dir / "eval.json"
        results = eval_stage(model, results_path, eval_limit)
        runs.append({
            "variant": variant, "score": score, "skip_ratio": ratio, "seed": seed, "skip_heads": skip,
            "results": str(results_path), "metrics": results["metrics"], "fit_seconds": fit_seconds,
        })

    if "base" in variants:
        record("base", None, 0.0, 0, [], out / "eval" / "base", base, None)
    for seed in seeds:
        if "full" in variants:
            run_dir = out / "runs" / f"full-s{seed}"
            checkpoint, seconds = fit_stage(base, world, run_dir, seed, max_steps)
            record("full", None, 0.0, seed, [], run_dir, checkpoint, seconds)
        for ratio in skip_ratios:
            for variant in [v for v in variants if v in MAP_VARIANTS]:
                run_dir = out / "runs" / f"{variant}-r{ratio:g}-s{seed}"
                vmap = variant_map(cmap, MAP_VARIANTS[variant], ratio, seed, run_dir / "conflict_map.json")
                checkpoint, seconds = fit_stage(base, world, run_dir, seed, max_steps, conflict_map=run_dir / "conflict_map.json")
                record(variant, MAP_VARIANTS[variant], ratio, seed, vmap.skip, run_dir, checkpoint, seconds)

    single = []
    if single_head_validity > 0:
        ranked = sorted(
            ((cmap.score[layer][head], layer, head) for layer in range(cmap.num_layers) for head in range(cmap.num_heads)),
            reverse=True,
        )
        step = max(1, len(ranked) // single_head_validity)
        for seed in seeds:
            for _, layer, head in ranked[::step][:single_head_validity]:
                run_dir = out / "single" / f"l{layer}h{head}-s{seed}"
                checkpoint, _ = fit_stage(base, world, run_dir, seed, max_steps, skip_heads=[[layer, head]])
                results = eval_stage(checkpoint, run_dir / "eval.json", eval_limit)
                single.append({"head": [layer, head], "seed": seed, "metrics": results["metrics"]})

    experiments = {
        "output_dir": str(out),
        "base_model": str(base),
        "diagnosis_map": str(diagnosis_map),
        "config": {
            "variants": variants, "skip_ratios": skip_ratios, "seeds": seeds, "single_head_validity": single_head_validity,
            "max_steps": max_steps, "eval_limit": eval_limit, "base_seed": base_seed,
        },
        "runs": runs,
        "single_head": single,
        "provenance": _provenance(),
    }
    atomic_write_json(out / "experiments.json", experiments)
    return experiments
