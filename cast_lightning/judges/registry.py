"""Judge specs (what ``cast eval --judge`` and lm-eval's ``--metadata '{"judge": ...}'`` take) and building judges.

A spec is ``KIND=PATH`` (``llama_guard_3=meta-llama/Llama-Guard-3-8B``, ``classifier=./my_refusal_clf``), a kind
alone (its published model: ``wildguard``), a known hub name (``allenai/wildguard``), ``pattern``, or a local
directory holding a sequence classifier (the ``--judge DIR`` of earlier versions). Anything else is one
``CastError`` naming the fix. Specs are checked before any model loads (``parse_judge_specs``).

lm-eval's aggregation calls ``cached_judge`` / ``cached_verdicts``: one judge per configuration and one judging per
set of exchanges, however many metrics read them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cast_lightning.errors import CastError
from cast_lightning.judges.base import Exchange, Judge, Verdict

KINDS = ("pattern", "classifier", "llama_guard_3", "wildguard", "harmbench")
CAUSAL_KINDS = ("llama_guard_3", "wildguard", "harmbench")
ALIASES = {
    "llamaguard3": "llama_guard_3", "llama-guard-3": "llama_guard_3", "llama_guard": "llama_guard_3",
    "harmbench_cls": "harmbench", "harmbench-cls": "harmbench", "sequence_classifier": "classifier", "patterns": "pattern",
}
KNOWN_MODELS = {
    "meta-llama/llama-guard-3-8b": "llama_guard_3",
    "allenai/wildguard": "wildguard",
    "cais/harmbench-llama-2-13b-cls": "harmbench",
    "cais/harmbench-mistral-7b-val-cls": "harmbench",
}


@dataclass(frozen=True)
class JudgeSpec:
    """A parsed judge spec: its kind, where its model is (None: the kind's default / no model) and its name."""

    kind: str
    path: str | None
    name: str

    def text(self) -> str:
        return self.kind if self.path is None else f"{self.kind}={self.path}"


def _kind(text: str) -> str | None:
    key = text.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in KINDS else None


def _known_names() -> str:
    return ", ".join(KINDS)


def parse_judge_spec(spec: str) -> JudgeSpec:
    """``KIND=PATH`` | ``KIND`` | a known hub name | a sequence-classifier directory -> ``JudgeSpec``."""
    spec = str(spec).strip()
    if not spec:
        raise CastError(f"empty judge spec: give KIND=PATH with KIND one of {_known_names()}")
    if "=" in spec:
        kind_text, path = (part.strip() for part in spec.split("=", 1))
        kind = _kind(kind_text)
        if kind is None:
            raise CastError(f"unknown judge format {kind_text!r} in --judge {spec}: use one of {_known_names()}")
        if kind == "pattern":
            raise CastError("the pattern judge takes no path: write --judge pattern")
        if not path:
            raise CastError(f"--judge {spec} names no model: write {kind}=HUB_NAME_OR_DIR, or {kind} for its published model")
        return JudgeSpec(kind, path, kind)
    kind = _kind(spec)
    if kind == "classifier":
        raise CastError("a classifier judge needs its model: write --judge classifier=DIR")
    if kind is not None:
        return JudgeSpec(kind, None, kind)
    known = KNOWN_MODELS.get(spec.lower())
    if known:
        return JudgeSpec(known, spec, known)
    path = Path(spec)
    if path.is_dir():
        config = path / "config.json"
        architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
        if any(str(a).endswith("ForSequenceClassification") for a in architectures):
            return JudgeSpec("classifier", spec, "classifier")
        raise CastError(f"cannot tell which judge format {spec} is: name it, e.g. --judge llama_guard_3={spec} "
                        f"(formats: {_known_names()})")
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.path.sep != "/" and os.path.sep in spec:
        raise CastError(f"judge directory {spec} does not exist: give a judge model directory or a hub name")
    raise CastError(f"unknown judge {spec!r}: name its format, e.g. --judge wildguard={spec} (formats: {_known_names()})")


def parse_judge_specs(specs: str | Sequence[str] | None) -> list[JudgeSpec]:
    """Every spec parsed, named uniquely (a second ``wildguard`` is ``wildguard_2``); ``pattern`` always first."""
    if specs is None:
        specs = []
    elif isinstance(specs, str):
        specs = [specs]
    parsed = [parse_judge_spec(s) for s in specs]
    out = [JudgeSpec("pattern", None, "pattern")]
    seen = {"pattern": 1}
    for spec in parsed:
        if spec.kind == "pattern":
            continue
        seen[spec.kind] = seen.get(spec.kind, 0) + 1
        name = spec.kind if seen[spec.kind] == 1 else f"{spec.kind}_{seen[spec.kind]}"
        out.append(JudgeSpec(spec.kind, spec.path, name))
    return out


def load_judge(
    spec: str | JudgeSpec,
    *,
    refusal_label: str | int = "refusal",
    dtype: str | None = None,
    device: str | None = None,
    batch_size: int = 8,
    prompt_source: str = "project",
) -> Judge:
    """Build the judge a spec names (its model loads by hub name or local directory through ``loading``)."""
    spec = parse_judge_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "pattern":
        from cast_lightning.judges.pattern import PatternJudge

        return PatternJudge(spec.name)
    if spec.kind == "classifier":
        from cast_lightning.judges.classifier import ClassifierJudge

        return ClassifierJudge(spec.path, refusal_label=refusal_label, batch_size=batch_size, device=device, name=spec.name)
    from cast_lightning.judges.causal_lm import CausalLMJudge

    return CausalLMJudge(spec.kind, spec.path, dtype=dtype, device=device, batch_size=batch_size,
                         prompt_source=prompt_source, name=spec.name)


# --- caches for lm-eval's aggregation ---------------------------------------------------------------------------------

JUDGE_OPTIONS = ("refusal_label", "dtype", "device", "batch_size", "prompt_source")
_JUDGES: dict[str, Judge] = {}
_VERDICTS: dict[tuple, list[Verdict]] = {}


def judge_config(spec: str | None, **options) -> str:
    """The canonical text of a judge and its options (``""``: no judge), carried by each lm-eval document."""
    if not spec:
        return ""
    parse_judge_spec(spec)  # a bad spec fails when the documents load, before any generation
    unknown = set(options) - set(JUDGE_OPTIONS)
    if unknown:
        raise CastError(f"unknown judge option(s) {', '.join(sorted(unknown))}: use {', '.join(JUDGE_OPTIONS)}")
    return json.dumps({"spec": spec, **{k: v for k, v in options.items() if v is not None}}, sort_keys=True)


def cached_judge(config: str) -> Judge:
    """The judge of a ``judge_config`` text, built once per process."""
    if config not in _JUDGES:
        values = json.loads(config)
        _JUDGES[config] = load_judge(values.pop("spec"), **values)
    return _JUDGES[config]


def cached_verdicts(config: str, exchanges: Sequence[Exchange]) -> list[Verdict]:
    """The judge's verdicts on ``exchanges``, judged once however many metrics ask."""
    key = (config, tuple(exchanges))
    if key not in _VERDICTS:
        _VERDICTS[key] = cached_judge(config).judge_exchanges(list(exchanges))
    return _VERDICTS[key]


def clear_caches() -> None:
    for judge in _JUDGES.values():
        judge.close()
    _JUDGES.clear()
    _VERDICTS.clear()
