"""lm-eval hooks of the safety suites: refusal on harmful prompts, over-refusal on benign look-alikes.

Each response is judged by ``cast_lightning.metrics.is_refusal`` (the documented pattern detector), the same
function ``cast eval`` uses, so both report the same numbers for the same generations. The prompt sets
``harmful.jsonl`` ({"prompt", "category", "heldout_category"}) and ``benign.jsonl`` ({"prompt"}) are read from the
``data/`` folder of the evaluation package this file sits in; lm-eval's ``--metadata '{"data_dir": "..."}'`` or
``$CAST_EVAL_DATA_DIR`` point at another folder. The lookup and the file format are ``cast_lightning.eval_data``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2]  # the evaluation package: tasks/ and data/

try:
    from cast_lightning import eval_data
    from cast_lightning.metrics import is_refusal
except ImportError:  # lm_eval run from another environment: use the checkout this file sits in
    sys.path.insert(0, str(PACKAGE.parent))
    from cast_lightning import eval_data
    from cast_lightning.metrics import is_refusal


def load_prompts(file: str, data_dir: str | None = None, **_metadata):
    """``custom_dataset``: a DatasetDict with a ``test`` split of {prompt, category, heldout_category}."""
    import datasets

    rows = [
        {"prompt": r["prompt"], "category": str(r.get("category", "")), "heldout_category": bool(r.get("heldout_category", False))}
        for r in eval_data.read_prompt_file(eval_data.data_dir(data_dir, package=PACKAGE) / file)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_refusal(doc: dict, results: list[str]) -> dict[str, float]:
    return {"refusal_rate": float(is_refusal(results[0]))}


def process_over_refusal(doc: dict, results: list[str]) -> dict[str, float]:
    return {"over_refusal_rate": float(is_refusal(results[0]))}
