"""The head mask: zero the gradients of skipped heads' slices and keep their values bit-identical.

Zeroing gradients before clipping keeps frozen slices out of the gradient norm; restoring the saved
values after each optimizer step undoes what decoupled weight decay (or any optimizer) did to them.
Both touch only the frozen slices, so the cost is proportional to the skipped heads, not the model.

Sharded parameters: a DTensor (FSDP2) is masked on its local shard; FSDP2 shards dim 0, so a row
range is translated to the local rows and a column range applies to every local row.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cast_lightning.heads import HeadLayout, ParamSlice


def _local(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The locally held part of ``tensor`` and the global index of its first row."""
    if hasattr(tensor, "to_local") and hasattr(tensor, "placements"):  # DTensor
        from torch.distributed.tensor import Shard

        local = tensor.to_local()
        offset = 0
        for mesh_dim, placement in enumerate(tensor.placements):
            if isinstance(placement, Shard):
                if placement.dim != 0:
                    raise NotImplementedError(f"head masking supports dim-0 sharding only, got Shard({placement.dim})")
                # torch.chunk semantics: every rank but the last holds ceil(n / world) rows.
                world = tensor.device_mesh.size(mesh_dim)
                rank = tensor.device_mesh.get_local_coordinate()[mesh_dim]
                offset += rank * -(-tensor.shape[0] // world)
        return local, offset
    return tensor, 0


def _local_range(s: ParamSlice, local: torch.Tensor, offset: int) -> tuple[int, int] | None:
    """The slice's [start, stop) in local coordinates, or None where this shard holds none of it."""
    if s.dim != 0:
        return s.start, s.stop
    start, stop = max(s.start - offset, 0), min(s.stop - offset, local.shape[0])
    return (start, stop) if start < stop else None


class HeadMask:
    """Freezes a set of parameter slices of ``model`` (names relative to ``model``)."""

    def __init__(self, model: torch.nn.Module, slices: Iterable[ParamSlice]):
        parameters = dict(model.named_parameters())
        self.slices: list[tuple[torch.nn.Parameter, ParamSlice]] = [
            (parameters[s.name], s) for s in slices if s.name in parameters and parameters[s.name].requires_grad
        ]
        self._saved: list[torch.Tensor | None] = []

    @classmethod
    def for_heads(
        cls, model: torch.nn.Module, layout: HeadLayout, skip_heads: Iterable[tuple[int, int]], kv_policy: str = "all"
    ) -> HeadMask:
        return cls(model, layout.frozen_slices(list(skip_heads), kv_policy))

    def __bool__(self) -> bool:
        return bool(self.slices)

    @property
    def num_frozen_elements(self) -> int:
        return sum((s.stop - s.start) * p.numel() // p.shape[s.dim] for p, s in self.slices)

    def _views(self, attribute: str):
        for parameter, s in self.slices:
            tensor = parameter.grad if attribute == "grad" else parameter.data
            if tensor is None:
                yield None
                continue
            local, offset = _local(tensor)
            bounds = _local_range(s, local, offset)
            yield None if bounds is None else local.narrow(s.dim, bounds[0], bounds[1] - bounds[0])

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the frozen slices' gradients (call before clipping and before the optimizer step)."""
        for view in self._views("grad"):
            if view is not None:
                view.zero_()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the current values of the frozen slices (call once the weights are final: after loading)."""
        self._saved = [None if view is None else view.clone() for view in self._views("data")]

    @torch.no_grad()
    def restore(self) -> None:
        """Write the remembered values back (call after every optimizer step)."""
        if not self._saved:
            return
        for view, saved in zip(self._views("data"), self._saved):
            if view is not None:
                view.copy_(saved)
