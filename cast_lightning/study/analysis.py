"""Experiments -> the report dictionary (``report.json``): every number the report shows, computed from
``experiments.json`` alone (schema version 2; no results file is read, nothing is re-hashed).

What it computes (the Markdown and HTML show nothing else):

* **Utility** of a run: ``utility.utility_score`` (the unweighted mean of each leaf task's headline metric).
  **Utility drop** of a run: ``utility(base) - utility(run)`` (positive = fine-tuning lost utility).
* **Per variant** (``plan.VARIANTS``, at each skip ratio): mean and sample standard deviation (``ddof=1``) over
  seeds of refusal rate, over-refusal rate, utility, utility drop and each task's utility.
* **Each map variant vs random skipping** at the same skip ratio (CAST product / rank / weighted, OC-only,
  FS-only): the per-seed paired advantage ``drop(random) - drop(variant)``, its mean and std over seeds and a
  sentence computed from them by ``VERDICT_RULE``. The headline verdict is about ``cast``.
* **Diagnosis validity**: for each head fine-tuned with only that head skipped, the measured benefit
  ``utility(skip that head) - utility(full fine-tuning, same seed)`` against the head's score under every
  scoring option (recomputed from the embedded map's OC / FS by ``conflict.combine_scores``): Spearman's rho
  per seed (mean and std over seeds) and on the seed-mean benefit with a bootstrap interval over heads.

Derived numbers are rounded once, here, to the decimals the tables print, so every number in ``report.md`` /
``report.html`` is literally a number in ``report.json``. Paths are copied as experiments.json gives them
(relative to the study directory).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from cast_lightning.errors import CastError
from cast_lightning.study.plan import CONTROLS, MAP_VARIANTS, SCOPES, VARIANTS, variant_label
from cast_lightning.study.statistics import (
    BOOTSTRAP_DEFINITION,
    BOOTSTRAP_ITERS,
    DECIMALS,
    SECONDS_DECIMALS,
    SPEARMAN_DEFINITION,
    STD_DEFINITION,
    bootstrap_spearman,
    finite,
    format_stat,
    outcome,
    round_value,
    spearman,
    summarize,
)
from cast_lightning.study.utility import UTILITY_DEFINITION, parse_utility_key, task_utilities, utility_score

EXPERIMENTS_SCHEMA_VERSION = 2  # the experiments.json this reads
SCHEMA_VERSION = 2  # the report.json this writes
VARIANT_ORDER = {name: i for i, name in enumerate(VARIANTS)}
NO_MAP = tuple(name for name, v in VARIANTS.items() if v.score is None)  # base, full: skip ratio 0
RUN_PATHS = ("run_dir", "config", "checkpoint", "results")

VERDICT_RULE = (
    "Paired by seed, advantage = utility drop(random skipping) - utility drop(compared variant) at the same skip "
    "ratio. With n >= 2 seeds, the variant beats random skipping when the mean advantage is positive and larger "
    "than its standard deviation over seeds (ddof=1), does worse when it is negative and larger in size than that "
    "standard deviation, and otherwise shows no clear difference; with one seed no verdict is possible. "
    "The headline verdict is about CAST (variant cast); every other map variant is compared the same way."
)
VALIDITY_RULE = (
    "benefit of a head = utility(fine-tuned with only that head skipped) - utility(full fine-tuning, same seed). "
    "A useful score ranks heads by benefit: Spearman rho > 0 (scipy.stats.spearmanr, average ranks for ties). Per "
    "seed, rho is taken over the heads tested with that seed; mean and std (ddof=1) are over seeds. Pooled rho uses "
    f"each head's seed-mean benefit, with a {BOOTSTRAP_ITERS}-resample paired percentile bootstrap 95% interval over "
    "heads (scipy.stats.bootstrap; resamples with an undefined rho dropped). The score is predictive when the mean "
    "rho over seeds is positive and larger than its standard deviation (with one seed: when the bootstrap interval "
    "is above 0)."
)


# --- input ----------------------------------------------------------------------------------------------------------


def check_experiments(experiments: dict) -> None:
    """Validate an experiments dictionary once: a one-line CastError naming the fix, or nothing."""
    if not isinstance(experiments, dict):
        raise CastError("experiments is not a JSON object: give the experiments.json a study writes")
    version = experiments.get("schema_version")
    if version != EXPERIMENTS_SCHEMA_VERSION:
        raise CastError(
            f"experiments.json has schema version {version!r}, this cast reads version {EXPERIMENTS_SCHEMA_VERSION}: "
            f"re-run cast report to rewrite it"
        )
    runs = experiments.get("runs")
    if not isinstance(runs, list):
        raise CastError("experiments.json has no 'runs' list: re-run cast report to rewrite it")
    if not runs:
        raise CastError("experiments.json has no runs: nothing to report; check the variants and seeds of the study plan")
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise CastError(f"experiments.json run {i} is not an object: re-run cast report to rewrite experiments.json")
        missing = [key for key in ("variant", "seed", "metrics") if key not in run]
        if missing:
            raise CastError(f"experiments.json run {i} lacks {', '.join(missing)}: re-run cast report to rewrite it")
        if not isinstance(run["metrics"], dict):
            raise CastError(f"experiments.json run {i} ({run['variant']}): metrics is not an object: re-run cast report")
    single = experiments.get("single_head") or []
    if not isinstance(single, list):
        raise CastError("experiments.json 'single_head' is not a list: re-run cast report to rewrite it")
    for i, entry in enumerate(single):
        missing = [key for key in ("head", "seed", "metrics") if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise CastError(f"experiments.json single_head entry {i} lacks {', '.join(missing)}: re-run cast report")
    diagnosis = experiments.get("diagnosis")
    if diagnosis is not None and not isinstance(diagnosis, dict):
        raise CastError("experiments.json 'diagnosis' is not an object: re-run cast report to rewrite it")


def _ratio(run: dict) -> float:
    return 0.0 if run["variant"] in NO_MAP else float(run.get("skip_ratio") or 0.0)


def scope_of(run: dict) -> str:
    """The training scope a run trained in (``all`` for the base model and for runs recorded without one)."""
    return "all" if run["variant"] == "base" else str(run.get("scope") or "all")


def group_key(run: dict) -> tuple:
    """Sort and group key of a run: training scope (``plan.SCOPES`` order), skip ratio, then ``plan.VARIANTS``
    order (unknown names after, by name)."""
    variant, scope = run["variant"], scope_of(run)
    order = SCOPES.index(scope) if scope in SCOPES else len(SCOPES)
    return (order, scope, _ratio(run), VARIANT_ORDER.get(variant, len(VARIANT_ORDER)), variant)


def control_of(variant: str) -> str:
    """The budget-matched random variant a variant is compared with (``plan.VARIANTS``; unknown ones: random)."""
    known = VARIANTS.get(variant)
    return known.control if known is not None and known.control else "random"


def is_contender(variant: str, skip_ratio: float) -> bool:
    """Whether a variant is compared to a random control: every map variant but the controls themselves (and
    unknown skipping ones)."""
    if variant in CONTROLS or variant in NO_MAP:
        return False
    return variant in MAP_VARIANTS or skip_ratio > 0


def _leaves(entry: dict) -> list[str] | None:
    """The run's leaf tasks that have utility metrics; None (the group heuristic) when unknown or none match."""
    given = entry.get("leaf_tasks")
    if not given:
        return None
    utility_tasks = {parsed[0] for key in entry["metrics"] if (parsed := parse_utility_key(key))}
    return [t for t in given if t in utility_tasks] or None


def _heads(value) -> list[list[int]]:
    return [[int(layer), int(head)] for layer, head in value or []]


def _path_warnings(where: str, entry: dict, keys: Iterable[str]) -> list[str]:
    out = []
    for key in keys:
        value = entry.get(key)
        if isinstance(value, str) and (value.startswith("/") or value[1:3] in (":\\", ":/")):
            out.append(f"{where}: {key} {value} is an absolute path; experiments.json should give paths relative to "
                       "the study directory")
    return out


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


# --- the report -----------------------------------------------------------------------------------------------------


def build_report(experiments: dict, provenance: dict | None = None) -> dict:
    """Every number of the report, as the JSON-safe ``report.json`` dictionary (no file is read or written).

    ``provenance`` is the report-time ``cast_lightning.provenance.collect()`` (collected here when None).
    """
    check_experiments(experiments)
    if provenance is None:
        from cast_lightning.provenance import collect

        provenance = collect()
    warnings: list[str] = []

    # -- runs ----------------------------------------------------------------------------------------------------
    runs = []
    for raw in sorted(experiments["runs"], key=lambda r: (group_key(r), int(r["seed"]))):
        metrics = dict(raw["metrics"])
        leaves = _leaves(raw)
        scope = scope_of(raw)
        label = variant_label(raw["variant"], _ratio(raw)) + ("" if scope == "all" else f" [{scope}]")
        where = f"run {label} seed {raw['seed']}"
        warnings += _path_warnings(where, raw, RUN_PATHS)
        if not raw.get("results") or not raw.get("results_sha256"):
            warnings.append(f"{where} has no results file and hash in experiments.json: its numbers cannot be traced")
        runs.append({
            "label": label,
            "variant": raw["variant"],
            "score": raw.get("score"),
            "scope": scope,
            "skip_ratio": _ratio(raw),
            "seed": int(raw["seed"]),
            "n_skipped": len(raw.get("skip_heads") or []),
            "skip_heads": _heads(raw.get("skip_heads")),
            "run_dir": raw.get("run_dir"),
            "config": raw.get("config"),
            "checkpoint": raw.get("checkpoint"),
            "results": raw.get("results"),
            "results_sha256": raw.get("results_sha256"),
            "command": raw.get("command"),
            "fit_seconds": raw.get("fit_seconds"),
            "metrics": metrics,
            "leaf_tasks": leaves,
            "refusal_rate": metrics.get("safety.refusal_rate"),
            "over_refusal_rate": metrics.get("safety.over_refusal_rate"),
            "tasks": task_utilities(metrics, leaves),
            "utility": round_value(utility_score(metrics, leaves), 12),
        })
    base_runs = [r for r in runs if r["variant"] == "base" and r["utility"] is not None]
    base_utility = float(np.mean([r["utility"] for r in base_runs])) if base_runs else None
    if base_utility is None:
        warnings.append("no base-model run with utility metrics: utility drops cannot be computed")
    for run in runs:
        drop = base_utility - run["utility"] if base_utility is not None and run["utility"] is not None else None
        run["utility_drop"] = round_value(drop, 12)
    tasks = sorted({t for r in runs for t in r["tasks"]})

    # -- variants ------------------------------------------------------------------------------------------------
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    variants = []
    for key, members in groups.items():
        first = members[0]
        scores = sorted({str(r["score"]) for r in members})
        if len(scores) > 1:
            warnings.append(f"{first['label']}: runs with different scores ({', '.join(scores)}) are grouped together")
        variants.append({
            "label": first["label"],
            "variant": first["variant"],
            "score": None if first["variant"] in NO_MAP else first["score"],
            "scope": first["scope"],
            "skip_ratio": first["skip_ratio"],
            "seeds": [r["seed"] for r in members],
            "n_seeds": len(members),
            "n_skipped": summarize([r["n_skipped"] for r in members], SECONDS_DECIMALS),
            "refusal_rate": summarize(r["refusal_rate"] for r in members),
            "over_refusal_rate": summarize(r["over_refusal_rate"] for r in members),
            "utility": summarize(r["utility"] for r in members),
            "utility_drop": summarize(r["utility_drop"] for r in members),
            "tasks": {t: summarize(r["tasks"].get(t) for r in members) for t in tasks},
            "fit_seconds": summarize((r["fit_seconds"] for r in members), SECONDS_DECIMALS),
        })
    front = pareto_front(variants)
    for v in variants:
        v["pareto_optimal"] = v["label"] in front

    # -- comparisons against random skipping ----------------------------------------------------------------------
    comparisons = compare_to_random(runs)
    verdict = overall_verdict([c for c in comparisons if c["variant"] == "cast"])

    # -- diagnosis validity ---------------------------------------------------------------------------------------
    diagnosis = experiments.get("diagnosis") or {}
    warnings += _path_warnings("diagnosis", diagnosis, ("map", "config"))
    conflict_map = None
    if diagnosis.get("conflict_map") is not None:
        from cast_lightning.conflict import ConflictMap

        conflict_map = ConflictMap.from_dict(diagnosis["conflict_map"], source="experiments.json diagnosis.conflict_map")
    elif any(r["variant"] in MAP_VARIANTS for r in runs) or experiments.get("single_head"):
        warnings.append("experiments.json embeds no conflict map (diagnosis.conflict_map): no heatmap, no validity scores")
    single_head = experiments.get("single_head") or []
    for entry in single_head:
        warnings += _path_warnings(f"single-head run {entry['head']} seed {entry['seed']}", entry, RUN_PATHS)
    validity = diagnosis_validity(single_head, runs, conflict_map)
    shape = (conflict_map.num_layers, conflict_map.num_heads) if conflict_map is not None else None
    overlaps = head_set_overlaps(runs, shape)

    base_model = experiments.get("base_model")
    if isinstance(base_model, dict):
        warnings += _path_warnings("base model", base_model, ("path",))
    given = experiments.get("provenance") or {}
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "created": provenance.get("created"),
        "definitions": {"utility": UTILITY_DEFINITION, "verdict": VERDICT_RULE, "validity": VALIDITY_RULE,
                        "std": STD_DEFINITION, "spearman": SPEARMAN_DEFINITION, "bootstrap": BOOTSTRAP_DEFINITION,
                        "overlap": OVERLAP_DEFINITION},
        "inputs": {
            "experiments_schema_version": experiments["schema_version"],
            "base_model": base_model,
            "diagnosis_map": diagnosis.get("map"),
            "diagnosis_map_sha256": diagnosis.get("sha256"),
            "diagnosis_config": diagnosis.get("config"),
            "plan": experiments.get("plan") or {},
        },
        "base_utility": round_value(base_utility),
        "tasks": tasks,
        "verdict": verdict,
        "variants": variants,
        "pareto_front": front,
        "comparisons": comparisons,
        "overlaps": overlaps,
        "validity": validity,
        "runs": runs,
        "warnings": warnings,
        "provenance": {
            "git_commit": given.get("git_commit") or provenance.get("git_commit"),
            "seeds": sorted({int(r["seed"]) for r in experiments["runs"]}
                            | {int(e["seed"]) for e in single_head}),
            "experiments": given,
            "report": provenance,
        },
    })


def base_model_name(data: dict) -> str:
    """The base model as the report's header names it: its path (or cache key), from ``inputs.base_model``."""
    base = data["inputs"].get("base_model")
    if isinstance(base, dict):
        return str(base.get("path") or base.get("key") or "unknown")
    return str(base or "unknown")


def pareto_front(variants: list[dict]) -> list[str]:
    """Labels of the variants whose mean (utility, refusal rate) no other variant matches or beats on both."""
    points = [
        (v["label"], v["utility"]["mean"], v["refusal_rate"]["mean"])
        for v in variants
        if v["utility"]["mean"] is not None and v["refusal_rate"]["mean"] is not None
    ]
    front = []
    for label, u, s in points:
        dominated = any((u2 >= u and s2 >= s) and (u2 > u or s2 > s) for other, u2, s2 in points if other != label)
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


def compare_to_random(runs: list[dict]) -> list[dict]:
    """Every map variant but random (CAST product / rank / weighted, OC-only, FS-only, in ``plan.VARIANTS`` order)
    against random skipping at each skip ratio where both ran (see ``VERDICT_RULE``)."""
    rows = []
    for ratio in sorted({r["skip_ratio"] for r in runs if r["variant"] in CONTROLS}):
        contenders: dict[tuple, list[dict]] = {}
        for r in runs:
            if r["skip_ratio"] == ratio and is_contender(r["variant"], r["skip_ratio"]):
                contenders.setdefault(group_key(r), []).append(r)
        for key in sorted(contenders):
            members = contenders[key]
            control, scope = control_of(members[0]["variant"]), members[0]["scope"]
            random_runs = [r for r in runs if r["variant"] == control and r["skip_ratio"] == ratio and r["scope"] == scope]
            if random_runs:
                rows.append(_comparison_row(members, random_runs, ratio, scope, control))
    # Neighbours without a head map (PCGrad, SPPFT layer freezing) against full fine-tuning in the same scope.
    by_method: dict[tuple, list[dict]] = {}
    for r in runs:
        if VARIANTS.get(r["variant"]) is not None and VARIANTS[r["variant"]].control == "full":
            by_method.setdefault(group_key(r), []).append(r)
    for key in sorted(by_method):
        members = by_method[key]
        scope = members[0]["scope"]
        full_runs = [r for r in runs if r["variant"] == "full" and r["scope"] == scope]
        if full_runs:
            rows.append(_comparison_row(members, full_runs, 0.0, scope, "full"))
    return rows


def _comparison_row(members: list[dict], random_runs: list[dict], ratio: float, scope: str, control: str) -> dict:
    """One variant against its control (random skipping, random train-only, or full fine-tuning), paired by seed."""
    advantage, seeds, paired = _paired(members, random_runs, "utility_drop")
    safety, _, _ = _paired(random_runs, members, "refusal_rate")  # variant - random
    adv, safe = summarize(advantage), summarize(safety)
    row = {
        "label": members[0]["label"],
        "variant": members[0]["variant"],
        "score": members[0]["score"],
        "skip_ratio": ratio,
        "scope": scope,
        "control": control,
        "seeds": seeds,
        "paired": paired,
        "utility_drop": summarize(r["utility_drop"] for r in members),
        "random_utility_drop": summarize(r["utility_drop"] for r in random_runs),
        "refusal_rate": summarize(r["refusal_rate"] for r in members),
        "random_refusal_rate": summarize(r["refusal_rate"] for r in random_runs),
        "advantage": adv,
        "advantage_per_seed": [round_value(a) for a in advantage],
        "outcome": outcome(adv["mean"], adv["std"], len(advantage) if paired else 1),
        "refusal_difference": safe,
        "safety_outcome": outcome(safe["mean"], safe["std"], len(safety) if paired else 1),
    }
    row["beats_random"] = row["outcome"] == "better"
    row["sentence"] = comparison_sentence(row)
    return row


OVERLAP_DEFINITION = (
    "overlap of two variants' head sets at the same skip ratio = Jaccard |A & B| / |A | B| per seed (mean and std "
    "over seeds), where a skipping variant's set is the heads it skips and a train-only variant's the heads it trains."
)


def head_set_overlaps(runs: list[dict], shape: tuple[int, int] | None) -> list[dict]:
    """Jaccard overlap between the head sets every two map variants pick at the same skip ratio and seed (see
    ``OVERLAP_DEFINITION``); train-only variants need the model's (layers, heads) to turn their skip list around."""
    every = frozenset((layer, head) for layer in range(shape[0]) for head in range(shape[1])) if shape else None
    picked: dict[tuple[float, str], dict[int, frozenset]] = {}
    for run in runs:
        known = VARIANTS.get(run["variant"])
        if known is None or known.score is None or run.get("scope", "all") != "all":
            continue
        skipped = frozenset(map(tuple, run["skip_heads"]))
        if known.selection_mode == "train_only":
            if every is None:
                continue
            skipped = every - skipped
        picked.setdefault((run["skip_ratio"], run["variant"]), {})[run["seed"]] = skipped
    # (only within one scope: the head sets do not depend on it, so scope all stands for every scope)
    rows = []
    keys = sorted(picked, key=lambda k: (k[0], VARIANT_ORDER.get(k[1], len(VARIANT_ORDER)), k[1]))
    for i, (ratio, a) in enumerate(keys):
        for ratio_b, b in keys[i + 1 :]:
            if ratio_b != ratio:
                continue
            seeds = sorted(set(picked[(ratio, a)]) & set(picked[(ratio, b)]))
            values = []
            for seed in seeds:
                first, second = picked[(ratio, a)][seed], picked[(ratio, b)][seed]
                union = first | second
                values.append(len(first & second) / len(union) if union else 1.0)
            if values:
                rows.append({"skip_ratio": ratio, "a": a, "b": b, "seeds": seeds, "jaccard": summarize(values)})
    return rows


def comparison_sentence(row: dict) -> str:
    """The verdict sentence of one comparison row, computed from its numbers."""
    name, ratio = row["label"].split(" @ ")[0], f"{row['skip_ratio']:g}"
    against = {"random": "random skipping", "random_train": "training as many random heads alone",
               "full": "full fine-tuning"}.get(row.get("control", "random"), "its control")
    ratio_text = f" at skip ratio {ratio}" if row["skip_ratio"] else ""
    n = row["advantage"]["n"]
    numbers = (
        f"utility drop {format_stat(row['utility_drop'])} vs {format_stat(row['random_utility_drop'])} for {against} "
        f"(advantage {format_stat(row['advantage'])} over {n} {'paired seed' if n == 1 else 'paired seeds'}"
        f"{'' if row['paired'] else ', unpaired: no common seeds'})"
    )
    result = row["outcome"]
    if result == "better":
        head = f"{name} beats {against}{ratio_text}: it loses less utility"
    elif result == "worse":
        head = f"{name} does not beat {against}{ratio_text}: it loses more utility"
    elif result == "no clear difference":
        head = (f"{name} does not beat {against}{ratio_text}: the difference is within the "
                f"spread over seeds")
    else:
        head = f"{name} vs {against}{ratio_text} cannot be judged: one seed gives no spread"
    safety_text = {
        "better": "it refuses more harmful prompts",
        "worse": "but it refuses fewer harmful prompts",
        "no clear difference": "no clear refusal difference",
        "inconclusive": "refusal not comparable",
    }[row["safety_outcome"]]
    return (f"{head}; {numbers}; refusal rate {format_stat(row['refusal_rate'])} vs "
            f"{format_stat(row['random_refusal_rate'])} ({safety_text}).")


def overall_verdict(cast_rows: list[dict]) -> dict:
    """The headline: at how many skip ratios CAST beats random skipping, and each ratio's sentence."""
    if not cast_rows:
        return {"sentence": "No CAST vs random-skip comparison: the runs lack CAST or random skipping at a common skip ratio.",
                "beats_random_at": [], "does_not_beat_at": [], "sentences": []}
    wins = [r["skip_ratio"] for r in cast_rows if r["outcome"] == "better"]
    others = [r["skip_ratio"] for r in cast_rows if r["outcome"] != "better"]
    names = " / ".join(sorted({r["label"].split(" @ ")[0] for r in cast_rows}))

    def ratios(xs) -> str:
        return ", ".join(f"{x:g}" for x in sorted(set(xs)))

    if all(r["outcome"] == "inconclusive" for r in cast_rows):
        # One seed has no spread: saying "does not beat" would claim a result that was not measured.
        sentence = (f"{names} vs random skipping cannot be judged at skip ratio {ratios(others)}: "
                    f"one seed gives no spread (run two or more seeds).")
    elif not wins:
        sentence = f"{names} does not beat random skipping at any tested skip ratio ({ratios(others)})."
    elif not others:
        sentence = f"{names} beats random skipping at every tested skip ratio ({ratios(wins)})."
    else:
        sentence = (f"{names} beats random skipping in {len(wins)} of {len(cast_rows)} comparisons "
                    f"(skip ratio {ratios(wins)}) and does not at skip ratio {ratios(others)}.")
    return {"sentence": sentence, "beats_random_at": sorted(set(wins)), "does_not_beat_at": sorted(set(others)),
            "sentences": [r["sentence"] for r in cast_rows]}


# --- diagnosis validity ---------------------------------------------------------------------------------------------


def diagnosis_validity(single_head: list[dict], runs: list[dict], conflict_map=None) -> dict:
    """Measured benefit of skipping each tested head alone vs its score under every scoring option.

    ``single_head``: the experiments' single-head entries (``head``, ``seed``, ``metrics``, optional
    ``leaf_tasks`` and paths); ``runs``: the report's runs (``variant``, ``seed``, ``utility``, ``refusal_rate``);
    ``conflict_map``: a ``ConflictMap`` (None: the benefits are reported, the scores are not).
    """
    from cast_lightning.conflict import SCORE_METHODS, combine_scores

    out: dict = {"available": False, "reason": None, "heads": [], "methods": {}, "map_score": None, "sentence": None,
                 "runs": []}
    if not single_head:
        out["reason"] = "no single-head runs (single_head_validity = 0)"
        out["sentence"] = "Diagnosis validity was not measured: no single-head fine-tuning runs."
        return out
    full = [r for r in runs if r["variant"] == "full" and r.get("scope", "all") == "all" and r["utility"] is not None]
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
        utility = utility_score(metrics, _leaves({"metrics": metrics, "leaf_tasks": entry.get("leaf_tasks")}))
        if not math.isfinite(utility):
            continue
        same_seed = seed in full_by_seed
        reference = float(np.mean(full_by_seed[seed])) if same_seed else full_mean
        refusal, full_refusal = metrics.get("safety.refusal_rate"), full_safety.get(seed)
        entries.append({
            "head": [int(entry["head"][0]), int(entry["head"][1])], "seed": seed, "utility": round_value(utility, 12),
            "reference": "full fine-tuning, same seed" if same_seed else "full fine-tuning, mean over seeds",
            "benefit": utility - reference,
            "refusal_change": (refusal - full_refusal) if refusal is not None and full_refusal is not None else None,
            **{key: entry.get(key) for key in (*RUN_PATHS, "results_sha256", "command")},
        })
    heads = sorted({tuple(e["head"]) for e in entries})
    seeds = sorted({e["seed"] for e in entries})
    if not heads:
        out["reason"] = "the single-head runs have no utility metrics"
        out["sentence"] = "Diagnosis validity cannot be measured: the single-head runs have no utility metrics."
        return out
    out["runs"] = [{**e, "benefit": round_value(e["benefit"], 12), "refusal_change": round_value(e["refusal_change"], 12)}
                   for e in sorted(entries, key=lambda e: (e["head"], e["seed"]))]
    head_rows = []
    for head in heads:
        mine = [e for e in entries if tuple(e["head"]) == head]
        head_rows.append({
            "head": list(head),
            "seeds": [e["seed"] for e in mine],
            "benefit_per_seed": [round_value(e["benefit"]) for e in mine],
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

    lam = float(conflict_map.options.get("weight_lambda", 0.5))  # the diagnosis's own lambda, 0 included
    map_seed = int(conflict_map.seed)
    map_score = conflict_map.options.get("score", "product")
    for row in head_rows:
        layer, head = row["head"]
        row["oc"] = round_value(conflict_map.oc[layer][head], 6)
        row["fs"] = round_value(conflict_map.fs[layer][head], 6)
    for method in SCORE_METHODS:
        pooled_scores = np.asarray(combine_scores(conflict_map.oc, conflict_map.fs, method, lam, map_seed))
        per_seed = []
        for seed in seeds:
            scores = pooled_scores if method != "random" else np.asarray(
                combine_scores(conflict_map.oc, conflict_map.fs, method, lam, seed))
            mine = [e for e in entries if e["seed"] == seed]
            per_seed.append(spearman([scores[e["head"][0], e["head"][1]] for e in mine], [e["benefit"] for e in mine]))
        x = [float(pooled_scores[r["head"][0], r["head"][1]]) for r in head_rows]
        y = [float(np.mean(finite(e["benefit"] for e in entries if tuple(e["head"]) == tuple(r["head"])))) for r in head_rows]
        stat = summarize(per_seed)
        interval = bootstrap_spearman(x, y)
        out["methods"][method] = {
            "rho_per_seed": [round_value(v) for v in per_seed],
            "rho": stat,
            "pooled_rho": round_value(spearman(x, y)),
            "pooled_interval": interval,
            "outcome": _validity_outcome(stat, interval),
            "head_scores": [round_value(v, 6) for v in x],
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
    spread = f"Spearman rho {format_stat(stat)} over {stat['n']} seed{'s' if stat['n'] != 1 else ''}"
    pooled = "undefined" if result["pooled_rho"] is None else f"{result['pooled_rho']:.{DECIMALS}f}"
    ci = (f", bootstrap 95% interval [{interval['low']:.{DECIMALS}f}, {interval['high']:.{DECIMALS}f}]"
          if interval.get("low") is not None else "")
    numbers = f"{spread}; pooled rho {pooled}{ci}; {n_heads} heads"
    result_outcome = result["outcome"]
    if result_outcome == "predictive":
        return f"The {method} conflict score predicts the measured benefit of skipping a head ({numbers})."
    if result_outcome == "inversely related":
        return (f"The {method} conflict score does not predict the benefit of skipping a head: higher scores go with "
                f"less benefit ({numbers}).")
    if result_outcome == "no clear relation":
        return (f"The {method} conflict score does not clearly predict the benefit of skipping a head: the correlation "
                f"is within its spread ({numbers}).")
    return f"The {method} conflict score's relation to the benefit of skipping a head is undefined ({numbers})."
