"""The sequence-classifier judge: an HF ``AutoModelForSequenceClassification`` refusal classifier on the response
(``cast_lightning.metrics.RefusalJudge``, the pluggable judge ``cast eval --judge DIR`` has always taken)."""

from __future__ import annotations

from collections.abc import Sequence

from cast_lightning.judges.base import Exchange, Judge, Verdict, weights_fingerprint
from cast_lightning.metrics import RefusalJudge


class ClassifierJudge(Judge):
    """Refusal by a sequence classifier (hub name or local directory); reads the response only.

    Args:
        path: the classifier.
        refusal_label: the class meaning "refusal" (name in ``config.id2label`` or index).
        threshold: P(refusal) >= threshold is a refusal; default: the refusal class is the argmax.
        batch_size, max_length, device: as ``RefusalJudge``.
        name: the label of its numbers in results (default ``classifier``).
    """

    kind = "classifier"
    fields = ("refusal",)

    def __init__(self, path: str, refusal_label: str | int = "refusal", threshold: float | None = None,
                 batch_size: int = 16, max_length: int = 512, device: str | None = None, name: str | None = None):
        super().__init__(name)
        self.path = str(path)
        self.classifier = RefusalJudge(self.path, refusal_label=refusal_label, threshold=threshold,
                                       batch_size=batch_size, max_length=max_length, device=device)

    def judge_exchanges(self, exchanges: Sequence[Exchange]) -> list[Verdict]:
        flags = self.classifier([e.response for e in exchanges])
        return [Verdict(refusal=bool(flag)) for flag in flags]

    def identity(self) -> dict:
        config = self.classifier.model.config
        return {"kind": self.kind, "name": self.name, "path": self.path, "reads": "response", "fields": list(self.fields),
                "refusal_label": (config.id2label or {}).get(self.classifier.index, self.classifier.index),
                "refusal_index": self.classifier.index, "threshold": self.classifier.threshold,
                "max_length": self.classifier.max_length, "architecture": getattr(config, "model_type", None),
                "revision": getattr(config, "_commit_hash", None), "fingerprint": weights_fingerprint(self.path)}
