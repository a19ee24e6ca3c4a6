"""Batched greedy generation: the one generation path of ``cast eval``, ``cast test``, the fit-time
``RefusalCallback``, the embedded world's quick checks and the causal-LM judges.

- ``generate_greedy`` / ``generate_greedy_tokens``: chat-formatted prompts (the tokenizer's chat template). This
  matches lm-eval's HF backend token for token (same chat-templated prompt ids, same length-sorted batches, same
  greedy decoding and EOS handling), so ``cast eval`` and stock ``lm_eval --apply_chat_template`` report the same
  numbers when run with the same batch size.
- ``generate_from_text`` / ``generate_from_text_tokens``: prompts that are already formatted text (a judge's own
  published prompt format), tokenized as they are, with or without the tokenizer's special tokens.

Both batch the same way: longest prompt first (ties by text), left padding, the KV cache, stop at EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cast_lightning.data.formatting import prompt_ids
from cast_lightning.errors import CastError


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise CastError("the model has no EOS token (generation_config.eos_token_id / tokenizer.eos_token): set one")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def generate_greedy_tokens(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    **generate_kwargs,
) -> list[list[int]]:
    """The generated token ids (up to, not including, EOS) for each prompt, in the order given.

    See ``generate_greedy`` for how prompts are batched and decoded.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    _check(max_new_tokens, batch_size)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    # Longest first, ties by rendered text: lm-eval's HF backend batches generate_until requests this way,
    # so with the same batch size both see identical batches (identical padding, identical numerics).
    return _generate_ids(model, tokenizer, encoded, rendered, max_new_tokens, batch_size, **generate_kwargs)


def _check(max_new_tokens: int, batch_size: int) -> None:
    if batch_size < 1 or max_new_tokens < 1:
        raise CastError("batch_size and max_new_tokens must be >= 1")


@torch.no_grad()
def _generate_ids(
    model, tokenizer, encoded: list[list[int]], keys: list[str], max_new_tokens: int, batch_size: int, **generate_kwargs
) -> list[list[int]]:
    """Generate after each prompt's ids, batched longest first (ties by ``keys``), left padded; tokens up to EOS."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), keys[i]))
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in encoded]
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            length = max(len(encoded[i]) for i in index)
            input_ids = torch.full((len(index), length), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(index), length), dtype=torch.long)
            for row, i in enumerate(index):
                ids = encoded[i]
                input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, length - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=eos,
                **generate_kwargs,
            )
            for row, i in enumerate(index):
                tokens = generated[row, length:].tolist()
                stop = next((position for position, token in enumerate(tokens) if token in eos), len(tokens))
                outputs[i] = tokens[:stop]
    finally:
        model.train(was_training)
    return outputs


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    **generate_kwargs,
) -> list[str]:
    """Greedy responses to chat-formatted prompts, in the order given.

    Prompts go through the tokenizer's chat template (``prompt_ids``), are sorted longest first
    (ties by rendered text, as lm-eval does) and generated ``batch_size`` at a time with left padding,
    the KV cache, ``do_sample=False`` and stopping at the model's EOS token(s)
    (``generation_config.eos_token_id``, else the tokenizer's). Special tokens are dropped when
    decoding. Extra keyword arguments go to ``model.generate`` (e.g. ``synced_gpus=True``).
    """
    tokens = generate_greedy_tokens(model, tokenizer, prompts, max_new_tokens, batch_size, **generate_kwargs)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def generate_from_text_tokens(
    model,
    tokenizer,
    texts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    add_special_tokens: bool = False,
    **generate_kwargs,
) -> list[list[int]]:
    """The generated token ids (up to, not including, EOS) after each already-formatted prompt text, in order.

    ``texts`` are tokenized as they are (no chat template); ``add_special_tokens`` adds the tokenizer's own (e.g. a
    BOS token) for formats whose text does not spell them out. Batching and decoding as ``generate_greedy``.
    """
    texts = list(texts)
    if not texts:
        return []
    _check(max_new_tokens, batch_size)
    encoded = [list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]
    if any(not ids for ids in encoded):
        raise CastError("a judge prompt tokenized to no tokens: the judge's tokenizer cannot read its prompt format")
    return _generate_ids(model, tokenizer, encoded, texts, max_new_tokens, batch_size, **generate_kwargs)


def generate_from_text(
    model,
    tokenizer,
    texts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    add_special_tokens: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Greedy continuations of already-formatted prompt texts (special tokens dropped when decoding), in order."""
    tokens = generate_from_text_tokens(model, tokenizer, texts, max_new_tokens, batch_size, add_special_tokens, **generate_kwargs)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
