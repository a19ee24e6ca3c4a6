"""Diagnosis cost: time of one diagnosis / time of one forward+backward pass over the same data (a benchmark, not a test).

Measures, on the same model and the same safety + utility batches:

* reference: one forward + backward pass over every batch (all parameters trainable, ``loss.backward()``,
  gradients dropped after each batch): what one training epoch over the diagnosis data costs without
  the optimizer step;
* ``taylor`` diagnosis (default mode; target <= 2.5 x the reference) and ``ablation`` diagnosis, end to end
  (hooks, gradient accumulation, per-head statistics, scores);
* medians over ``--repeats`` rounds after one warm-up, the modes interleaved within each round in one
  process (so load from other processes hits them alike), and the peak memory of each mode measured in
  its own fresh process (CUDA: peak allocated; CPU: peak RSS, and its rise over the loaded model + data);
* rank agreement (Spearman) of taylor FS with exact ablation FS: on the benchmark model, and on tiny
  Llama models trained briefly on a copy/reverse task (random-init heads carry no function, so their
  rank agreement is noise), one per seed.

Results print as a table and go to ``benchmarks/results/diagnosis.json`` with the machine stated.

    python benchmarks/bench_diagnosis.py                       # default small Llama (random init), CPU
    python benchmarks/bench_diagnosis.py --pretrained DIR      # any saved HF causal LM
    python benchmarks/bench_diagnosis.py --device cuda --hidden 1024 --layers 8 --heads 16 --kv-heads 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cast_lightning.conflict import ConflictMap  # noqa: E402
from cast_lightning.data.formatting import collate, per_sample_loss  # noqa: E402
from cast_lightning.diagnosis import diagnose  # noqa: E402
from cast_lightning.io import atomic_write_json  # noqa: E402


# -- memory ------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return (_status_kib("VmRSS") or 0) * 1024


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return (_status_kib("VmHWM") or 0) * 1024


# -- data and models ---------------------------------------------------------------------------------------------------


def token_rows(n: int, seed: int, vocab: int, seq_len: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        total = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g))
        prompt_len = max(1, total // 2)
        ids = torch.randint(3, vocab, (total,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return rows


def loaders(args, vocab: int) -> tuple[list[dict], list[dict]]:
    make = partial(collate, pad_token_id=0)
    safety = list(DataLoader(token_rows(args.samples, 1, vocab, args.seq_len), batch_size=args.batch_size, collate_fn=make))
    utility = list(DataLoader(token_rows(args.samples, 2, vocab, args.seq_len), batch_size=args.batch_size, collate_fn=make))
    return safety, utility


def build_model(args, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.pretrained:
        from cast_lightning.loading import load_causal_lm

        model = load_causal_lm(args.pretrained, args.dtype)
    else:
        config = LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(512, 2 * args.seq_len), tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    return model.to(device).eval()


# -- timing ------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_backward(model, batches, device) -> None:
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        per_sample_loss(logits, batch["labels"]).sum().backward()
        model.zero_grad(set_to_none=True)


MODES = ("reference", "taylor", "ablation")


def _setup(args: argparse.Namespace):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args, device)
    safety, utility = loaders(args, model.config.vocab_size)
    fns = {
        "reference": lambda: forward_backward(model, safety + utility, device),
        "taylor": lambda: diagnose(model, safety, utility, plot=False),
        "ablation": lambda: diagnose(model, safety, utility, sensitivity="ablation",
                                     heads_per_pass=args.heads_per_pass, plot=False),
    }
    return device, model, fns


def run_memory(mode: str, args: argparse.Namespace) -> dict:
    """One pass of ``mode`` in a fresh process, so its peak memory is its own (CPU peak RSS, CUDA peak allocated)."""
    device, model, fns = _setup(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _memory_now(device)  # model + data loaded
    result = fns[mode]()
    peak = _memory_peak(device)
    out = {"kind": "cuda_peak_allocated" if device.type == "cuda" else "process_peak_rss",
           "peak_mib": round(peak / 2**20, 1), "over_model_and_data_mib": round((peak - baseline) / 2**20, 1)}
    if result is not None:
        out["map"] = result.to_dict()
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def run_timing(args: argparse.Namespace) -> dict:
    """All modes in one process, interleaved per round (ref, taylor, ablation, ref, ...) after one warm-up each,
    so load from other processes hits every mode alike."""
    device, _, fns = _setup(args)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.repeats):
        for mode in MODES:
            if mode == "ablation" and round_ >= args.ablation_repeats:
                continue
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[mode]()
            _sync(device)
            times[mode].append(round(time.perf_counter() - start, 4))
            cpu[mode].append(round(time.process_time() - start_cpu, 4))
    return {"times_s": times, "cpu_s": cpu, "torch_threads": torch.get_num_threads()}


def in_fresh_process(fn, *args):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(torch.tensor(a).flatten(), torch.tensor(b).flatten()).statistic)


def trained_tiny_rho(seed: int, steps: int) -> dict:
    """Train a 2-layer, 8-head Llama on copy/reverse for ``steps`` steps; Spearman of taylor vs ablation FS."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = 32

    def rows(n: int, data_seed: int) -> list[dict]:
        g = torch.Generator().manual_seed(data_seed)
        out = []
        for i in range(n):
            tokens = torch.randint(4, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
            prompt = [3 if i % 2 else 1] + tokens
            response = tokens[::-1] if i % 2 else tokens
            out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
        return out

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                         initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    make = partial(collate, pad_token_id=0)
    train = DataLoader(rows(steps * 16, 5), batch_size=16, shuffle=True, collate_fn=make,
                       generator=torch.Generator().manual_seed(seed))
    for batch in train:
        loss = per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    cmap = diagnose(model, DataLoader(rows(16, 0), batch_size=8, collate_fn=make),
                    DataLoader(rows(48, 1), batch_size=16, collate_fn=make), sensitivity="ablation", plot=False)
    return {"seed": seed, "heads": 16, "train_steps": steps, "final_train_loss": round(loss.item(), 3),
            "spearman": round(spearman(cmap.fs, cmap.extra["fs_taylor"]), 3)}


# -- main --------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="a saved HF causal LM (default: a random-init Llama of the sizes below)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--samples", type=int, default=32, help="samples per objective (safety, utility)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ablation-repeats", type=int, default=3)
    parser.add_argument("--heads-per-pass", type=int, default=8)
    parser.add_argument("--spearman-seeds", type=int, default=3, help="trained tiny models for the rank agreement (0: skip)")
    parser.add_argument("--spearman-steps", type=int, default=150)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per measurement (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diagnosis.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    timing = in_fresh_process(run_timing, args)
    memory = {mode: in_fresh_process(run_memory, mode, args) for mode in MODES}
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs = {mode: {"median_s": round(statistics.median(timing["times_s"][mode]), 4), "times_s": timing["times_s"][mode]}
            for mode in MODES}
    for mode in ("taylor", "ablation"):
        wall, ref_wall = timing["times_s"][mode], timing["times_s"]["reference"]
        # ratio within each round (same load), then the median: robust to load that changes between rounds
        runs[mode]["paired_ratio_median"] = round(statistics.median(t / r for t, r in zip(wall, ref_wall)), 3)
        if device.type == "cpu":  # process CPU time: far less sensitive to other processes than wall time
            runs[mode]["cpu_ratio_median"] = round(
                statistics.median(timing["cpu_s"][mode]) / statistics.median(timing["cpu_s"]["reference"]), 3)
    if device.type == "cpu":
        for mode in MODES:
            runs[mode]["cpu_s"] = timing["cpu_s"][mode]
    ref = runs["reference"]["median_s"]
    taylor_map, abl_map = (ConflictMap.from_dict(memory[m].pop("map")) for m in ("taylor", "ablation"))
    parameters = memory["reference"]["parameters"]
    for mode in MODES:
        memory[mode].pop("parameters")
        runs[mode]["memory"] = memory[mode]
    n_batches = 2 * -(-args.samples // args.batch_size)

    rhos = [trained_tiny_rho(seed, args.spearman_steps) for seed in range(args.spearman_seeds)]
    layout = taylor_map.model
    taylor, ablation = runs["taylor"], runs["ablation"]
    taylor["ratio"] = round(taylor["median_s"] / ref, 3)
    taylor["target_ratio"] = 2.5
    taylor["meets_target"] = max(taylor["ratio"], taylor["paired_ratio_median"]) <= 2.5
    ablation["ratio"] = round(ablation["median_s"] / ref, 3)
    ablation["heads_per_pass"] = args.heads_per_pass
    result = {
        "benchmark": "diagnosis time / one forward+backward pass time over the same data (medians of interleaved rounds in one process; peak memory of each mode in its own fresh process)",
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
            "cpu_count": os.cpu_count(), "torch_threads": timing["torch_threads"],
            "load_average_before": load_before, "load_average_after": load_after,
        },
        "model": {"name": args.pretrained or "random-init llama",
                  **{k: layout[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "dtype")},
                  "parameters": parameters},
        "data": {"samples_per_objective": args.samples, "batch_size": args.batch_size, "seq_len_max": args.seq_len,
                 "batches": n_batches, "response_tokens": taylor_map.data["safety_tokens"] + taylor_map.data["utility_tokens"]},
        "reference_forward_backward": runs["reference"],
        "taylor": taylor,
        "ablation": ablation,
        "spearman_taylor_vs_ablation": {
            "benchmark_model": round(spearman(abl_map.fs, abl_map.extra["fs_taylor"]), 3),
            "benchmark_model_note": "random-init weights unless --pretrained: heads carry no function, expect ~0",
            "trained_tiny_models": rhos,
            "trained_tiny_median": round(statistics.median(r["spearman"] for r in rhos), 3) if rhos else None,
        },
        "command": " ".join(["python", *sys.argv]),
    }
    atomic_write_json(args.out, result)

    print(f"model {result['model']['name']}: {layout['num_layers']} layers x {layout['num_heads']} heads "
          f"({parameters / 1e6:.1f}M params), {n_batches} batches of {args.batch_size}, device {device}")
    print(f"{'pass':<26}{'median s':>10}{'ratio':>8}{'paired':>8}{'cpu':>8}{'peak MiB':>10}{'+MiB':>8}")
    for name, block in [("forward+backward (ref)", runs["reference"]), ("diagnosis taylor", taylor), ("diagnosis ablation", ablation)]:
        print(f"{name:<26}{block['median_s']:>10.3f}{block.get('ratio', 1.0):>8.2f}{block.get('paired_ratio_median', 1.0):>8.2f}"
              f"{block.get('cpu_ratio_median', 1.0):>8.2f}{block['memory']['peak_mib']:>10.1f}"
              f"{block['memory']['over_model_and_data_mib']:>8.1f}")
    sp = result["spearman_taylor_vs_ablation"]
    print(f"Spearman taylor vs ablation: benchmark model {sp['benchmark_model']:.3f}; trained tiny models "
          f"{[r['spearman'] for r in rhos]} (median {sp['trained_tiny_median']})")
    print(f"load average before/after: {load_before} / {load_after}")
    print(f"taylor target ratio <= 2.5: {'met' if taylor['meets_target'] else 'NOT met'}; wrote {args.out}")

if __name__ == "__main__":
    main()
