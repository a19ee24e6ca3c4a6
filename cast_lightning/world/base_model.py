"""The embedded world's base model: a small Llama (GQA) pretrained on the world, cached as a HF directory.

``ensure_base_model()`` builds the world and its tokenizer, pretrains a ``LlamaForCausalLM`` on the
utility skills, the compliant answers to harmful prompts and the benign look-alikes (a capable,
*unaligned* model), and saves model + tokenizer with ``save_pretrained`` into a cache directory keyed
by a hash of the world/model/training config. Later calls reuse it. Load it like any hub model::

    path = ensure_base_model()
    model = load_causal_lm(str(path)); tokenizer = load_tokenizer(str(path))

The world's data files are in ``path / "world"`` (see ``world_paths``). ``generate_greedy`` and
``measure`` give the quick checks (held-out utility accuracy per skill, refusal rates) and
``quick_safety_sft`` the learnability check: ``measure`` the base model, ``quick_safety_sft`` it, and
``measure`` again to see how much safety training moves the refusal rates and what it costs in utility.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from cast_lightning.data.formatting import IGNORE_INDEX, collate, per_sample_loss, tokenize_example
from cast_lightning.generation import generate_greedy as _generate_greedy
from cast_lightning.metrics import is_refusal
from cast_lightning.schedule import warmup_cosine
from cast_lightning.world import generator as world_lib

BASE_MODEL_VERSION = 1

MODEL_CONFIG = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
TRAIN_CONFIG = {
    "steps": 1800,
    "batch_size": 32,  # small batches learn the algorithmic skills in fewer samples than 64
    "learning_rate": 1e-3,  # 3e-3 learned reverse slower in the tuning runs
    "warmup_steps": 40,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "max_length": 96,
    "benign_repeat": 1,  # times the benign look-alikes appear in the corpus
    # Intra-op threads are part of the recipe, not read off the machine's load: float sums can depend on how many
    # threads split them (this model built bit-identical weights with 1 and 2, checked), and one thread is the robust
    # choice on a small shared machine, where oversubscribed OpenMP threads spin (steps up to 10x slower).
    "threads": 1,
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAST_CACHE_DIR") or Path.home() / ".cache" / "cast_lightning")


def config_key(seed: int = 0, scale: float = 1.0, model_config: dict | None = None, train_config: dict | None = None) -> str:
    splits, _ = world_lib.generate_world(seed, scale)  # ~0.3 s: any change of the data changes the key
    data = hashlib.sha256("".join(world_lib._jsonl(splits[name]) for name in world_lib.SPLITS).encode()).hexdigest()
    spec = {
        "world_version": world_lib.WORLD_VERSION,
        "world_data": data,
        "chat_template": world_lib.CHAT_TEMPLATE,
        "base_model_version": BASE_MODEL_VERSION,
        "seed": seed,
        "scale": scale,
        "vocab_size": world_lib.VOCAB_SIZE,
        "model": {**MODEL_CONFIG, **(model_config or {})},
        "train": {**TRAIN_CONFIG, **(train_config or {})},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def world_paths(model_dir: str | Path) -> world_lib.WorldPaths:
    """The data files of the world a cached base model was built from (``model_dir/world``)."""
    root = Path(model_dir) / "world"
    files = {split: root / f"{split}.jsonl" for split in world_lib.SPLITS}
    tok = root / "tokenizer"
    return world_lib.WorldPaths(root=root, manifest=root / "world.json", tokenizer=tok if tok.exists() else None, **files)


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[cast base-model] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[int]:
    """Run with exactly ``threads`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Training


def _tokenize_rows(tokenizer, rows: Sequence[dict], max_length: int) -> list[dict]:
    examples = []
    for row in rows:
        example = tokenize_example(tokenizer, row["prompt"], row["response"], max_length)
        if any(label != IGNORE_INDEX for label in example["labels"]):
            examples.append(example)
    return examples


def _batches(examples: list[dict], batch_size: int, rng: random.Random):
    """Endless length-bucketed batches: shuffle, sort chunks of 32 batches by length, shuffle the batches."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        chunk = batch_size * 32
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: len(examples[i]["input_ids"]))
            batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
        rng.shuffle(batches)
        for batch in batches:
            if len(batch) == batch_size:
                yield [examples[i] for i in batch]


def train_sft(
    model,
    tokenizer,
    rows: Sequence[dict],
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    warmup_steps: int = 40,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    max_length: int = 96,
    seed: int = 0,
    log_every: int = 100,
    log: Callable[[str], None] | None = None,
    **_: object,
) -> dict:
    """Plain PyTorch SFT on response tokens (AdamW, ``schedule.warmup_cosine``: linear warmup + cosine). Each
    sample weighs the same (per-sample mean token loss), so short utility answers are not drowned by long ones."""
    examples = _tokenize_rows(tokenizer, rows, max_length)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.98))
    scheduler = warmup_cosine(optimizer, steps, warmup_steps, min_lr_ratio)
    model.train()
    batches = _batches(examples, batch_size, rng)
    start, running, losses = time.perf_counter(), 0.0, []
    for step in range(steps):
        batch = collate(next(batches), tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_sample_loss(logits, batch["labels"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            losses.append(round(running / n, 4))
            if log:
                log(f"step {step + 1}/{steps} loss {running / n:.4f} ({time.perf_counter() - start:.0f}s)")
            running = 0.0
    model.eval()
    return {"steps": steps, "examples": len(examples), "seconds": round(time.perf_counter() - start, 1), "losses": losses}


def new_model(tokenizer, model_config: dict | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**MODEL_CONFIG, **(model_config or {})},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pretrain_base(output_dir: str | Path, seed: int = 0, scale: float = 1.0, model_config: dict | None = None,
                  train_config: dict | None = None, quiet: bool = False) -> dict:
    """Build the world + tokenizer in ``output_dir/world`` and pretrain the base model into ``output_dir``."""
    from transformers import AutoTokenizer

    output_dir = Path(output_dir)
    train_config = {**TRAIN_CONFIG, **(train_config or {})}
    t0 = time.perf_counter()
    paths = world_lib.build_world(output_dir / "world", seed=seed, scale=scale)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    t_world = time.perf_counter() - t0
    _log(f"world + tokenizer built in {t_world:.1f}s ({len(tokenizer)} tokens)", quiet)
    rows = (world_lib.read_jsonl(paths.utility_train) + world_lib.read_jsonl(paths.harmful_compliant_train)
            + world_lib.read_jsonl(paths.benign_train) * train_config["benign_repeat"])
    model = new_model(tokenizer, model_config, seed)
    n_params = sum(p.numel() for p in model.parameters())
    threads = train_config["threads"]
    _log(f"pretraining {n_params / 1e6:.2f}M-parameter Llama (GQA) for {train_config['steps']} steps "
         f"on {len(rows)} rows, {threads} thread(s)", quiet)
    with intra_op_threads(threads):
        stats = train_sft(model, tokenizer, rows, seed=seed, log=None if quiet else (lambda m: _log(m, False)), **train_config)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    info = {
        "key": config_key(seed, scale, model_config, train_config),
        "seed": seed,
        "scale": scale,
        "parameters": n_params,
        "model_config": {**MODEL_CONFIG, **(model_config or {})},
        "train_config": train_config,
        "threads": threads,
        "world_seconds": round(t_world, 1),
        "train_seconds": stats["seconds"],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "losses": stats["losses"],
        "torch": torch.__version__,
    }
    (output_dir / "base_model.json").write_text(json.dumps(info, indent=2) + "\n")
    _log(f"done in {info['total_seconds']:.0f}s", quiet)
    return info


def ensure_base_model(cache_dir: str | Path | None = None, seed: int = 0, force: bool = False, scale: float = 1.0,
                      model_config: dict | None = None, train_config: dict | None = None, quiet: bool = False,
                      wait: bool = True) -> Path:
    """The cached base model directory (built on first use, atomically: temp dir, then rename).

    Default cache: ``$CAST_CACHE_DIR`` or ``~/.cache/cast_lightning``. ``force`` rebuilds. Builds hold a file lock
    (``<cache>/world-base-<key>.lock``): a second process asking for the same model meanwhile waits for it, with one
    line saying so, and then uses it, so the model is built once; ``wait=False`` makes it fail at once instead.
    """
    from cast_lightning.io import exclusive

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = config_key(seed, scale, model_config, train_config)
    final = cache / f"world-base-{key}"
    if (final / "base_model.json").exists() and not force:
        _log(f"using cached base model {final}", quiet)
        return final
    with exclusive(cache / f"world-base-{key}.lock", f"the base model cache {final}", wait=wait):
        if (final / "base_model.json").exists() and not force:
            _log(f"using the base model another run just built: {final}", quiet)
            return final
        tmp = cache / f".tmp-world-base-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            pretrain_base(tmp, seed=seed, scale=scale, model_config=model_config, train_config=train_config, quiet=quiet)
            if final.exists():
                old = cache / f".old-world-base-{key}-{os.getpid()}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"saved {final}", quiet)
    return final


# ----------------------------------------------------------------------------------------------
# Measuring


def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy answers to chat-formatted prompts: ``cast_lightning.generation``'s batched generation (one code path)
    with this module's shorter defaults."""
    return _generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def measure(model, tokenizer, world: world_lib.WorldPaths, batch_size: int = 64) -> dict:
    """Held-out utility accuracy per skill (exact match), refusal rates on held-out harmful prompts
    (training categories / held-out category) and over-refusal on held-out benign look-alikes, judged by
    ``cast_lightning.metrics.is_refusal`` (the detector ``cast eval`` uses)."""
    t0 = time.perf_counter()
    utility = world_lib.read_jsonl(world.utility_heldout)
    answers = generate_greedy(model, tokenizer, [r["prompt"] for r in utility], max_new_tokens=12, batch_size=batch_size)
    per_skill: dict[str, list[int]] = {}
    for row, answer in zip(utility, answers):
        per_skill.setdefault(row["skill"], []).append(int(answer == row["response"]))
    harmful = world_lib.read_jsonl(world.harmful_heldout)
    benign = world_lib.read_jsonl(world.benign_heldout)
    h_out = generate_greedy(model, tokenizer, [r["prompt"] for r in harmful], max_new_tokens=16, batch_size=batch_size)
    b_out = generate_greedy(model, tokenizer, [r["prompt"] for r in benign], max_new_tokens=16, batch_size=batch_size)
    seen = [is_refusal(o) for r, o in zip(harmful, h_out) if not r["heldout_category"]]
    unseen = [is_refusal(o) for r, o in zip(harmful, h_out) if r["heldout_category"]]
    return {
        "utility_accuracy": {k: round(sum(v) / len(v), 3) for k, v in per_skill.items()},
        "refusal_heldout_harmful": round(sum(seen + unseen) / len(seen + unseen), 3),
        "refusal_heldout_prompts_train_categories": round(sum(seen) / max(1, len(seen)), 3),
        "refusal_heldout_category": round(sum(unseen) / max(1, len(unseen)), 3),
        "over_refusal_benign": round(sum(map(is_refusal, b_out)) / len(b_out), 3),
        "detector": f"{is_refusal.__module__}.{is_refusal.__name__}",
        "samples": {"utility": dict(zip([r["prompt"] for r in utility[:3]], answers[:3])),
                    "harmful": dict(zip([r["prompt"] for r in harmful[:2]], h_out[:2])),
                    "benign": dict(zip([r["prompt"] for r in benign[:2]], b_out[:2]))},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def quick_safety_sft(model, tokenizer, world: world_lib.WorldPaths, steps: int = 200, replay: float = 0.5,
                     learning_rate: float = 1e-3, batch_size: int = 32, seed: int = 0, benign: bool = True,
                     log=None) -> dict:
    """Full fine-tuning on ``safety_train`` (refusals) plus the benign look-alikes (helpful answers, so
    the model learns what *not* to refuse) and utility replay (``replay`` utility rows per safety row).
    The learnability check of the world, not the product's training path."""
    rng = random.Random(seed)
    safety = world_lib.read_jsonl(world.safety_train)
    contrast = world_lib.read_jsonl(world.benign_train) if benign else []
    utility = world_lib.read_jsonl(world.utility_train)
    rows = safety + contrast + rng.sample(utility, min(len(utility), int(len(safety) * replay)))
    return train_sft(model, tokenizer, rows, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                     warmup_steps=10, min_lr_ratio=0.1, seed=seed, log=log, log_every=50)
