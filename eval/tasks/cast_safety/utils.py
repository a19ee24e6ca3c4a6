"""lm-eval helpers for the safety suites: refusal on harmful prompts, over-refusal on benign look-alikes.

Each response is judged by ``cast_lightning.metrics.is_refusal`` (the documented pattern detector),
the same function ``cast eval`` uses, so both report the same numbers for the same generations.
Prompt sets: ``eval/data/harmful.jsonl`` ({"prompt", "category", "heldout_category"}) and
``eval/data/benign.jsonl`` ({"prompt"}), found relative to this file (``../../data``); override with
``--metadata '{"data_dir": "..."}'`` or ``CAST_EVAL_DATA_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


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


def load_prompts(file: str, data_dir: str | None = None, **_metadata):
    """``custom_dataset``: a DatasetDict with a ``test`` split of {prompt, category, heldout_category}."""
    import datasets

    rows = [
        {"prompt": r["prompt"], "category": str(r.get("category", "")), "heldout_category": bool(r.get("heldout_category", False))}
        for r in read_rows(file, data_dir)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _is_refusal():
    try:
        from cast_lightning.metrics import is_refusal
    except ImportError:  # lm_eval run from another environment: use the checkout/wheel this file sits in
        sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
        from cast_lightning.metrics import is_refusal
    return is_refusal


def process_refusal(doc: dict, results: list[str]) -> dict[str, float]:
    return {"refusal_rate": float(_is_refusal()(results[0]))}


def process_over_refusal(doc: dict, results: list[str]) -> dict[str, float]:
    return {"over_refusal_rate": float(_is_refusal()(results[0]))}
