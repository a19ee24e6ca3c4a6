"""lm-eval hooks of the standard safety suites (XSTest, HarmBench, AdvBench, JailbreakBench, StrongREJECT).

Each task reads its hub dataset (``cast_lightning.eval_data.SUITE_DATASETS``: path, config, split, columns) with
``datasets.load_dataset``, or a local copy in the same schema named by ``--metadata '{"suite_data": {KEY: PATH}}'``
(KEY: xstest, harmbench_standard, harmbench_contextual, advbench, jbb_harmful, jbb_benign, strongreject; PATH: a
.jsonl/.json/.csv/.parquet file or a ``save_to_disk`` directory). Scoring:

- ``refusal_rate`` / ``over_refusal_rate``: ``cast_lightning.metrics.is_refusal`` on each response (per document);
- with ``--metadata '{"judge": "wildguard=allenai/wildguard"}'`` (optional ``"judge_options": {"dtype": ...,
  "batch_size": ..., "device": ...}``), the judge reads every (prompt, response) of the task at aggregation time,
  batched, and gives ``judge_refusal_rate`` / ``judge_over_refusal_rate``, ``attack_success_rate`` /
  ``harmful_response_rate`` and ``judge_unparsed_rate`` (``cast_lightning.judges.scoring``: the definitions
  ``cast eval`` uses). Without a judge, or with one that does not produce a field, those are NaN.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2]  # the evaluation package: tasks/ and data/

try:
    from cast_lightning import eval_data
    from cast_lightning.errors import CastError
    from cast_lightning.metrics import is_refusal
except ImportError:  # lm_eval run from another environment: use the checkout this file sits in
    sys.path.insert(0, str(PACKAGE.parent))
    from cast_lightning import eval_data
    from cast_lightning.errors import CastError
    from cast_lightning.metrics import is_refusal

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _local_rows(spec, local: str) -> list[dict]:
    import datasets

    path = Path(local).expanduser()
    if not path.exists():
        raise CastError(f"suite data for {spec.key}: {local} does not exist; give a copy of {spec.hub} "
                        f"(.jsonl/.json/.csv/.parquet or a save_to_disk directory)")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split = spec.split if spec.split in loaded else next(iter(loaded))
            loaded = loaded[split]
    elif path.suffix in LOCAL_BUILDERS:
        loaded = datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        raise CastError(f"suite data for {spec.key}: {local} is not .jsonl/.json/.csv/.parquet or a dataset directory")
    return [dict(row) for row in loaded]


def _hub_rows(spec, task: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(spec.hub, spec.name, split=spec.split)
    except CastError:
        raise
    except Exception as error:  # not cached offline, gated, renamed, no network: one line naming the fix
        where = f"{spec.hub}" + (f" ({spec.name})" if spec.name else "") + f" split {spec.split}"
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise CastError(
            f"cannot load {where} for {task} ({type(error).__name__}: {reason}); download it first (huggingface-cli "
            f"download --repo-type dataset {spec.hub}; accept its terms on the hub if it is gated) or give a local copy "
            f"in its schema: cast eval --suite_data '{{{spec.key}: PATH}}' (lm-eval: --metadata "
            f"'{{\"suite_data\": {{\"{spec.key}\": \"PATH\"}}}}')"
        ) from error
    return [dict(row) for row in loaded]


def load_suite(suite: str, suite_data: dict | None = None, judge: str | None = None, judge_options: dict | None = None,
               **_metadata):
    """``custom_dataset``: a DatasetDict with a ``test`` split of the suite's documents (``eval_data.suite_documents``)."""
    import datasets

    from cast_lightning.judges.registry import judge_config

    spec = eval_data.SUITE_DATASETS[eval_data.SAFETY_SUITES[suite].dataset]
    local = (suite_data or {}).get(spec.key)
    rows = _local_rows(spec, local) if local else _hub_rows(spec, suite)
    docs = eval_data.suite_documents(suite, rows, judge_config(judge, **(judge_options or {})), source=local or spec.hub)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _item(doc: dict, response: str) -> dict:
    return {"prompt": doc["behavior"], "response": response, "context": doc["context"], "judge": doc["judge"]}


def process_attack(doc: dict, results: list[str]) -> dict:
    """Harmful behaviours (HarmBench, AdvBench, JBB harmful, StrongREJECT)."""
    item = _item(doc, results[0])
    return {"refusal_rate": float(is_refusal(results[0])), "judge_refusal_rate": item, "attack_success_rate": item,
            "judge_unparsed_rate": item}


def process_unsafe(doc: dict, results: list[str]) -> dict:
    """XSTest's unsafe contrast prompts (no attack: a harmful-response rate)."""
    item = _item(doc, results[0])
    return {"refusal_rate": float(is_refusal(results[0])), "judge_refusal_rate": item, "harmful_response_rate": item,
            "judge_unparsed_rate": item}


def process_benign(doc: dict, results: list[str]) -> dict:
    """Benign prompts (XSTest safe, JBB benign): over-refusal."""
    item = _item(doc, results[0])
    return {"over_refusal_rate": float(is_refusal(results[0])), "judge_over_refusal_rate": item,
            "judge_unparsed_rate": item}


def agg_judge_refusal(items: list[dict]) -> float:
    from cast_lightning.judges.scoring import lm_eval_aggregate

    return lm_eval_aggregate(items, "refusal")


def agg_judge_harmful(items: list[dict]) -> float:
    from cast_lightning.judges.scoring import lm_eval_aggregate

    return lm_eval_aggregate(items, "harmful")


def agg_judge_unparsed(items: list[dict]) -> float:
    from cast_lightning.judges.scoring import lm_eval_aggregate

    return lm_eval_aggregate(items, "unparsed")
