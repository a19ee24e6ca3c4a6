"""PCGrad as a training variant (``--model.pcgrad off | global | per_tensor``): the safety and the utility-replay
gradients of a step are kept apart, and where they conflict the safety gradient is projected onto the normal plane of
the utility gradient (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning", one-sided: only the safety
gradient is projected). The update is ``g = s' + u`` (docs/formulas.md, "PCGrad").

* ``part_losses``: a fit batch's HF loss (the mean over all its response tokens) split exactly into its safety part
  and its utility part by the batch's ``is_utility`` rows: ``loss = safety_part + utility_part``, so with no conflict
  ``s + u`` is the gradient of the default loss.
* ``project``: the projection, globally (all trainable tensors as one vector) or per parameter tensor, with the
  statistics that are logged (``pcgrad/conflict_fraction``, ``pcgrad/cosine``).

How ``CASTModule`` uses it (automatic optimization throughout): ``training_step`` takes the safety part's gradient
with ``torch.autograd.grad`` (retaining the graph; divided by the accumulation count as Lightning divides the loss)
into ``SafetyGradients`` and returns the utility part, which Lightning back-propagates into ``.grad`` as usual (with
accumulation, DDP's no_sync and its all-reduce). ``on_before_optimizer_step`` (after the last micro-batch's backward,
before clipping) averages the safety buffer across ranks, zeroes the skipped heads' slices in both gradients, projects,
writes ``s' + u`` into ``.grad``; clipping, the head mask's restore and the scheduler are then untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cast_lightning.data.formatting import IGNORE_INDEX
from cast_lightning.errors import CastError

OFF, GLOBAL, PER_TENSOR = "off", "global", "per_tensor"
MODES = (OFF, GLOBAL, PER_TENSOR)
UTILITY_ROWS = "is_utility"  # the fit batches' per-row flag (SafetyUtilityDataModule)
_TINY = 1e-30


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CastError(f"unknown --model.pcgrad {mode!r}: use one of {', '.join(MODES)}")
    return mode


def part_losses(logits: torch.Tensor, labels: torch.Tensor, is_utility: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(safety part, utility part) of the mean response-token cross-entropy over the whole micro-batch:
    ``part_X = sum over tokens of rows in X of CE / n`` with ``n`` all response tokens of the batch (at least 1)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shift_labels.shape)
    n = (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
    utility = is_utility.to(device=token.device, dtype=torch.bool)[:, None]
    return (token * ~utility).sum() / n, (token * utility).sum() / n


@dataclass
class Projection:
    """One step's statistics: ``conflict_fraction`` (global: 1 or 0; per_tensor: the share of tensors with a nonzero
    utility gradient whose inner product is negative), ``cosine`` = cos(s, u) over all trainable elements before the
    projection, and the global inner products before and after it."""

    conflict_fraction: float
    cosine: float
    dot_before: float
    dot_after: float


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    if not a:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum()


@torch.no_grad()
def project(safety: list[torch.Tensor], utility: list[torch.Tensor], mode: str) -> tuple[list[torch.Tensor], Projection]:
    """The projected safety gradient ``s'`` (new tensors) and the step's statistics.

    global:      s' = s - min(<s, u>, 0) / ||u||^2 * u          over all tensors as one vector
    per_tensor:  s'_p = s_p - min(<s_p, u_p>, 0) / ||u_p||^2 * u_p  for each tensor p
    (no projection where ||u|| = 0). Inner products in float64."""
    check_mode(mode)
    dot = _dot(safety, utility)
    ss, uu = _dot(safety, safety), _dot(utility, utility)
    cosine = float(dot / max(float(ss.sqrt() * uu.sqrt()), _TINY))
    if mode == OFF:
        out, fraction = [s.clone() for s in safety], 0.0
    elif mode == GLOBAL:
        conflict = bool(dot < 0) and float(uu) > 0
        coefficient = float(dot / uu) if conflict else 0.0
        out = [s - coefficient * u.to(s.dtype) for s, u in zip(safety, utility)]
        fraction = float(conflict)
    else:
        out, conflicts, counted = [], 0, 0
        for s, u in zip(safety, utility):
            d, n = _dot([s], [u]), _dot([u], [u])
            if float(n) > 0:
                counted += 1
            if float(n) > 0 and bool(d < 0):
                conflicts += 1
                out.append(s - float(d / n) * u.to(s.dtype))
            else:
                out.append(s.clone())
        fraction = conflicts / counted if counted else 0.0
    return out, Projection(fraction, cosine, float(dot), float(_dot(out, utility)))


class SafetyGradients:
    """The safety part's gradient, summed over a step's micro-batches, one buffer per trainable parameter."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.buffers = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in parameters]

    def add(self, loss: torch.Tensor, scale: float) -> None:
        grads = torch.autograd.grad(loss, self.parameters, retain_graph=True, allow_unused=True)
        for buffer, grad in zip(self.buffers, grads):
            if grad is not None:
                buffer.add_(grad, alpha=scale)

    def reset(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()


def require_utility_rows(batch: dict) -> torch.Tensor:
    if UTILITY_ROWS not in batch:
        raise CastError("--model.pcgrad needs fit batches that mark their utility rows (is_utility): use "
                        "SafetyUtilityDataModule with --data.utility_replay > 0, or --model.pcgrad off")
    return batch[UTILITY_ROWS]
