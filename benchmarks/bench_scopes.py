"""Memory per training scope: optimizer-state bytes and peak memory of CAST training under ``--model.trainable``
``all``, ``attention`` and ``lora``, on the ~246M-parameter Llama of ``bench_mask_overhead.py`` (hidden 1024,
16 layers, 16 heads / 4 KV, MLP 2816, vocab 32000, random init), 10% of the heads skipped (seed 0).

Each scope runs in its own child process (peak memory is per process), through ``CASTModule``'s own hooks in a
manual loop as ``bench_mask_overhead.py`` does (forward, backward, ``on_before_optimizer_step``, AdamW step,
``head_mask.restore``, zero_grad), for ``--steps`` optimizer steps. Per scope it reports:

* ``trainable_parameters`` and ``optimizer_state_bytes``: the bytes of every tensor in AdamW's state after the
  steps (exp_avg, exp_avg_sq, step) - counted, not timed, so the figure is exact and load-independent;
* ``gradient_bytes``: the bytes of the trainable parameters' gradients;
* ``checkpoint_weight_bytes``: the weight bytes a ``cast fit`` checkpoint holds (the trained tensors only for
  ``attention`` and ``lora`` on one device / DDP);
* ``peak_rss_bytes`` (CPU: the child's peak resident set, ``ru_maxrss``), ``rss_after_load_bytes`` and their
  difference, the training overhead; on CUDA ``peak_cuda_allocated_bytes`` instead;
* ``step_s_median``: for orientation only (a shared machine makes it noisy).

Run from the repository root (~3-5 min on 2 CPU cores with the defaults)::

    python benchmarks/bench_scopes.py                      # -> benchmarks/results/scopes.json
    python benchmarks/bench_scopes.py --steps 2 --batch 1  # the smallest sensible run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

SCOPES = ("all", "attention", "lora")
SKIP_FRACTION = 0.10
LORA = {"r": 16, "alpha": 32.0}  # default targets: the attention projections


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def child(scope: str, model_dir: str, steps: int, batch: int, length: int, seed: int, device: str, out: str) -> None:
    """One scope in this process: build, step, measure, write ``out``."""
    from bench_mask_overhead import configure, make_batches

    from cast_lightning.module import CASTModule

    warnings.filterwarnings("ignore")
    device = torch.device(device)
    module = CASTModule(model_dir, trainable=scope, lora=LORA if scope == "lora" else None, learning_rate=1e-4,
                        weight_decay=0.01)
    layout = module.layout
    heads = [(layer, head) for layer in range(layout.num_layers) for head in range(layout.num_heads)]
    skip = sorted(random.Random(seed).sample(heads, max(1, round(SKIP_FRACTION * len(heads)))))
    module.set_skip_heads(skip)
    module.to(device)
    module.train()
    optimizer, scheduler = configure(module, total_steps=steps + 1)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in make_batches(steps, batch, length, module.model.config.vocab_size, seed)]
    module.head_mask.snapshot()
    gc.collect()
    loaded_rss = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss = module.training_step(b, i)
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        module.head_mask.restore()
        scheduler.step()
        grad_bytes = tensor_bytes(p.grad for p in module.model.parameters() if p.grad is not None)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    state_bytes = sum(tensor_bytes(state.values()) for state in optimizer.state.values())
    every = [p for _, p in module.model.named_parameters()]
    checkpoint_weights = tensor_bytes(every) if scope == "all" else tensor_bytes(trainable)
    result = {
        "scope": scope,
        "lora": LORA if scope == "lora" else None,
        "parameters": sum(p.numel() for p in every),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "frozen_elements_in_mask": module.head_mask.num_frozen_elements,
        "skipped_heads": len(skip),
        "total_heads": len(heads),
        "optimizer_state_bytes": state_bytes,
        "gradient_bytes": grad_bytes,
        "checkpoint_weight_bytes": checkpoint_weights,
        "rss_after_load_bytes": loaded_rss,
        "step_s": [round(t, 3) for t in times],
        "step_s_median": round(statistics.median(times), 3),
        "loss_last": float(loss.detach()),
    }
    if device.type == "cuda":
        result["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["training_rss_overhead_bytes"] = result["peak_rss_bytes"] - loaded_rss
    Path(out).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated: all, attention, lora")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per scope (>= 2: the first allocates state)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="large", choices=["large", "small"],
                        help="large: the ~246M Llama (the figure); small: a 1.7M one to try the script in seconds")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "scopes.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.model_dir, args.steps, args.batch, args.length, args.seed, args.device, args.child_out)
        return 0

    from bench_mask_overhead import LARGE, SMALL_FALLBACK, save_random_model

    from cast_lightning.io import atomic_write_text
    from cast_lightning.provenance import collect

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or args.steps < 2:
        parser.error(f"unknown scope(s) {unknown}" if unknown else "--steps must be at least 2")
    t0 = time.perf_counter()
    machine_before = collect()
    results = []
    with tempfile.TemporaryDirectory(prefix="cast-bench-scopes-") as tmp:
        config = LARGE if args.model == "large" else SMALL_FALLBACK
        model_dir = save_random_model(Path(tmp) / args.model, config, args.seed)
        for scope in scopes:
            out = Path(tmp) / f"{scope}.json"
            command = [sys.executable, __file__, "--child", scope, "--model-dir", str(model_dir), "--child-out", str(out),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length),
                       "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed)]
            load = os.getloadavg()
            subprocess.run(command, check=True, cwd=ROOT)
            r = json.loads(out.read_text())
            r["loadavg_before"] = [round(x, 2) for x in load]
            results.append(r)
            peak = r.get("peak_rss_bytes", r.get("peak_cuda_allocated_bytes", 0))
            print(f"{scope:9s} trainable {r['trainable_parameters'] / 1e6:8.2f}M / {r['parameters'] / 1e6:.1f}M  "
                  f"optimizer state {r['optimizer_state_bytes'] / 2**20:9.1f} MiB  grads {r['gradient_bytes'] / 2**20:8.1f} MiB  "
                  f"checkpoint weights {r['checkpoint_weight_bytes'] / 2**20:8.1f} MiB  peak {peak / 2**30:.2f} GiB  "
                  f"step {r['step_s_median']:.2f} s", flush=True)
    by_scope = {r["scope"]: r for r in results}
    ratios = {}
    if "all" in by_scope:
        for scope, r in by_scope.items():
            ratios[scope] = {key: round(r[key] / by_scope["all"][key], 5) for key in
                             ("optimizer_state_bytes", "gradient_bytes", "checkpoint_weight_bytes",
                              "peak_rss_bytes" if "peak_rss_bytes" in r else "peak_cuda_allocated_bytes")
                             if by_scope["all"].get(key)}
    report = {
        "benchmark": "scopes",
        "metric": "optimizer-state bytes (AdamW exp_avg + exp_avg_sq + step, counted) and peak memory per training scope",
        "model": {"name": args.model, "config": config, "init": "random", "dtype": "float32"},
        "settings": {"steps": args.steps, "batch_size": args.batch, "sequence_length": args.length, "threads": args.threads,
                     "device": args.device, "seed": args.seed, "skip_fraction": SKIP_FRACTION, "optimizer": "AdamW"},
        "provenance": machine_before,
        "machine_after": collect()["machine"],
        "results": results,
        "ratio_to_all": ratios,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
