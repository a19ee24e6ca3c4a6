"""Where the folders shipped beside the package live: the top-level ``eval/`` and ``configs/`` of the checkout, which
a wheel installs as ``cast_lightning.eval_tasks`` and ``cast_lightning.configs`` (pyproject's package-dir)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cast_lightning.errors import CastError


def shipped_folder(package: str, checkout: str, marker: str) -> Path:
    """``package`` (e.g. ``cast_lightning.configs``) when installed, else the checkout's ``checkout`` folder; the one
    that holds ``marker`` (a sub-folder every copy has), or a CastError saying to reinstall."""
    try:
        root = Path(str(resources.files(package)))
        if (root / marker).is_dir():
            return root
    except (ModuleNotFoundError, TypeError):
        pass
    root = Path(__file__).resolve().parents[1] / checkout
    if not (root / marker).is_dir():
        raise CastError(f"cannot find {checkout}/{marker} (shipped as {package}): reinstall cast-lightning")
    return root
