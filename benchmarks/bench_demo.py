"""`cast demo` wall time and peak memory, from nothing (target: <= 10 minutes on 2 CPU cores).

Runs the real command in a child process with an empty base-model cache and an empty output folder, so the
figure includes building the world, pretraining the base model, diagnosing, fine-tuning every variant x seed,
evaluating and writing the report. Peak memory is the child's maximum resident set size (``RUSAGE_CHILDREN``;
the demo runs in one process). The per-stage times are parsed from the demo's own ``[cast] ... (N s)`` lines.

    python benchmarks/bench_demo.py                  # writes benchmarks/results/demo.json (about 7 minutes)
    python benchmarks/bench_demo.py --keep DIR       # keep the demo's output (report, runs) in DIR
    python benchmarks/bench_demo.py -- --full        # time another demo invocation (args after --)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cast_lightning.io import atomic_write_json  # noqa: E402

TARGET_S = 600.0
STAGE = re.compile(r"^\[cast\] (?P<stage>.*) \((?P<seconds>[\d.]+)s\)$")  # "[cast] fit full-s0: done (19.7s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "demo.json"))
    parser.add_argument("--keep", help="copy the demo's output folder here (report, runs, results)")
    parser.add_argument("demo_args", nargs="*", help="extra `cast demo` arguments, after --")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="cast-bench-demo-"))
    env = dict(os.environ, CAST_CACHE_DIR=str(scratch / "cache"), HF_HUB_OFFLINE="1")
    command = [str(Path(sys.executable).parent / "cast"), "demo", "--output_dir", str(scratch / "demo"), *args.demo_args]
    load_before = os.getloadavg()
    started = time.perf_counter()
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    load_after = os.getloadavg()
    if run.returncode != 0:
        sys.exit(f"cast demo failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    stages = [{"stage": m["stage"][:100], "seconds": float(m["seconds"])}
              for line in run.stdout.splitlines() if (m := STAGE.match(line.strip()))]
    pretrain = re.search(r"\[cast base-model\] done in ([\d.]+)s", run.stdout + run.stderr)
    result = {
        "command": "cast demo " + " ".join(args.demo_args),
        "wall_s": round(wall_s, 1),
        "target_s": TARGET_S,
        "wall_over_target": round(wall_s / TARGET_S, 3),
        "peak_rss_mib": round(peak_mib),
        "base_model_pretraining_s": float(pretrain.group(1)) if pretrain else None,
        "stages": stages,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "versions": _versions(),
    }
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        shutil.copytree(scratch / "demo", args.keep)
    shutil.rmtree(scratch, ignore_errors=True)
    atomic_write_json(args.output, result)
    print(f"cast demo: {wall_s:.0f} s wall ({wall_s / TARGET_S:.2f} of the {TARGET_S:.0f} s target), "
          f"peak RSS {peak_mib:.0f} MiB, base-model pretraining {result['base_model_pretraining_s']} s -> {args.output}")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "lightning", "transformers", "lm_eval")}


if __name__ == "__main__":
    main()
