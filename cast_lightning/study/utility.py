"""The utility metric: one number per run from the ``utility.<task>.<metric>[.<filter>]`` keys of its metrics.

Light on purpose (numpy and the light ``eval_data`` lookup): the report and the demo's table import it without the evaluation stack.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from cast_lightning.errors import CastError
from cast_lightning.eval_data import tasks_dir

HEADLINE_METRICS = ("exact_match", "acc_norm", "acc")

UTILITY_DEFINITION = (
    "utility = the unweighted mean, over leaf utility tasks, of each task's headline metric "
    "(exact_match, else acc_norm, else acc; the unfiltered value, else the first filter by name); group "
    "aggregates (e.g. cast_world_utility) are left out so no task counts twice. "
    "utility drop = utility(base model) - utility(variant): positive means fine-tuning lost utility."
)


def parse_utility_key(key: str) -> tuple[str, str, str | None] | None:
    """``utility.<task>.<metric>[.<filter>]`` -> ``(task, metric, filter)``; None for other keys."""
    if not key.startswith("utility."):
        return None
    parts = key[len("utility.") :].split(".", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _tasks_dir() -> Path | None:
    """The lm-eval task folder (``cast_lightning.eval_data.tasks_dir``, a light module); None when it is missing."""
    try:
        return tasks_dir()
    except CastError:
        return None


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
