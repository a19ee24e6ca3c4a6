"""``cast report``: variants x seeds -> a safety-utility report (``report.md``, ``report.html``, ``report.json``, plots).

``report()`` runs (or reuses) every diagnose / fit / eval through ``cast_lightning.pipeline.run_experiments``
and hands its ``experiments`` dictionary to ``render_report``, which only reads numbers: the per-run
``metrics`` copied from each ``cast eval`` results JSON, the single-head runs, and the conflict map.

What the report computes (all of it is written to ``report.json``; the Markdown and HTML show nothing else):

* **Utility** of a run: ``utility_score`` (the unweighted mean of each leaf task's headline metric).
  **Utility drop** of a run: ``utility(base) - utility(run)`` (positive = fine-tuning lost utility).
* **Per variant** (base, full fine-tuning, CAST / random / OC-only / FS-only at each skip ratio): mean
  and sample standard deviation (``ddof=1``) over seeds of refusal rate, over-refusal rate, utility,
  utility drop and each task's utility.
* **CAST vs random skipping** at each skip ratio: the per-seed paired advantage
  ``drop(random) - drop(CAST)``, its mean and standard deviation over seeds, and a verdict sentence
  computed from them by ``VERDICT_RULE``, whatever it says.
* **Diagnosis validity**: for each head fine-tuned with only that head skipped, the measured benefit
  ``utility(skip that head) - utility(full fine-tuning, same seed)`` against the head's score under every
  scoring option (recomputed from the map's OC / FS by ``conflict.combine_scores``): Spearman's rho per seed
  (mean and std over seeds) and on the seed-mean benefit with a bootstrap interval over heads.

Derived numbers are rounded once, in ``report.json``, to the decimals the tables print, so every number
in ``report.md`` / ``report.html`` is literally a number in ``report.json``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from cast_lightning.errors import CastError
from cast_lightning.io import atomic_save, atomic_write_json, atomic_write_text, ensure_writable

SCHEMA_VERSION = 1
VARIANTS = ("base", "full", "cast", "random", "oc", "fs")
VARIANT_ORDER = {name: i for i, name in enumerate(VARIANTS)}
HEADLINE_METRICS = ("exact_match", "acc_norm", "acc")
DECIMALS = 4  # rates, utilities, correlations
SECONDS_DECIMALS = 1
BOOTSTRAP_ITERS = 1000

UTILITY_DEFINITION = (
    "utility = the unweighted mean, over leaf utility tasks, of each task's headline metric "
    "(exact_match, else acc_norm, else acc; the unfiltered value, else the first filter by name); group "
    "aggregates (e.g. cast_world_utility) are left out so no task counts twice. "
    "utility drop = utility(base model) - utility(variant): positive means fine-tuning lost utility."
)
VERDICT_RULE = (
    "Paired by seed, advantage = utility drop(random skipping) - utility drop(compared variant) at the same skip "
    "ratio. With n >= 2 seeds, the variant beats random skipping when the mean advantage is positive and larger "
    "than its standard deviation over seeds (ddof=1), does worse when it is negative and larger in size than that "
    "standard deviation, and otherwise shows no clear difference; with one seed no verdict is possible."
)
VALIDITY_RULE = (
    "benefit of a head = utility(fine-tuned with only that head skipped) - utility(full fine-tuning, same seed). "
    "A useful score ranks heads by benefit: Spearman rho > 0. Per seed, rho is taken over the heads tested with "
    "that seed; mean and std (ddof=1) are over seeds. Pooled rho uses each head's seed-mean benefit, with a "
    f"{BOOTSTRAP_ITERS}-resample bootstrap 95% interval over heads. The score is predictive when the mean rho over "
    "seeds is positive and larger than its standard deviation (with one seed: when the bootstrap interval is above 0)."
)


# --- utility -------------------------------------------------------------------------------------------------------


def parse_utility_key(key: str) -> tuple[str, str, str | None] | None:
    """``utility.<task>.<metric>[.<filter>]`` -> ``(task, metric, filter)``; None for other keys."""
    if not key.startswith("utility."):
        return None
    parts = key[len("utility.") :].split(".", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _tasks_dir() -> Path | None:
    """The lm-eval task folder, found as ``evaluation.tasks_dir`` does but without importing the evaluation stack."""
    try:
        from importlib import resources

        root = Path(str(resources.files("cast_lightning.eval_tasks"))) / "tasks"
        if root.is_dir():
            return root
    except (ModuleNotFoundError, TypeError):
        pass
    root = Path(__file__).resolve().parents[1] / "eval" / "tasks"
    return root if root.is_dir() else None


@lru_cache(maxsize=1)
def local_groups() -> frozenset[str]:
    """Group names declared by the package's own lm-eval task YAMLs (``group:`` keys), e.g. ``cast_world_utility``."""
    names = {"cast_world_utility", "cast_safety"}
    root = _tasks_dir()
    for path in sorted(root.glob("*/*.yaml")) if root else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("group:"):
                value = line.split(":", 1)[1].split("#", 1)[0].strip().strip("'\"")
                if value:
                    names.add(value)
    return frozenset(names)


def task_utilities(metrics: dict, leaf_tasks: Iterable[str] | None = None) -> dict[str, float]:
    """Each leaf task's headline utility metric from a run's ``metrics``, sorted by task name.

    The headline metric is ``exact_match``, else ``acc_norm``, else ``acc`` (unfiltered, else the first
    filter by name). ``leaf_tasks`` (e.g. the task names of an lm-eval results file's sample counts, which
    lm-eval records only for leaf tasks) restricts the tasks; without it, the package's own group names and
    any task whose name prefixes another present task (``mmlu`` of ``mmlu_anatomy``) are treated as groups.
    Non-numeric and NaN values are ignored.
    """
    found: dict[str, dict[tuple[int, int, str], float]] = {}
    for key, value in metrics.items():
        parsed = parse_utility_key(key)
        if parsed is None or not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            continue
        task, metric, filter_name = parsed
        if metric not in HEADLINE_METRICS:
            continue
        rank = (HEADLINE_METRICS.index(metric), 0 if filter_name is None else 1, filter_name or "")
        found.setdefault(task, {})[rank] = float(value)
    if leaf_tasks is not None:
        leaves = set(leaf_tasks)
        tasks = [t for t in found if t in leaves]
    else:
        groups = local_groups()
        tasks = [t for t in found if t not in groups and not any(o != t and o.startswith(t + "_") for o in found)]
    return {task: found[task][min(found[task])] for task in sorted(tasks)}


def utility_score(metrics: dict, leaf_tasks: Iterable[str] | None = None) -> float:
    """A run's utility: the unweighted mean of ``task_utilities(metrics, leaf_tasks)``; NaN without utility metrics.

    On the embedded world this is the mean of ``utility.cast_world_<skill>.exact_match`` over the five
    skills (add, reverse, sort, count, facts); the group aggregate ``utility.cast_world_utility.exact_match``
    (weighted by skill size) is not counted again. With lm-eval tasks such as mmlu / gsm8k it is the mean
    of each leaf task's exact_match / acc_norm / acc.
    """
    values = list(task_utilities(metrics, leaf_tasks).values())
    return float(np.mean(values)) if values else math.nan


# --- statistics ----------------------------------------------------------------------------------------------------


def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _round(value, decimals: int = DECIMALS):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return round(float(value), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


def summarize(values: Iterable, decimals: int = DECIMALS) -> dict:
    """``{"mean", "std", "n", "min", "max"}`` of the finite values (std: ddof=1, None for n < 2), rounded."""
    data = _finite(values)
    n = len(data)
    return {
        "mean": _round(np.mean(data), decimals) if n else None,
        "std": _round(np.std(data, ddof=1), decimals) if n >= 2 else None,
        "n": n,
        "min": _round(min(data), decimals) if n else None,
        "max": _round(max(data), decimals) if n else None,
    }


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing their average rank (``scipy.stats.rankdata(method="average")``)."""
    values = np.asarray(values, dtype=float)
    less = (values[..., None, :] < values[..., :, None]).sum(-1)
    equal = (values[..., None, :] == values[..., :, None]).sum(-1)
    return less + (equal + 1) / 2.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties): Pearson's r of the ranks.

    NaN when fewer than 3 finite pairs remain or either side is constant (the correlation is undefined).
    """
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(float(a)) and math.isfinite(float(b))]
    if len(pairs) < 3:
        return math.nan
    rx = rankdata(np.asarray([p[0] for p in pairs]))
    ry = rankdata(np.asarray([p[1] for p in pairs]))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denominator == 0:
        return math.nan
    return float((dx * dy).sum() / denominator)


def _rows_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    da, db = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((da * da).sum(axis=1) * (db * db).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (da * db).sum(axis=1) / np.where(denominator > 0, denominator, 1), np.nan)


def bootstrap_spearman(x: Sequence[float], y: Sequence[float], iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> dict:
    """Percentile 95% interval of Spearman's rho over ``iters`` resamples of the pairs (undefined resamples dropped)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return {"low": None, "high": None, "iters": 0}
    index = np.random.default_rng(seed).integers(0, len(x), (iters, len(x)))
    rho = np.concatenate([_rows_pearson(rankdata(x[part]), rankdata(y[part])) for part in np.array_split(index, max(1, iters // 100))])
    rho = rho[np.isfinite(rho)]
    if not rho.size:
        return {"low": None, "high": None, "iters": 0}
    return {"low": _round(np.percentile(rho, 2.5)), "high": _round(np.percentile(rho, 97.5)), "iters": int(rho.size)}


def _outcome(mean: float | None, std: float | None, n: int) -> str:
    """better / worse / no clear difference / inconclusive (see ``VERDICT_RULE``)."""
    if mean is None or n == 0:
        return "inconclusive"
    if n < 2 or std is None:
        return "inconclusive"
    if mean > 0 and mean > std:
        return "better"
    if mean < 0 and -mean > std:
        return "worse"
    return "no clear difference"


# --- the experiments ------------------------------------------------------------------------------------------------


def _resolve(path: str | None, roots: Sequence[Path]) -> Path | None:
    if not path:
        return None
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    for root in roots:
        if (root / candidate).exists():
            return root / candidate
    return candidate


def _sha256(path: Path) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def variant_label(variant: str, score: str | None = None, skip_ratio: float | None = None) -> str:
    """The display name of a variant group, e.g. ``CAST (product) @ 0.1``, ``random skip @ 0.25``."""
    ratio = f"{float(skip_ratio or 0):g}"
    if variant == "base":
        return "base model"
    if variant == "full":
        return "full fine-tuning"
    if variant == "cast":
        return f"CAST ({score or 'product'}) @ {ratio}"
    if variant == "random":
        return f"random skip @ {ratio}"
    if variant == "oc":
        return f"OC-only @ {ratio}"
    if variant == "fs":
        return f"FS-only @ {ratio}"
    return f"{variant}{f' ({score})' if score else ''} @ {ratio}"


def _group_key(run: dict) -> tuple:
    variant = run["variant"]
    ratio = 0.0 if variant in ("base", "full") else float(run.get("skip_ratio") or 0.0)
    score = run.get("score") if variant == "cast" else None
    return (ratio, VARIANT_ORDER.get(variant, len(VARIANTS)), variant, score or "")


def _check_experiments(experiments: dict) -> None:
    if not isinstance(experiments, dict) or not isinstance(experiments.get("runs"), list):
        raise CastError("experiments has no 'runs' list: give the dictionary (or experiments.json) written by run_experiments")
    for i, run in enumerate(experiments["runs"]):
        missing = [key for key in ("variant", "seed", "metrics") if key not in run]
        if missing:
            raise CastError(f"experiments run {i} lacks {', '.join(missing)}: re-run cast report to rewrite experiments.json")
    if not experiments["runs"]:
        raise CastError("experiments has no runs: nothing to report; check the variants and seeds of cast report")


def _load_results(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def build_report(experiments: dict) -> dict:
    """Every number of the report, as the ``report.json`` dictionary (no files are written)."""
    _check_experiments(experiments)
    roots = [Path(experiments["output_dir"])] if experiments.get("output_dir") else []
    warnings: list[str] = []

    # -- runs ----------------------------------------------------------------------------------------------------
    runs = []
    for raw in sorted(experiments["runs"], key=lambda r: (_group_key(r), int(r["seed"]))):
        metrics = dict(raw["metrics"])
        path = _resolve(raw.get("results"), roots)
        stored = _load_results(path)
        leaves = None
        if stored is not None:
            for key, value in (stored.get("metrics") or {}).items():
                if key in metrics and not _same(metrics[key], value):
                    warnings.append(f"{path}: {key} is {value} in the results file but {metrics[key]} in experiments.json")
            counts = stored.get("sample_counts") or {}
            leaves = [t for t in counts if any((parse_utility_key(k) or ("",))[0] == t for k in metrics)] or None
        elif raw.get("results"):
            warnings.append(f"results file {raw.get('results')} is missing: its numbers come from experiments.json only")
        runs.append(
            {
                "label": variant_label(raw["variant"], raw.get("score"), raw.get("skip_ratio")),
                "variant": raw["variant"],
                "score": raw.get("score"),
                "skip_ratio": float(raw.get("skip_ratio") or 0.0),
                "seed": int(raw["seed"]),
                "n_skipped": len(raw.get("skip_heads") or []),
                "skip_heads": [list(map(int, h)) for h in raw.get("skip_heads") or []],
                "results": str(path) if path else None,
                "results_sha256": _sha256(path) if path and path.is_file() else None,
                "fit_seconds": raw.get("fit_seconds"),
                "metrics": metrics,
                "refusal_rate": metrics.get("safety.refusal_rate"),
                "over_refusal_rate": metrics.get("safety.over_refusal_rate"),
                "tasks": task_utilities(metrics, leaves),
                "utility": _round(utility_score(metrics, leaves), 12),
            }
        )
    base_runs = [r for r in runs if r["variant"] == "base" and r["utility"] is not None]
    base_utility = float(np.mean([r["utility"] for r in base_runs])) if base_runs else None
    if base_utility is None:
        warnings.append("no base-model run with utility metrics: utility drops cannot be computed")
    for run in runs:
        run["utility_drop"] = _round(base_utility - run["utility"], 12) if base_utility is not None and run["utility"] is not None else None
    tasks = sorted({t for r in runs for t in r["tasks"]})

    # -- variants ------------------------------------------------------------------------------------------------
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    variants = []
    for key, members in groups.items():
        first = members[0]
        variants.append(
            {
                "label": first["label"],
                "variant": first["variant"],
                "score": first["score"] if first["variant"] in ("cast", "random", "oc", "fs") else None,
                "skip_ratio": key[0],
                "seeds": [r["seed"] for r in members],
                "n_seeds": len(members),
                "n_skipped": summarize([r["n_skipped"] for r in members], SECONDS_DECIMALS),
                "refusal_rate": summarize(r["refusal_rate"] for r in members),
                "over_refusal_rate": summarize(r["over_refusal_rate"] for r in members),
                "utility": summarize(r["utility"] for r in members),
                "utility_drop": summarize(r["utility_drop"] for r in members),
                "tasks": {t: summarize(r["tasks"].get(t) for r in members) for t in tasks},
                "fit_seconds": summarize((r["fit_seconds"] for r in members), SECONDS_DECIMALS),
            }
        )
    front = pareto_front(variants)
    for v in variants:
        v["pareto_optimal"] = v["label"] in front

    # -- comparisons against random skipping ----------------------------------------------------------------------
    comparisons = compare_to_random(runs)
    cast_rows = [c for c in comparisons if c["variant"] == "cast"]
    verdict = overall_verdict(cast_rows)

    # -- diagnosis validity ---------------------------------------------------------------------------------------
    map_path = _resolve(experiments.get("diagnosis_map"), roots)
    conflict_map = None
    if map_path is not None and map_path.is_file():
        from cast_lightning.conflict import ConflictMap

        conflict_map = ConflictMap.from_json(map_path)
    elif experiments.get("diagnosis_map"):
        warnings.append(f"conflict map {experiments['diagnosis_map']} is missing: no heatmap, no validity scores")
    validity = diagnosis_validity(experiments.get("single_head") or [], runs, conflict_map, roots)

    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "definitions": {"utility": UTILITY_DEFINITION, "verdict": VERDICT_RULE, "validity": VALIDITY_RULE,
                        "std": "sample standard deviation over seeds (ddof=1); null with one seed"},
        "inputs": {
            "experiments_dir": experiments.get("output_dir"),
            "base_model": experiments.get("base_model"),
            "diagnosis_map": str(map_path) if map_path else None,
            "diagnosis_map_sha256": _sha256(map_path) if map_path and map_path.is_file() else None,
        },
        "base_utility": _round(base_utility),
        "tasks": tasks,
        "verdict": verdict,
        "variants": variants,
        "pareto_front": front,
        "comparisons": comparisons,
        "validity": validity,
        "runs": runs,
        "warnings": warnings,
        "provenance": _provenance(experiments),
    }


def pareto_front(variants: list[dict]) -> list[str]:
    """Labels of the variants whose mean (utility, refusal rate) no other variant matches or beats on both."""
    points = [
        (v["label"], v["utility"]["mean"], v["refusal_rate"]["mean"])
        for v in variants
        if v["utility"]["mean"] is not None and v["refusal_rate"]["mean"] is not None
    ]
    front = []
    for label, u, s in points:
        dominated = any(
            (u2 >= u and s2 >= s) and (u2 > u or s2 > s) for other, u2, s2 in points if other != label
        )
        if not dominated:
            front.append(label)
    return front


def _paired(runs_a: list[dict], runs_b: list[dict], field: str) -> tuple[list[float], list[int], bool]:
    """``b - a`` of ``field`` per common seed; without common seeds, the difference of the means (one value)."""
    by_seed_a = {r["seed"]: r[field] for r in runs_a if r[field] is not None}
    by_seed_b = {r["seed"]: r[field] for r in runs_b if r[field] is not None}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if seeds:
        return [by_seed_b[s] - by_seed_a[s] for s in seeds], seeds, True
    if by_seed_a and by_seed_b:
        return [float(np.mean(list(by_seed_b.values())) - np.mean(list(by_seed_a.values())))], [], False
    return [], [], False


def _pm(stat: dict, decimals: int = DECIMALS) -> str:
    if stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean']:.{decimals}f}"
    return text + (f" ± {stat['std']:.{decimals}f}" if stat.get("std") is not None else "")


def compare_to_random(runs: list[dict]) -> list[dict]:
    """CAST, OC-only and FS-only against random skipping at each common skip ratio (see ``VERDICT_RULE``)."""
    rows = []
    ratios = sorted({r["skip_ratio"] for r in runs if r["variant"] == "random"})
    for ratio in ratios:
        random_runs = [r for r in runs if r["variant"] == "random" and r["skip_ratio"] == ratio]
        contenders: dict[tuple, list[dict]] = {}
        for r in runs:
            if r["variant"] in ("cast", "oc", "fs") and r["skip_ratio"] == ratio:
                contenders.setdefault(_group_key(r), []).append(r)
        for key in sorted(contenders):
            members = contenders[key]
            advantage, seeds, paired = _paired(members, random_runs, "utility_drop")
            safety, _, _ = _paired(random_runs, members, "refusal_rate")  # variant - random
            adv = summarize(advantage)
            safe = summarize(safety)
            outcome = _outcome(adv["mean"], adv["std"], len(advantage) if paired else 1)
            safety_outcome = _outcome(safe["mean"], safe["std"], len(safety) if paired else 1)
            row = {
                "label": members[0]["label"],
                "variant": members[0]["variant"],
                "score": members[0]["score"],
                "skip_ratio": ratio,
                "seeds": seeds,
                "paired": paired,
                "utility_drop": summarize(r["utility_drop"] for r in members),
                "random_utility_drop": summarize(r["utility_drop"] for r in random_runs),
                "refusal_rate": summarize(r["refusal_rate"] for r in members),
                "random_refusal_rate": summarize(r["refusal_rate"] for r in random_runs),
                "advantage": adv,
                "advantage_per_seed": [_round(a) for a in advantage],
                "outcome": outcome,
                "refusal_difference": safe,
                "safety_outcome": safety_outcome,
            }
            row["beats_random"] = outcome == "better"
            row["sentence"] = comparison_sentence(row)
            rows.append(row)
    return rows


def comparison_sentence(row: dict) -> str:
    """The verdict sentence of one comparison row, computed from its numbers."""
    name, ratio = row["label"].split(" @ ")[0], f"{row['skip_ratio']:g}"
    n = row["advantage"]["n"]
    numbers = (
        f"utility drop {_pm(row['utility_drop'])} vs {_pm(row['random_utility_drop'])} for random skipping "
        f"(advantage {_pm(row['advantage'])} over {n} {'paired seed' if n == 1 else 'paired seeds'}"
        f"{'' if row['paired'] else ', unpaired: no common seeds'})"
    )
    outcome = row["outcome"]
    if outcome == "better":
        head = f"{name} beats random skipping at skip ratio {ratio}: it loses less utility"
    elif outcome == "worse":
        head = f"{name} does not beat random skipping at skip ratio {ratio}: it loses more utility"
    elif outcome == "no clear difference":
        head = (f"{name} does not beat random skipping at skip ratio {ratio}: the difference is within the "
                f"spread over seeds")
    else:
        head = f"{name} vs random skipping at skip ratio {ratio} cannot be judged: one seed gives no spread"
    safety = row["safety_outcome"]
    safety_text = {
        "better": "it refuses more harmful prompts",
        "worse": "but it refuses fewer harmful prompts",
        "no clear difference": "no clear refusal difference",
        "inconclusive": "refusal not comparable",
    }[safety]
    return (f"{head}; {numbers}; refusal rate {_pm(row['refusal_rate'])} vs {_pm(row['random_refusal_rate'])}"
            f" ({safety_text}).")


def overall_verdict(cast_rows: list[dict]) -> dict:
    """The headline: at how many skip ratios CAST beats random skipping, and each ratio's sentence."""
    if not cast_rows:
        return {"sentence": "No CAST vs random-skip comparison: the runs lack CAST or random skipping at a common skip ratio.",
                "beats_random_at": [], "does_not_beat_at": [], "sentences": []}
    wins = [r["skip_ratio"] for r in cast_rows if r["outcome"] == "better"]
    others = [r["skip_ratio"] for r in cast_rows if r["outcome"] != "better"]
    names = sorted({r["label"].split(" @ ")[0] for r in cast_rows})
    ratios = lambda xs: ", ".join(f"{x:g}" for x in sorted(set(xs)))  # noqa: E731
    total = len(cast_rows)
    if all(r["outcome"] == "inconclusive" for r in cast_rows):
        # One seed has no spread: saying "does not beat" would claim a result that was not measured.
        sentence = (f"{' / '.join(names)} vs random skipping cannot be judged at skip ratio {ratios(others)}: "
                    f"one seed gives no spread (run two or more seeds).")
    elif not wins:
        sentence = f"{' / '.join(names)} does not beat random skipping at any tested skip ratio ({ratios(others)})."
    elif not others:
        sentence = f"{' / '.join(names)} beats random skipping at every tested skip ratio ({ratios(wins)})."
    else:
        sentence = (f"{' / '.join(names)} beats random skipping in {len(wins)} of {total} comparisons "
                    f"(skip ratio {ratios(wins)}) and does not at skip ratio {ratios(others)}.")
    return {"sentence": sentence, "beats_random_at": sorted(set(wins)), "does_not_beat_at": sorted(set(others)),
            "sentences": [r["sentence"] for r in cast_rows]}


# --- diagnosis validity ---------------------------------------------------------------------------------------------


def diagnosis_validity(single_head: list[dict], runs: list[dict], conflict_map=None, roots: Sequence[Path] = ()) -> dict:
    """Measured benefit of skipping each tested head alone vs its score under every scoring option."""
    from cast_lightning.conflict import SCORE_METHODS, combine_scores

    out: dict = {"available": False, "reason": None, "heads": [], "methods": {}, "map_score": None, "sentence": None}
    if not single_head:
        out["reason"] = "no single-head runs (single_head_validity = 0)"
        out["sentence"] = "Diagnosis validity was not measured: no single-head fine-tuning runs."
        return out
    full = [r for r in runs if r["variant"] == "full" and r["utility"] is not None]
    if not full:
        out["reason"] = "no full fine-tuning runs to measure benefits against"
        out["sentence"] = "Diagnosis validity cannot be measured: no full fine-tuning run."
        return out
    full_by_seed: dict[int, list[float]] = {}
    for r in full:
        full_by_seed.setdefault(r["seed"], []).append(r["utility"])
    full_mean = float(np.mean([r["utility"] for r in full]))
    full_safety = {r["seed"]: r["refusal_rate"] for r in full}

    entries = []
    for entry in single_head:
        metrics = entry.get("metrics") or {}
        seed = int(entry.get("seed", 0))
        stored = _load_results(_resolve(entry.get("results"), roots))
        leaves = list((stored or {}).get("sample_counts") or {}) or None
        utility = utility_score(metrics, leaves)
        if not math.isfinite(utility):
            continue
        same_seed = seed in full_by_seed
        reference = float(np.mean(full_by_seed[seed])) if same_seed else full_mean
        refusal, full_refusal = metrics.get("safety.refusal_rate"), full_safety.get(seed)
        entries.append({
            "head": [int(entry["head"][0]), int(entry["head"][1])], "seed": seed, "utility": _round(utility, 12),
            "reference": "full fine-tuning, same seed" if same_seed else "full fine-tuning, mean over seeds",
            "benefit": utility - reference,
            "refusal_change": (refusal - full_refusal) if refusal is not None and full_refusal is not None else None,
        })
    heads = sorted({tuple(e["head"]) for e in entries})
    seeds = sorted({e["seed"] for e in entries})
    if not heads:
        out["reason"] = "the single-head runs have no utility metrics"
        out["sentence"] = "Diagnosis validity cannot be measured: the single-head runs have no utility metrics."
        return out
    head_rows = []
    for head in heads:
        mine = [e for e in entries if tuple(e["head"]) == head]
        head_rows.append({
            "head": list(head),
            "seeds": [e["seed"] for e in mine],
            "benefit_per_seed": [_round(e["benefit"]) for e in mine],
            "benefit": summarize(e["benefit"] for e in mine),
            "refusal_change": summarize(e["refusal_change"] for e in mine),
            "reference": sorted({e["reference"] for e in mine}),
        })
    out.update(available=True, heads=head_rows, seeds=seeds, n_heads=len(heads))
    if conflict_map is None:
        out["available"] = False
        out["reason"] = "no conflict map: the scores cannot be recomputed"
        out["sentence"] = "Diagnosis validity cannot be scored: the conflict map is missing."
        return out

    lam = float(conflict_map.options.get("weight_lambda", 0.5) or 0.5)
    map_seed = int(conflict_map.seed)
    map_score = conflict_map.options.get("score", "product")
    for row in head_rows:
        layer, head = row["head"]
        row["oc"] = _round(conflict_map.oc[layer][head], 6)
        row["fs"] = _round(conflict_map.fs[layer][head], 6)
    for method in SCORE_METHODS:
        pooled_scores = np.asarray(combine_scores(conflict_map.oc, conflict_map.fs, method, lam, map_seed))
        per_seed = []
        for seed in seeds:
            scores = pooled_scores if method != "random" else np.asarray(
                combine_scores(conflict_map.oc, conflict_map.fs, method, lam, seed))
            mine = [e for e in entries if e["seed"] == seed]
            rho = spearman([scores[e["head"][0], e["head"][1]] for e in mine], [e["benefit"] for e in mine])
            per_seed.append(rho)
        x = [pooled_scores[r["head"][0], r["head"][1]] for r in head_rows]
        y = [np.mean(_finite(e["benefit"] for e in entries if tuple(e["head"]) == tuple(r["head"]))) for r in head_rows]
        stat = summarize(per_seed)
        pooled = spearman(x, y)
        interval = bootstrap_spearman(x, y)
        out["methods"][method] = {
            "rho_per_seed": [_round(v) for v in per_seed],
            "rho": stat,
            "pooled_rho": _round(pooled),
            "pooled_interval": interval,
            "outcome": _validity_outcome(stat, interval),
            "head_scores": [_round(v, 6) for v in x],
        }
    out["map_score"] = map_score if map_score in out["methods"] else "product"
    out["weight_lambda"] = lam
    out["sentence"] = validity_sentence(out["map_score"], out["methods"][out["map_score"]], len(heads), len(seeds))
    return out


def _validity_outcome(stat: dict, interval: dict) -> str:
    mean, std, n = stat["mean"], stat["std"], stat["n"]
    if n >= 2 and mean is not None and std is not None:
        if mean > 0 and mean > std:
            return "predictive"
        if mean < 0 and -mean > std:
            return "inversely related"
        return "no clear relation"
    if interval.get("low") is not None:
        if interval["low"] > 0:
            return "predictive"
        if interval["high"] < 0:
            return "inversely related"
        return "no clear relation"
    return "undefined"


def validity_sentence(method: str, result: dict, n_heads: int, n_seeds: int) -> str:
    """The verdict sentence of the map's own scoring option, computed from its numbers."""
    stat, interval = result["rho"], result["pooled_interval"]
    spread = f"Spearman rho {_pm(stat)} over {stat['n']} seed{'s' if stat['n'] != 1 else ''}"
    pooled = "undefined" if result["pooled_rho"] is None else f"{result['pooled_rho']:.{DECIMALS}f}"
    ci = (f", bootstrap 95% interval [{interval['low']:.{DECIMALS}f}, {interval['high']:.{DECIMALS}f}]"
          if interval.get("low") is not None else "")
    numbers = f"{spread}; pooled rho {pooled}{ci}; {n_heads} heads"
    outcome = result["outcome"]
    if outcome == "predictive":
        return f"The {method} conflict score predicts the measured benefit of skipping a head ({numbers})."
    if outcome == "inversely related":
        return (f"The {method} conflict score does not predict the benefit of skipping a head: higher scores go with "
                f"less benefit ({numbers}).")
    if outcome == "no clear relation":
        return (f"The {method} conflict score does not clearly predict the benefit of skipping a head: the correlation "
                f"is within its spread ({numbers}).")
    return f"The {method} conflict score's relation to the benefit of skipping a head is undefined ({numbers})."


# --- provenance -----------------------------------------------------------------------------------------------------


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("cast-lightning", "torch", "lightning", "transformers", "lm_eval", "numpy", "scipy", "matplotlib"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return versions


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                                text=True, timeout=5, check=False)
        return result.stdout.strip() or None if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _provenance(experiments: dict) -> dict:
    given = experiments.get("provenance") or {}
    config = experiments.get("config") or {}
    return {
        "experiments": given,
        "config": config,
        "seeds": sorted({int(r["seed"]) for r in experiments["runs"]} | {int(e.get("seed", 0)) for e in experiments.get("single_head") or []}),
        "git_commit": given.get("git_commit") or _git_commit(),
        "report_versions": _versions(),
        "machine": given.get("machine") or platform.platform(),
    }


# --- plots ----------------------------------------------------------------------------------------------------------

COLORS = {"base": "#555555", "full": "#1f77b4", "cast": "#d62728", "random": "#7f7f7f", "oc": "#ff7f0e", "fs": "#2ca02c"}
MARKERS = {"base": "s", "full": "D", "cast": "o", "random": "X", "oc": "^", "fs": "v"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")  # no pyplot: no global backend state
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    return atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_pareto(data: dict, path: Path) -> Path:
    """Refusal rate vs utility: every run (small) and every variant's mean +- std (large); the Pareto front dashed."""
    fig = _figure(7.5, 5.0)
    ax = fig.subplots()
    for run in data["runs"]:
        if run["utility"] is not None and run["refusal_rate"] is not None:
            ax.scatter(run["utility"], run["refusal_rate"], s=12, alpha=0.35, color=COLORS.get(run["variant"], "k"),
                       marker=MARKERS.get(run["variant"], "o"), linewidths=0)
    ratios = sorted({v["skip_ratio"] for v in data["variants"] if v["skip_ratio"] > 0})
    fills = ["full", "none", "left", "bottom", "right", "top"]  # one fill style per skip ratio
    for v in data["variants"]:
        u, s = v["utility"], v["refusal_rate"]
        if u["mean"] is None or s["mean"] is None:
            continue
        fill = fills[ratios.index(v["skip_ratio"]) % len(fills)] if v["skip_ratio"] in ratios else "full"
        ax.errorbar(u["mean"], s["mean"], xerr=u["std"] or 0, yerr=s["std"] or 0, fmt=MARKERS.get(v["variant"], "o"),
                    color=COLORS.get(v["variant"], "k"), markersize=8, capsize=3, label=v["label"], fillstyle=fill,
                    markerfacecoloralt="white", markeredgewidth=1.5)
    front = [v for v in data["variants"] if v["pareto_optimal"]]
    front.sort(key=lambda v: v["utility"]["mean"])
    if len(front) > 1:
        ax.plot([v["utility"]["mean"] for v in front], [v["refusal_rate"]["mean"] for v in front], "--", color="#444444",
                linewidth=1, label="Pareto front")
    ax.set_xlabel("utility (mean headline metric of the utility tasks)")
    ax.set_ylabel("refusal rate on harmful prompts")
    ax.set_title("Safety vs utility (mean ± std over seeds; small dots: single runs)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_utility_drop(data: dict, path: Path) -> Path:
    """Utility drop vs skip ratio: CAST, random, OC-only, FS-only (mean +- std, seeds as dots); full FT at ratio 0."""
    fig = _figure(7.0, 4.6)
    ax = fig.subplots()
    full = next((v for v in data["variants"] if v["variant"] == "full"), None)
    lines: dict[tuple, list[dict]] = {}
    for v in data["variants"]:
        if v["variant"] in ("cast", "random", "oc", "fs"):
            lines.setdefault((v["variant"], v["score"] if v["variant"] == "cast" else None), []).append(v)
    offsets = {"cast": -0.003, "random": 0.003, "oc": -0.0015, "fs": 0.0015}
    for (variant, score), members in sorted(lines.items(), key=lambda kv: VARIANT_ORDER.get(kv[0][0], 9)):
        points = sorted((v for v in members if v["utility_drop"]["mean"] is not None), key=lambda v: v["skip_ratio"])
        if full is not None and full["utility_drop"]["mean"] is not None:
            points = [full] + points
        xs = [p["skip_ratio"] + (offsets.get(variant, 0) if p is not full else 0) for p in points]
        ys = [p["utility_drop"]["mean"] for p in points]
        errs = [p["utility_drop"]["std"] or 0 for p in points]
        label = members[0]["label"].split(" @ ")[0]
        ax.errorbar(xs, ys, yerr=errs, fmt="-" + MARKERS.get(variant, "o"), color=COLORS.get(variant, "k"), capsize=3,
                    label=label, linewidth=2 if variant in ("cast", "random") else 1,
                    alpha=1.0 if variant in ("cast", "random") else 0.6)
        for run in data["runs"]:
            if run["variant"] == variant and (variant != "cast" or run["score"] == score) and run["utility_drop"] is not None:
                ax.scatter(run["skip_ratio"] + offsets.get(variant, 0), run["utility_drop"], s=10, alpha=0.35,
                           color=COLORS.get(variant, "k"), linewidths=0)
    ax.axhline(0.0, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xlabel("skip ratio (fraction of heads frozen; 0 = full fine-tuning)")
    ax.set_ylabel("utility drop vs base (lower is better)")
    ax.set_title("Utility drop vs skip ratio (mean ± std over seeds; dots: seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_validity(data: dict, path: Path) -> Path | None:
    """Measured benefit of skipping each tested head alone vs its score under the map's scoring option."""
    validity = data["validity"]
    if not validity.get("available"):
        return None
    method = validity["map_score"]
    result = validity["methods"][method]
    fig = _figure(5.6, 4.2)
    ax = fig.subplots()
    xs = result["head_scores"]
    ys = [row["benefit"]["mean"] for row in validity["heads"]]
    errs = [row["benefit"]["std"] or 0 for row in validity["heads"]]
    ax.errorbar(xs, ys, yerr=errs, fmt="o", color=COLORS["cast"], capsize=3)
    for x, y, row in zip(xs, ys, validity["heads"]):
        ax.annotate(f"L{row['head'][0]}H{row['head'][1]}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"{method} score")
    ax.set_ylabel("benefit of skipping the head alone\n(utility - full fine-tuning)")
    rho = result["rho"]
    ax.set_title(f"Diagnosis validity ({method} score): Spearman rho {_pm(rho)} over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --- rendering ------------------------------------------------------------------------------------------------------


def _num(value, decimals: int = DECIMALS) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


def _tables(data: dict) -> list[dict]:
    """The report's tables as ``{"id", "title", "header", "rows"}`` with already formatted cells (md and html share them)."""
    summary_rows = [
        [v["label"], str(v["n_seeds"]), _pm(v["refusal_rate"]), _pm(v["over_refusal_rate"]), _pm(v["utility"]),
         _pm(v["utility_drop"]), _pm(v["n_skipped"], SECONDS_DECIMALS), _pm(v["fit_seconds"], SECONDS_DECIMALS),
         "yes" if v["pareto_optimal"] else ""]
        for v in data["variants"]
    ]
    tables = [{
        "id": "summary", "title": "Variants (mean ± std over seeds)",
        "header": ["variant", "seeds", "refusal rate", "over-refusal rate", "utility", "utility drop", "heads skipped",
                   "fit seconds", "Pareto"],
        "rows": summary_rows,
    }]
    if data["comparisons"]:
        tables.append({
            "id": "comparisons", "title": "Against random skipping at the same budget (paired by seed)",
            "header": ["variant", "skip ratio", "utility drop", "random utility drop", "advantage", "per seed",
                       "refusal rate", "random refusal rate", "outcome"],
            "rows": [[c["label"].split(" @ ")[0], f"{c['skip_ratio']:g}", _pm(c["utility_drop"]), _pm(c["random_utility_drop"]),
                      _pm(c["advantage"]), ", ".join(_num(a) for a in c["advantage_per_seed"]), _pm(c["refusal_rate"]),
                      _pm(c["random_refusal_rate"]), c["outcome"]] for c in data["comparisons"]],
        })
    if data["tasks"]:
        tables.append({
            "id": "tasks", "title": "Utility per task (headline metric, mean ± std over seeds)",
            "header": ["variant", *data["tasks"]],
            "rows": [[v["label"], *(_pm(v["tasks"][t]) for t in data["tasks"])] for v in data["variants"]],
        })
    validity = data["validity"]
    if validity.get("available"):
        tables.append({
            "id": "validity", "title": "Diagnosis validity: Spearman rho of score vs measured benefit",
            "header": ["scoring option", "rho (mean ± std over seeds)", "rho per seed", "pooled rho", "bootstrap 95% interval", "outcome"],
            "rows": [[m, _pm(r["rho"]), ", ".join(_num(x) for x in r["rho_per_seed"]), _num(r["pooled_rho"]),
                      (f"[{_num(r['pooled_interval']['low'])}, {_num(r['pooled_interval']['high'])}]"
                       if r["pooled_interval"].get("low") is not None else "n/a"), r["outcome"]]
                     for m, r in validity["methods"].items()],
        })
        tables.append({
            "id": "heads", "title": "Heads tested alone (benefit = utility - full fine-tuning, same seed)",
            "header": ["head", "OC", "FS", f"{validity['map_score']} score", "benefit (mean ± std)", "benefit per seed",
                       "refusal change"],
            "rows": [[f"L{r['head'][0]} H{r['head'][1]}", _num(r.get("oc"), 6), _num(r.get("fs"), 6),
                      _num(validity["methods"][validity["map_score"]]["head_scores"][i], 6), _pm(r["benefit"]),
                      ", ".join(_num(b) for b in r["benefit_per_seed"]), _pm(r["refusal_change"])]
                     for i, r in enumerate(validity["heads"])],
        })
    tables.append({
        "id": "runs", "title": "Every run (numbers from its results file)",
        "header": ["variant", "seed", "refusal rate", "over-refusal rate", "utility", "utility drop", "heads skipped", "results"],
        "rows": [[r["label"], str(r["seed"]), _num(r["refusal_rate"]), _num(r["over_refusal_rate"]), _num(r["utility"]),
                  _num(r["utility_drop"]), str(r["n_skipped"]), r["results"] or "n/a"] for r in data["runs"]],
    })
    return tables


def _md_table(table: dict) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = [f"### {table['title']}", "", "| " + " | ".join(cell(h) for h in table["header"]) + " |",
             "|" + "|".join("---" for _ in table["header"]) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def _sections(data: dict) -> dict:
    validity = data["validity"]
    return {
        "verdict": [data["verdict"]["sentence"], *data["verdict"]["sentences"]],
        "validity": [validity.get("sentence") or ""],
    }


def render_markdown(data: dict, plots: dict[str, str]) -> str:
    tables = {t["id"]: t for t in _tables(data)}
    text = _sections(data)
    prov = data["provenance"]
    out = ["# CAST report", "", f"Created {data['created']} · git commit `{prov['git_commit'] or 'unknown'}` · "
           f"base model `{data['inputs']['base_model']}`", "", "## Verdict", ""]
    out += [f"- {s}" for s in text["verdict"]] + ["", f"_{data['definitions']['verdict']}_", ""]
    out += ["## Results", "", _md_table(tables["summary"]), f"_{data['definitions']['utility']}_", ""]
    if "pareto" in plots:
        out += [f"![Safety vs utility]({plots['pareto']})", ""]
    if "comparisons" in tables:
        out += [_md_table(tables["comparisons"])]
    if "utility_drop" in plots:
        out += [f"![Utility drop vs skip ratio]({plots['utility_drop']})", ""]
    if "tasks" in tables:
        out += [_md_table(tables["tasks"])]
    out += ["## Diagnosis validity", "", text["validity"][0], ""]
    if "validity" in tables:
        out += [f"_{data['definitions']['validity']}_", "", _md_table(tables["validity"]), _md_table(tables["heads"])]
    if "validity" in plots:
        out += [f"![Diagnosis validity]({plots['validity']})", ""]
    if "conflict_map" in plots:
        out += ["## Conflict map", "", f"![Conflict map]({plots['conflict_map']})", ""]
    out += ["## Runs", "", _md_table(tables["runs"])]
    if data["warnings"]:
        out += ["## Warnings", ""] + [f"- {w}" for w in data["warnings"]] + [""]
    out += ["## Provenance", "", "```json", json.dumps(prov, indent=2, default=str), "```", ""]
    return "\n".join(out)


HTML_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.6em 0 1.4em;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.verdict{background:#fff8e1;border-left:4px solid #f0b400;padding:0.6em 1em}
.note{color:#555;font-size:12px} img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:12px}
"""


def _html_table(table: dict) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table["header"])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table["rows"])
    return (f"<h3>{html.escape(table['title'])}</h3>\n<table id=\"{table['id']}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>\n")


def _img(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"></p>\n'


def render_html(data: dict, plot_files: dict[str, Path]) -> str:
    tables = {t["id"]: t for t in _tables(data)}
    text = _sections(data)
    prov = data["provenance"]
    esc = html.escape
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>CAST report</title>",
        f"<style>{HTML_STYLE}</style></head><body>",
        "<h1>CAST report</h1>",
        f"<p class=\"note\">Created {esc(data['created'])} · git commit <code>{esc(str(prov['git_commit'] or 'unknown'))}</code>"
        f" · base model <code>{esc(str(data['inputs']['base_model']))}</code></p>",
        "<h2>Verdict</h2><div class=\"verdict\" id=\"verdict\">",
        f"<p><strong>{esc(text['verdict'][0])}</strong></p>",
        *(f"<p>{esc(s)}</p>" for s in text["verdict"][1:]),
        f"</div><p class=\"note\">{esc(data['definitions']['verdict'])}</p>",
        "<h2>Results</h2>", _html_table(tables["summary"]), f"<p class=\"note\">{esc(data['definitions']['utility'])}</p>",
    ]
    if "pareto" in plot_files:
        parts.append(_img(plot_files["pareto"], "Safety vs utility"))
    if "comparisons" in tables:
        parts.append(_html_table(tables["comparisons"]))
    if "utility_drop" in plot_files:
        parts.append(_img(plot_files["utility_drop"], "Utility drop vs skip ratio"))
    if "tasks" in tables:
        parts.append(_html_table(tables["tasks"]))
    parts += ["<h2>Diagnosis validity</h2>", f"<p class=\"verdict\" id=\"validity-verdict\">{esc(text['validity'][0])}</p>"]
    if "validity" in tables:
        parts += [f"<p class=\"note\">{esc(data['definitions']['validity'])}</p>", _html_table(tables["validity"]),
                  _html_table(tables["heads"])]
    if "validity" in plot_files:
        parts.append(_img(plot_files["validity"], "Diagnosis validity"))
    if "conflict_map" in plot_files:
        parts += ["<h2>Conflict map</h2>", _img(plot_files["conflict_map"], "Conflict map")]
    parts += ["<h2>Runs</h2>", _html_table(tables["runs"])]
    if data["warnings"]:
        parts += ["<h2>Warnings</h2><ul>", *(f"<li>{esc(w)}</li>" for w in data["warnings"]), "</ul>"]
    parts += ["<h2>Provenance</h2>", f"<pre>{esc(json.dumps(prov, indent=2, default=str))}</pre>",
              "<p class=\"note\">Every number above is in report.json beside this file.</p></body></html>\n"]
    return "\n".join(parts)


def _clean(obj):
    """JSON-safe copy: NaN / inf -> null, tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def render_report(experiments: dict | str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, str]:
    """Write report.md, report.html (self-contained), report.json and the plots into ``output_dir``.

    ``experiments`` is the dictionary ``run_experiments`` returns, or the path of its ``experiments.json``.
    Returns ``{"markdown", "html", "json", "pareto", "utility_drop", "conflict_map"?, "validity"?}`` -> path.
    Every file is written atomically.
    """
    if not isinstance(experiments, dict):
        source = Path(experiments)
        try:
            experiments = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise CastError(f"{source} does not exist: run cast report to create experiments.json") from error
        except json.JSONDecodeError as error:
            raise CastError(f"{source} is not valid JSON (line {error.lineno}): re-run cast report") from error
        experiments.setdefault("output_dir", str(source.parent))
    out = Path(output_dir)
    data = _clean(build_report(experiments))

    plot_files: dict[str, Path] = {
        "pareto": plot_pareto(data, out / "pareto.png"),
        "utility_drop": plot_utility_drop(data, out / "utility_drop.png"),
    }
    validity_plot = plot_validity(data, out / "validity.png")
    if validity_plot is not None:
        plot_files["validity"] = validity_plot
    map_path = data["inputs"]["diagnosis_map"]
    if map_path and Path(map_path).is_file():
        from cast_lightning.conflict import ConflictMap

        plot_files["conflict_map"] = ConflictMap.from_json(map_path).plot(out / "conflict_map.png")
    data["plots"] = {name: path.name for name, path in plot_files.items()}

    paths = {
        "json": atomic_write_json(out / "report.json", data),
        "markdown": atomic_write_text(out / "report.md", render_markdown(data, data["plots"])),
        "html": atomic_write_text(out / "report.html", render_html(data, plot_files)),
        **plot_files,
    }
    return {name: str(path) for name, path in paths.items()}


# --- the command ----------------------------------------------------------------------------------------------------


def check_study(
    *,
    output_dir: str | os.PathLike,
    variants: Sequence[str],
    skip_ratios: Sequence[float],
    seeds: Sequence[int],
    single_head_validity: int,
    max_steps: int,
    eval_limit: int | None,
) -> None:
    """The options ``cast report`` and ``cast demo`` share, checked before anything is built or trained:
    a typo must cost a second, not a finished fine-tuning run. Raises a one-line CastError naming the fix."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise CastError(f"unknown variant(s) {', '.join(map(str, unknown))}: use any of {', '.join(VARIANTS)}")
    bad = [r for r in skip_ratios if not 0.0 < float(r) <= 1.0]
    if bad:
        raise CastError(f"skip ratio(s) {', '.join(map(str, bad))} outside (0, 1]: give fractions of heads to skip")
    if not seeds:
        raise CastError("no seeds given: give at least one, e.g. --seeds '[0, 1, 2]'")
    if single_head_validity < 0:
        raise CastError(f"single_head_validity {single_head_validity} is negative: give 0 (no validity runs) or more heads")
    if max_steps < 1:
        raise CastError(f"max_steps {max_steps} is below 1: give at least 1 optimizer step per fine-tuning run")
    if eval_limit is not None and eval_limit < 1:
        raise CastError(f"eval_limit {eval_limit} is below 1: give at least 1, or null to evaluate everything")
    ensure_writable(Path(output_dir) / "report.md", "--output_dir")


def report(
    *,
    output_dir: str = "cast_runs/report",
    variants: list[str] = list(VARIANTS),
    skip_ratios: list[float] = [0.1],
    seeds: list[int] = [0, 1, 2],
    single_head_validity: int = 8,
    max_steps: int = 150,
    eval_limit: int | None = None,
) -> dict[str, str]:
    """Run variants x seeds (diagnose / fit / eval, reusing cached results) and write the safety-utility report.

    Writes ``report.md``, a self-contained ``report.html``, ``report.json`` (every number shown) and the
    plots (``pareto.png``, ``utility_drop.png``, ``conflict_map.png``, ``validity.png``) into ``output_dir``,
    beside the runs' own ``experiments.json``. Load these keys from a file with ``--config``, e.g.
    ``cast report --config configs/tiny/report.yaml``.

    Args:
        output_dir: folder for every run, the cached results and the report; re-running reuses what is there.
        variants: which of base (no fine-tuning), full (full fine-tuning), cast (skip the highest-conflict
            heads), random (skip as many random heads), oc (skip by Optimization Conflict only) and fs (skip by
            Functional Sensitivity only) to run.
        skip_ratios: fractions of all attention heads to skip for cast, random, oc and fs.
        seeds: fine-tuning seeds; every variant but base runs once per seed (mean and spread are over these).
        single_head_validity: how many heads to fine-tune with only that head skipped, per seed, to test
            whether the conflict score predicts the measured benefit (0 skips the validity section).
        max_steps: optimizer steps of each fine-tuning run.
        eval_limit: evaluate only the first N prompts of each safety set and N documents of each utility task
            (None: all of them).

    Returns:
        The written files: name -> path.
    """
    check_study(output_dir=output_dir, variants=variants, skip_ratios=skip_ratios, seeds=seeds,
                single_head_validity=single_head_validity, max_steps=max_steps, eval_limit=eval_limit)
    from cast_lightning.pipeline import run_experiments

    experiments = run_experiments(
        output_dir=output_dir,
        variants=list(variants),
        skip_ratios=[float(r) for r in skip_ratios],
        seeds=[int(s) for s in seeds],
        single_head_validity=single_head_validity,
        max_steps=max_steps,
        eval_limit=eval_limit,
    )
    paths = render_report(experiments, output_dir)
    verdict = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))["verdict"]["sentence"]
    print(f"cast report: {paths['html']}\n{verdict}")
    return paths
