"""Mask overhead: CAST step time / full fine-tuning step time on the same model, data and seed (target <= 1.03).

One ``CASTModule`` per model, stepped through its own hooks in a manual loop, exactly as Lightning's
automatic optimisation calls them::

    loss = module.training_step(batch, i); loss.backward()
    module.on_before_optimizer_step(optimizer)      # head_mask.zero_grads() + grad-norm logging
    optimizer.step(); module.head_mask.restore()    # what CASTModule.optimizer_step does
    scheduler.step(); optimizer.zero_grad(set_to_none=True)

The two arms share the module, its optimizer and the batches: before a CAST step the mask is set to
10% of the heads (drawn with a seed) and snapshotted; before a full fine-tuning step it is set to no
heads (the baseline code path). Switching happens outside the timed region. Steps are interleaved in
pairs whose order alternates (AB BA AB ...), so drift (allocator, caches, thermal) hits both arms
alike; pair ``j`` uses batch ``j`` in both arms. After warm-up pairs, we report the median of the per-pair
ratios CAST/full (the headline) with a 90% bootstrap interval, the ratio of the median step times, the ratio
of median process CPU times, and the mask-only time (``zero_grads`` + ``restore``) as a fraction of the step.
Since the arms differ by nothing but the mask work, ``1 + mask / full step`` is a noise-free estimate of the
ratio; on a busy machine the measured ratio scatters by several percent around it. No Trainer in the loop:
data loading and logging noise would swamp a 3% figure. Each model stops starting pairs after its time
budget (at least 3 pairs), so a loaded machine still finishes in minutes.

Models: ``small``, a Llama GQA model shaped like the embedded world's base (its cached weights when
already built, else a random init from the same config), and ``large``, a ~0.25B-parameter random-init
Llama-style GQA model. Run from the repository root (about 3-4 minutes on 2 CPU cores)::

    python benchmarks/bench_mask_overhead.py            # both models -> benchmarks/results/mask_overhead.json
    python benchmarks/bench_mask_overhead.py --models small --pairs 10
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning (read when torch loads). On a shared 2-core machine a
# spinning pool makes 2-thread steps 5-30x slower and wildly noisy; both arms run under the same policy.
# Override with OMP_WAIT_POLICY=ACTIVE on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

TARGET = 1.03
SKIP_FRACTION = 0.10

# Shaped like cast_lightning.world.base_model.MODEL_CONFIG (used instead when that module imports).
SMALL_FALLBACK = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512, tie_word_embeddings=True)
LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)

# (batch size, sequence length, warm-up pairs, timed pairs, time budget in seconds for the timed pairs)
SETTINGS = {"small": (8, 128, 3, 100, 45.0), "large": (2, 64, 1, 10, 90.0)}


def small_model_source(tmp: Path) -> tuple[Path, str]:
    """The embedded world's base model when its cache is already built, else a random init of its shape."""
    try:
        from cast_lightning.world import base_model
        from cast_lightning.world import generator as world_lib
    except ImportError:
        return save_random_model(tmp / "small", SMALL_FALLBACK), "random init (fallback config)"
    cached = base_model.default_cache_dir() / f"world-base-{base_model.config_key()}"
    if (cached / "base_model.json").exists():  # never build it here: that takes minutes
        return cached, f"embedded world base model ({cached})"
    config = {**base_model.MODEL_CONFIG, "vocab_size": world_lib.VOCAB_SIZE}
    return save_random_model(tmp / "small", config), "random init of the embedded world base config (cache not built)"


def save_random_model(directory: Path, config: dict, seed: int = 0) -> Path:
    """A random-init Llama saved with save_pretrained next to a small chat tokenizer (like a hub download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)  # vocab < the model's: batches use random ids over the model's vocab
    cfg = LlamaConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, **config)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def make_batches(n: int, batch_size: int, length: int, vocab: int, seed: int) -> list[dict]:
    """Random token batches; the first quarter of each row is 'prompt' (labels -100), like SFT batches."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch_size, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 4] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def configure(module, total_steps: int):
    """The module's own configure_optimizers, under an unlaunched single-device Trainer.

    The Trainer is attached only for this call (configure_optimizers reads its strategy and
    ``estimated_stepping_batches``); the timed loop runs without one, so ``self.log`` is a no-op there.
    """
    import logging

    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banner per model
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=total_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    try:
        config = module.configure_optimizers()
    finally:
        module.trainer = None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MaskTimer:
    """Wraps a HeadMask's zero_grads/restore on the instance and accumulates their wall time.

    Both arms are wrapped (the full fine-tuning mask is empty), so on CUDA the synchronisations the
    timer needs cost both arms alike.
    """

    def __init__(self, device: torch.device):
        self.seconds = 0.0
        self.device = device

    def wrap(self, head_mask) -> None:
        for name in ("zero_grads", "restore"):
            method = getattr(head_mask, name)

            def timed(method=method):
                synchronize(self.device)
                t0 = time.perf_counter()
                method()
                synchronize(self.device)
                self.seconds += time.perf_counter() - t0

            setattr(head_mask, name, timed)


def bench_model(name: str, model_dir: Path, source: str, seed: int, warmup: int, pairs: int,
                batch_size: int, length: int, budget_s: float = float("inf"), min_pairs: int = 3,
                device: str = "cpu") -> dict:
    from cast_lightning.module import CASTModule

    module = CASTModule(str(model_dir), learning_rate=1e-4, weight_decay=0.01, warmup_steps=2)
    device = torch.device(device)
    module.to(device)
    module.train()
    layout = module.layout
    n_params = sum(p.numel() for p in module.model.parameters())
    heads = [(layer, head) for layer in range(layout.num_layers) for head in range(layout.num_heads)]
    skip = sorted(random.Random(seed).sample(heads, max(1, round(SKIP_FRACTION * len(heads)))))
    optimizer, scheduler = configure(module, total_steps=2 * (warmup + pairs) + 1)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in make_batches(warmup + pairs, batch_size, length, module.model.config.vocab_size, seed)]

    module.set_skip_heads(skip)
    cast_slices = len(module.head_mask.slices)
    frozen = module.head_mask.num_frozen_elements

    def step(arm: str, batch: dict, index: int) -> tuple[float, float]:
        module.set_skip_heads(skip if arm == "cast" else [])
        module.head_mask.snapshot()  # the weights are "final" now: what on_train_start does
        timer = MaskTimer(device)
        timer.wrap(module.head_mask)
        gc.collect()
        gc.disable()
        synchronize(device)
        c0, t0 = time.process_time(), time.perf_counter()
        loss = module.training_step(batch, index)
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        module.head_mask.restore()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        gc.enable()
        return seconds, cpu_seconds, timer.seconds

    times = {"cast": [], "full": []}
    cpu_times = {"cast": [], "full": []}
    mask_times = []
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    for j in range(warmup + pairs):
        if j >= warmup + min_pairs and time.perf_counter() - t_start > budget_s:
            break  # a loaded machine: keep the total runtime bounded, report how many pairs were timed
        order = ("cast", "full") if j % 2 == 0 else ("full", "cast")
        results = {arm: step(arm, batches[j], 2 * j + k) for k, arm in enumerate(order)}
        if j >= warmup:
            for arm in order:
                times[arm].append(results[arm][0])
                cpu_times[arm].append(results[arm][1])
            mask_times.append(results["cast"][2])
    bench_seconds = time.perf_counter() - t_start
    load_after = os.getloadavg()

    cast_median, full_median = statistics.median(times["cast"]), statistics.median(times["full"])
    cpu_ratio = statistics.median(cpu_times["cast"]) / statistics.median(cpu_times["full"])
    pair_ratios = sorted(c / f for c, f in zip(times["cast"], times["full"]))
    q = statistics.quantiles(pair_ratios, n=4) if len(pair_ratios) >= 2 else [pair_ratios[0]] * 3
    mask_median = statistics.median(mask_times)
    # 90% bootstrap interval of the median per-pair ratio (pairs resampled, seeded).
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(pair_ratios, k=len(pair_ratios))) for _ in range(2000))
    ci = (boot[100], boot[1899])
    # The arms differ only by the mask work, so 1 + mask / full step estimates the ratio without step-time noise.
    ratio_from_mask = 1 + mask_median / full_median
    result = {
        "model": name,
        "source": source,
        "parameters": n_params,
        "config": {k: getattr(module.model.config, k) for k in
                   ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
        "attn_implementation": module.model.config._attn_implementation,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "batch_size": batch_size,
        "sequence_length": length,
        "skipped_heads": len(skip),
        "total_heads": len(heads),
        "skip_heads": [list(h) for h in skip],
        "frozen_slices": cast_slices,
        "mask_kernel_launches_per_step": 2 * cast_slices,  # one zero_ per slice + one copy_ per slice
        "frozen_elements": frozen,
        "warmup_pairs": warmup,
        "timed_pairs": len(times["cast"]),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cast_step_s_median": round(cast_median, 5),
        "full_step_s_median": round(full_median, 5),
        # Headline: the median of the per-pair ratios (adjacent steps share the machine's load, so drift
        # cancels); the ratio of the two medians is kept beside it.
        "ratio": round(statistics.median(pair_ratios), 4),
        "ratio_of_medians": round(cast_median / full_median, 4),
        "pair_ratio_iqr": [round(q[0], 4), round(q[2], 4)],
        "ratio_ci90": [round(ci[0], 4), round(ci[1], 4)],
        "cpu_time_ratio": round(cpu_ratio, 4),
        "ratio_from_mask_time": round(ratio_from_mask, 5),
        "mask_s_median": round(mask_median, 6),
        "mask_fraction_of_step": round(mask_median / cast_median, 5),
        "target": TARGET,
        "meets_target": statistics.median(pair_ratios) <= TARGET,
        "bound_meets_target": ratio_from_mask <= TARGET,
        "cast_steps_s": [round(t, 5) for t in times["cast"]],
        "full_steps_s": [round(t, 5) for t in times["full"]],
        "cast_steps_cpu_s": [round(t, 5) for t in cpu_times["cast"]],
        "full_steps_cpu_s": [round(t, 5) for t in cpu_times["full"]],
        "bench_seconds": round(bench_seconds, 1),
    }
    del module, optimizer, scheduler
    gc.collect()
    return result


def machine() -> dict:
    import lightning
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,large", help="comma-separated: small, large")
    parser.add_argument("--pairs", type=int, default=None, help="timed CAST/full pairs per model (default: per model)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up pairs per model (default: per model)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per model after which no more pairs start (at least 3 pairs; default: per model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (the reference figure) or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "mask_overhead.json"))
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")  # self.log() without a Trainer warns; nothing else to see here
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="cast-bench-mask-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in SETTINGS:
                parser.error(f"unknown model {name!r}: use small and/or large")
            batch_size, length, warmup, pairs, budget = SETTINGS[name]
            budget = budget if args.budget is None else args.budget
            warmup = warmup if args.warmup is None else args.warmup
            pairs = pairs if args.pairs is None else args.pairs
            if name == "small":
                model_dir, source = small_model_source(Path(tmp))
            else:
                model_dir, source = save_random_model(Path(tmp) / name, LARGE, args.seed), "random init"
            r = bench_model(name, model_dir, source, args.seed, warmup, pairs, batch_size, length, budget, device=args.device)
            results.append(r)
            print(f"{name:6s} {r['parameters'] / 1e6:8.1f}M params  skip {r['skipped_heads']}/{r['total_heads']} heads  "
                  f"cast {r['cast_step_s_median'] * 1e3:9.1f} ms  full {r['full_step_s_median'] * 1e3:9.1f} ms  "
                  f"ratio {r['ratio']:.4f} (90% CI {r['ratio_ci90'][0]:.4f}-{r['ratio_ci90'][1]:.4f}; "
                  f"ratio of medians {r['ratio_of_medians']:.4f}; per-pair IQR {r['pair_ratio_iqr'][0]:.4f}-{r['pair_ratio_iqr'][1]:.4f}; CPU time {r['cpu_time_ratio']:.4f}; "
                  f"1+mask/step {r['ratio_from_mask_time']:.4f}; {r['timed_pairs']} pairs)  "
                  f"mask {r['mask_s_median'] * 1e3:.2f} ms = {r['mask_fraction_of_step']:.2%} of step  "
                  f"[{'ok' if r['meets_target'] else 'MISSES'} <= {TARGET}]", flush=True)

    report = {
        "benchmark": "mask_overhead",
        "metric": "median over interleaved pairs of CAST step time / full fine-tuning step time "
                  "(forward+backward+on_before_optimizer_step+optimizer step+restore+zero_grad)",
        "target": TARGET,
        "skip_fraction": SKIP_FRACTION,
        "seed": args.seed,
        "machine": machine(),
        "results": results,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    from cast_lightning.io import atomic_write_text

    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} in {report['total_seconds']:.0f}s")
    return 0  # timings on a shared machine are noisy: the figures are read, not asserted


if __name__ == "__main__":
    sys.exit(main())
