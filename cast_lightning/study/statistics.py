"""The report's statistics: mean / sample std over seeds, rounding and formatting, Spearman's rho and its bootstrap.

Correlations are scipy's (``scipy.stats.spearmanr``, ``scipy.stats.bootstrap``); this module only decides what an
undefined value is: Spearman's rho is NaN (``null`` in ``report.json``) with fewer than ``MIN_PAIRS`` finite pairs or
when either side is constant, and bootstrap resamples whose rho is undefined are dropped from the interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import stats

DECIMALS = 4  # rates, utilities, correlations
SECONDS_DECIMALS = 1
BOOTSTRAP_ITERS = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
MIN_PAIRS = 3

STD_DEFINITION = "sample standard deviation over seeds (ddof=1); null with one seed"
SPEARMAN_DEFINITION = (
    "Spearman's rho = scipy.stats.spearmanr: Pearson's correlation of the average ranks (tied values share their "
    f"mean rank); null when fewer than {MIN_PAIRS} finite pairs remain or either side is constant (undefined)."
)
BOOTSTRAP_DEFINITION = (
    f"{CONFIDENCE:.0%} percentile bootstrap interval of Spearman's rho from scipy.stats.bootstrap (paired=True: heads "
    f"are resampled with their score and benefit together; {BOOTSTRAP_ITERS} resamples, random_state={BOOTSTRAP_SEED}); "
    "resamples in which rho is undefined (a constant side) are dropped and 'iters' counts the ones kept; null with "
    f"fewer than {MIN_PAIRS} heads or no defined resample."
)


def finite(values: Iterable) -> list[float]:
    """The values that are numbers and not NaN, as floats (None and NaN are left out)."""
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def round_value(value, decimals: int = DECIMALS) -> float | None:
    """``value`` rounded to ``decimals``; None for None, NaN and infinities; ``-0.0`` becomes ``0.0``."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), decimals) + 0.0


def summarize(values: Iterable, decimals: int = DECIMALS) -> dict:
    """``{"mean", "std", "n", "min", "max"}`` of the finite values, rounded (std: ddof=1, None for n < 2)."""
    data = finite(values)
    n = len(data)
    return {
        "mean": round_value(np.mean(data), decimals) if n else None,
        "std": round_value(np.std(data, ddof=1), decimals) if n >= 2 else None,
        "n": n,
        "min": round_value(min(data), decimals) if n else None,
        "max": round_value(max(data), decimals) if n else None,
    }


def format_value(value, decimals: int = DECIMALS) -> str:
    """``0.1234`` with ``decimals`` places; ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.{decimals}f}"


def format_stat(stat: dict, decimals: int = DECIMALS) -> str:
    """A ``summarize`` dictionary as ``mean ± std`` (``mean`` alone with one value; ``n/a`` without any)."""
    if stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean']:.{decimals}f}"
    return text + (f" ± {stat['std']:.{decimals}f}" if stat.get("std") is not None else "")


def _finite_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray([np.nan if v is None else v for v in x], dtype=float)
    b = np.asarray([np.nan if v is None else v for v in y], dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of the finite pairs (``scipy.stats.spearmanr``, average ranks for ties).

    NaN when fewer than ``MIN_PAIRS`` finite pairs remain or either side is constant: the correlation is undefined
    (checked here, so scipy never warns about constant input).
    """
    a, b = _finite_pairs(x, y)
    if len(a) < MIN_PAIRS or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def _spearman_rows(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho of each resample (vectorised for ``scipy.stats.bootstrap``): Pearson's r of the ranks.

    NaN where a side is constant (scipy's ``ConstantInputWarning`` is silenced: such resamples are dropped).
    """
    ranks_a, ranks_b = stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return stats.pearsonr(ranks_a, ranks_b, axis=axis).statistic


def bootstrap_spearman(
    x: Sequence[float], y: Sequence[float], iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED
) -> dict:
    """Percentile interval (``CONFIDENCE``) of Spearman's rho over ``iters`` paired resamples (see ``BOOTSTRAP_DEFINITION``).

    Returns ``{"low", "high", "iters", "resamples", "method"}``; ``low`` / ``high`` are None (and ``iters`` 0) with
    fewer than ``MIN_PAIRS`` finite pairs or when no resample has a defined rho.
    """
    a, b = _finite_pairs(x, y)
    undefined = {"low": None, "high": None, "iters": 0, "resamples": int(iters), "method": "percentile"}
    if len(a) < MIN_PAIRS:
        return undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # raised when some resample is undefined
        result = stats.bootstrap(
            (a, b), _spearman_rows, paired=True, vectorized=True, method="percentile", n_resamples=int(iters),
            confidence_level=CONFIDENCE, random_state=seed,
        )
    rho = np.asarray(result.bootstrap_distribution, dtype=float)
    kept = rho[np.isfinite(rho)]
    if not kept.size:
        return undefined
    if kept.size == rho.size:  # every resample defined: scipy's own interval
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    else:  # the same percentile interval over the defined resamples only
        alpha = (1 - CONFIDENCE) / 2
        low, high = (float(v) for v in np.quantile(kept, [alpha, 1 - alpha]))
    return {**undefined, "low": round_value(low), "high": round_value(high), "iters": int(kept.size)}


def outcome(mean: float | None, std: float | None, n: int) -> str:
    """better / worse / no clear difference, from a mean and its std over ``n`` seeds; inconclusive for n < 2."""
    if mean is None or n < 2 or std is None:
        return "inconclusive"
    if mean > 0 and mean > std:
        return "better"
    if mean < 0 and -mean > std:
        return "worse"
    return "no clear difference"
