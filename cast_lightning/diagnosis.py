"""Diagnosis: safety and utility gradients on the attention heads -> a ConflictMap.

Two entry points share one engine (``HeadStatistics``):

* ``DiagnosisModule``, a LightningModule run by ``cast diagnose`` through ``trainer.predict`` (so every
  ``--trainer.*`` switch works; ``run_diagnosis`` is the call the CLI makes);
* ``diagnose(hf_model, safety_loader, utility_loader, **options)``, plain PyTorch, for tests and scripts.

What is measured (every choice is recorded in the map's ``options``):

* Loss of a batch = SUM over its samples of ``per_sample_loss`` (each sample's mean response-token
  cross-entropy). ``G_s``/``G_u`` are therefore sums of per-sample gradients: independent of the batch
  size and of how samples are split across ranks, so the map is the same on 1 or N devices.
* Gradients are taken with ``torch.autograd.grad`` w.r.t. the attention parameters only (all other
  parameters are frozen for the run, which saves the MLP/embedding/LM-head weight gradients), never
  with ``.backward()``: no optimizer state, no DDP reducer hooks, no ``.grad`` left behind.
* OC of head h is computed over the vector of exactly the slices that skipping head h alone freezes
  under ``kv_policy`` (the GQA policy the map is made for, the same option as ``CASTModule``'s): its query
  rows and output-projection columns, plus its KV group's key/value rows only under ``kv_policy="any"``
  (where one skipped head freezes the group's K/V). Under ``all`` (default) and ``never`` skipping one
  head leaves the shared K/V rows training, so their gradients say nothing about that head's skip
  decision and would only add a component common to every head of the group.
* FS ``taylor``: ``mean over utility samples of |dL_sample / d xi_h|`` for a gate ``xi_h`` on head h's
  output (Michel et al., 2019). Per sample it is ``sum_t <x[t, h], dL/dx[t, h]>`` where ``x`` is the input
  of the output projection (head h = features ``[h*d, (h+1)*d)``); ``x`` is captured by a forward
  pre-hook and ``dL/dx`` comes from the same ``autograd.grad`` call as the parameter gradients.
* FS ``ablation``: increase of the mean utility loss when head h's output is zeroed (forward pre-hook on
  the output projection). ``heads_per_pass`` heads are measured in one forward by repeating the batch,
  one head zeroed per copy: L*H/heads_per_pass forwards of heads_per_pass*B samples per batch.
  The free ``taylor`` FS is kept beside it in ``extra["fs_taylor"]``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from cast_lightning.conflict import (
    ALL_SCORES,
    ATTRIBUTION_SCORES,
    CONFLICT_VARIANTS,
    SELECTION_MODES,
    SENSITIVITY_VARIANTS,
    ConflictMap,
    check_finite,
    combine_scores,
    conflict_from_stats,
    select_heads,
    selection_rule,
)
from cast_lightning.data.formatting import IGNORE_INDEX, per_sample_loss
from cast_lightning.errors import CastError
from cast_lightning.heads import KV_POLICIES, HeadLayout
from cast_lightning.io import ensure_writable, shown_path
from cast_lightning.layers import LAYER_GAP_KEY, layer_gap, layer_prefix, locate_layers

SAFETY, UTILITY = 0, 1  # dataloader_idx of the two diagnosis loaders
LAYER_SCORERS = ("layer_gap",)  # per-layer scorers: recorded in the map's data, not as layers x heads grids
SCORERS = ATTRIBUTION_SCORES + LAYER_SCORERS
LAYER_GAP_RULE = ("M = max gap; none when M <= 0; start = first layer with gap >= layer_gap_fraction * M; l_inc = the "
                  "layer l >= 1 with the largest gap_l - gap_{l-1} (first on ties); located = start .. max(start, l_inc)")

DIAGNOSIS_TRAINER_DEFAULTS = {
    "inference_mode": False,  # gradients are needed inside predict_step
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


@dataclass
class DiagnosisOptions:
    """Every knob of a diagnosis; recorded verbatim in the map."""

    conflict: str = "cosine"
    sensitivity: str = "taylor"
    score: str = "product"
    weight_lambda: float = 0.5
    skip_ratio: float | None = 0.1
    top_k: int | None = None
    threshold: float | None = None
    kv_policy: str = "all"
    seed: int = 0
    heads_per_pass: int = 8
    scorers: tuple[str, ...] = ()
    ships_scale: float = 0.01
    snip_safety_top: float = 0.05
    snip_utility_top: float = 0.05
    selection_mode: str = "skip"
    layer_gap_fraction: float = 0.5

    def validate(self) -> DiagnosisOptions:
        self.scorers = tuple(dict.fromkeys(self.scorers))
        for option, value, choices in [
            ("conflict", self.conflict, CONFLICT_VARIANTS),
            ("sensitivity", self.sensitivity, SENSITIVITY_VARIANTS),
            ("score", self.score, ALL_SCORES),
            ("kv_policy", self.kv_policy, KV_POLICIES),
            ("selection_mode", self.selection_mode, SELECTION_MODES),
            *[("scorer", scorer, SCORERS) for scorer in self.scorers],
        ]:
            if value not in choices:
                raise CastError(f"unknown {option} {value!r}: use one of {', '.join(choices)}")
        if self.score in ATTRIBUTION_SCORES and self.score not in self.scorers:
            raise CastError(f"score {self.score} needs its attribution: add --model.scorers '[{self.score}]'")
        if not 0.0 <= self.ships_scale < 1.0:
            raise CastError(f"ships_scale {self.ships_scale} must be in [0, 1): the factor a head's output is scaled by")
        for name in ("snip_safety_top", "snip_utility_top"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise CastError(f"{name} {getattr(self, name)} must be in (0, 1]: the fraction of weights in the top set")
        if not 0.0 < self.layer_gap_fraction <= 1.0:
            raise CastError(f"layer_gap_fraction {self.layer_gap_fraction} must be in (0, 1]: the share of the largest "
                            f"cosine gap where the located layers start")
        if not 0.0 <= self.weight_lambda <= 1.0:
            raise CastError(f"weight_lambda {self.weight_lambda} is outside [0, 1]: choose the OC weight in [0, 1]")
        if self.heads_per_pass < 1:
            raise CastError(f"heads_per_pass {self.heads_per_pass} must be >= 1")
        selection_rule(self.skip_ratio, self.top_k, self.threshold)
        return self

    @property
    def include_kv(self) -> bool:
        """Whether a head's OC vector includes its KV group's k/v rows (only when skipping it freezes them)."""
        return self.kv_policy == "any"

    def record(self) -> dict:
        d = asdict(self)
        d.pop("seed")  # stored at the top level of the map
        d["selection"] = selection_rule(self.skip_ratio, self.top_k, self.threshold)
        d["oc_slices"] = "q rows + o columns" + (" + KV-group k/v rows" if self.include_kv else "")
        d["loss"] = "sum over samples of per-sample mean response-token cross-entropy"
        d["fs_definition"] = {
            "taylor": "mean over utility samples of |dL/d gate| on the head output",
            "ablation": "increase of mean utility loss with the head output zeroed",
        }[self.sensitivity]
        if self.sensitivity != "ablation" and "ships" not in self.scorers:
            d.pop("heads_per_pass")
        d["scorers"] = list(self.scorers)
        if "ships" not in self.scorers:
            d.pop("ships_scale")
        else:
            d["ships_definition"] = ("mean over safety samples of |L_s(head output scaled by ships_scale) - L_s|; "
                                     "score ships = -ships (the least safety-relevant heads are skipped first)")
        if "layer_gap" not in self.scorers:
            d.pop("layer_gap_fraction")
        else:
            d["layer_gap_definition"] = ("per decoder layer l, h_l = the layer's output at the last prompt token (utility "
                                         "prompts benign, safety prompts harmful): gap_l = mean over i != j of "
                                         "cos(benign_i, benign_j) - mean over i, j of cos(benign_i, harmful_j); "
                                         "in data.layer_gap")
            d["layer_gap_rule"] = LAYER_GAP_RULE
        if "snip" not in self.scorers:
            d.pop("snip_safety_top")
            d.pop("snip_utility_top")
        else:
            d["snip_definition"] = ("share of the head's OC slices' weights whose |W * G_s| is in the top snip_safety_top "
                                    "of all attention weights and whose |W * G_u| is not in the top snip_utility_top; "
                                    "score snip = -snip")
        return d


def _model_dtype(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def model_identity(model: torch.nn.Module, layout: HeadLayout, name: str | None = None) -> dict:
    """``name`` (as given, else the config's ``_name_or_path``), ``path`` when local (``io.shown_path``), dtype, layout."""
    name = name or getattr(model.config, "_name_or_path", None) or layout.architecture
    path = shown_path(name) if os.path.isdir(name) else None
    return {"name": str(name), "path": path, **layout.shape_dict(), "hidden_size": layout.hidden_size, "dtype": _model_dtype(model)}


class HeadStatistics:
    """Accumulates the per-head statistics of one diagnosis on one process.

    ``attach()`` freezes every non-attention parameter and installs the hooks; ``safety_batch`` /
    ``utility_batch`` consume batches (``input_ids``, ``attention_mask``, ``labels``); ``reduce(fn)`` sums
    every accumulator across processes with ``fn``; ``conflict_map()`` computes the map; ``detach()``
    restores the model. It is also a context manager (attach/detach).
    """

    def __init__(self, model: torch.nn.Module, layout: HeadLayout, options: DiagnosisOptions):
        self.model, self.layout, self.options = model, layout, options.validate()
        self._attached = False
        self._handles: list = []
        self._requires_grad: dict[str, bool] = {}
        self._captured: dict[int, torch.Tensor] | None = None
        self._ablation_masks: dict[int, torch.Tensor] | None = None
        self.timing = {"safety_s": 0.0, "utility_s": 0.0, "ablation_s": 0.0, "reduce_s": 0.0, "scores_s": 0.0}

    # -- setup ----------------------------------------------------------------------------------------------------

    def attach(self) -> HeadStatistics:
        if self._attached:
            return self
        params = dict(self.model.named_parameters())
        names = [n for n in self.layout.attention_parameter_names() if n in params]
        modules = dict(self.model.named_modules())
        proj = [self.layout.output_proj_name(layer) for layer in range(self.layout.num_layers)]
        missing = [n for n in proj if n not in modules] + [n for n in names if not isinstance(params[n], torch.Tensor)]
        if missing or not names:
            raise CastError(
                f"the model's attention modules are not where the {self.layout.architecture} layout expects them "
                f"({(missing or ['no attention parameters'])[0]}): diagnosis needs an unsharded model; use "
                f"--trainer.strategy ddp or a single device"
            )
        self._names = names
        self._params = [params[n] for n in names]
        device = self._params[0].device
        self._requires_grad = {n: p.requires_grad for n, p in params.items()}
        wanted = set(names)
        for n, p in params.items():
            p.requires_grad_(n in wanted)
        sizes = [p.numel() for p in self._params]
        total = sum(sizes)
        # One flat float32 buffer per objective: one all-reduce, views per parameter.
        self._flat_s = torch.zeros(total, dtype=torch.float32, device=device)
        self._flat_u = torch.zeros(total, dtype=torch.float32, device=device)
        self.grad_s = {n: v.view_as(p) for n, v, p in zip(names, self._flat_s.split(sizes), self._params)}
        self.grad_u = {n: v.view_as(p) for n, v, p in zip(names, self._flat_u.split(sizes), self._params)}
        shape = (self.layout.num_layers, self.layout.num_heads)
        stat_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        self.taylor_sum = torch.zeros(shape, dtype=stat_dtype, device=device)
        self.ablation_sum = torch.zeros(shape, dtype=stat_dtype, device=device)
        self.ships_sum = torch.zeros(shape, dtype=stat_dtype, device=device)
        # counts: safety samples, utility samples, safety tokens, utility tokens, safety loss sum, utility loss sum
        self.counts = torch.zeros(6, dtype=stat_dtype, device=device)
        # layer_gap: per objective (safety, utility) and layer, the sum of unit last-prompt-token hidden states.
        self.hidden_sum = torch.zeros(2, self.layout.num_layers, self.layout.hidden_size, dtype=stat_dtype, device=device)
        self._hidden: dict[int, torch.Tensor] | None = None
        for layer, name in enumerate(proj):
            self._handles.append(modules[name].register_forward_pre_hook(self._pre_hook(layer)))
        if "layer_gap" in self.options.scorers:
            for layer in range(self.layout.num_layers):
                block = modules.get(layer_prefix(self.layout, layer)[:-1])
                if block is None:
                    raise CastError(f"no decoder layer {layer_prefix(self.layout, layer)[:-1]} in the model: the layer gap "
                                    f"needs the {self.layout.architecture} layout's module names")
                self._handles.append(block.register_forward_hook(self._layer_hook(layer)))
        self._attached = True
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for n, p in self.model.named_parameters():
            if n in self._requires_grad:
                p.requires_grad_(self._requires_grad[n])
        self._requires_grad = {}
        self._attached = False

    def __enter__(self) -> HeadStatistics:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _pre_hook(self, layer: int) -> Callable:
        def hook(module, args):
            x = args[0]
            if self._captured is not None:
                self._captured[layer] = x
            if self._ablation_masks is not None and layer in self._ablation_masks:
                mask = self._ablation_masks[layer]  # (copies, H*d), 0 on the ablated head of each copy
                copies = mask.shape[0]
                x = (x.reshape(copies, -1, *x.shape[1:]) * mask.view(copies, 1, 1, -1).to(x.dtype)).reshape(x.shape)
                return (x, *args[1:])
            return None

        return hook

    def _layer_hook(self, layer: int) -> Callable:
        def hook(module, args, output):
            if self._hidden is not None:
                self._hidden[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def _add_hidden(self, batch: dict, valid: torch.Tensor, into: int) -> None:
        """Add the unit hidden state at each valid sample's last prompt token (the position before its first label)."""
        labels = batch["labels"]
        last = (labels != IGNORE_INDEX).int().argmax(dim=1) - 1
        rows = torch.arange(labels.shape[0], device=labels.device)
        for layer in range(self.layout.num_layers):
            h = self._hidden[layer][rows, last.clamp(min=0)].to(self.hidden_sum.dtype)
            h = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-30)
            self.hidden_sum[into, layer] += (h * valid[:, None].to(h.dtype)).sum(0)

    # -- per batch ------------------------------------------------------------------------------------------------

    def _losses(self, batch: dict) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        return per_sample_loss(out.logits, batch["labels"])

    @staticmethod
    def _valid(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["labels"][:, 1:] != IGNORE_INDEX
        return tokens.any(dim=1), tokens.sum()

    def _accumulate(self, batch: dict, grads_into: dict[str, torch.Tensor], capture: bool) -> tuple:
        if not self._attached:
            raise RuntimeError("HeadStatistics.attach() must be called before feeding batches")
        if torch.is_inference_mode_enabled():
            raise CastError("diagnosis needs gradients: run it with --trainer.inference_mode false (cast diagnose's default)")
        self._captured = {} if capture else None
        self._hidden = {} if "layer_gap" in self.options.scorers else None
        try:
            with torch.enable_grad():
                losses = self._losses(batch)
                captured = [self._captured[layer] for layer in range(self.layout.num_layers)] if capture else []
                grads = torch.autograd.grad(losses.sum(), self._params + captured, allow_unused=True)
            if self._hidden is not None:
                self._add_hidden(batch, self._valid(batch)[0], UTILITY if grads_into is self.grad_u else SAFETY)
        finally:
            self._captured = None
            self._hidden = None
        for name, g in zip(self._names, grads):
            if g is not None:
                grads_into[name].add_(g)
        valid, tokens = self._valid(batch)
        if capture:
            H, d = self.layout.num_heads, self.layout.head_dim
            for layer, (x, gx) in enumerate(zip(captured, grads[len(self._params) :])):
                if gx is None:
                    continue
                gate = (x.detach().float() * gx.float()).reshape(x.shape[0], -1, H, d).sum(dim=(1, 3))  # (B, H)
                self.taylor_sum[layer] += (gate.abs() * valid[:, None]).sum(0).to(self.taylor_sum.dtype)
        return losses.detach(), valid, tokens

    def safety_batch(self, batch: dict) -> None:
        start = time.perf_counter()
        losses, valid, tokens = self._accumulate(batch, self.grad_s, capture=False)
        self.counts[0] += valid.sum()
        self.counts[2] += tokens
        self.counts[4] += losses.float().sum()
        self.timing["safety_s"] += time.perf_counter() - start
        if "ships" in self.options.scorers:
            start = time.perf_counter()
            self._ablate(batch, valid, self.ships_sum, self.options.ships_scale, absolute=True)
            self.timing["ships_s"] = self.timing.get("ships_s", 0.0) + time.perf_counter() - start

    def utility_batch(self, batch: dict) -> None:
        start = time.perf_counter()
        losses, valid, tokens = self._accumulate(batch, self.grad_u, capture=True)
        self.counts[1] += valid.sum()
        self.counts[3] += tokens
        self.counts[5] += losses.float().sum()
        self.timing["utility_s"] += time.perf_counter() - start
        if self.options.sensitivity == "ablation":
            start = time.perf_counter()
            self._ablate(batch, valid, self.ablation_sum, 0.0)
            self.timing["ablation_s"] += time.perf_counter() - start

    @torch.no_grad()
    def _ablate(self, batch: dict, valid: torch.Tensor, into: torch.Tensor, scale: float, absolute: bool = False) -> None:
        """``into[l, h] += sum over valid samples of L(head (l, h)'s output scaled by scale) - L`` (its absolute
        value per sample with ``absolute``)."""
        H, d = self.layout.num_heads, self.layout.head_dim
        base = self._losses(batch)
        heads = [(layer, head) for layer in range(self.layout.num_layers) for head in range(H)]
        step = self.options.heads_per_pass
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if batch.get(k) is not None}
        for i in range(0, len(heads), step):
            chunk = heads[i : i + step]
            copies = len(chunk)
            masks: dict[int, torch.Tensor] = {}
            for c, (layer, head) in enumerate(chunk):
                if layer not in masks:
                    masks[layer] = torch.ones(copies, H * d, device=base.device)
                masks[layer][c, head * d : (head + 1) * d] = scale
            repeated = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
            self._ablation_masks = masks
            try:
                losses = self._losses(repeated).view(copies, -1)
            finally:
                self._ablation_masks = None
            change = losses - base[None]
            delta = ((change.abs() if absolute else change) * valid[None]).sum(dim=1).to(into.dtype)
            for c, (layer, head) in enumerate(chunk):
                into[layer, head] += delta[c]

    # -- results --------------------------------------------------------------------------------------------------

    def reduce(self, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Sum every accumulator across processes with ``fn`` (in place or returned); None = one process."""
        if fn is None:
            return
        start = time.perf_counter()
        small = torch.cat([self.counts, self.taylor_sum.reshape(-1), self.ablation_sum.reshape(-1), self.ships_sum.reshape(-1),
                           self.hidden_sum.reshape(-1)])
        for flat in (self._flat_s, self._flat_u):
            flat.copy_(fn(flat))
        small = fn(small)
        n, LH = self.counts.numel(), self.taylor_sum.numel()
        self.counts.copy_(small[:n])
        self.taylor_sum.copy_(small[n : n + LH].view_as(self.taylor_sum))
        self.ablation_sum.copy_(small[n + LH : n + 2 * LH].view_as(self.ablation_sum))
        self.ships_sum.copy_(small[n + 2 * LH : n + 3 * LH].view_as(self.ships_sum))
        self.hidden_sum.copy_(small[n + 3 * LH :].view_as(self.hidden_sum))
        self.timing["reduce_s"] += time.perf_counter() - start

    def _head_slices(self, layer: int, head: int) -> list:
        """The slices a head's statistics are taken over: those skipping it alone freezes (see ``include_kv``)."""
        slices = self.layout.query_slices(layer, head) + self.layout.output_slices(layer, head)
        if self.options.include_kv:
            slices += self.layout.kv_slices(layer, self.layout.kv_group(head))
        return [s for s in slices if s.name in self.grad_s]

    @torch.no_grad()
    def snip_shares(self) -> torch.Tensor:
        """Per head, the share of its weights in the SNIP set difference: |W * G_s| in the top ``snip_safety_top``
        of all attention weights and |W * G_u| not in the top ``snip_utility_top`` (float64, L x H)."""
        weights = torch.cat([p.detach().reshape(-1).float() for p in self._params])
        n = weights.numel()

        def top(importance: torch.Tensor, fraction: float) -> torch.Tensor:
            k = max(1, math.ceil(fraction * n))
            threshold = torch.kthvalue(importance.cpu(), n - k + 1).values.to(importance.device)  # k-th largest
            return importance >= threshold

        difference = (top((weights * self._flat_s).abs(), self.options.snip_safety_top)
                      & ~top((weights * self._flat_u).abs(), self.options.snip_utility_top)).float()
        views = dict(zip(self._names, (v.view_as(p) for v, p in zip(difference.split([p.numel() for p in self._params]), self._params))))
        shares = torch.zeros(self.layout.num_layers, self.layout.num_heads, dtype=torch.float64)
        for layer in range(self.layout.num_layers):
            for head in range(self.layout.num_heads):
                parts = [views[s.name].narrow(s.dim, s.start, s.stop - s.start) for s in self._head_slices(layer, head)]
                shares[layer, head] = float(sum(p.sum() for p in parts)) / max(sum(p.numel() for p in parts), 1)
        return shares

    def head_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head ``<G_s, G_u>``, ``||G_s||^2``, ``||G_u||^2`` over the head's slices (float64, L x H)."""
        Lh, H = self.layout.num_layers, self.layout.num_heads
        acc_dtype = self.taylor_sum.dtype  # float64 where the device has it
        acc = torch.zeros(Lh, H, 3, dtype=acc_dtype, device=self._flat_s.device)
        for layer in range(Lh):
            for head in range(H):
                for s in self._head_slices(layer, head):
                    a = self.grad_s[s.name].narrow(s.dim, s.start, s.stop - s.start).to(acc_dtype)
                    b = self.grad_u[s.name].narrow(s.dim, s.start, s.stop - s.start).to(acc_dtype)
                    acc[layer, head] += torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()])
        acc = acc.double().cpu()  # one device-to-host copy
        return acc[..., 0], acc[..., 1], acc[..., 2]

    def conflict_map(self, name: str | None = None, timing: dict | None = None, world_size: int = 1) -> ConflictMap:
        start = time.perf_counter()
        counts = self.counts.double().cpu()
        n_safety, n_utility = int(counts[0]), int(counts[1])
        if n_safety == 0 or n_utility == 0:
            empty = "safety" if n_safety == 0 else "utility"
            raise CastError(f"the {empty} diagnosis set has no sample with response tokens: give non-empty --data.{empty}_files")
        dot, ss, uu = self.head_stats()
        oc = conflict_from_stats(dot, ss, uu, self.options.conflict)
        fs_taylor = self.taylor_sum.double().cpu() / n_utility
        fs_ablation = self.ablation_sum.double().cpu() / n_utility
        fs = fs_ablation if self.options.sensitivity == "ablation" else fs_taylor
        extra = {"fs_taylor": fs_taylor} if self.options.sensitivity == "ablation" else {}
        if "ships" in self.options.scorers:
            extra["ships"] = self.ships_sum.double().cpu() / n_safety
        if "snip" in self.options.scorers:
            extra["snip"] = self.snip_shares()
        check_finite(safety_grad_sq_norm=ss, utility_grad_sq_norm=uu, grad_dot=dot, oc=oc, fs=fs, **extra)
        o = self.options
        score = combine_scores(oc, fs, o.score, o.weight_lambda, o.seed, extra)
        skip = select_heads(score, o.skip_ratio, o.top_k, o.threshold, o.seed, o.selection_mode)
        data = {}
        if "layer_gap" in o.scorers:
            record = layer_gap(self.hidden_sum[UTILITY].cpu(), n_utility, self.hidden_sum[SAFETY].cpu(), n_safety)
            if not all(math.isfinite(v) for v in record["gap"]):
                raise CastError("the layer gap is not finite (NaN/inf hidden states): run in float32 (--model.dtype float32)")
            data[LAYER_GAP_KEY] = {**record, "located": locate_layers(record["gap"], o.layer_gap_fraction),
                                   "fraction": o.layer_gap_fraction, "rule": LAYER_GAP_RULE,
                                   "benign": "utility prompts", "harmful": "safety prompts"}
        self.timing["scores_s"] += time.perf_counter() - start
        return ConflictMap(
            model=model_identity(self.model, self.layout, name),
            oc=oc,
            fs=fs,
            score=score,
            skip=skip,
            options=o.record(),
            data={
                "safety_samples": n_safety,
                "utility_samples": n_utility,
                "safety_tokens": int(counts[2]),
                "utility_tokens": int(counts[3]),
                "safety_loss": float(counts[4] / n_safety),
                "utility_loss": float(counts[5] / n_utility),
                "world_size": int(world_size),
                **data,
            },
            seed=o.seed,
            timing={**{k: round(v, 4) for k, v in self.timing.items()}, **(timing or {})},
            extra=extra,
        )


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _dist_sum() -> Callable[[torch.Tensor], torch.Tensor] | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    return reduce


def write_map(conflict_map: ConflictMap, output: str | os.PathLike, plot: bool = True) -> Path:
    """Write ``conflict_map.json`` (and the ``.png`` heatmap beside it) atomically; returns the JSON path."""
    path = Path(output)
    conflict_map.to_json(path)
    if plot:
        conflict_map.plot(path.with_suffix(".png"))
    return path


def diagnose(
    model: torch.nn.Module,
    safety_loader: Iterable[dict],
    utility_loader: Iterable[dict],
    *,
    name: str | None = None,
    output: str | os.PathLike | None = None,
    plot: bool = True,
    **options,
) -> ConflictMap:
    """Plain-PyTorch diagnosis of an HF causal LM: returns (and, with ``output``, writes) the ConflictMap.

    ``options`` are the ``DiagnosisOptions`` fields (conflict, sensitivity, score, weight_lambda,
    skip_ratio, top_k, threshold, kv_policy, seed, heads_per_pass). Under an initialized
    ``torch.distributed`` group, statistics are summed across ranks and only rank 0 writes.
    """
    opts = DiagnosisOptions(**options).validate()
    if output is not None:  # fail before the gradients, not after
        ensure_writable(output, "output")
    layout = HeadLayout.from_model(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    reduce = _dist_sum()
    try:
        with HeadStatistics(model, layout, opts) as stats:
            for batch in safety_loader:
                stats.safety_batch(_to_device(batch, device))
            for batch in utility_loader:
                stats.utility_batch(_to_device(batch, device))
            stats.reduce(reduce)
            world = torch.distributed.get_world_size() if reduce else 1
            conflict_map = stats.conflict_map(name, world_size=world)
    finally:
        model.train(was_training)
    conflict_map.timing["total_s"] = round(time.perf_counter() - start, 4)
    if output is not None and (reduce is None or torch.distributed.get_rank() == 0):
        write_map(conflict_map, output, plot)
    return conflict_map


class DiagnosisModule(L.LightningModule):
    """Diagnose a causal LM before safety fine-tuning: per-head conflict map -> conflict_map.json + .png.

    Run by ``cast diagnose`` with ``trainer.predict`` over two dataloaders, safety (index 0) then utility
    (index 1). The statistics are summed across ranks at the end, so any ``--trainer.devices`` /
    ``--trainer.strategy ddp`` gives the same map as one process.

    Args:
        pretrained: Hugging Face hub name or local directory of the causal LM to diagnose.
        dtype: Weight dtype: float32, bfloat16 or float16 (statistics accumulate in float32/float64).
        attn_implementation: Attention implementation passed to transformers (eager, sdpa, flash_attention_2).
        trust_remote_code: Allow the model repository's own code to run (off by default).
        conflict: Optimization Conflict: cosine = -cos(G_s, G_u); projection = -<G_s, G_u>/||G_u||.
        sensitivity: Functional Sensitivity: taylor = E|dL_u/d gate| (free, same backward); ablation = exact
            utility-loss increase with the head zeroed (L*H/heads_per_pass extra forwards per batch).
        score: How OC and FS combine: product = relu(OC)*FS/max FS; weighted = lambda*z(OC)+(1-lambda)*z(FS);
            rank = mean rank; oc; fs; random = seeded uniform scores (the budget-matched control); ships, snip =
            minus that attribution (needs it in scorers).
        weight_lambda: OC weight of the weighted score, in [0, 1].
        skip_ratio: Fraction of all heads to skip (at least one when > 0); ignored when top_k or threshold is set.
        top_k: Skip exactly this many heads (highest scores).
        threshold: Skip every head whose score is >= this value.
        kv_policy: GQA policy the map is made for (use the same in fit): any = skipping a head freezes its KV
            group's k/v rows, so they enter the head's OC; all (default) / never = OC over q rows + o columns only.
        seed: Seed of the random score and of tie-breaking among equal scores.
        heads_per_pass: Heads ablated per forward pass (ablation, ships): the batch is repeated this many times.
        scorers: Neighbouring methods' head scores computed beside OC/FS and kept in the map (usable as --model.score
            here and by the study's variants): ships = mean absolute safety-loss change when the head's output is scaled by
            ships_scale (on the safety set: harmful prompt -> refusal); snip = share of the head's weights whose SNIP
            importance |W * G| is in the top snip_safety_top for safety and not in the top snip_utility_top for utility;
            layer_gap = per layer, the cosine gap between benign (utility) and harmful (safety) prompts' last-prompt-token
            hidden states and the located layer range (map data.layer_gap; cast fit --model.skip_layers from_map).
        ships_scale: Factor a head's output is scaled by for ships (a small epsilon; 0 = removed).
        snip_safety_top: Fraction of all attention weights in the top SNIP set for safety.
        snip_utility_top: Fraction of all attention weights in the top SNIP set for utility.
        layer_gap_fraction: layer_gap: the located layers start at the first layer whose cosine gap reaches this share
            of the largest gap (docs/formulas.md, "Layer freezing").
        selection_mode: skip = freeze the selected (highest-score) heads; train_only = train only the k lowest-score
            heads (for ships/snip: the most safety-relevant) and freeze every other head.
        output: Path of conflict_map.json (the .png goes beside it); default <trainer.default_root_dir>/conflict_map.json.
        plot: Also write the conflict_map.png heatmap.
    """

    def __init__(
        self,
        pretrained: str,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        conflict: Literal["cosine", "projection"] = "cosine",
        sensitivity: Literal["taylor", "ablation"] = "taylor",
        score: Literal["product", "weighted", "rank", "oc", "fs", "random", "ships", "snip"] = "product",
        weight_lambda: float = 0.5,
        skip_ratio: float | None = 0.1,
        top_k: int | None = None,
        threshold: float | None = None,
        kv_policy: Literal["all", "any", "never"] = "all",
        seed: int = 0,
        heads_per_pass: int = 8,
        scorers: list[Literal["ships", "snip", "layer_gap"]] | None = None,
        ships_scale: float = 0.01,
        snip_safety_top: float = 0.05,
        snip_utility_top: float = 0.05,
        selection_mode: Literal["skip", "train_only"] = "skip",
        layer_gap_fraction: float = 0.5,
        output: str | None = None,
        plot: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.options = DiagnosisOptions(
            conflict=conflict, sensitivity=sensitivity, score=score, weight_lambda=weight_lambda,
            skip_ratio=skip_ratio, top_k=top_k, threshold=threshold, kv_policy=kv_policy, seed=seed,
            heads_per_pass=heads_per_pass, scorers=tuple(scorers or ()), ships_scale=ships_scale,
            snip_safety_top=snip_safety_top, snip_utility_top=snip_utility_top, selection_mode=selection_mode,
            layer_gap_fraction=layer_gap_fraction,
        ).validate()
        from cast_lightning.loading import load_causal_lm

        self.pretrained, self.output, self.plot = pretrained, output, plot
        self.model = load_causal_lm(pretrained, dtype, attn_implementation, trust_remote_code)
        self.layout = HeadLayout.from_model(self.model)
        self.conflict_map: ConflictMap | None = None
        self.output_path: Path | None = None
        self._stats: HeadStatistics | None = None
        self._start = 0.0

    def forward(self, **batch):
        return self.model(**batch)

    def resolve_output(self, default_root_dir: str | os.PathLike) -> Path:
        """Where the map goes: ``output``, else ``<default_root_dir>/conflict_map.json``."""
        return Path(self.output or Path(default_root_dir) / "conflict_map.json")

    def configure_model(self) -> None:
        """Under ``configs/strategy/fsdp2.yaml`` (ModelParallelStrategy, which requires this hook) the model is kept
        whole on every rank and the diagnosis runs data-parallel, like DDP: it holds no optimizer state and only the
        attention gradients, and ``autograd.grad`` needs unsharded parameters. The statistics are summed across ranks
        in ``on_predict_end``, so the map equals the single-process one."""

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise CastError("diagnosis needs gradients: run it with --trainer.inference_mode false (cast diagnose's default)")
        self._start = time.perf_counter()
        self._stats = HeadStatistics(self.model, self.layout, self.options).attach()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        try:
            if dataloader_idx == SAFETY:
                self._stats.safety_batch(batch)
            elif dataloader_idx == UTILITY:
                self._stats.utility_batch(batch)
            else:
                raise CastError(f"diagnosis takes two dataloaders (safety, utility), got dataloader index {dataloader_idx}")
        except BaseException:
            self.teardown("predict")  # Lightning calls no module hook on failure: restore the model here
            raise

    def on_predict_end(self) -> None:
        stats, strategy = self._stats, self.trainer.strategy
        try:
            stats.reduce(lambda t: strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t)
            self.conflict_map = stats.conflict_map(self.pretrained, world_size=self.trainer.world_size)
        finally:
            stats.detach()
            self._stats = None
        self.conflict_map.timing["total_s"] = round(time.perf_counter() - self._start, 4)
        self.output_path = self.resolve_output(self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            write_map(self.conflict_map, self.output_path, self.plot)
        strategy.barrier("cast_diagnosis_written")

    def teardown(self, stage: str) -> None:
        if self._stats is not None:  # an interrupted run: restore the model
            self._stats.detach()
            self._stats = None


def run_diagnosis(model: DiagnosisModule, datamodule, trainer: L.Trainer) -> ConflictMap:
    """What ``cast diagnose`` calls after ``LightningCLI(DiagnosisModule, SafetyUtilityDataModule, run=False,
    trainer_defaults=DIAGNOSIS_TRAINER_DEFAULTS)``: predict over [safety, utility] and return the map
    (written to ``model.output_path`` by rank 0)."""
    if getattr(trainer, "predict_loop", None) is not None and trainer.predict_loop.inference_mode:
        raise CastError("diagnosis needs gradients: run it with --trainer.inference_mode false")
    if trainer.is_global_zero:
        # Before any gradient is taken: an unwritable output must not cost a finished diagnosis.
        output = model.resolve_output(trainer.default_root_dir)
        ensure_writable(output, "--model.output")
        if model.plot:
            ensure_writable(output.with_suffix(".png"), "--model.output")
    loaders = datamodule.diagnosis_dataloaders()
    if len(loaders) != 2:
        raise CastError(f"diagnosis_dataloaders() must return [safety, utility], got {len(loaders)} loaders")
    trainer.predict(model, dataloaders=list(loaders), return_predictions=False)
    return model.conflict_map
