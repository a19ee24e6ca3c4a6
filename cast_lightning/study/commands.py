"""``cast report`` and ``cast demo``: thin commands over the study (plan -> stages -> report)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from cast_lightning.study.plan import StudyPlan, shipped_configs_dir


def report(
    *,
    output_dir: str = "cast_runs/report",
    fit_config: str = "configs/world/fit.yaml",
    diagnose_config: str = "configs/world/diagnose.yaml",
    variants: list[str] = ["base", "full", "cast", "random", "oc", "fs"],
    skip_ratios: list[float] = [0.1],
    seeds: list[int] = [0, 1, 2],
    single_head_validity: int = 8,
    scopes: list[str] = ["all"],
    max_steps: int | None = None,
    eval_limit: int | None = None,
    eval_batch_size: int = 64,
    base_seed: int = 0,
    fit_args: list[str] = [],
    no_wait: bool = False,
) -> dict[str, str]:
    """Run variants x skip ratios x seeds (cast diagnose / cast fit / cast eval from the recipe YAMLs, reusing
    cached runs) and write the safety-utility report: report.md, a self-contained report.html, report.json (every
    number shown, each traced to a results file and its sha256) and plots, beside experiments.json in output_dir.
    A whole study is a YAML of these keys: ``cast report --config configs/world/demo_full.yaml``.

    Args:
        output_dir: the study directory: every run, cached result and the report; re-running reuses what is there.
        fit_config: the fine-tuning recipe; each run is ``cast fit --config <it>`` with only the conflict map (or
            skipped head), seed and run directory set per run, inside output_dir (its relative paths resolve there).
        diagnose_config: the diagnosis recipe (``cast diagnose --config <it>``); every variant's map is its map
            re-scored.
        variants: which of base (no fine-tuning), full (full fine-tuning), cast (skip the highest product-score
            heads), random (as many random heads), oc / fs (by Optimization Conflict / Functional Sensitivity
            alone), rank / weighted (the other CAST scores) to run.
        skip_ratios: fractions of all attention heads the skipping variants skip.
        seeds: fine-tuning seeds; every variant but base runs once per seed (means and spreads are over these).
        single_head_validity: heads to fine-tune with only that head skipped, per seed, to test whether the scores
            predict the measured benefit (0: no validity section).
        scopes: training scopes to run every fine-tuning variant under (all, attention, lora: --model.trainable);
            each scope's variants are compared with that scope's random control and full fine-tuning.
        max_steps: optimizer steps of each fit, overriding the recipe's trainer.max_steps (None: the recipe's).
        eval_limit: evaluate only the first N prompts of each safety set and N documents of each utility task.
        eval_batch_size: generation batch size of the evaluations.
        base_seed: seed of the embedded world and its base model.
        fit_args: more ``cast fit`` overrides shared by every run, e.g. ``["--trainer.accumulate_grad_batches=2"]``.
        no_wait: fail at once if another cast run is using output_dir or building the base model, instead of waiting
            for it (each run waits by default, saying so in one line).

    Returns:
        The written report files: name -> path.
    """
    plan = StudyPlan(
        output_dir=output_dir, fit_config=fit_config, diagnose_config=diagnose_config, variants=list(variants),
        skip_ratios=list(skip_ratios), seeds=list(seeds), single_head_validity=single_head_validity, scopes=list(scopes),
        max_steps=max_steps, eval_limit=eval_limit, eval_batch_size=eval_batch_size, base_seed=base_seed,
        fit_args=list(fit_args),
    )
    return write(plan, wait=not no_wait)


def write(plan: StudyPlan, wait: bool = True) -> dict[str, str]:
    """Check the plan, run its stages and write the report; print where it is and its verdict. The study directory
    stays locked from the first stage to the last report file (``stages.study_lock``)."""
    from cast_lightning.study.render import write_report
    from cast_lightning.study.stages import run_study, stage, study_lock

    plan.check()  # before the base model is built or anything trains
    with study_lock(plan.output_dir, wait):
        experiments = run_study(plan, wait)
        paths = write_report(experiments, plan.output_dir)
    _print_table(experiments)
    verdict = json.loads((Path(plan.output_dir) / paths["json"]).read_text(encoding="utf-8"))["verdict"]["sentence"]
    stage(f"report: {Path(plan.output_dir) / paths['html']}\n{verdict}")
    return paths


def study_yaml(full: bool = False) -> Path:
    """The shipped study of ``cast demo`` (``configs/world/demo.yaml``, or ``demo_full.yaml`` with ``full``)."""
    return shipped_configs_dir() / "world" / ("demo_full.yaml" if full else "demo.yaml")


def load_study(path: str | Path, **overrides) -> StudyPlan:
    """A study YAML read by ``cast report``'s own parser (so its keys and types are checked the same way), with
    ``overrides`` (None values ignored) on top."""
    from jsonargparse import ArgumentParser

    from cast_lightning.lightning_cli import PARSER_KWARGS

    parser = ArgumentParser(prog="cast report", **PARSER_KWARGS)
    parser.add_function_arguments(report)
    values = vars(parser.parse_path(str(path)))
    values.pop("no_wait", None)  # how this run waits for another, not part of the study
    values.update({key: value for key, value in overrides.items() if value is not None})
    return StudyPlan(**values)


def demo(
    *,
    full: bool = False,
    output_dir: str | None = None,
    seeds: list[int] | None = None,
    skip_ratio: float | None = None,
    max_steps: int | None = None,
    eval_limit: int | None = None,
    no_wait: bool = False,
) -> dict[str, str]:
    """The whole CAST pipeline on the embedded world, offline, on a laptop CPU: build (or reuse) the world's
    unaligned base model, diagnose it, fine-tune it with CAST, with full fine-tuning and with budget-matched random
    skipping over 3 seeds, evaluate all and write the safety-utility report. The study is
    configs/world/demo.yaml (``cast report --config configs/world/demo.yaml`` is the same run).

    Args:
        full: the full study instead (configs/world/demo_full.yaml: also OC-only and FS-only, skip ratios 0.1 and
            0.25, single-head validity on 8 heads; about 30 minutes on 2 CPU cores).
        output_dir: where the runs and the report go (default: the study's, cast_runs/demo or cast_runs/demo_full).
        seeds: override the study's seeds.
        skip_ratio: override the study's skip ratios with this one.
        max_steps: override the recipe's optimizer steps per fit.
        eval_limit: evaluate only this many prompts/documents per suite (quicker, noisier).
        no_wait: fail at once if another cast run is using output_dir or building the base model, instead of waiting
            for it (each run waits by default, saying so in one line).
    """
    started = time.perf_counter()
    plan = load_study(
        study_yaml(full), output_dir=output_dir, seeds=seeds, max_steps=max_steps, eval_limit=eval_limit,
        skip_ratios=[skip_ratio] if skip_ratio is not None else None,
    )
    paths = write(plan, wait=not no_wait)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from cast_lightning.study.stages import stage

    stage(f"demo finished in {time.perf_counter() - started:.0f}s, peak memory {peak_mb:.0f} MiB (this process)")
    return paths


def _print_table(experiments: dict) -> None:
    from cast_lightning.study.utility import utility_score

    print(f"\n{'variant':<10}{'ratio':>6}{'seed':>5}{'refusal':>9}{'over-ref':>9}{'utility':>9}")
    for run in experiments["runs"]:
        m = run["metrics"]
        print(
            f"{run['variant']:<10}{run['skip_ratio']:>6.2f}{run['seed']:>5}{m.get('safety.refusal_rate', float('nan')):>9.3f}"
            f"{m.get('safety.over_refusal_rate', float('nan')):>9.3f}{utility_score(m, run.get('leaf_tasks')):>9.3f}"
        )
