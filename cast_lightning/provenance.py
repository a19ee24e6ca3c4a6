"""Where a number came from: package versions, the git commit, the machine and its load. The one collector, used
by evaluation results, the study's experiments.json, the report and the benchmarks."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("cast-lightning", "torch", "lightning", "transformers", "lm_eval", "datasets", "numpy", "scipy", "matplotlib")
GIT_TIMEOUT_S = 5


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when a package is absent), Python's first."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    return found


def git_commit(where: str | os.PathLike | None = None) -> str | None:
    """HEAD of the checkout holding this package (or ``where``); None outside git, without git, or when git hangs:
    a probe that fails must never cost a finished study its report."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(where or Path(__file__).resolve().parent), capture_output=True,
            text=True, timeout=GIT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def machine() -> dict:
    """The machine a measurement ran on, with its 1-minute load average (timings mean little on a busy machine)."""
    import torch

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": load,
    }


def collect() -> dict:
    """Everything above, stamped with the time (UTC)."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": versions(),
        "machine": machine(),
    }
