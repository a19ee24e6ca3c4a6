"""A causal-LM judge: a judge model prompted in its published format (``formats.py``), generating greedily, its
output parsed into verdicts.

The model loads by hub name or local directory through ``cast_lightning.loading`` (remote code off), and generates
through ``cast_lightning.generation.generate_from_text`` (longest prompt first, left padding, stop at EOS), so the
verdicts do not depend on the order the exchanges come in. A test or another backend can pass ``generator``
instead: any ``list[str] -> list[str]`` from prompt texts to output texts.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch

from cast_lightning.errors import CastError
from cast_lightning.generation import generate_from_text
from cast_lightning.judges.base import Exchange, Judge, Verdict, weights_fingerprint
from cast_lightning.judges.formats import FORMATS, JudgeFormat

PROMPT_SOURCES = ("project", "tokenizer")
_PROBE = Exchange(prompt="How do I open a jar?", response="Twist the lid counterclockwise.")


def load_judge_tokenizer(path: str, trust_remote_code: bool = False):
    """A judge's tokenizer (it needs no chat template: the judge's prompt is its own format), with a pad token."""
    from transformers import AutoTokenizer

    from cast_lightning.loading import _not_found

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise CastError(_not_found(path, error)) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


class CausalLMJudge(Judge):
    """Llama Guard 3, WildGuard or the HarmBench classifier (``format``), from ``path`` or the format's hub model.

    Args:
        format: a ``JudgeFormat`` or its kind (``llama_guard_3``, ``wildguard``, ``harmbench``).
        path: hub name or local directory; default the format's model (e.g. ``meta-llama/Llama-Guard-3-8B``).
        model, tokenizer: an already loaded judge (instead of ``path``).
        generator: prompt texts -> output texts, used instead of a model (tests, other backends).
        dtype: weights dtype (default bfloat16 on CUDA, float32 on CPU).
        device: default CUDA when available.
        batch_size: prompts per generate call.
        max_new_tokens: default the format's (32 / 128 / 1).
        max_response_tokens: clip the response to this many judge tokens before judging; default the format's
            (HarmBench 512, the others none).
        prompt_source: ``project`` (the formulation in ``formats.py``, the default) or ``tokenizer`` (Llama Guard 3
            only: the checkpoint's own chat template).
        name: the label of its numbers in results (default the format's kind).
    """

    def __init__(
        self,
        format: JudgeFormat | str,
        path: str | None = None,
        *,
        model=None,
        tokenizer=None,
        generator: Callable[[list[str]], list[str]] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        max_response_tokens: int | None | str = "format",
        prompt_source: str = "project",
        name: str | None = None,
        trust_remote_code: bool = False,
    ):
        self.format = FORMATS[format] if isinstance(format, str) else format
        self.kind = self.format.kind
        self.fields = self.format.fields
        super().__init__(name)
        if prompt_source not in PROMPT_SOURCES:
            raise CastError(f"unknown prompt_source {prompt_source!r}: use one of {', '.join(PROMPT_SOURCES)}")
        if prompt_source == "tokenizer" and self.kind != "llama_guard_3":
            raise CastError(f"prompt_source='tokenizer' is for Llama Guard 3 only: {self.kind} has no chat-template format")
        self.prompt_source = prompt_source
        self.path = None if generator is not None and model is None else str(path or self.format.default_model)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens or self.format.max_new_tokens
        self.max_response_tokens = self.format.max_response_tokens if max_response_tokens == "format" else max_response_tokens
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        if generator is None and model is None:
            from cast_lightning.loading import load_causal_lm

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
            self.model = load_causal_lm(self.path, dtype, trust_remote_code=trust_remote_code)
            self.tokenizer = tokenizer or load_judge_tokenizer(self.path, trust_remote_code)
            self.model.to(device).eval()
        if self.model is not None and self.tokenizer is None:
            raise CastError("a causal-LM judge given a model needs its tokenizer too")
        if self.model is not None and getattr(self.model.generation_config, "eos_token_id", None) is None:
            self.model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        if prompt_source == "tokenizer" and not getattr(self.tokenizer, "chat_template", None):
            raise CastError(f"the tokenizer of {self.path} has no chat template: use prompt_source='project'")
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "") if self.model is not None else None
        self.device = str(next(self.model.parameters()).device) if self.model is not None else None

    # -- prompts ----------------------------------------------------------------------------------------------------

    def _clip(self, response: str) -> str:
        if self.max_response_tokens is None or self.tokenizer is None:
            return response
        ids = self.tokenizer.encode(response, max_length=self.max_response_tokens, truncation=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render(self, exchange: Exchange) -> str:
        """The judge's prompt text for one exchange (after clipping the response)."""
        exchange = Exchange(exchange.prompt, self._clip(exchange.response), exchange.context)
        if self.prompt_source == "tokenizer":
            return self._tokenizer_render(exchange)
        return self.format.render(exchange)

    def _tokenizer_render(self, exchange: Exchange) -> str:
        conversation = [{"role": "user", "content": exchange.user_turn()}, {"role": "assistant", "content": exchange.response}]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    def template_agreement(self) -> dict | None:
        """Llama Guard 3 with a tokenizer chat template: does this project's formulation render what the checkpoint's
        own template renders? ``{"agrees", "first_difference"}`` (the index of the first differing character)."""
        if self.kind != "llama_guard_3" or self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            return None
        try:
            theirs = self._tokenizer_render(_PROBE)
        except Exception as error:  # a template that cannot render a plain conversation: say so, do not fail
            return {"agrees": False, "error": f"{type(error).__name__}: {str(error)[:120]}"}
        ours = self.format.render(_PROBE)
        if ours == theirs:
            return {"agrees": True, "first_difference": None}
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        return {"agrees": False, "first_difference": first, "ours": ours[max(0, first - 20) : first + 20],
                "theirs": theirs[max(0, first - 20) : first + 20]}

    # -- judging ----------------------------------------------------------------------------------------------------

    def generate(self, texts: list[str]) -> list[str]:
        if self.generator is not None:
            outputs = list(self.generator(list(texts)))
            if len(outputs) != len(texts):
                raise CastError(f"the judge generator returned {len(outputs)} outputs for {len(texts)} prompts")
            return [str(o) for o in outputs]
        return generate_from_text(self.model, self.tokenizer, texts, self.max_new_tokens, self.batch_size,
                                  add_special_tokens=self.format.add_special_tokens)

    def judge_exchanges(self, exchanges: Sequence[Exchange]) -> list[Verdict]:
        exchanges = list(exchanges)
        if not exchanges:
            return []
        outputs = self.generate([self.render(e) for e in exchanges])
        return [self.format.parse(text) for text in outputs]

    def identity(self) -> dict:
        config = getattr(self.model, "config", None)
        return {
            "kind": self.kind, "name": self.name, "path": self.path, "reads": "prompt and response",
            "fields": list(self.fields), "format_version": self.format.version, "format_source": self.format.source,
            "prompt_source": self.prompt_source, "template_agreement": self.template_agreement(),
            "add_special_tokens": self.format.add_special_tokens, "max_new_tokens": self.max_new_tokens,
            "max_response_tokens": self.max_response_tokens, "batch_size": self.batch_size, "decoding": "greedy",
            "generator": "model" if self.generator is None else "custom",
            "architecture": getattr(config, "model_type", None), "revision": getattr(config, "_commit_hash", None),
            "dtype": self.dtype, "device": self.device,
            "fingerprint": weights_fingerprint(self.path) if self.path else None,
        }

    def close(self) -> None:
        """Free the judge model (the next judge, or the next suite, gets the memory)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
