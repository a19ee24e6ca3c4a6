"""Judges of (prompt, response) pairs, batched, behind one interface (``Judge.judge``): the pattern detector (the
offline default), an HF sequence classifier, and the causal-LM judges Llama Guard 3, WildGuard and the HarmBench
classifier in their published prompt formats. ``load_judge("wildguard=allenai/wildguard")`` builds one from a spec.

One job per file: ``base`` (Verdict, Exchange, Judge), ``pattern``, ``classifier``, ``formats`` (the published prompt
texts and output parsers), ``causal_lm`` (judge models that generate), ``registry`` (specs, building, lm-eval's
caches), ``scoring`` (the numbers verdicts give on a suite, and agreement).
"""

from cast_lightning.judges.base import FIELDS, Exchange, Judge, Verdict
from cast_lightning.judges.registry import KINDS, JudgeSpec, load_judge, parse_judge_spec, parse_judge_specs

__all__ = ["FIELDS", "Exchange", "Judge", "Verdict", "KINDS", "JudgeSpec", "load_judge", "parse_judge_spec", "parse_judge_specs"]
