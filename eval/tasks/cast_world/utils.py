"""lm-eval helpers for the embedded world's utility skills (exact match over generate_until).

The prompt sets live in ``eval/data/utility_<skill>.jsonl`` ({"prompt", "answer"}), found relative to
this file (``../../data``), so the tasks work from a source checkout, from an installed wheel
(``cast_lightning/eval_tasks/data``) and from any working directory. ``data_dir`` (passed through
lm-eval's ``--metadata '{"data_dir": "..."}'``) or the ``CAST_EVAL_DATA_DIR`` environment variable
point at another directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DATA_FILE = "utility_{skill}.jsonl"


def data_dir(override: str | None = None) -> Path:
    """The prompt-set directory: ``override``, else ``$CAST_EVAL_DATA_DIR``, else ``../../data`` from this file."""
    chosen = override or os.environ.get("CAST_EVAL_DATA_DIR")
    return Path(chosen) if chosen else Path(__file__).resolve().parents[2] / "data"


def read_rows(name: str, override: str | None = None) -> list[dict]:
    path = data_dir(override) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: write the embedded world's eval sets with "
            f"`python -m cast_lightning.data.world --eval-sets {path.parent}`"
        )
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def load_skill(skill: str, data_dir: str | None = None, **_metadata):
    """``custom_dataset`` for one skill: a DatasetDict with a ``test`` split of {prompt, answer}."""
    import datasets

    rows = [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in read_rows(DATA_FILE.format(skill=skill), data_dir)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _exact_match():
    try:
        from cast_lightning.metrics import exact_match
    except ImportError:  # lm_eval run from another environment: use the checkout/wheel this file sits in
        sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
        from cast_lightning.metrics import exact_match
    return exact_match


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the stripped generation against the stripped answer."""
    return {"exact_match": _exact_match()(results[0], doc["answer"])}
