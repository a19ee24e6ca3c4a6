"""Prompt/response rows -> token ids through the tokenizer's own chat template, labels -100 on the prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cast_lightning.errors import CastError

IGNORE_INDEX = -100


def _ids(encoded) -> list[int]:
    # apply_chat_template(tokenize=True) returns a list, or a BatchEncoding in transformers >= 5.
    if isinstance(encoded, list):
        return encoded
    return list(encoded["input_ids"])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The chat-formatted prompt up to and including the assistant turn's opening (for generation)."""
    messages = [{"role": "user", "content": prompt}]
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Tokenize one user/assistant exchange; only the response tokens carry labels.

    Truncation keeps the whole prompt and cuts the response; a prompt that alone fills ``max_length``
    leaves no label and is rejected by the caller (counted as a bad row).
    """
    prefix = prompt_ids(tokenizer, prompt)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[: len(prefix)] != prefix:
        raise CastError(
            "the tokenizer's chat template does not render the prompt as a prefix of the full conversation: "
            "use a tokenizer whose template supports add_generation_prompt"
        )
    full = full[:max_length]
    labels = [IGNORE_INDEX] * min(len(prefix), len(full)) + full[len(prefix) :]
    return {"input_ids": full, "labels": labels}


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into ``input_ids``, ``attention_mask`` and ``labels``."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each sample's response tokens: shape (batch,).

    Samples are normalised by their own token count so that sums over samples do not depend on how
    samples are batched or split across processes.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1)
