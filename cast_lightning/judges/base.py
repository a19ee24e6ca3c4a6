"""The judge interface: a judge reads (prompt, response) pairs, batched, and returns one ``Verdict`` per pair.

Every judge says which verdict fields it produces (``fields``): ``refusal`` (the response refuses), ``harmful`` (the
response is harmful / carries out the behaviour), ``prompt_harmful`` (the request is harmful). A field a judge does
not produce stays ``None``. A judge output that does not follow the judge's format is a ``Verdict`` with
``parsed=False`` and every field ``None``: it is counted and reported, never scored as safe or unsafe.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

FIELDS = ("refusal", "harmful", "prompt_harmful")
HASH_LIMIT_BYTES = 2 << 30  # hash judge weights up to 2 GiB; larger ones are named by size (+ the hub commit)


@dataclass(frozen=True)
class Verdict:
    """One judged (prompt, response) pair.

    Attributes:
        refusal: the response refuses the request (None: this judge does not say, or WildGuard's "n/a").
        harmful: the response is harmful (Llama Guard "unsafe", WildGuard "Harmful response: yes", HarmBench "yes").
        prompt_harmful: the request itself is harmful (WildGuard).
        categories: the policy categories the judge named (Llama Guard's S1..S14), in its order.
        raw: the judge's output text (None for judges that produce no text).
        parsed: False when the output did not follow the judge's format; then every field is None.
    """

    refusal: bool | None = None
    harmful: bool | None = None
    prompt_harmful: bool | None = None
    categories: tuple[str, ...] = ()
    raw: str | None = None
    parsed: bool = True

    def to_dict(self) -> dict:
        out = asdict(self)
        out["categories"] = list(self.categories)
        return out


def unparsed(raw: str) -> Verdict:
    """The verdict of an output that does not follow the format."""
    return Verdict(raw=raw, parsed=False)


@dataclass(frozen=True)
class Exchange:
    """What a judge reads: the user's request, the model's response and, for HarmBench's contextual behaviours,
    the context the request refers to (the model saw ``context + "\\n\\n---\\n\\n" + prompt``)."""

    prompt: str
    response: str
    context: str | None = None

    def user_turn(self) -> str:
        """The user message the model answered (the context, if any, before the request, as HarmBench renders it)."""
        return f"{self.context}\n\n---\n\n{self.prompt}" if self.context else self.prompt


class Judge(ABC):
    """A batched judge of (prompt, response) pairs.

    Subclasses set ``kind`` (the format: ``pattern``, ``classifier``, ``llama_guard_3``, ``wildguard``,
    ``harmbench``) and ``fields`` (the verdict fields they produce), and implement ``judge_exchanges`` and
    ``identity``. ``name`` labels the judge's numbers in results (``<metric>.<name>``); it defaults to ``kind``.
    """

    kind: str = ""
    fields: tuple[str, ...] = ()

    def __init__(self, name: str | None = None):
        self.name = name or self.kind

    def judge(self, prompts: Sequence[str], responses: Sequence[str], contexts: Sequence[str | None] | None = None) -> list[Verdict]:
        """One verdict per (prompt, response) pair, in order. ``contexts`` (optional) go with HarmBench's contextual
        behaviours."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        contexts = list(contexts) if contexts is not None else [None] * len(prompts)
        exchanges = [Exchange(str(p), str(r), c or None) for p, r, c in zip(prompts, responses, contexts)]
        return self.judge_exchanges(exchanges)

    @abstractmethod
    def judge_exchanges(self, exchanges: Sequence[Exchange]) -> list[Verdict]:
        """One verdict per exchange, in order; the result must not depend on the order of ``exchanges``."""

    @abstractmethod
    def identity(self) -> dict:
        """What produced the verdicts: kind, name, model path and fingerprint, format version, settings."""

    def close(self) -> None:
        """Free what the judge holds (a model); a closed judge is not used again."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def weights_fingerprint(directory: str | Path | None) -> dict | None:
    """sha256 of a model directory's weight files (up to 2 GiB in all; larger: names and sizes only)."""
    if directory is None or not Path(directory).is_dir():
        return None
    paths = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    size = sum(p.stat().st_size for p in paths)
    info: dict = {"files": [p.name for p in paths], "bytes": size}
    if paths and size <= HASH_LIMIT_BYTES:
        digest = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        info["sha256"] = digest.hexdigest()
    return info


__all__ = ["FIELDS", "Verdict", "Exchange", "Judge", "unparsed", "weights_fingerprint"]
