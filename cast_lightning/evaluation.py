"""``cast eval``: utility (lm-eval tasks) and safety (refusal / over-refusal) on a checkpoint or HF directory.

- Safety: batched greedy generation (left padding, KV cache, stop at EOS) on harmful prompts
  (refusal rate, higher is better) and benign look-alikes (over-refusal rate, lower is better),
  judged by ``cast_lightning.metrics.is_refusal`` or a ``RefusalJudge``.
- Utility: lm-eval's ``simple_evaluate`` on the in-memory model (``HFLM(pretrained=model)``), with
  the embedded world's tasks from ``eval/tasks`` (shipped in the wheel as
  ``cast_lightning.eval_tasks``; ``cast_lightning.eval_data`` finds them) and any lm-eval task (mmlu, gsm8k, ...).

The safety suites are also the lm-eval tasks ``cast_refusal`` / ``cast_over_refusal``. Generation
(``cast_lightning.generation``) matches lm-eval's HF backend token for token, so ``cast eval`` and
``lm_eval --model hf --include_path <eval/tasks> --tasks cast_safety --apply_chat_template`` report
the same numbers when run with the same batch size.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cast_lightning.checkpoints import (
    SKIP_HEADS_KEY,
    checkpoint_files,
    is_lightning_checkpoint,
    load_checkpoint_model,
)
from cast_lightning.errors import CastError
from cast_lightning.eval_data import data_dir, read_prompt_file, task_version, tasks_dir
from cast_lightning.export import MARKER as EXPORT_MARKER
from cast_lightning.generation import generate_greedy_tokens
from cast_lightning.io import atomic_write_json, atomic_write_text, ensure_writable
from cast_lightning.loading import load_model_and_tokenizer
from cast_lightning.metrics import RefusalJudge, detect
from cast_lightning.provenance import versions

SCHEMA_VERSION = 1
SUITES = ("utility", "safety", "all")
WORLD_UTILITY_TASKS = ["cast_world_utility"]
SAFETY_TASK_FILES = {"cast_refusal": "harmful.jsonl", "cast_over_refusal": "benign.jsonl"}
HASH_LIMIT_BYTES = 2 << 30  # fingerprint files up to 2 GiB; larger ones are identified by size + mtime


# --- prompt sets --------------------------------------------------------------------------------------------------


def read_prompts(source: str | os.PathLike) -> list[dict]:
    """Prompt rows (each with a non-empty ``prompt``) from a local JSONL file (``eval_data.read_prompt_file``), or any
    source ``SafetyUtilityDataModule`` reads (JSON/Parquet/CSV, a dataset directory, ``hub/name@split``)."""
    source = str(source)
    if source.endswith(".jsonl"):
        return read_prompt_file(source)
    from cast_lightning.data.datamodule import load_rows

    rows = load_rows(source)
    bad = [i for i, r in enumerate(rows, 1) if not str(r.get("prompt") or "").strip()]
    if not rows or bad:
        raise CastError(f"{source}: {'no rows' if not rows else f'row {bad[0]} has no prompt'}; every row needs a 'prompt' field")
    return rows


# --- loading ------------------------------------------------------------------------------------------------------


def _fingerprint(paths: Sequence[Path]) -> dict:
    paths = sorted(p for p in paths if p.is_file())
    size = sum(p.stat().st_size for p in paths)
    info: dict = {"bytes": size, "files": [p.name for p in paths]}
    if paths and size <= HASH_LIMIT_BYTES:
        digest = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        info["sha256"] = digest.hexdigest()
    elif paths:
        info["mtime"] = max(p.stat().st_mtime for p in paths)
    return info


def load_for_eval(path: str, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, identity) from a ``cast fit`` checkpoint (a ``.ckpt`` file, or the checkpoint directory
    FSDP2 or DeepSpeed writes), an HF directory or a hub name.

    Checkpoints go through ``checkpoints.load_checkpoint_model``, the loader ``cast export`` uses: checked and read
    without executing code, the base model named in ``hyper_parameters["pretrained"]`` (in the checkpoint's dtype)
    with the trained weights. A ``.ckpt`` path that does not exist is named as such, not looked up on the hub.
    ``identity`` records what was evaluated (path, kind, base model, step, skipped heads, a sha256 of the weights up
    to 2 GiB).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolved = os.path.abspath(path) if os.path.exists(path) else path
    if is_lightning_checkpoint(path) or (path.endswith(".ckpt") and not os.path.exists(path)):
        model, tokenizer, checkpoint = load_checkpoint_model(path)
        identity = {
            "kind": "lightning_checkpoint",
            "path": resolved,
            "pretrained": checkpoint["hyper_parameters"]["pretrained"],
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "skip_heads": checkpoint.get(SKIP_HEADS_KEY, []),
            "fingerprint": _fingerprint([Path(f) for f in checkpoint_files(path)]),
        }
    elif os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise CastError(f"{path} is neither a Lightning checkpoint nor an HF model directory (no config.json)")
        model, tokenizer = load_model_and_tokenizer(path, dtype, trust_remote_code=trust_remote_code)
        weights = [p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin")]
        skip_file = Path(path) / EXPORT_MARKER
        identity = {
            "kind": "hf_directory",
            "path": resolved,
            "skip_heads": json.loads(skip_file.read_text()).get("skip_heads", []) if skip_file.exists() else None,
            "fingerprint": _fingerprint(weights),
        }
    elif os.path.exists(path):
        raise CastError(f"{path} is neither a .ckpt checkpoint nor an HF model directory")
    else:
        model, tokenizer = load_model_and_tokenizer(path, dtype, trust_remote_code=trust_remote_code)
        identity = {"kind": "hub", "path": path}
    if getattr(model.generation_config, "eos_token_id", None) is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    identity.update(
        {
            "architecture": getattr(model.config, "model_type", None),
            "name_or_path": getattr(model.config, "_name_or_path", None),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        }
    )
    return model, tokenizer, identity


# --- the suites ---------------------------------------------------------------------------------------------------


def _rate(flags: list[bool]) -> float | None:
    # Python float arithmetic, as lm-eval's mean aggregation: the two report bit-identical numbers.
    return sum(map(float, flags)) / len(flags) if flags else None


def run_safety_suite(
    model,
    tokenizer,
    harmful: str | os.PathLike | None = None,
    benign: str | os.PathLike | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    judge: RefusalJudge | None = None,
    limit: int | None = None,
    return_samples: bool = False,
) -> dict:
    """Refusal rate on harmful prompts and over-refusal rate on benign look-alikes.

    ``harmful`` / ``benign`` default to the package's ``harmful.jsonl`` / ``benign.jsonl``;
    ``limit`` keeps the first N prompts of each (as lm-eval's ``--limit``). Returns the two rates, the
    sample counts, refusal rates per ``category`` and for held-out vs training categories, timing,
    and (``return_samples``) every prompt with its response and verdict.
    """
    sets = {
        "harmful": read_prompts(harmful or data_dir() / SAFETY_TASK_FILES["cast_refusal"]),
        "benign": read_prompts(benign or data_dir() / SAFETY_TASK_FILES["cast_over_refusal"]),
    }
    if limit is not None:
        sets = {name: rows[:limit] for name, rows in sets.items()}
    start = time.perf_counter()
    tokens = {name: generate_greedy_tokens(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size) for name, rows in sets.items()}
    seconds = time.perf_counter() - start
    responses = {name: [tokenizer.decode(t, skip_special_tokens=True) for t in ids] for name, ids in tokens.items()}
    verdicts = {name: detect(texts, judge) for name, texts in responses.items()}
    harmful_rows, harmful_flags = sets["harmful"], verdicts["harmful"]
    by_category: dict[str, list[bool]] = {}
    for row, flag in zip(harmful_rows, harmful_flags):
        by_category.setdefault(str(row.get("category", "")), []).append(flag)
    heldout = [f for r, f in zip(harmful_rows, harmful_flags) if r.get("heldout_category")]
    trained = [f for r, f in zip(harmful_rows, harmful_flags) if not r.get("heldout_category")]
    n_tokens = sum(len(t) for ids in tokens.values() for t in ids)
    result = {
        "refusal_rate": _rate(harmful_flags),
        "over_refusal_rate": _rate(verdicts["benign"]),
        "n_harmful": len(harmful_rows),
        "n_benign": len(sets["benign"]),
        "refusal_rate_by_category": {c: _rate(f) for c, f in sorted(by_category.items()) if c},
        "refusal_rate_heldout_category": _rate(heldout),
        "refusal_rate_training_categories": _rate(trained) if heldout else None,
        "n_heldout_category": len(heldout),
        "generation_seconds": round(seconds, 3),
        "generated_tokens": n_tokens,
        "generated_tokens_per_second": round(n_tokens / seconds, 1) if seconds > 0 else None,
    }
    if return_samples:
        result["samples"] = [
            {"set": name, "prompt": row["prompt"], "response": text, "refusal": flag, **({"category": row["category"]} if "category" in row else {})}
            for name in sets
            for row, text, flag in zip(sets[name], responses[name], verdicts[name])
        ]
    return result


def _number(value):
    """lm-eval reports group versions as strings ("1.0"): numbers where they are numbers."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _is_local_task(task: str) -> bool:
    return task in WORLD_UTILITY_TASKS or task.startswith("cast_")


def run_utility_suite(
    model,
    tokenizer,
    tasks: Sequence[str] = tuple(WORLD_UTILITY_TASKS),
    batch_size: int = 32,
    limit: int | float | None = None,
    apply_chat_template: bool | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    data_dir_override: str | None = None,
) -> dict:
    """lm-eval ``simple_evaluate`` on the in-memory model.

    Our tasks (``cast_*``, from ``tasks_dir()``) and any built-in lm-eval task can be mixed.
    ``apply_chat_template=None`` renders our tasks with the tokenizer's chat template and runs other
    tasks as lm-eval does by default (no template); True/False forces it for all. Returns
    ``{"metrics": {"<task>.<metric>": value}, "stderr": ..., "versions": ..., "n_samples": ..., "higher_is_better": ...}``
    where a metric with an lm-eval filter other than ``none`` is named ``<metric>.<filter>``.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    try:
        from lm_eval.models.huggingface import HFLM
    except ModuleNotFoundError as error:  # lm-eval's HF backend needs accelerate (the lm-eval[hf] extra)
        raise CastError(f"lm-eval's HF backend cannot load ({error.name} is missing): pip install 'lm-eval[hf]' accelerate") from error

    tasks = list(tasks)
    if not tasks:
        raise CastError("no utility tasks given: name lm-eval tasks, e.g. --tasks '[cast_world_utility]'")
    include_defaults = not all(_is_local_task(t) for t in tasks)
    metadata = {"data_dir": str(data_dir_override)} if data_dir_override else None
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=include_defaults, metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise CastError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm_eval ls tasks` or use cast_world_utility")
    if apply_chat_template is None:
        runs = [(True, [t for t in tasks if _is_local_task(t)]), (False, [t for t in tasks if not _is_local_task(t)])]
    else:
        runs = [(bool(apply_chat_template), tasks)]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = {"metrics": {}, "stderr": {}, "versions": {}, "n_samples": {}, "higher_is_better": {}, "apply_chat_template": {}}
    start = time.perf_counter()
    for chat, names in runs:
        if not names:
            continue
        # A missing cast_* prompt set raises CastError inside lm-eval (the task's utils.py reads it via eval_data).
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            apply_chat_template=chat,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        for task, values in results["results"].items():
            out["apply_chat_template"][task] = chat
            for key, value in values.items():
                if "," not in key or not isinstance(value, (int, float)):
                    continue
                metric, filter_name = key.split(",", 1)
                target = "stderr" if metric.endswith("_stderr") else "metrics"
                metric = metric.removesuffix("_stderr")
                name = f"{task}.{metric}" if filter_name == "none" else f"{task}.{metric}.{filter_name}"
                out[target][name] = float(value)
        out["versions"].update({k: _number(v) for k, v in results.get("versions", {}).items()})
        out["n_samples"].update({k: v.get("effective", v) for k, v in results.get("n-samples", {}).items()})
        out["higher_is_better"].update(results.get("higher_is_better", {}))
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


# --- the command --------------------------------------------------------------------------------------------------


def evaluate(
    *,
    model: str,
    suite: str = "all",
    output: str = "results.json",
    tasks: list[str] | None = None,
    harmful: str | None = None,
    benign: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    limit: int | None = None,
    seed: int = 0,
    apply_chat_template: bool | None = None,
    num_fewshot: int | None = None,
    judge: str | None = None,
    judge_label: str = "refusal",
    dtype: str = "float32",
    device: str | None = None,
    samples: str | None = None,
) -> dict:
    """Evaluate a model's safety (refusal / over-refusal) and utility (lm-eval tasks) into a results JSON.

    All arguments are keyword-only, so the CLI reads ``cast eval --model PATH ...``.

    Args:
        model: what to evaluate: a ``cast fit`` checkpoint (``.ckpt``), an HF ``save_pretrained``
            directory (e.g. from ``cast export``) or a hub name.
        suite: ``safety`` (refusal on harmful prompts, over-refusal on benign look-alikes),
            ``utility`` (lm-eval tasks) or ``all``.
        output: the results JSON to write (atomically).
        tasks: lm-eval tasks for the utility suite; default the embedded world's ``cast_world_utility``.
            Real models: e.g. ``[mmlu, gsm8k, arc_challenge, hellaswag]`` (see configs/eval/).
        harmful: JSONL of harmful prompts (``prompt``, optional ``category``/``heldout_category``);
            default the embedded world's held-out set.
        benign: JSONL of benign look-alike prompts (``prompt``); default the embedded world's set.
        batch_size: prompts per generation / lm-eval batch.
        max_new_tokens: greedy generation length for the safety suites.
        limit: evaluate only the first N prompts of each safety set and N documents of each task.
        seed: seed for torch and lm-eval (few-shot sampling); generation is greedy.
        apply_chat_template: render prompts with the tokenizer's chat template in lm-eval;
            default: yes for the ``cast_*`` tasks, lm-eval's default (no) for the others.
        num_fewshot: few-shot examples for the lm-eval tasks (default: each task's own).
        judge: an HF sequence-classification model directory used instead of the pattern detector.
        judge_label: the judge's class that means "refusal" (name or index).
        dtype: weight dtype for HF directories and hub models: float32, bfloat16 or float16.
        device: cuda, cpu, ...; default CUDA when available.
        samples: also write every safety prompt, response and verdict to this JSONL file.

    Returns:
        The results dictionary written to ``output``: ``metrics`` holds ``safety.refusal_rate``,
        ``safety.over_refusal_rate`` and ``utility.<task>.<metric>``.
    """
    if suite not in SUITES:
        raise CastError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)}")
    if limit is not None and limit < 1:
        raise CastError("--limit must be >= 1")
    # Before loading the model and generating: a bad output path must not cost a finished evaluation.
    ensure_writable(output, "--output")
    if samples is not None:
        ensure_writable(samples, "--samples")
    if suite in ("safety", "all"):
        for prompts in (harmful, benign):
            if prompts is not None:
                read_prompts(prompts)  # a missing or broken prompt file fails now, not after the model loads
    # load_for_eval checks a checkpoint (missing, damaged, pickled, not from cast fit) before loading any model.
    started = time.perf_counter()
    torch.manual_seed(seed)
    model_obj, tokenizer, identity = load_for_eval(model, dtype=dtype, device=device)
    detector = RefusalJudge(judge, refusal_label=judge_label) if judge else None
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": identity,
        "suite": suite,
        "seed": seed,
        "metrics": {},
        "task_versions": {},
        "sample_counts": {},
    }
    if suite in ("safety", "all"):
        safety = run_safety_suite(
            model_obj, tokenizer, harmful, benign, max_new_tokens, batch_size, detector, limit, return_samples=samples is not None
        )
        rows = safety.pop("samples", None)
        results["metrics"]["safety.refusal_rate"] = safety["refusal_rate"]
        results["metrics"]["safety.over_refusal_rate"] = safety["over_refusal_rate"]
        results["safety"] = {
            **safety,
            "detector": repr(detector) if detector else "cast_lightning.metrics.is_refusal",
            "prompts": {
                "harmful": str(Path(harmful).resolve()) if harmful else str(data_dir() / SAFETY_TASK_FILES["cast_refusal"]),
                "benign": str(Path(benign).resolve()) if benign else str(data_dir() / SAFETY_TASK_FILES["cast_over_refusal"]),
            },
            "generation": {"greedy": True, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat_template": True},
        }
        for task in SAFETY_TASK_FILES:
            results["task_versions"][task] = task_version(task)
        results["sample_counts"]["cast_refusal"] = safety["n_harmful"]
        results["sample_counts"]["cast_over_refusal"] = safety["n_benign"]
        if rows is not None:
            atomic_write_text(samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if suite in ("utility", "all"):
        utility = run_utility_suite(
            model_obj, tokenizer, tasks or WORLD_UTILITY_TASKS, batch_size, limit, apply_chat_template, num_fewshot, seed
        )
        results["metrics"].update({f"utility.{k}": v for k, v in utility["metrics"].items()})
        results["task_versions"].update(utility["versions"])
        results["sample_counts"].update(utility["n_samples"])
        results["utility"] = {
            "tasks": list(tasks or WORLD_UTILITY_TASKS),
            "stderr": {f"utility.{k}": v for k, v in utility["stderr"].items()},
            "higher_is_better": utility["higher_is_better"],
            "apply_chat_template": utility["apply_chat_template"],
            "num_fewshot": num_fewshot,
            "seconds": utility["seconds"],
        }
    results["environment"] = _environment(model_obj)
    results["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(output, results)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in results["metrics"].items() if isinstance(v, float))
    print(f"[cast eval] {model}: {summary} -> {output}")
    return results


def _environment(model) -> dict:
    """The package versions (``provenance.versions``) and the device the model ran on."""
    return {**versions(), "device": str(next(model.parameters()).device)}
