"""A study's stages, each cached: base model -> ``cast diagnose`` -> variant maps -> ``cast fit`` -> ``cast eval``
-> ``experiments.json``.

Every stage runs inside the study directory (``output_dir``), where ``base_model`` and ``world`` link to the cached
base model and its data, so the recipes' relative paths resolve there and every path recorded is relative to it.
A diagnosis or fit is exactly the LightningCLI run of ``cast diagnose`` / ``cast fit`` with the recipe YAML and
this run's overrides; its directory keeps the resolved ``config.yaml`` (``cast fit --config runs/<run>/config.yaml``
repeats the run) and a ``stage.json`` stamp of the command and of its inputs (the recipe's hash, the heads its map
skips). A stage is reused only when its output is readable and its stamp matches what would run now, so editing a
recipe or a map's selection reruns exactly the stages it feeds. Layout of ``output_dir``::

    base_model, world                       links to the cached base model and its generated data
    diagnosis/{conflict_map.json, .png, config.yaml, stage.json}
    eval/base/eval.json                     the base model's evaluation
    runs/<variant>-s<seed>[-<scope>]/       full fine-tuning (scope suffix unless all): {config.yaml, stage.json, final.ckpt, eval.json, lightning_logs/}
    runs/<variant>-r<ratio>-s<seed>[-<scope>]/ skipping variants: the same + conflict_map.json (the re-scored diagnosis map)
    single/l<L>h<H>-s<seed>/                single-head validity runs (scope all): the same, skipping one head
    experiments.json                        every run's metrics, paths and hashes (schema 2): what the report reads
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from cast_lightning.errors import CastError
from cast_lightning.io import atomic_write_json
from cast_lightning.study.plan import NO_MAP_FITS, VARIANTS, StudyPlan, resolve_recipe

SCHEMA_VERSION = 2
T = TypeVar("T")


def stage(message: str, started: float | None = None) -> float:
    """One progress line per stage (with its time when it ends)."""
    now = time.perf_counter()
    suffix = f" ({now - started:.1f}s)" if started is not None else ""
    print(f"[cast] {message}{suffix}", flush=True)
    return now


@contextlib.contextmanager
def inside(directory: Path) -> Iterator[None]:
    """Run with ``directory`` as the working directory (the recipes' relative paths resolve there)."""
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(path: Path, read: Callable[[Path], T]) -> T | None:
    """A finished stage's output, or None when the stage must run: the file is missing, or it cannot be read
    (every stage writes atomically, so that means damage from outside, e.g. a copy cut short or an edit): one
    progress line says so and the stage is recomputed rather than stopping the whole study."""
    if not path.exists():
        return None
    try:
        return read(path)
    except (CastError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        stage(f"cached {path} is unreadable ({reason}); recomputing it")
        return None


def _stamp_matches(path: Path, stamp: dict) -> bool:
    """Whether the stage that wrote the stamp ``path`` ran exactly as ``stamp`` says it would run now."""
    if not path.exists():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if saved != stamp:
        stage(f"{path.parent}: its command or inputs changed since it ran; rerunning it")
        return False
    return True


def _read_results(path: Path) -> dict:
    results = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise CastError(f"{path} has no 'metrics' object")
    return results


def _read_checkpoint(path: Path) -> Path:
    from cast_lightning.checkpoints import check_resume_checkpoint

    check_resume_checkpoint(str(path))  # memory-mapped: checks the file is whole without reading the tensors
    return path


def _read_map(path: Path):
    from cast_lightning.conflict import ConflictMap

    return ConflictMap.from_json(path)


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


def command_line(argv: list[str]) -> str:
    return "cast " + shlex.join(argv)


# -- the stages ------------------------------------------------------------------------------------------------------


def prepare(out: Path, base_seed: int, wait: bool = True) -> dict:
    """Build (or reuse) the embedded world's base model; link it and its world into the study directory."""
    from cast_lightning.world import base_model

    started = stage("base model: building or reusing the cached one")
    base = base_model.ensure_base_model(seed=base_seed, wait=wait)
    out.mkdir(parents=True, exist_ok=True)
    _link(base, out / "base_model")
    _link(base / "world", out / "world")
    stage(f"base model ready: {base}", started)
    return {"path": "base_model", "key": base.name}


def diagnose_stage(plan: StudyPlan, recipe: Path) -> tuple[object, dict]:
    """``cast diagnose --config <diagnose recipe> --trainer.default_root_dir diagnosis`` (cached)."""
    from cast_lightning.lightning_cli import run_diagnose

    run_dir = Path("diagnosis")
    argv = ["--config", str(recipe), "--trainer.default_root_dir", str(run_dir)]
    shown = ["diagnose", "--config", plan.diagnose_config, *argv[2:]]
    stamp = {"command": command_line(shown), "recipe_sha256": sha256(recipe)}
    output = run_dir / "conflict_map.json"
    cmap = _cached(output, _read_map) if _stamp_matches(run_dir / "stage.json", stamp) else None
    if cmap is None:
        started = stage(f"diagnose: {command_line(shown)}")
        run_diagnose(argv)
        atomic_write_json(run_dir / "stage.json", stamp)
        cmap = _read_map(output)
        stage(f"diagnose: map written to {output}", started)
    return cmap, {"map": str(output), "sha256": sha256(output), "config": str(run_dir / "config.yaml"),
                  "command": stamp["command"], "conflict_map": json.loads(output.read_text(encoding="utf-8"))}


def variant_map(cmap, diagnosis_sha256: str, score: str, skip_ratio: float, seed: int, output: Path,
                selection_mode: str = "skip") -> object:
    """The diagnosis map re-scored and re-selected for one variant (``ConflictMap.rescore``: no new gradients),
    cached while the diagnosis map it came from is unchanged."""
    source = {"map": "diagnosis/conflict_map.json", "sha256": diagnosis_sha256}
    cached = _cached(output, _read_map)
    if cached is not None and cached.options.get("derived_from") == source:
        return cached
    derived = cmap.rescore(score=score, skip_ratio=skip_ratio, seed=seed, selection_mode=selection_mode)
    derived.options["derived_from"] = source
    derived.to_json(output)
    return derived


def fit_command(plan: StudyPlan, run_dir: Path, seed: int, conflict_map: Path | None = None,
                skip_heads: list[list[int]] | None = None, scope: str = "all", extra: tuple[str, ...] = ()) -> list[str]:
    """The ``cast fit`` arguments of one run: the recipe, the plan's shared overrides, then this run's scope (when
    not the recipe's ``all``), map, seed and directory (with the recipe named as the plan names it)."""
    argv = ["fit", "--config", plan.fit_config, *plan.run_args()]
    if scope != "all":
        argv += [f"--model.trainable={scope}"]
    argv += list(extra)
    if conflict_map is not None:
        argv += ["--model.conflict_map", str(conflict_map)]
    if skip_heads is not None:
        argv += ["--model.skip_heads", json.dumps(skip_heads)]
    return argv + ["--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.default_root_dir", str(run_dir)]


def fit_stage(plan: StudyPlan, recipe: Path, argv: list[str], run_dir: Path,
              conflict_map: Path | None = None) -> tuple[Path, float | None]:
    """Run (or reuse) one ``cast fit`` -> ``run_dir/final.ckpt``; returns it and the fit's seconds (None: reused).
    ``argv`` names the recipe as the plan does; ``recipe`` is where that resolved to."""
    from cast_lightning.lightning_cli import run_lightning

    # What the fit consumes of a map is its skip list: a map that gains other fields (a new scorer's grid) or is
    # re-derived with the same heads leaves the fit valid.
    skip = _read_map(conflict_map).skip if conflict_map is not None else None
    stamp = {"command": command_line(argv), "recipe_sha256": sha256(recipe), "skip_heads": skip}
    final = run_dir / "final.ckpt"
    if _stamp_matches(run_dir / "stage.json", stamp) and _cached(final, _read_checkpoint) is not None:
        return final, None
    # Its results came from weights that are about to be replaced.
    for stale in ("eval.json", "eval.stage.json", "stage.json"):
        (run_dir / stale).unlink(missing_ok=True)
    started = stage(f"fit: {command_line(argv)}")
    run_lightning([argv[0], "--config", str(recipe), *argv[3:]])
    if not final.is_file():
        raise CastError(f"{command_line(argv)} wrote no {final}: keep the FinalCheckpoint callback in {plan.fit_config}")
    atomic_write_json(run_dir / "stage.json", stamp)
    return final, round(stage(f"fit {run_dir}: done", started) - started, 1)


def eval_stage(plan: StudyPlan, model: Path, output: Path) -> dict:
    """``cast eval --suite all`` on ``model`` -> results JSON (cached while its options are unchanged)."""
    from cast_lightning.evaluation import evaluate

    stamp = {"command": command_line(["eval", "--model", str(model), "--suite", "all", "--output", str(output),
                                       "--limit", str(plan.eval_limit), "--batch_size", str(plan.eval_batch_size)])}
    stamp_path = output.with_name(output.stem + ".stage.json")
    cached = _cached(output, _read_results)
    if cached is not None and _stamp_matches(stamp_path, stamp):
        return cached
    started = stage(f"eval {output.parent}")
    results = evaluate(model=str(model), suite="all", output=str(output), limit=plan.eval_limit,
                       batch_size=plan.eval_batch_size)
    atomic_write_json(stamp_path, stamp)
    summary = ", ".join(f"{k}={v:.3f}" for k, v in results["metrics"].items() if isinstance(v, float))
    stage(f"eval done: {summary}", started)
    return results


def _leaf_tasks(results: dict) -> list[str] | None:
    """The lm-eval leaf tasks of a results file (lm-eval records sample counts only for leaf tasks)."""
    from cast_lightning.study.utility import parse_utility_key

    counts = results.get("sample_counts") or {}
    tasks = {(parse_utility_key(key) or ("",))[0] for key in results["metrics"]}
    return [task for task in counts if task in tasks] or None


def _entry(run_dir: Path, model: Path, results_path: Path, results: dict, config: bool = True) -> dict:
    return {
        "run_dir": str(run_dir),
        "config": str(run_dir / "config.yaml") if config else None,
        "checkpoint": str(model),
        "results": str(results_path),
        "results_sha256": sha256(results_path),
        "metrics": results["metrics"],
        "leaf_tasks": _leaf_tasks(results),
    }


def single_heads(cmap, count: int) -> list[tuple[int, int]]:
    """``count`` heads spread evenly over the diagnosis ranking (highest score first)."""
    ranked = sorted(
        ((cmap.score[layer][head], layer, head) for layer in range(cmap.num_layers) for head in range(cmap.num_heads)),
        reverse=True,
    )
    step = max(1, len(ranked) // count)
    return [(layer, head) for _, layer, head in ranked[::step][:count]]


STUDY_LOCK = ".cast.lock"


def study_lock(output_dir: str | Path, wait: bool = True):
    """The lock of one study directory (``<output_dir>/.cast.lock``): one study at a time writes there; a second
    waits, saying so in one line, or (``wait=False``) fails at once. Re-entrant within a process."""
    from cast_lightning.io import exclusive

    out = Path(output_dir).resolve()
    return exclusive(out / STUDY_LOCK, f"the study directory {out}", wait=wait)


def run_study(plan: StudyPlan, wait: bool = True) -> dict:
    """Every (variant, skip ratio, seed) through diagnose / fit / eval, reusing cached stages; writes and returns
    ``experiments.json`` (schema 2: each run's metrics, leaf tasks, command, and paths relative to ``output_dir``
    with the sha256 of its results file). The study directory is locked meanwhile (``study_lock``), and the base
    model's cache while it is built: ``wait=False`` fails at once if another run holds either."""
    plan.check()
    with study_lock(plan.output_dir, wait):
        return _run_study(plan, wait)


def _run_study(plan: StudyPlan, wait: bool) -> dict:
    from cast_lightning.provenance import collect

    # Resolved before entering the study directory: the plan's paths are relative to where the command started.
    fit_recipe = resolve_recipe(plan.fit_config, "--fit_config")
    diagnose_recipe = resolve_recipe(plan.diagnose_config, "--diagnose_config")
    out = Path(plan.output_dir).resolve()
    base_model = prepare(out, plan.base_seed, wait)
    runs: list[dict] = []
    single: list[dict] = []
    with inside(out):
        cmap, diagnosis = diagnose_stage(plan, diagnose_recipe)
        computed = set(cmap.extra) | ({"layer_gap"} if "layer_gap" in cmap.data else set())
        missing = sorted({VARIANTS[v].needs for v in plan.variants if VARIANTS[v].needs} - computed)
        if missing:
            raise CastError(
                f"variant(s) need the diagnosis scorer(s) {', '.join(missing)}, which {plan.diagnose_config} does not "
                f"compute: add 'scorers: [{', '.join(missing)}]' under its model: section"
            )
        if "base" in plan.variants:
            results_path = Path("eval/base/eval.json")
            results = eval_stage(plan, Path("base_model"), results_path)
            runs.append({"variant": "base", "score": None, "skip_ratio": 0.0, "seed": 0, "skip_heads": [],
                         "command": None, "fit_seconds": None,
                         **_entry(results_path.parent, Path("base_model"), results_path, results, config=False)})
        for scope, seed in [(scope, seed) for scope in plan.scopes for seed in plan.seeds]:
            suffix = "" if scope == "all" else f"-{scope}"  # scope all keeps the plain names
            for variant in [v for v in NO_MAP_FITS if v in plan.variants]:
                run_dir = Path("runs") / f"{variant}-s{seed}{suffix}"
                argv = fit_command(plan, run_dir, seed, scope=scope, extra=VARIANTS[variant].fit_args)
                checkpoint, seconds = fit_stage(plan, fit_recipe, argv, run_dir)
                results = eval_stage(plan, checkpoint, run_dir / "eval.json")
                runs.append({"variant": variant, "score": None, "scope": scope, "skip_ratio": 0.0, "seed": seed,
                             "skip_heads": [], "command": command_line(argv), "fit_seconds": seconds,
                             **_entry(run_dir, checkpoint, run_dir / "eval.json", results)})
            for ratio in plan.skip_ratios:
                for variant in [v for v in plan.variants if VARIANTS[v].score is not None]:
                    score, mode = VARIANTS[variant].score, VARIANTS[variant].selection_mode
                    run_dir = Path("runs") / f"{variant}-r{ratio:g}-s{seed}{suffix}"
                    map_path = run_dir / "conflict_map.json"
                    vmap = variant_map(cmap, diagnosis["sha256"], score, ratio, seed, map_path, mode)
                    argv = fit_command(plan, run_dir, seed, conflict_map=map_path, scope=scope)
                    checkpoint, seconds = fit_stage(plan, fit_recipe, argv, run_dir, conflict_map=map_path)
                    results = eval_stage(plan, checkpoint, run_dir / "eval.json")
                    runs.append({"variant": variant, "score": score, "selection_mode": mode, "scope": scope,
                                 "skip_ratio": ratio, "seed": seed,
                                 "skip_heads": [list(h) for h in vmap.skip], "command": command_line(argv),
                                 "fit_seconds": seconds, **_entry(run_dir, checkpoint, run_dir / "eval.json", results)})
        if plan.single_head_validity > 0:
            for seed in plan.seeds:
                for layer, head in single_heads(cmap, plan.single_head_validity):
                    run_dir = Path("single") / f"l{layer}h{head}-s{seed}"
                    argv = fit_command(plan, run_dir, seed, skip_heads=[[layer, head]])
                    checkpoint, seconds = fit_stage(plan, fit_recipe, argv, run_dir)
                    results = eval_stage(plan, checkpoint, run_dir / "eval.json")
                    single.append({"head": [layer, head], "seed": seed, "command": command_line(argv),
                                   "fit_seconds": seconds, **_entry(run_dir, checkpoint, run_dir / "eval.json", results)})
        experiments = {
            "schema_version": SCHEMA_VERSION,
            "plan": plan.record(),
            "base_model": base_model,
            "diagnosis": diagnosis,
            "runs": runs,
            "single_head": single,
            "provenance": collect(),
        }
        atomic_write_json("experiments.json", experiments)
    return experiments
