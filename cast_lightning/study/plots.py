"""The report's plots, drawn from the report dictionary (and the conflict map embedded in experiments.json).

Matplotlib's Agg canvas on a bare ``Figure`` (no pyplot, so no global backend state); every PNG is written
atomically. Colours and markers are keyed by variant name, with a fixed fallback for names ``plan.VARIANTS`` lacks.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from cast_lightning.io import atomic_save
from cast_lightning.study.analysis import VARIANT_ORDER
from cast_lightning.study.statistics import format_stat

COLORS = {"base": "#555555", "full": "#1f77b4", "cast": "#d62728", "random": "#7f7f7f", "oc": "#ff7f0e",
          "fs": "#2ca02c", "rank": "#9467bd", "weighted": "#8c564b"}
MARKERS = {"base": "s", "full": "D", "cast": "o", "random": "X", "oc": "^", "fs": "v", "rank": "P", "weighted": "*"}
FALLBACK_COLORS = ("#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39")
FALLBACK_MARKERS = ("h", "p", "<", ">", "d", "8")
EMPHASIZED = ("cast", "random")  # drawn bold in the utility-drop plot: the headline comparison
DPI = 110


def color(variant: str) -> str:
    """The variant's colour; an unknown name gets a fixed colour from its name (the same in every plot)."""
    return COLORS.get(variant) or FALLBACK_COLORS[zlib.crc32(variant.encode()) % len(FALLBACK_COLORS)]


def marker(variant: str) -> str:
    """The variant's marker; an unknown name gets a fixed marker from its name."""
    return MARKERS.get(variant) or FALLBACK_MARKERS[zlib.crc32(variant.encode()) % len(FALLBACK_MARKERS)]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    return atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def plot_pareto(data: dict, path: str | Path) -> Path:
    """Refusal rate vs utility: every run (small) and every variant's mean +- std (large); the Pareto front dashed."""
    fig = _figure(7.5, 5.0)
    ax = fig.subplots()
    for run in data["runs"]:
        if run["utility"] is not None and run["refusal_rate"] is not None:
            ax.scatter(run["utility"], run["refusal_rate"], s=12, alpha=0.35, color=color(run["variant"]),
                       marker=marker(run["variant"]), linewidths=0)
    ratios = sorted({v["skip_ratio"] for v in data["variants"] if v["skip_ratio"] > 0})
    fills = ["full", "none", "left", "bottom", "right", "top"]  # one fill style per skip ratio
    for v in data["variants"]:
        u, s = v["utility"], v["refusal_rate"]
        if u["mean"] is None or s["mean"] is None:
            continue
        fill = fills[ratios.index(v["skip_ratio"]) % len(fills)] if v["skip_ratio"] in ratios else "full"
        ax.errorbar(u["mean"], s["mean"], xerr=u["std"] or 0, yerr=s["std"] or 0, fmt=marker(v["variant"]),
                    color=color(v["variant"]), markersize=8, capsize=3, label=v["label"], fillstyle=fill,
                    markerfacecoloralt="white", markeredgewidth=1.5)
    front = sorted((v for v in data["variants"] if v["pareto_optimal"]), key=lambda v: v["utility"]["mean"])
    if len(front) > 1:
        ax.plot([v["utility"]["mean"] for v in front], [v["refusal_rate"]["mean"] for v in front], "--",
                color="#444444", linewidth=1, label="Pareto front")
    ax.set_xlabel("utility (mean headline metric of the utility tasks)")
    ax.set_ylabel("refusal rate on harmful prompts")
    ax.set_title("Safety vs utility (mean ± std over seeds; small dots: single runs)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_utility_drop(data: dict, path: str | Path) -> Path:
    """Utility drop vs skip ratio, one line per skipping variant (mean +- std, seeds as dots); full FT at ratio 0."""
    fig = _figure(7.0, 4.6)
    ax = fig.subplots()
    full = next((v for v in data["variants"] if v["variant"] == "full"), None)
    lines: dict[str, list[dict]] = {}
    for v in data["variants"]:
        if v["skip_ratio"] > 0:
            lines.setdefault(v["variant"], []).append(v)
    names = sorted(lines, key=lambda name: (VARIANT_ORDER.get(name, len(VARIANT_ORDER)), name))
    ratios = sorted({v["skip_ratio"] for v in data["variants"] if v["skip_ratio"] > 0})
    gap = min([b - a for a, b in zip(ratios, ratios[1:])] + [ratios[0] if ratios else 0.1])
    spread = 0.12 * gap  # seeds and variants at one skip ratio side by side, never overlapping the next ratio
    offsets = {name: (i - (len(names) - 1) / 2) * spread / max(1, len(names) - 1) for i, name in enumerate(names)}
    for name in names:
        points = sorted((v for v in lines[name] if v["utility_drop"]["mean"] is not None), key=lambda v: v["skip_ratio"])
        if full is not None and full["utility_drop"]["mean"] is not None:
            points = [full] + points
        xs = [p["skip_ratio"] + (offsets[name] if p is not full else 0) for p in points]
        ax.errorbar(xs, [p["utility_drop"]["mean"] for p in points], yerr=[p["utility_drop"]["std"] or 0 for p in points],
                    fmt="-" + marker(name), color=color(name), capsize=3, label=lines[name][0]["label"].split(" @ ")[0],
                    linewidth=2 if name in EMPHASIZED else 1, alpha=1.0 if name in EMPHASIZED else 0.6)
        for run in data["runs"]:
            if run["variant"] == name and run["utility_drop"] is not None:
                ax.scatter(run["skip_ratio"] + offsets[name], run["utility_drop"], s=10, alpha=0.35, color=color(name),
                           linewidths=0)
    ax.axhline(0.0, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xlabel("skip ratio (fraction of heads frozen; 0 = full fine-tuning)")
    ax.set_ylabel("utility drop vs base (lower is better)")
    ax.set_title("Utility drop vs skip ratio (mean ± std over seeds; dots: seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_validity(data: dict, path: str | Path) -> Path | None:
    """Measured benefit of skipping each tested head alone vs its score under the map's scoring option; None
    when the report has no validity scores."""
    validity = data["validity"]
    if not validity.get("available"):
        return None
    method = validity["map_score"]
    result = validity["methods"][method]
    fig = _figure(5.6, 4.2)
    ax = fig.subplots()
    xs = result["head_scores"]
    ys = [row["benefit"]["mean"] for row in validity["heads"]]
    ax.errorbar(xs, ys, yerr=[row["benefit"]["std"] or 0 for row in validity["heads"]], fmt="o", color=color("cast"),
                capsize=3)
    for x, y, row in zip(xs, ys, validity["heads"]):
        ax.annotate(f"L{row['head'][0]}H{row['head'][1]}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"{method} score")
    ax.set_ylabel("benefit of skipping the head alone\n(utility - full fine-tuning)")
    ax.set_title(f"Diagnosis validity ({method} score): Spearman rho {format_stat(result['rho'])} over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_conflict_map(conflict_map: dict | None, path: str | Path) -> Path | None:
    """The conflict map's OC / FS / score heatmaps (``ConflictMap.plot``) from the map JSON object embedded in
    experiments.json (``diagnosis.conflict_map``); None without one."""
    if conflict_map is None:
        return None
    from cast_lightning.conflict import ConflictMap

    return ConflictMap.from_dict(conflict_map, source="experiments.json diagnosis.conflict_map").plot(path)
