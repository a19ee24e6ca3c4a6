"""``cast demo``: the whole CAST pipeline on the embedded world, offline, on a laptop CPU."""

from __future__ import annotations

import resource
import time
from pathlib import Path


def demo(
    *,
    output_dir: str = "cast_runs/demo",
    full: bool = False,
    seeds: list[int] | None = None,
    skip_ratio: float = 0.1,
    max_steps: int = 150,
    eval_limit: int | None = None,
) -> dict:
    """Build (or reuse) the embedded world's unaligned base model, diagnose it, fine-tune it with CAST, with
    full fine-tuning and with budget-matched random skipping, evaluate all, and write the safety-utility report.

    Args:
        output_dir: where the runs, results and report go (reused: finished stages are not redone).
        full: the full study (3 seeds; CAST, random, OC-only and FS-only at skip ratios 0.1 and 0.25; single-head
            validity on 8 heads; about 25 minutes on 2 CPU cores) instead of the default (3 seeds; base, full,
            CAST and random at ``skip_ratio``; about 7 minutes).
        seeds: override the seeds of the chosen study.
        skip_ratio: fraction of heads CAST (and random) skip in the quick study.
        max_steps: optimizer steps of each safety fine-tuning run.
        eval_limit: evaluate only this many prompts/documents per suite (quicker, noisier).
    """
    from cast_lightning.pipeline import run_experiments, stage
    from cast_lightning.report import check_study, render_report

    started = time.perf_counter()
    if full:
        plan = dict(variants=["base", "full", "cast", "random", "oc", "fs"], skip_ratios=[0.1, 0.25], seeds=[0, 1, 2],
                    single_head_validity=8)
    else:
        plan = dict(variants=["base", "full", "cast", "random"], skip_ratios=[skip_ratio], seeds=[0, 1, 2], single_head_validity=0)
    if seeds is not None:
        plan["seeds"] = list(seeds)
    # cast report's checks, before the base model is built or anything trains.
    check_study(output_dir=output_dir, max_steps=max_steps, eval_limit=eval_limit, **plan)
    experiments = run_experiments(output_dir=output_dir, max_steps=max_steps, eval_limit=eval_limit, **plan)
    paths = render_report(experiments, output_dir)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _print_table(experiments)
    stage(f"report: {paths.get('html', Path(output_dir) / 'report.html')}")
    stage(f"demo finished in {time.perf_counter() - started:.0f}s, peak memory {peak_mb:.0f} MiB (this process)")
    return experiments


def _print_table(experiments: dict) -> None:
    from cast_lightning.report import utility_score

    print(f"\n{'variant':<10}{'ratio':>6}{'seed':>5}{'refusal':>9}{'over-ref':>9}{'utility':>9}")
    for run in experiments["runs"]:
        m = run["metrics"]
        print(
            f"{run['variant']:<10}{run['skip_ratio']:>6.2f}{run['seed']:>5}{m.get('safety.refusal_rate', float('nan')):>9.3f}"
            f"{m.get('safety.over_refusal_rate', float('nan')):>9.3f}{utility_score(m):>9.3f}"
        )
