"""ConflictMap: per-head conflict scores, head selection, JSON I/O and the heatmap.

Everything here is pure arithmetic on small ``layers x heads`` arrays; gathering the statistics from
a model is ``diagnosis.py``'s job. The formulation:

* **Optimization Conflict** of head h, over the vector of head h's gradient slices:
  ``cosine`` (default) ``OC = -cos(G_s, G_u)`` in [-1, 1]; ``projection`` ``OC = -<G_s, G_u> / ||G_u||``.
  Positive means a safety step raises the utility loss to first order.
* **Functional Sensitivity** FS >= 0 comes from the diagnosis (``taylor`` or ``ablation``).
* **Score** ``combine_scores``: ``product`` (default) ``relu(OC) * relu(FS) / max relu(FS)``; ``weighted``
  ``lambda * z(OC) + (1 - lambda) * z(FS)``; ``rank`` mean of the normalised ranks of OC and FS; ``oc``;
  ``fs``; ``random`` (uniform scores from ``seed``: the budget-matched control).
* **Selection** ``select_heads``: the ``top_k`` highest scores, or ``round(skip_ratio * L * H)`` of them
  (at least one when ``skip_ratio > 0``), or every head with ``score >= threshold``. Ties are broken by
  a permutation drawn from ``seed``, so equal scores never favour low layer indices.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cast_lightning.errors import CastError
from cast_lightning.io import atomic_save, atomic_write_json

SCHEMA_VERSION = 1

CONFLICT_VARIANTS = ("cosine", "projection")
SENSITIVITY_VARIANTS = ("taylor", "ablation")
SCORE_METHODS = ("product", "weighted", "rank", "oc", "fs", "random")  # computed from OC and FS alone
# Neighbouring methods' head scores, computed by the diagnosis when asked (``scorers``) and kept in the map's
# ``extra`` grids: ``ships`` (mean absolute safety-loss change when the head's output is scaled down) and ``snip`` (share of the
# head's weights in the top SNIP set for safety and not for utility).
ATTRIBUTION_SCORES = ("ships", "snip")
ALL_SCORES = SCORE_METHODS + ATTRIBUTION_SCORES
SELECTION_MODES = ("skip", "train_only")

# The layout fields a map must share with the model it is applied to.
IDENTITY_KEYS = ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")

_EPS = 1e-30


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CastError(f"unknown {option} {value!r}: use one of {', '.join(choices)}")


# -- scores -----------------------------------------------------------------------------------------------------------


def conflict_from_stats(dot, ss, uu, variant: str = "cosine") -> torch.Tensor:
    """OC from per-head sufficient statistics ``<G_s, G_u>``, ``||G_s||^2``, ``||G_u||^2`` (any shape).

    A head with a zero gradient on either objective has no direction to conflict with: OC = 0.
    """
    _check_choice("conflict", variant, CONFLICT_VARIANTS)
    dot, ss, uu = (torch.as_tensor(x, dtype=torch.float64) for x in (dot, ss, uu))
    if variant == "cosine":
        return -dot / (ss.sqrt() * uu.sqrt()).clamp_min(_EPS)
    return -dot / uu.sqrt().clamp_min(_EPS)


def optimization_conflict(gs, gu, variant: str = "cosine") -> torch.Tensor:
    """OC of gradient vectors on the last dimension: ``gs``, ``gu`` of shape (..., P) -> (...).

    ``cosine``: ``-cos(gs, gu)`` (identical -> -1, opposite -> +1, orthogonal -> 0);
    ``projection``: ``-<gs, gu> / ||gu||`` (the first-order utility-loss increase per unit safety step along gu).
    """
    gs, gu = torch.as_tensor(gs, dtype=torch.float64), torch.as_tensor(gu, dtype=torch.float64)
    return conflict_from_stats((gs * gu).sum(-1), (gs * gs).sum(-1), (gu * gu).sum(-1), variant)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std(unbiased=False)
    if not torch.isfinite(std) or std <= 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def _normalised_rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank) scaled to [0, 1]; highest value -> 1."""
    from scipy.stats import rankdata

    flat = x.reshape(-1).numpy()
    ranks = torch.as_tensor(rankdata(flat, method="average") - 1.0, dtype=torch.float64)
    return (ranks / max(flat.size - 1, 1)).view(x.shape)


def combine_scores(oc, fs, method: str = "product", lam: float = 0.5, seed: int = 0, extra: dict | None = None) -> torch.Tensor:
    """Per-head score ``S = combine(OC, FS)`` (shape of ``oc``); higher = more worth skipping.

    ``ships`` and ``snip`` take the diagnosis's attribution grid of that name from ``extra`` and negate it: a head
    that matters least for safety is the most worth skipping (and, under ``train_only`` selection, the heads that
    matter most are the ones trained).
    """
    _check_choice("score", method, ALL_SCORES)
    oc, fs = torch.as_tensor(oc, dtype=torch.float64), torch.as_tensor(fs, dtype=torch.float64)
    if oc.shape != fs.shape:
        raise CastError(f"OC shape {tuple(oc.shape)} differs from FS shape {tuple(fs.shape)}")
    if method in ATTRIBUTION_SCORES:
        if not extra or method not in extra:
            raise CastError(
                f"score {method} needs the diagnosis's {method} attribution: run cast diagnose with "
                f"--model.scorers '[{method}]'"
            )
        values = torch.as_tensor(extra[method], dtype=torch.float64)
        if values.shape != oc.shape:
            raise CastError(f"{method} shape {tuple(values.shape)} differs from OC shape {tuple(oc.shape)}")
        return -values
    if method == "product":
        fs_pos = fs.clamp_min(0)  # an ablation FS < 0 (removing the head helps) means "not depended on"
        top = fs_pos.max() if fs_pos.numel() else torch.tensor(0.0, dtype=torch.float64)
        return oc.clamp_min(0) * (fs_pos / top if top > 0 else torch.zeros_like(fs_pos))
    if method == "weighted":
        if not 0.0 <= lam <= 1.0:
            raise CastError(f"weight_lambda {lam} is outside [0, 1]: choose the OC weight in [0, 1]")
        return lam * _zscore(oc) + (1.0 - lam) * _zscore(fs)
    if method == "rank":
        return (_normalised_rank(oc) + _normalised_rank(fs)) / 2
    if method == "oc":
        return oc.clone()
    if method == "fs":
        return fs.clone()
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(oc.shape, generator=generator, dtype=torch.float64)


def selection_rule(skip_ratio: float | None = None, top_k: int | None = None, threshold: float | None = None) -> dict:
    """The one selection rule in force: ``top_k`` or ``threshold`` when given (not both), else ``skip_ratio``."""
    if top_k is not None and threshold is not None:
        raise CastError("both top_k and threshold are set: give only one head-selection rule")
    if top_k is not None:
        if int(top_k) < 0:
            raise CastError(f"top_k {top_k} is negative: give the number of heads to skip (>= 0)")
        return {"rule": "top_k", "top_k": int(top_k)}
    if threshold is not None:
        return {"rule": "threshold", "threshold": float(threshold)}
    ratio = 0.0 if skip_ratio is None else float(skip_ratio)
    if not 0.0 <= ratio <= 1.0:
        raise CastError(f"skip_ratio {skip_ratio} is outside [0, 1]: give the fraction of heads to skip")
    return {"rule": "skip_ratio", "skip_ratio": ratio}


def select_heads(
    score,
    skip_ratio: float | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    seed: int = 0,
    mode: str = "skip",
) -> list[list[int]]:
    """The heads to skip, highest score first, as ``[layer, head]`` pairs (see ``selection_rule``).

    ``mode="train_only"`` turns the rule around: it picks the k heads to *train* (the k lowest scores) and returns
    every other head, so only the picked heads' attention slices train (a threshold means the same in both modes).
    """
    _check_choice("selection mode", mode, SELECTION_MODES)
    score = torch.as_tensor(score, dtype=torch.float64)
    if score.dim() != 2:
        raise CastError(f"score must be a layers x heads array, got shape {tuple(score.shape)}")
    rule = selection_rule(skip_ratio, top_k, threshold)
    num_layers, num_heads = score.shape
    n = num_layers * num_heads
    flat = score.reshape(-1).numpy()
    tiebreak = np.random.default_rng(int(seed)).permutation(n)
    order = np.lexsort((tiebreak, -flat))  # by score descending, ties in a seeded random order
    if rule["rule"] == "threshold":  # the same in both modes: heads below the threshold train
        chosen = [int(i) for i in order if flat[i] >= rule["threshold"]]
    else:
        if rule["rule"] == "top_k":
            k = rule["top_k"]
            if k > n:
                raise CastError(f"top_k {k} exceeds the model's {n} heads: choose top_k <= {n}")
        else:
            ratio = rule["skip_ratio"]
            k = max(1, round(ratio * n)) if ratio > 0 else 0
        chosen = [int(i) for i in order[: (n - k if mode == "train_only" else k)]]
    return [[i // num_heads, i % num_heads] for i in chosen]


def nonfinite_heads(values) -> list[list[int]]:
    """``[layer, head]`` of every entry of a layers x heads array that is NaN or infinite."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return [[int(layer), int(head)] for layer, head in (~torch.isfinite(values)).nonzero().tolist()]


def check_finite(**arrays) -> None:
    """Raise a one-line CastError naming every head whose statistics are NaN/inf (by statistic)."""
    problems = []
    for name, values in arrays.items():
        heads = nonfinite_heads(values)
        if heads:
            shown = ", ".join(f"[{layer}, {head}]" for layer, head in heads[:16])
            more = f" and {len(heads) - 16} more" if len(heads) > 16 else ""
            problems.append(f"{name} at {len(heads)} head(s) {shown}{more}")
    if problems:
        raise CastError(
            "non-finite diagnosis statistics (NaN/inf): " + "; ".join(problems)
            + ": check the diagnosis data and run in float32 (--model.dtype float32)"
        )


# -- the map ----------------------------------------------------------------------------------------------------------


def _grid(values) -> list[list[float]]:
    return [[float(v) for v in row] for row in torch.as_tensor(values, dtype=torch.float64).tolist()]


@dataclass
class ConflictMap:
    """A diagnosis result: per-head OC, FS and score (layers x heads), the heads to skip, and provenance.

    ``model`` holds ``name`` (what was passed as pretrained), ``path`` (absolute directory, or None for a
    hub name) and the ``HeadLayout.shape_dict()`` identity. ``options`` records every diagnosis option,
    ``data`` the sample/token counts, ``timing`` seconds per phase. ``extra`` holds further named
    layers x heads arrays (e.g. ``fs_taylor`` when the map's FS is ``ablation``).
    """

    model: dict
    oc: list[list[float]]
    fs: list[list[float]]
    score: list[list[float]]
    skip: list[list[int]]
    options: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    seed: int = 0
    timing: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.oc, self.fs, self.score = _grid(self.oc), _grid(self.fs), _grid(self.score)
        self.extra = {name: _grid(values) for name, values in self.extra.items()}
        self.skip = [[int(layer), int(head)] for layer, head in self.skip]
        self.validate()

    # -- shape ----------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.model["num_heads"])

    @property
    def skip_heads(self) -> list[tuple[int, int]]:
        """The skipped heads as ``(layer, head)`` tuples."""
        return [(layer, head) for layer, head in self.skip]

    def identity(self) -> dict:
        return {key: self.model.get(key) for key in IDENTITY_KEYS}

    def validate(self, source: str = "conflict map") -> None:
        missing = [key for key in IDENTITY_KEYS if key not in self.model]
        if missing:
            raise CastError(f"{source} lacks model fields {', '.join(missing)}: re-run cast diagnose to rewrite it")
        shape = (self.num_layers, self.num_heads)
        for name, values in [("oc", self.oc), ("fs", self.fs), ("score", self.score), *self.extra.items()]:
            if len(values) != shape[0] or any(len(row) != shape[1] for row in values):
                raise CastError(
                    f"{source}: {name} is not a {shape[0]} x {shape[1]} (layers x heads) array: re-run cast diagnose to rewrite it"
                )
        for layer, head in self.skip:
            if not (0 <= layer < shape[0] and 0 <= head < shape[1]):
                raise CastError(f"{source}: skipped head [{layer}, {head}] is outside {shape[0]} x {shape[1]}: re-run cast diagnose")

    def check_layout(self, layout) -> ConflictMap:
        """Fail clearly unless the map was computed for a model with ``layout``'s architecture and shape."""
        mine, theirs = self.identity(), {key: layout.shape_dict()[key] for key in IDENTITY_KEYS}
        if mine != theirs:
            def describe(d: dict) -> str:
                return (
                    f"{d['architecture']} {d['num_layers']} layers x {d['num_heads']} heads "
                    f"({d['num_kv_heads']} KV heads, head_dim {d['head_dim']})"
                )

            name = self.model.get("name") or "another model"
            raise CastError(
                f"conflict map was computed for {name}: {describe(mine)}, but this model is {describe(theirs)}: "
                f"run cast diagnose on this model"
            )
        return self

    # -- re-scoring -----------------------------------------------------------------------------------------------

    def rescore(
        self,
        score: str | None = None,
        weight_lambda: float | None = None,
        skip_ratio: float | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        seed: int | None = None,
        selection_mode: str | None = None,
    ) -> ConflictMap:
        """A copy with the score and the selection recomputed from this map's OC and FS (no new diagnosis).

        Options left as None keep this map's values; giving any selection rule replaces the old rule.
        Used to derive CAST at several skip ratios, OC-only, FS-only and random controls from one diagnosis.
        """
        options = dict(self.options)
        method = score or options.get("score", "product")
        lam = options.get("weight_lambda", 0.5) if weight_lambda is None else weight_lambda
        seed = self.seed if seed is None else seed
        if skip_ratio is None and top_k is None and threshold is None:
            skip_ratio, top_k, threshold = options.get("skip_ratio"), options.get("top_k"), options.get("threshold")
        mode = selection_mode or options.get("selection_mode", "skip")
        new_score = combine_scores(self.oc, self.fs, method, lam, seed, self.extra)
        skip = select_heads(new_score, skip_ratio, top_k, threshold, seed, mode)
        options.update(
            score=method, weight_lambda=lam, skip_ratio=skip_ratio, top_k=top_k, threshold=threshold,
            selection=selection_rule(skip_ratio, top_k, threshold), selection_mode=mode,
        )
        data = {**asdict(self), "score": new_score, "skip": skip, "options": options, "seed": seed}
        data.pop("created")
        return ConflictMap(**data)

    # -- I/O ------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"schema_version": d.pop("schema_version"), **d}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the map atomically (temp file + rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, source: str = "conflict map") -> ConflictMap:
        if not isinstance(d, dict):
            raise CastError(f"{source} is not a JSON object: give a conflict_map.json written by cast diagnose")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CastError(
                f"{source} has schema version {version!r}, this cast reads version {SCHEMA_VERSION}: "
                f"re-run cast diagnose to rewrite it"
            )
        known = set(cls.__dataclass_fields__)
        missing = [key for key in ("model", "oc", "fs", "score", "skip") if key not in d]
        if missing:
            raise CastError(f"{source} lacks {', '.join(missing)}: re-run cast diagnose to rewrite it")
        try:
            m = cls(**{key: value for key, value in d.items() if key in known})
        except CastError:
            raise
        except (TypeError, ValueError, KeyError) as error:
            raise CastError(f"{source} is malformed ({error}): re-run cast diagnose to rewrite it") from error
        m.validate(source)
        return m

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ConflictMap:
        """Read a map written by ``to_json``; a missing, malformed or foreign-version file is a CastError."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as error:
            raise CastError(f"conflict map {path} does not exist: run cast diagnose first or fix the path") from error
        except OSError as error:
            raise CastError(f"cannot read conflict map {path}: {error.strerror}") from error
        try:
            d = json.loads(text)
        except json.JSONDecodeError as error:
            raise CastError(
                f"conflict map {path} is not valid JSON (line {error.lineno}): re-run cast diagnose to rewrite it"
            ) from error
        return cls.from_dict(d, source=f"conflict map {path}")

    # -- heatmap --------------------------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write a PNG: OC, FS and score as layers x heads heatmaps, each with a colour bar; skipped heads boxed."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
        from matplotlib.patheffects import withStroke

        L, H = self.num_layers, self.num_heads
        oc, fs, score = (np.asarray(v, dtype=float) for v in (self.oc, self.fs, self.score))
        cell = min(0.45, max(0.08, 6.0 / max(H, L)))
        width = max(3.2, H * cell + 1.6)
        height = max(2.6, L * cell + 1.4)
        fig = Figure(figsize=(3 * width, height), layout="constrained")  # no pyplot: no global backend state
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3)
        bound = max(float(np.nanmax(np.abs(oc))) if oc.size else 1.0, 1e-12)
        if self.options.get("conflict", "cosine") == "cosine":
            bound = 1.0
        panels = [
            (f"Optimization Conflict ({self.options.get('conflict', 'cosine')})", oc, "RdBu_r", -bound, bound),
            (f"Functional Sensitivity ({self.options.get('sensitivity', 'taylor')})", fs, "viridis", None, None),
            (f"score ({self.options.get('score', 'product')}), {len(self.skip)} skipped", score, "magma", None, None),
        ]
        for ax, (name, values, cmap, vmin, vmax) in zip(axes, panels):
            image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            fig.colorbar(image, ax=ax, shrink=0.9)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            step_h, step_l = max(1, math.ceil(H / 16)), max(1, math.ceil(L / 16))
            ax.set_xticks(range(0, H, step_h))
            ax.set_yticks(range(0, L, step_l))
            for layer, head in self.skip:  # black under white: visible on every colour map
                for color, width in (("black", 2.8), ("white", 1.3)):
                    ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=width))
                ax.plot(head, layer, marker="x", color="white", markersize=min(8, 60 * cell), markeredgewidth=1.2,
                        path_effects=[withStroke(linewidth=2.6, foreground="black")])
        name = self.model.get("name") or self.model.get("architecture")
        fig.suptitle(title or f"CAST conflict map: {name} (skipped heads: boxed x)", fontsize=10)

        def write(tmp: str) -> None:
            fig.savefig(tmp, format="png", dpi=110)

        return atomic_save(path, write)
