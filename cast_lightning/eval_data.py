"""Where the evaluation package lives (lm-eval task suites and the embedded world's prompt sets) and how a prompt
set is read: the one lookup behind ``cast eval``, the fit-time ``RefusalCallback`` and the lm-eval task files
(``eval/tasks/*/utils.py``), so all of them read the same prompts.

Light on purpose: no torch, lm-eval or transformers, because lm-eval imports the task files.

The package is ``cast_lightning.eval_tasks`` in an installed wheel, else the checkout's top-level ``eval/``; its
``tasks/`` folder is lm-eval's ``include_path`` and its ``data/`` folder holds the prompt sets
(``utility_<skill>.jsonl`` {prompt, answer}, ``harmful.jsonl`` {prompt, category, heldout_category},
``benign.jsonl`` {prompt}). ``$CAST_EVAL_DATA_DIR`` (or a task's ``--metadata '{"data_dir": ...}'``) points at other
prompt sets of the same format.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from cast_lightning.errors import CastError

DATA_DIR_ENV = "CAST_EVAL_DATA_DIR"


def eval_package_dir() -> Path:
    """The evaluation package: ``cast_lightning.eval_tasks`` when installed, else the checkout's ``eval/``."""
    try:
        root = Path(str(resources.files("cast_lightning.eval_tasks")))
        if (root / "tasks").is_dir():
            return root
    except (ModuleNotFoundError, TypeError):
        pass
    root = Path(__file__).resolve().parents[1] / "eval"
    if not (root / "tasks").is_dir():
        raise CastError("cannot find the evaluation task suites (eval/tasks): reinstall cast-lightning")
    return root


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
