"""Generated tokens/s: batched greedy generation (left padding, KV cache) vs one prompt at a time.

Both runs use ``cast_lightning.generation.generate_greedy_tokens`` (the path ``cast eval`` takes) on the
same prompts (the embedded world's held-out harmful/benign/utility prompts); only ``batch_size``
differs. Reports medians over ``--repeats`` timed runs after one warm-up, per model:

- ``random_llama``: a random-init Llama (GQA) of the size given by ``--hidden/--layers``, never
  trained, so it rarely emits EOS: every prompt generates about ``--max-new-tokens`` tokens;
- ``world_base``: the embedded world's base model, if it is cached (``--build-world`` builds it,
  which takes minutes); it stops at EOS like a real model, so batches finish at their longest answer.

    python benchmarks/bench_generation.py                 # writes benchmarks/results/generation.json
    python benchmarks/bench_generation.py --prompts 64 --batch-size 64 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cast_lightning.generation import generate_greedy_tokens  # noqa: E402
from cast_lightning.io import atomic_write_json  # noqa: E402
from cast_lightning.world import generator as world_lib  # noqa: E402


def world_prompts(n: int) -> list[str]:
    sets = world_lib.eval_sets(seed=0, scale=1.0)
    pools = [[r["prompt"] for r in sets["harmful.jsonl"]], [r["prompt"] for r in sets["benign.jsonl"]],
             [r["prompt"] for name, rows in sets.items() if name.startswith("utility_") for r in rows]]
    prompts, i = [], 0
    while len(prompts) < n:  # interleave the sets: a realistic mix of prompt lengths
        pool = pools[i % len(pools)]
        prompts.append(pool[(i // len(pools)) % len(pool)])
        i += 1
    return prompts


def random_llama(hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    splits, _ = world_lib.generate_world(seed=0, scale=0.1)
    tokenizer = world_lib.build_tokenizer(world_lib.tokenizer_corpus(splits))
    heads = max(2, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def world_base(build: bool):
    from cast_lightning.world import base_model
    from cast_lightning.loading import load_causal_lm, load_tokenizer

    cached = base_model.default_cache_dir() / f"world-base-{base_model.config_key()}"
    if not (cached / "base_model.json").exists() and not build:
        return None, None, None
    path = base_model.ensure_base_model(quiet=True)
    return load_causal_lm(str(path)).eval(), load_tokenizer(str(path)), str(path)


def measure(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    generate_greedy_tokens(model, tokenizer, prompts[: max(1, min(len(prompts), batch_size))], max_new_tokens, batch_size)  # warm-up
    seconds, tokens = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_greedy_tokens(model, tokenizer, prompts, max_new_tokens, batch_size)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(t) for t in out))
    rates = [t / s for t, s in zip(tokens, seconds)]
    return {"batch_size": batch_size, "generated_tokens": tokens[0], "seconds": [round(s, 3) for s in seconds],
            "median_seconds": round(statistics.median(seconds), 3), "tokens_per_second": round(statistics.median(rates), 1)}


def bench_model(name: str, model, tokenizer, prompts: list[str], args) -> dict:
    batched = measure(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, args.repeats)
    single = measure(model, tokenizer, prompts, 1, args.max_new_tokens, args.repeats)
    ratio = batched["tokens_per_second"] / single["tokens_per_second"]
    params = sum(p.numel() for p in model.parameters())
    print(f"{name} ({params / 1e6:.1f}M params, {len(prompts)} prompts, <= {args.max_new_tokens} new tokens): "
          f"batched (bs={args.batch_size}) {batched['tokens_per_second']:.0f} tok/s vs one at a time "
          f"{single['tokens_per_second']:.0f} tok/s -> {ratio:.1f}x", flush=True)
    return {"parameters": params, "batched": batched, "one_at_a_time": single, "speedup": round(ratio, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256, help="random_llama hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random_llama layers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores we may use)")
    parser.add_argument("--build-world", action="store_true", help="build the world base model if it is not cached (minutes)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "generation.json"))
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    prompts = world_prompts(args.prompts)
    results = {
        "benchmark": "generation",
        "what": "generated tokens/s, batched greedy (left padding, KV cache) vs one prompt at a time; medians",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cores": cores, "torch_threads": torch.get_num_threads(), "device": "cpu",
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "models": {},
    }
    model, tokenizer = random_llama(args.hidden, args.layers)
    results["models"]["random_llama"] = bench_model("random_llama", model, tokenizer, prompts, args)
    model, tokenizer, path = world_base(args.build_world)
    if model is None:
        print("world_base: not cached (run `cast demo` or pass --build-world); skipped", flush=True)
    else:
        results["models"]["world_base"] = {"path": path, **bench_model("world_base", model, tokenizer, prompts, args)}
    results["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    atomic_write_json(args.output, results)
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
