"""The pattern judge: ``cast_lightning.metrics.is_refusal`` on the response (the offline default; refusal only)."""

from __future__ import annotations

from collections.abc import Sequence

from cast_lightning.judges.base import Exchange, Judge, Verdict
from cast_lightning.metrics import PATTERN_VERSION, is_refusal


class PatternJudge(Judge):
    """Refusal by the documented English pattern detector; reads the response only, needs no model or network.

    It judges refusal, not harm: a pattern cannot tell a harmful answer from a harmless one.
    """

    kind = "pattern"
    fields = ("refusal",)

    def judge_exchanges(self, exchanges: Sequence[Exchange]) -> list[Verdict]:
        return [Verdict(refusal=is_refusal(e.response)) for e in exchanges]

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.name, "implementation": "cast_lightning.metrics.is_refusal",
                "pattern_version": PATTERN_VERSION, "reads": "response", "fields": list(self.fields)}
