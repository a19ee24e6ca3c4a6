"""lm-eval hooks of the embedded world's utility skills (exact match over generate_until).

Each skill reads ``utility_<skill>.jsonl`` ({"prompt", "answer"}) from the ``data/`` folder of the evaluation package
this file sits in (the checkout's ``eval/``, or ``cast_lightning/eval_tasks/`` in an installed wheel), whatever the
working directory; lm-eval's ``--metadata '{"data_dir": "..."}'`` or ``$CAST_EVAL_DATA_DIR`` point at another folder.
The lookup and the file format are ``cast_lightning.eval_data``'s, the same ``cast eval`` uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2]  # the evaluation package: tasks/ and data/
DATA_FILE = "utility_{skill}.jsonl"

try:
    from cast_lightning import eval_data
    from cast_lightning.metrics import exact_match
except ImportError:  # lm_eval run from another environment: use the checkout this file sits in
    sys.path.insert(0, str(PACKAGE.parent))
    from cast_lightning import eval_data
    from cast_lightning.metrics import exact_match


def load_skill(skill: str, data_dir: str | None = None, **_metadata):
    """``custom_dataset`` for one skill: a DatasetDict with a ``test`` split of {prompt, answer}."""
    import datasets

    path = eval_data.data_dir(data_dir, package=PACKAGE) / DATA_FILE.format(skill=skill)
    rows = [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in eval_data.read_prompt_file(path)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the stripped generation against the stripped answer."""
    return {"exact_match": exact_match(results[0], doc["answer"])}
