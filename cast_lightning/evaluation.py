"""``cast eval``: utility (lm-eval tasks) and safety (refusal / over-refusal, judged) on a checkpoint or HF directory.

- World safety (``--suite safety``): batched greedy generation (left padding, KV cache, stop at EOS) on harmful
  prompts (refusal rate, higher is better) and benign look-alikes (over-refusal rate, lower is better), judged by
  ``cast_lightning.metrics.is_refusal`` or the judge given.
- Standard safety suites (``--suite standard`` or suite names: XSTest safe + unsafe, HarmBench standard +
  contextual, AdvBench, JailbreakBench harmful + benign, StrongREJECT): the lm-eval tasks ``eval/tasks/cast_suites``
  run on the in-memory model (their hub datasets, or local copies with ``--suite_data``), 256-512 new tokens, then
  every judge given (``cast_lightning.judges``: Llama Guard 3, WildGuard, the HarmBench classifier, a sequence
  classifier) reads every (prompt, response). Each number is named with the judge that produced it; two judges'
  agreement is Cohen's kappa.
- Utility: lm-eval's ``simple_evaluate`` on the in-memory model (``HFLM(pretrained=model)``), with
  the embedded world's tasks from ``eval/tasks`` (shipped in the wheel as
  ``cast_lightning.eval_tasks``; ``cast_lightning.eval_data`` finds them) and any lm-eval task (mmlu, gsm8k, ...).

The world safety suites are also the lm-eval tasks ``cast_refusal`` / ``cast_over_refusal``. Generation
(``cast_lightning.generation``) matches lm-eval's HF backend token for token, so ``cast eval`` and
``lm_eval --model hf --include_path <eval/tasks> --tasks cast_safety --apply_chat_template`` report
the same numbers when run with the same batch size. The standard suites run through lm-eval itself, and score with
the functions lm-eval's aggregation calls (``cast_lightning.judges.scoring``), so stock
``lm_eval ... --tasks cast_safety_suites --metadata '{"judge": ...}'`` reports the same numbers too.
"""

from __future__ import annotations

import datetime as _dt
import gc
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
from cast_lightning.eval_data import (
    SAFETY_SUITES,
    STANDARD,
    SUITE_DATASETS,
    SUITE_GROUPS,
    data_dir,
    eval_package_dir,
    expand_suites,
    read_prompt_file,
    task_version,
    tasks_dir,
)
from cast_lightning.export import MARKER as EXPORT_MARKER
from cast_lightning.generation import generate_greedy_tokens
from cast_lightning.io import atomic_write_json, atomic_write_text, ensure_writable, shown_path
from cast_lightning.judges import Exchange, Judge, JudgeSpec, load_judge, parse_judge_specs
from cast_lightning.judges.scoring import BENIGN, HARMFUL, agreement, judge_metrics, require_parsed, verdict_counts
from cast_lightning.loading import load_model_and_tokenizer
from cast_lightning.metrics import RefusalJudge, detect
from cast_lightning.provenance import versions

SCHEMA_VERSION = 2  # 2: judges, the standard safety suites, generation settings
SUITES = ("utility", "safety", "all")
WORLD_UTILITY_TASKS = ["cast_world_utility"]
SAFETY_TASK_FILES = {"cast_refusal": "harmful.jsonl", "cast_over_refusal": "benign.jsonl"}
WORLD_MAX_NEW_TOKENS = 64  # the embedded world's safety suites; the standard suites default to their YAML's 256/512
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


def recorded_path(path: str | os.PathLike) -> str:
    """A path as results files record it: relative to the working directory when it lies inside it (a study's runs),
    ``cast_lightning.eval_tasks/...`` for the package's own prompt sets (wherever the package is installed), else
    absolute. What was read is identified by its hash beside it, not by where it was."""
    shown = shown_path(path)
    if os.path.isabs(shown):
        try:
            return f"cast_lightning.eval_tasks/{Path(shown).resolve().relative_to(eval_package_dir().resolve())}"
        except ValueError:
            pass
    return shown


def load_for_eval(path: str, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, identity) from a ``cast fit`` checkpoint (a ``.ckpt`` file, or the checkpoint directory
    FSDP2 or DeepSpeed writes), an HF directory, a LoRA adapter directory (``cast export --adapter_only``) or a hub
    name.

    Checkpoints go through ``checkpoints.load_checkpoint_model``, the loader ``cast export`` uses: checked and read
    without executing code, the base model named in ``hyper_parameters["pretrained"]`` (in the checkpoint's dtype)
    in its training scope with the trained weights; LoRA adapters are merged into the base weights. An adapter
    directory is applied to the base model its ``adapter_config.json`` names and merged. A ``.ckpt`` path that does
    not exist is named as such, not looked up on the hub. ``identity`` records what was evaluated (path, kind, base
    model, step, skipped heads, training scope, a sha256 of the weights up to 2 GiB).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolved = recorded_path(path) if os.path.exists(path) else path
    if is_lightning_checkpoint(path) or (path.endswith(".ckpt") and not os.path.exists(path)):
        from cast_lightning.checkpoints import checkpoint_scope

        model, tokenizer, checkpoint = load_checkpoint_model(path)
        scope = checkpoint_scope(checkpoint)
        identity = {
            "kind": "lightning_checkpoint",
            "path": resolved,
            "pretrained": checkpoint["hyper_parameters"]["pretrained"],
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "skip_heads": checkpoint.get(SKIP_HEADS_KEY, []),
            "trainable": scope["trainable"],
            "lora": scope["lora"],
            "fingerprint": _fingerprint([Path(f) for f in checkpoint_files(path)]),
        }
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json")):
        from cast_lightning.lora import load_adapter_directory

        model, tokenizer, adapter = load_adapter_directory(path, dtype, trust_remote_code)
        marker = Path(path) / EXPORT_MARKER
        exported = json.loads(marker.read_text()) if marker.exists() else {}
        identity = {
            "kind": "adapter_directory",
            "path": resolved,
            "pretrained": adapter.get("base_model_name_or_path"),
            "skip_heads": exported.get("skip_heads"),
            "trainable": "lora",
            "lora": exported.get("lora"),
            "fingerprint": _fingerprint([p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin")]),
        }
    elif os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise CastError(f"{path} is neither a Lightning checkpoint nor an HF model directory (no config.json)")
        model, tokenizer = load_model_and_tokenizer(path, dtype, trust_remote_code=trust_remote_code)
        weights = [p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin")]
        skip_file = Path(path) / EXPORT_MARKER
        exported = json.loads(skip_file.read_text()) if skip_file.exists() else {}
        identity = {
            "kind": "hf_directory",
            "path": resolved,
            "skip_heads": exported.get("skip_heads", []) if skip_file.exists() else None,
            "fingerprint": _fingerprint(weights),
        }
        if "trainable" in exported:  # exported by cast export: the scope it was trained in (merged)
            identity.update({"trainable": exported["trainable"], "lora": exported.get("lora")})
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


def generate_world_safety(
    model,
    tokenizer,
    harmful: str | os.PathLike | None = None,
    benign: str | os.PathLike | None = None,
    max_new_tokens: int = WORLD_MAX_NEW_TOKENS,
    batch_size: int = 32,
    limit: int | None = None,
) -> dict:
    """The world safety suites' prompt rows and greedy responses: ``{"sets": {harmful, benign}, "responses",
    "tokens", "seconds"}`` (``limit`` keeps the first N prompts of each set, as lm-eval's ``--limit``)."""
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
    return {"sets": sets, "responses": responses, "tokens": tokens, "seconds": seconds}


def score_world_safety(generated: dict, verdicts: dict[str, list[bool]], return_samples: bool = False) -> dict:
    """Refusal / over-refusal rates (and per category, held-out vs training categories) from refusal ``verdicts``
    (``{"harmful": [...], "benign": [...]}``) on ``generate_world_safety``'s responses."""
    sets, responses, tokens, seconds = generated["sets"], generated["responses"], generated["tokens"], generated["seconds"]
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


def run_safety_suite(
    model,
    tokenizer,
    harmful: str | os.PathLike | None = None,
    benign: str | os.PathLike | None = None,
    max_new_tokens: int = WORLD_MAX_NEW_TOKENS,
    batch_size: int = 32,
    judge: RefusalJudge | Judge | None = None,
    limit: int | None = None,
    return_samples: bool = False,
) -> dict:
    """Refusal rate on harmful prompts and over-refusal rate on benign look-alikes.

    ``harmful`` / ``benign`` default to the package's ``harmful.jsonl`` / ``benign.jsonl``;
    ``limit`` keeps the first N prompts of each (as lm-eval's ``--limit``). ``judge``: a ``RefusalJudge``, a judge
    from ``cast_lightning.judges`` that gives refusal verdicts, or None (the pattern detector). Returns the two
    rates, the sample counts, refusal rates per ``category`` and for held-out vs training categories, timing,
    and (``return_samples``) every prompt with its response and verdict.
    """
    generated = generate_world_safety(model, tokenizer, harmful, benign, max_new_tokens, batch_size, limit)
    if isinstance(judge, Judge):
        if "refusal" not in judge.fields:
            raise CastError(f"judge {judge.name} gives no refusal verdicts: the world safety suite needs one")
        verdicts = {name: [v.refusal for v in judge.judge(
            [r["prompt"] for r in generated["sets"][name]], generated["responses"][name])] for name in generated["sets"]}
    else:
        verdicts = {name: detect(texts, judge) for name, texts in generated["responses"].items()}
    return score_world_safety(generated, verdicts, return_samples)


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


# --- the standard safety suites -------------------------------------------------------------------------------------


def _suite_manager(suite_data: dict | None):
    from lm_eval.tasks import TaskManager

    metadata = {"suite_data": {str(k): str(v) for k, v in suite_data.items()}} if suite_data else None
    return TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=metadata)


def check_suite_data(suite_data: dict | None) -> None:
    """Every ``--suite_data`` key names a suite dataset and every path exists (before any model loads)."""
    for key, path in (suite_data or {}).items():
        if key not in SUITE_DATASETS:
            raise CastError(f"--suite_data: unknown dataset {key!r}: use {', '.join(SUITE_DATASETS)}")
        if not Path(str(path)).expanduser().exists():
            raise CastError(f"--suite_data {key}: {path} does not exist; give a copy of {SUITE_DATASETS[key].hub} in its schema")


def preflight_suites(tasks: Sequence[str], suite_data: dict | None = None) -> None:
    """Load the suites' datasets (hub or local) before the model: a missing one is one line naming the fix."""
    _suite_manager(suite_data).load(list(tasks))


def _generation_overrides(max_new_tokens, do_sample, temperature, top_p, stop) -> dict:
    out: dict = {}
    if max_new_tokens is not None:
        out["max_gen_toks"] = int(max_new_tokens)
    if do_sample:
        out["do_sample"] = True
        if temperature is not None:
            out["temperature"] = float(temperature)
        if top_p is not None:
            out["top_p"] = float(top_p)
    if stop:
        out["until"] = [str(s) for s in stop]
    return out


def generate_safety_suites(
    model,
    tokenizer,
    suites: Sequence[str],
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    generation: dict | None = None,
    suite_data: dict | None = None,
) -> dict:
    """Run the standard suites' lm-eval tasks on the in-memory model (chat template, ``generation`` overriding the
    tasks' ``generation_kwargs``) and collect every (prompt, response): ``{"tasks": {task: {"exchanges",
    "categories", "version", "n", "generation", "pattern", "stderr"}}, "seconds"}``."""
    import lm_eval

    try:
        from lm_eval.models.huggingface import HFLM
    except ModuleNotFoundError as error:
        raise CastError(f"lm-eval's HF backend cannot load ({error.name} is missing): pip install 'lm-eval[hf]' accelerate") from error

    tasks = expand_suites(list(suites))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=_suite_manager(suite_data), limit=limit, apply_chat_template=True,
        log_samples=True, gen_kwargs=dict(generation) if generation else None, bootstrap_iters=1000,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    out: dict = {"tasks": {}, "seconds": round(time.perf_counter() - start, 3)}
    for task in tasks:
        suite = SAFETY_SUITES[task]
        samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
        exchanges = [Exchange(s["doc"]["behavior"], s["resps"][0][0], s["doc"]["context"] or None) for s in samples]
        pattern_metric = "refusal_rate" if suite.kind == HARMFUL else "over_refusal_rate"
        values = results["results"][task]
        config = results.get("configs", {}).get(task, {})
        out["tasks"][task] = {
            "exchanges": exchanges,
            "model_prompts": [s["doc"]["prompt"] for s in samples],
            "categories": [s["doc"]["category"] for s in samples],
            "version": _number(results.get("versions", {}).get(task)),
            "n": len(samples),
            "generation": config.get("generation_kwargs"),
            "pattern": float(values[f"{pattern_metric},none"]),
            "pattern_stderr": values.get(f"{pattern_metric}_stderr,none"),
        }
    return out


def _prompts_sha256(prompts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\0")
    return digest.hexdigest()


def score_safety_suites(generated: dict, verdicts: dict[str, dict[str, list]], judges: dict[str, dict],
                        suite_data: dict | None = None, limit: int | None = None) -> dict:
    """Per task: the dataset, version, sample count, generation settings, every judge's numbers (``metric: {judge:
    value}``), their verdict counts and agreement. ``verdicts``: ``{judge name: {task: [Verdict]}}``; ``judges``:
    ``{name: {"fields": [...], ...identity}}``."""
    tasks = {}
    for task, run in generated["tasks"].items():
        suite = SAFETY_SUITES[task]
        dataset = SUITE_DATASETS[suite.dataset]
        local = (suite_data or {}).get(dataset.key)
        by_judge = {name: verdicts[name][task] for name in verdicts if task in verdicts[name]}
        fields = {name: judges[name]["fields"] for name in by_judge}
        metrics: dict[str, dict[str, float | None]] = {}
        for name, judged in by_judge.items():
            for metric, value in judge_metrics(judged, fields[name], suite.kind, suite.harm_metric).items():
                metrics.setdefault(metric, {})[name] = value
        tasks[task] = {
            "description": suite.description,
            "kind": suite.kind,
            "dataset": {"key": dataset.key, "hub": dataset.hub, "name": dataset.name, "split": dataset.split,
                        "half": suite.half, "local": recorded_path(Path(local).expanduser()) if local else None,
                        "card": dataset.card, "prompts_sha256": _prompts_sha256(run["model_prompts"])},
            "version": run["version"],
            "n_samples": run["n"],
            "limit": limit,
            "generation": run["generation"],
            "metrics": metrics,
            "stderr": {f"{'refusal_rate' if suite.kind == HARMFUL else 'over_refusal_rate'}.pattern": run["pattern_stderr"]},
            "judged": {name: verdict_counts(judged, fields[name]) for name, judged in by_judge.items()},
            "agreement": agreement(by_judge, fields),
        }
    return tasks


def _judge_all(specs: Sequence[JudgeSpec], world: dict | None, standard: dict | None, *, judge_label: str,
               judge_dtype: str | None, judge_batch_size: int, device: str | None) -> tuple[dict, dict]:
    """Every judge, one at a time (each freed before the next loads), on the world's and the suites' responses:
    ``({name: {"world": {set: [Verdict]}, "suites": {task: [Verdict]}}}, {name: identity})``."""
    verdicts: dict = {}
    identities: dict = {}
    for spec in specs:
        judge = load_judge(spec, refusal_label=judge_label, dtype=judge_dtype, device=device, batch_size=judge_batch_size)
        try:
            identities[spec.name] = {**judge.identity(), "fields": list(judge.fields)}
            mine: dict = {"world": {}, "suites": {}}
            if world is not None:
                for name, rows in world["sets"].items():
                    judged = judge.judge([r["prompt"] for r in rows], world["responses"][name])
                    require_parsed(judged, spec.name, spec.kind, f"the world's {name} prompts", spec.path)
                    mine["world"][name] = judged
            for task, run in (standard or {}).get("tasks", {}).items():
                judged = judge.judge_exchanges(run["exchanges"])
                require_parsed(judged, spec.name, spec.kind, task, spec.path)
                mine["suites"][task] = judged
            verdicts[spec.name] = mine
        finally:
            judge.close()
    return verdicts, identities


# --- the command --------------------------------------------------------------------------------------------------


def _plan(suite: str) -> tuple[bool, bool, list[str]]:
    """``--suite`` -> (world safety?, utility?, standard suite tasks)."""
    parts = [part.strip() for part in str(suite).split(",") if part.strip()]
    known = set(SUITES) | {STANDARD} | set(SUITE_GROUPS) | set(SAFETY_SUITES)
    bad = [part for part in parts if part not in known]
    if not parts or bad:
        raise CastError(f"unknown suite {bad[0] if bad else suite!r}: use utility, safety, all, {STANDARD} (every standard "
                        f"safety suite) or suite names ({', '.join([*SUITE_GROUPS, *SAFETY_SUITES])}), comma-separated")
    world = any(part in ("safety", "all") for part in parts)
    utility = any(part in ("utility", "all") for part in parts)
    standard = expand_suites([part for part in parts if part not in SUITES])
    return world, utility, standard


def evaluate(
    *,
    model: str,
    suite: str = "all",
    output: str = "results.json",
    tasks: list[str] | None = None,
    harmful: str | None = None,
    benign: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    apply_chat_template: bool | None = None,
    num_fewshot: int | None = None,
    judge: list[str] | str | None = None,
    judge_label: str = "refusal",
    judge_dtype: str | None = None,
    judge_batch_size: int = 8,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: list[str] | None = None,
    suite_data: dict[str, str] | None = None,
    dtype: str = "float32",
    device: str | None = None,
    samples: str | None = None,
) -> dict:
    """Evaluate a model's safety (refusal / over-refusal, judged) and utility (lm-eval tasks) into a results JSON.

    All arguments are keyword-only, so the CLI reads ``cast eval --model PATH ...``.

    Args:
        model: what to evaluate: a ``cast fit`` checkpoint (``.ckpt``), an HF ``save_pretrained``
            directory (e.g. from ``cast export``) or a hub name.
        suite: ``safety`` (the embedded world: refusal on harmful prompts, over-refusal on benign look-alikes),
            ``utility`` (lm-eval tasks), ``all`` (both), ``standard`` (every standard safety suite: XSTest safe and
            unsafe, HarmBench standard and contextual, AdvBench, JailbreakBench harmful and benign, StrongREJECT,
            from their hub datasets) or suite names (``cast_xstest``, ``cast_harmbench``, ``cast_jbb``, ...);
            comma-separated to combine (``all,standard``).
        output: the results JSON to write (atomically).
        tasks: lm-eval tasks for the utility suite; default the embedded world's ``cast_world_utility``.
            Real models: e.g. ``[mmlu, gsm8k, arc_challenge, hellaswag]`` (see configs/eval/).
        harmful: JSONL of harmful prompts (``prompt``, optional ``category``/``heldout_category``);
            default the embedded world's held-out set.
        benign: JSONL of benign look-alike prompts (``prompt``); default the embedded world's set.
        batch_size: prompts per generation / lm-eval batch.
        max_new_tokens: generation length: default 64 for the world's safety suites and each standard suite's own
            (256; HarmBench 512); given, it applies to all.
        limit: evaluate only the first N prompts of each safety set and N documents of each task.
        seed: seed for torch and lm-eval (few-shot sampling, sampled generation).
        apply_chat_template: render prompts with the tokenizer's chat template in lm-eval;
            default: yes for the ``cast_*`` tasks, lm-eval's default (no) for the others.
        num_fewshot: few-shot examples for the lm-eval tasks (default: each task's own).
        judge: judge(s) that read every (prompt, response) of the safety suites, besides the pattern detector
            (always run): ``KIND=PATH`` with KIND ``llama_guard_3``, ``wildguard``, ``harmbench`` or
            ``classifier``; a KIND alone (its published model); a known hub name; or a sequence-classifier
            directory. A list gives several judges and their agreement (Cohen's kappa). The first judge that
            gives refusal verdicts replaces the pattern detector in the world suite's headline rates.
        judge_label: a classifier judge's class that means "refusal" (name or index).
        judge_dtype: causal-LM judges' weights dtype (default bfloat16 on CUDA, float32 on CPU).
        judge_batch_size: (prompt, response) pairs per judge forward pass.
        do_sample: sample instead of greedy decoding in the standard suites (seeded by ``seed``).
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus sampling (with ``do_sample``).
        stop: stop sequences for the standard suites (EOS always stops).
        suite_data: local copies of the standard suites' datasets, in the hub's schema, by dataset:
            ``{xstest, harmbench_standard, harmbench_contextual, advbench, jbb_harmful, jbb_benign,
            strongreject}: PATH`` (.jsonl/.json/.csv/.parquet or a ``save_to_disk`` directory).
        dtype: weight dtype for HF directories and hub models: float32, bfloat16 or float16.
        device: cuda, cpu, ...; default CUDA when available.
        samples: also write every safety prompt, response and verdict to this JSONL file.

    Returns:
        The results dictionary written to ``output``: ``metrics`` holds ``safety.refusal_rate``,
        ``safety.over_refusal_rate``, ``utility.<task>.<metric>`` and ``suites.<task>.<metric>.<judge>``;
        ``judges`` names every judge (path, format version, fingerprint).
    """
    world, utility, standard = _plan(suite)
    if limit is not None and limit < 1:
        raise CastError("--limit must be >= 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise CastError("--max_new_tokens must be >= 1")
    if (do_sample or stop) and world:
        raise CastError("--do_sample / --stop apply to the standard safety suites; the world's safety suite is greedy: "
                        "use --suite standard (or suite names)")
    if (temperature is not None or top_p is not None) and not do_sample:
        raise CastError("--temperature / --top_p need --do_sample true")
    # Before loading the model and generating: a bad output path must not cost a finished evaluation.
    ensure_writable(output, "--output")
    if samples is not None:
        ensure_writable(samples, "--samples")
    if world:
        for prompts in (harmful, benign):
            if prompts is not None:
                read_prompts(prompts)  # a missing or broken prompt file fails now, not after the model loads
    specs = parse_judge_specs(judge)  # an unknown judge format fails now too
    if standard:
        check_suite_data(suite_data)
        preflight_suites(standard, suite_data)  # and a suite whose dataset cannot be read
    # load_for_eval checks a checkpoint (missing, damaged, pickled, not from cast fit) before loading any model.
    started = time.perf_counter()
    torch.manual_seed(seed)
    model_obj, tokenizer, identity = load_for_eval(model, dtype=dtype, device=device)
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
    world_generated = None
    if world:
        world_generated = generate_world_safety(model_obj, tokenizer, harmful, benign,
                                                max_new_tokens or WORLD_MAX_NEW_TOKENS, batch_size, limit)
    if utility:
        utility_results = run_utility_suite(
            model_obj, tokenizer, tasks or WORLD_UTILITY_TASKS, batch_size, limit, apply_chat_template, num_fewshot, seed
        )
        results["metrics"].update({f"utility.{k}": v for k, v in utility_results["metrics"].items()})
        results["task_versions"].update(utility_results["versions"])
        results["sample_counts"].update(utility_results["n_samples"])
        results["utility"] = {
            "tasks": list(tasks or WORLD_UTILITY_TASKS),
            "stderr": {f"utility.{k}": v for k, v in utility_results["stderr"].items()},
            "higher_is_better": utility_results["higher_is_better"],
            "apply_chat_template": utility_results["apply_chat_template"],
            "num_fewshot": num_fewshot,
            "seconds": utility_results["seconds"],
        }
    generation = _generation_overrides(max_new_tokens, do_sample, temperature, top_p, stop)
    standard_generated = None
    if standard:
        standard_generated = generate_safety_suites(model_obj, tokenizer, standard, batch_size, limit, seed,
                                                    generation, suite_data)
    results["environment"] = _environment(model_obj)
    if len(specs) > 1:  # a judge model loads next: the evaluated model's memory goes first
        del model_obj
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    judged, judge_ids = _judge_all(specs, world_generated, standard_generated, judge_label=judge_label,
                                   judge_dtype=judge_dtype, judge_batch_size=judge_batch_size, device=device)
    results["judges"] = judge_ids
    rows = None
    if world:
        rows = _world_results(results, world_generated, judged, judge_ids, specs, harmful, benign,
                              max_new_tokens or WORLD_MAX_NEW_TOKENS, batch_size, samples is not None)
    if standard:
        scored = score_safety_suites(standard_generated, {name: v["suites"] for name, v in judged.items()}, judge_ids,
                                     suite_data, limit)
        for task, entry in scored.items():
            for metric, by_judge in entry["metrics"].items():
                for name, value in by_judge.items():
                    results["metrics"][f"suites.{task}.{metric}.{name}"] = value
            results["task_versions"][task] = entry["version"]
            results["sample_counts"][task] = entry["n_samples"]
        results["suites"] = {
            "tasks": scored,
            "generation": {"chat_template": True, "batch_size": batch_size, "seed": seed, "overrides": generation,
                           "decoding": "sampled" if do_sample else "greedy"},
            "seconds": standard_generated["seconds"],
        }
        if samples is not None:
            rows = (rows or []) + _suite_sample_rows(standard_generated, judged)
    if rows is not None:
        atomic_write_text(samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    results["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(output, results)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in results["metrics"].items() if isinstance(v, float))
    print(f"[cast eval] {model}: {summary} -> {output}")
    return results


def _world_results(results: dict, generated: dict, judged: dict, judge_ids: dict, specs: Sequence[JudgeSpec],
                   harmful, benign, max_new_tokens: int, batch_size: int, return_samples: bool) -> list | None:
    """The world suite's part of the results (headline rates from the first judge with refusal verdicts)."""
    refusing = [s.name for s in specs if "refusal" in judge_ids[s.name]["fields"]]
    detector = next((name for name in refusing if name != "pattern"), "pattern")
    flags = {name: [v.refusal for v in judged[detector]["world"][name]] for name in generated["sets"]}
    safety = score_world_safety(generated, flags, return_samples)
    rows = safety.pop("samples", None)
    results["metrics"]["safety.refusal_rate"] = safety["refusal_rate"]
    results["metrics"]["safety.over_refusal_rate"] = safety["over_refusal_rate"]
    by_judge: dict = {}
    for name, mine in judged.items():
        fields = judge_ids[name]["fields"]
        entry = {**judge_metrics(mine["world"]["harmful"], fields, HARMFUL, "attack_success_rate"),
                 **judge_metrics(mine["world"]["benign"], fields, BENIGN, None),
                 "judged": {set_name: verdict_counts(v, fields) for set_name, v in mine["world"].items()}}
        by_judge[name] = entry
        if name != "pattern":
            for metric in ("refusal_rate", "over_refusal_rate", "attack_success_rate"):
                if metric in entry:
                    results["metrics"][f"safety.{metric}.{name}"] = entry[metric]
    detector_id = judge_ids[detector]
    results["safety"] = {
        **safety,
        "detector": "cast_lightning.metrics.is_refusal" if detector == "pattern" else f"{detector}:{detector_id.get('path')}",
        "detector_judge": detector,
        "by_judge": by_judge,
        "agreement": {set_name: agreement({n: judged[n]["world"][set_name] for n in judged},
                                          {n: judge_ids[n]["fields"] for n in judged}) for set_name in generated["sets"]},
        "prompts": {
            "harmful": recorded_path(harmful or data_dir() / SAFETY_TASK_FILES["cast_refusal"]),
            "benign": recorded_path(benign or data_dir() / SAFETY_TASK_FILES["cast_over_refusal"]),
        },
        "generation": {"greedy": True, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat_template": True},
    }
    for task in SAFETY_TASK_FILES:
        results["task_versions"][task] = task_version(task)
    results["sample_counts"]["cast_refusal"] = safety["n_harmful"]
    results["sample_counts"]["cast_over_refusal"] = safety["n_benign"]
    if rows is not None:
        for row_index, row in enumerate(rows):
            set_name = row["set"]
            index = row_index if set_name == "harmful" else row_index - len(generated["sets"]["harmful"])
            row["verdicts"] = {n: judged[n]["world"][set_name][index].to_dict() for n in judged if n != "pattern"}
    return rows


def _suite_sample_rows(generated: dict, judged: dict) -> list[dict]:
    rows = []
    for task, run in generated["tasks"].items():
        for i, exchange in enumerate(run["exchanges"]):
            verdicts = {name: judged[name]["suites"][task][i].to_dict() for name in judged}
            rows.append({"set": task, "prompt": run["model_prompts"][i], "response": exchange.response,
                         "category": run["categories"][i], "refusal": verdicts["pattern"]["refusal"],
                         "verdicts": {n: v for n, v in verdicts.items() if n != "pattern"}})
    return rows


def _environment(model) -> dict:
    """The package versions (``provenance.versions``) and the device the model ran on."""
    return {**versions(), "device": str(next(model.parameters()).device)}
