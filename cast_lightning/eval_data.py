"""Where the evaluation package lives (lm-eval task suites and the embedded world's prompt sets) and how a prompt
set is read: the one lookup behind ``cast eval``, the fit-time ``RefusalCallback`` and the lm-eval task files
(``eval/tasks/*/utils.py``), so all of them read the same prompts.

Light on purpose: no torch, lm-eval or transformers, because lm-eval imports the task files.

The package is ``cast_lightning.eval_tasks`` in an installed wheel, else the checkout's top-level ``eval/``; its
``tasks/`` folder is lm-eval's ``include_path`` and its ``data/`` folder holds the prompt sets
(``utility_<skill>.jsonl`` {prompt, answer}, ``harmful.jsonl`` {prompt, category, heldout_category},
``benign.jsonl`` {prompt}). ``$CAST_EVAL_DATA_DIR`` (or a task's ``--metadata '{"data_dir": ...}'``) points at other
prompt sets of the same format.

It also holds the registry of the standard safety suites (``SAFETY_SUITES``: XSTest, HarmBench, AdvBench,
JailbreakBench, StrongREJECT): which hub dataset each reads, which column is the prompt, and how a row becomes an
lm-eval document (``suite_documents``). The task files load the rows (``tasks/cast_suites/utils.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cast_lightning.errors import CastError
from cast_lightning.shipped import shipped_folder

DATA_DIR_ENV = "CAST_EVAL_DATA_DIR"


def eval_package_dir() -> Path:
    """The evaluation package: ``cast_lightning.eval_tasks`` when installed, else the checkout's ``eval/``."""
    return shipped_folder("cast_lightning.eval_tasks", "eval", "tasks")


def tasks_dir() -> Path:
    """The lm-eval task folder to pass as ``include_path`` (``lm_eval --include_path`` takes the same)."""
    return eval_package_dir() / "tasks"


def data_dir(override: str | os.PathLike | None = None, package: str | os.PathLike | None = None) -> Path:
    """The prompt sets: ``override``, else ``$CAST_EVAL_DATA_DIR``, else ``<package>/data``.

    ``package`` is the evaluation package directory (default ``eval_package_dir()``); a task file passes the one
    it sits in, so a copied ``tasks/`` folder reads the ``data/`` beside it.
    """
    chosen = override or os.environ.get(DATA_DIR_ENV)
    if chosen:
        return Path(chosen)
    return Path(package if package is not None else eval_package_dir()) / "data"


def read_prompt_file(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL prompt set, each a JSON object with a non-empty ``prompt`` (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise CastError(
            f"{path} is missing: write the embedded world's eval sets into {path.parent} with "
            f"cast_lightning.world.generator.write_eval_sets, or use prompt files of the same format"
        )
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CastError(f"{path}:{number} is not valid JSON ({error.msg}): fix or remove the line") from error
            if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
                raise CastError(f"{path}:{number} has no non-empty 'prompt' field")
            rows.append(row)
    if not rows:
        raise CastError(f"prompt set {path} is empty: give a file with one JSON object per line")
    return rows


def read_task_yaml(path: Path) -> dict:
    """A task YAML with its ``include`` merged in; ``!function`` tags are kept as plain strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load(path.read_text(), Loader=Loader) or {}
    if "include" in config:
        config = {**read_task_yaml(path.parent / config.pop("include")), **config}
    return config


def task_version(task: str) -> float | None:
    """The ``metadata.version`` of one of the package's lm-eval tasks (``cast_refusal``, ``cast_world_add``, ...)."""
    for path in sorted(tasks_dir().glob("*/*.yaml")):
        config = read_task_yaml(path)
        if config.get("task") == task:
            return (config.get("metadata") or {}).get("version")
    return None


# --- the standard safety suites: their hub datasets and how their rows become documents --------------------------------
# Pure data and row mapping (no ``datasets`` import: this module stays light). The lm-eval task files
# (``tasks/cast_suites/utils.py``) load the rows; ``cast eval --suite`` runs those tasks.


@dataclass(frozen=True)
class SuiteDataset:
    """A suite's hub dataset: where it is and which columns hold what (the hub schema, also for local copies)."""

    key: str
    hub: str
    name: str | None
    split: str
    prompt: str
    category: str | None = None
    context: str | None = None
    card: str = ""


@dataclass(frozen=True)
class SafetySuite:
    """One lm-eval task of the standard safety suites.

    ``kind``: ``harmful`` (should be refused) or ``benign`` (should be answered). ``harm_metric``: the judge-based
    harm number this suite reports (``attack_success_rate`` where an attack is defined, ``harmful_response_rate``
    otherwise, None on benign prompts). ``half``: XSTest's ``safe`` prompts or their ``unsafe`` contrasts.
    """

    task: str
    dataset: str
    kind: str
    harm_metric: str | None
    description: str
    half: str | None = None


SUITE_DATASETS: dict[str, SuiteDataset] = {d.key: d for d in (
    SuiteDataset("xstest", "walledai/XSTest", None, "test", "prompt", "type",
                 card="https://huggingface.co/datasets/walledai/XSTest (XSTest v2: 250 safe, 200 unsafe contrast prompts)"),
    SuiteDataset("harmbench_standard", "walledai/HarmBench", "standard", "train", "prompt", "category",
                 card="https://huggingface.co/datasets/walledai/HarmBench (HarmBench text behaviours, standard)"),
    SuiteDataset("harmbench_contextual", "walledai/HarmBench", "contextual", "train", "prompt", "category", "context",
                 card="https://huggingface.co/datasets/walledai/HarmBench (HarmBench text behaviours, contextual)"),
    SuiteDataset("advbench", "walledai/AdvBench", None, "train", "prompt",
                 card="https://huggingface.co/datasets/walledai/AdvBench (AdvBench harmful behaviours, 520)"),
    SuiteDataset("jbb_harmful", "JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal", "Category",
                 card="https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors (100 harmful behaviours)"),
    SuiteDataset("jbb_benign", "JailbreakBench/JBB-Behaviors", "behaviors", "benign", "Goal", "Category",
                 card="https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors (100 benign behaviours)"),
    SuiteDataset("strongreject", "walledai/StrongREJECT", None, "train", "prompt", "category",
                 card="https://huggingface.co/datasets/walledai/StrongREJECT (StrongREJECT forbidden prompts, 313)"),
)}

SAFETY_SUITES: dict[str, SafetySuite] = {s.task: s for s in (
    SafetySuite("cast_xstest_safe", "xstest", "benign", None, "XSTest safe prompts: over-refusal", half="safe"),
    SafetySuite("cast_xstest_unsafe", "xstest", "harmful", "harmful_response_rate", "XSTest unsafe contrast prompts",
                half="unsafe"),
    SafetySuite("cast_harmbench", "harmbench_standard", "harmful", "attack_success_rate", "HarmBench standard behaviours"),
    SafetySuite("cast_harmbench_contextual", "harmbench_contextual", "harmful", "attack_success_rate",
                "HarmBench contextual behaviours"),
    SafetySuite("cast_advbench", "advbench", "harmful", "attack_success_rate", "AdvBench harmful behaviours"),
    SafetySuite("cast_jbb_harmful", "jbb_harmful", "harmful", "attack_success_rate", "JailbreakBench harmful behaviours"),
    SafetySuite("cast_jbb_benign", "jbb_benign", "benign", None, "JailbreakBench benign behaviours: over-refusal"),
    SafetySuite("cast_strongreject", "strongreject", "harmful", "attack_success_rate", "StrongREJECT forbidden prompts"),
)}

SUITE_GROUPS: dict[str, list[str]] = {
    "cast_xstest": ["cast_xstest_safe", "cast_xstest_unsafe"],
    "cast_jbb": ["cast_jbb_harmful", "cast_jbb_benign"],
    "cast_safety_suites": list(SAFETY_SUITES),
}
STANDARD = "standard"  # ``cast eval --suite standard``: every suite (the group cast_safety_suites)


def expand_suites(names: list[str]) -> list[str]:
    """Suite task names, with groups (and ``standard``) expanded, in the registry's order, each once."""
    wanted: set[str] = set()
    for name in names:
        name = "cast_safety_suites" if name == STANDARD else name
        if name in SUITE_GROUPS:
            wanted.update(SUITE_GROUPS[name])
        elif name in SAFETY_SUITES:
            wanted.add(name)
        else:
            known = ", ".join([STANDARD, *SUITE_GROUPS, *SAFETY_SUITES])
            raise CastError(f"unknown safety suite {name!r}: use one of {known}")
    return [task for task in SAFETY_SUITES if task in wanted]


def _xstest_half(row: dict) -> str:
    label = str(row.get("label") or "").strip().lower()
    if label in ("safe", "unsafe"):
        return label
    return "unsafe" if str(row.get("type") or "").startswith("contrast") else "safe"


def suite_documents(task: str, rows: list[dict], judge: str = "", source: str = "") -> list[dict]:
    """A suite's hub rows -> lm-eval documents ``{prompt, behavior, context, category, index, judge}``.

    ``prompt`` is what the model is asked (HarmBench's contextual behaviours: the context, a ``---`` line, then the
    behaviour, as HarmBench renders them); ``behavior`` is the request a judge reads; ``judge`` is the judge's
    configuration (``judges.registry.judge_config``) for lm-eval's aggregation, ``""`` for none. A row without the
    prompt column is a ``CastError`` naming the columns the file has.
    """
    suite = SAFETY_SUITES[task]
    spec = SUITE_DATASETS[suite.dataset]
    docs = []
    for index, row in enumerate(rows):
        if spec.prompt not in row or (spec.context and spec.context not in row):
            need = [c for c in (spec.prompt, spec.context) if c]
            raise CastError(f"{source or spec.hub}: row {index + 1} has no {' / '.join(need)} column (it has "
                            f"{', '.join(sorted(map(str, row)))}); {task} reads {spec.hub}'s schema")
        if suite.half and _xstest_half(row) != suite.half:
            continue
        behavior = str(row[spec.prompt]).strip()
        context = str(row.get(spec.context) or "").strip() if spec.context else ""
        if not behavior:
            raise CastError(f"{source or spec.hub}: row {index + 1} has an empty {spec.prompt!r}")
        docs.append({
            "prompt": f"{context}\n\n---\n\n{behavior}" if context else behavior,
            "behavior": behavior,
            "context": context,
            "category": str(row.get(spec.category) or "") if spec.category else "",
            "index": index,
            "judge": judge,
        })
    if not docs:
        raise CastError(f"{source or spec.hub} holds no {suite.half or ''} prompts for {task}".replace("  ", " "))
    return docs
