"""The head mask: zero the gradients of skipped heads' slices and keep their values bit-identical.

Zeroing gradients before clipping keeps frozen slices out of the gradient norm; restoring the saved
values after each optimizer step undoes what decoupled weight decay (or any optimizer) did to them.
Both touch only the frozen slices, so the cost is proportional to the skipped heads, not the model.

With LoRA (``lora.mask_slices``) the slices are rows of the B factors and columns of the A factors, held at exactly
zero instead of at their initial values (``zero_slices``: zeroed when the mask is built and at the snapshot, then
kept like any other slice), which keeps the skipped heads' merged weights ``W + s * B @ A`` equal to ``W``. Frozen
parameters (outside the training scope) need no entry.

How a rank holds a parameter depends on the strategy, so each frozen parameter becomes one entry
that knows where its frozen elements live on this rank (``HeadMask`` picks the kind per parameter from
``strategies.sharding_of``):

* ``_DenseEntry``: the whole tensor (one device, DDP) or a DTensor (FSDP2, ``fully_shard``). FSDP2
  shards dim 0, so a row range is translated to the local rows and a column range applies to every
  local row.
* ``_FlatEntry``: FSDP1 with ``use_orig_params=True``. Between forward/backward passes each original
  parameter's ``.data`` and ``.grad`` are 1-D views of this rank's window of the *flattened* parameter
  (``FlatParameter._shard_param_infos``); the frozen elements are the window's positions that fall in a
  frozen slice. Writing through the views writes the FlatParameter the optimizer steps.
* ``_DeepSpeedEntry``: ZeRO 1/2/3. Gradients are zeroed by a tensor hook on the parameter, which runs on
  each micro-batch's full gradient before DeepSpeed reduces and partitions it; so the engine's internal
  clipping and its global grad norm never see a frozen element, for every stage and accumulation step.
  After each engine step both copies the optimizer keeps are restored: the fp32 master (ZeRO-1/2 through
  the parameter's ``_hp_mapping`` fragment, ZeRO-3 through ``safe_get/set_local_fp32_param``) and the
  working low-precision copy (ZeRO-1/2: the full replica; ZeRO-3: the ``ds_tensor`` partition and, for
  persistent parameters, the gathered tensor). Restoring only the working copy would let the next step
  copy the drifted master back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout, ParamSlice
from cast_lightning.strategies import DEEPSPEED, DENSE, FSDP1, is_dtensor

# Wrapper modules insert these into parameter names; HeadLayout names are the plain HF ones.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _local(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The locally held part of ``tensor`` and the global index of its first row."""
    if is_dtensor(tensor):
        from torch.distributed.tensor import Shard

        local = tensor.to_local()
        offset = 0
        for mesh_dim, placement in enumerate(tensor.placements):
            if isinstance(placement, Shard):
                if placement.dim != 0:
                    raise CastError(
                        f"head masking supports dim-0 sharding only, got Shard({placement.dim}): shard the weights along "
                        f"their first dimension (configs/strategy/fsdp2.yaml does)"
                    )
                # torch.chunk semantics: every rank but the last holds ceil(n / world) rows.
                world = tensor.device_mesh.size(mesh_dim)
                rank = tensor.device_mesh.get_coordinate()[mesh_dim]
                offset += rank * -(-tensor.shape[0] // world)
        return local, offset
    return tensor, 0


def _local_range(s: ParamSlice, local: torch.Tensor, offset: int) -> tuple[int, int] | None:
    """The slice's [start, stop) in local coordinates, or None where this shard holds none of it."""
    if s.dim != 0:
        return s.start, s.stop
    start, stop = max(s.start - offset, 0), min(s.stop - offset, local.shape[0])
    return (start, stop) if start < stop else None


def _narrow_views(tensor: torch.Tensor | None, slices: list[ParamSlice]) -> list[torch.Tensor]:
    """Views of the frozen slices in the locally held part of ``tensor`` (a full tensor or a DTensor)."""
    if tensor is None:
        return []
    local, offset = _local(tensor)
    views = []
    for s in slices:
        bounds = _local_range(s, local, offset)
        if bounds is not None:
            views.append(local.narrow(s.dim, bounds[0], bounds[1] - bounds[0]))
    return views


def frozen_flat_index(shape: torch.Size, slices: list[ParamSlice], lo: int, hi: int) -> torch.Tensor:
    """Positions ``i - lo`` of the frozen elements ``i`` in ``[lo, hi)`` of the row-major flattened parameter."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for s in slices:
        mask.narrow(s.dim, s.start, s.stop - s.start).fill_(True)
    return mask.reshape(-1)[lo:hi].nonzero().squeeze(1)


# -- entries: one frozen parameter as this rank holds it ------------------------------------------------------------


class _DenseEntry:
    def __init__(self, param: torch.nn.Parameter, slices: list[ParamSlice], zero: bool = False):
        self.param, self.slices, self.zero = param, slices, zero
        self._saved: list[torch.Tensor] = []

    def zero_grad(self) -> None:
        for view in _narrow_views(self.param.grad, self.slices):
            view.zero_()

    def zero_values(self) -> None:
        for view in _narrow_views(self.param.data, self.slices):
            view.zero_()

    def snapshot(self) -> None:
        if self.zero:
            self.zero_values()
        self._saved = [view.clone() for view in _narrow_views(self.param.data, self.slices)]

    def restore(self) -> None:
        for view, saved in zip(_narrow_views(self.param.data, self.slices), self._saved):
            view.copy_(saved)


class _FlatEntry:
    """FSDP1 ``use_orig_params``: ``param`` is a 1-D view of this rank's window of the flattened parameter."""

    def __init__(self, param: torch.nn.Parameter, index: torch.Tensor, zero: bool = False):
        self.param, self.index, self.zero = param, index.to(param.device), zero
        self._saved: torch.Tensor | None = None

    def zero_grad(self) -> None:
        if self.param.grad is not None and self.index.numel():
            self.param.grad.view(-1).index_fill_(0, self.index, 0)

    def zero_values(self) -> None:
        if self.index.numel():
            self.param.data.view(-1).index_fill_(0, self.index, 0)

    def snapshot(self) -> None:
        if self.zero:
            self.zero_values()
        self._saved = self.param.data.view(-1).index_select(0, self.index)

    def restore(self) -> None:
        if self._saved is not None and self.index.numel():
            self.param.data.view(-1).index_copy_(0, self.index, self._saved)


class _DeepSpeedEntry:
    # zero: LoRA factor slices are zeroed before DeepSpeed copies the weights (CASTModule.__init__), so the snapshot
    # of both copies holds zeros; the engine's partitions are not written outside restore().
    def __init__(self, param: torch.nn.Parameter, slices: list[ParamSlice], zero: bool = False):
        self.param, self.slices, self.zero = param, slices, zero
        self.zero3 = hasattr(param, "ds_id")
        shape = tuple(param.ds_shape) if self.zero3 else tuple(param.shape)
        self.hook = param.register_hook(self._masked)
        self._hp_index = self._lp_index = None
        self._saved_hp = self._saved_lp = None
        self._saved_dense: list[torch.Tensor] = []
        if self.zero3:
            # The fp32 master partition and ds_tensor cover the same window of the flattened parameter.
            import torch.distributed as dist

            size = param.ds_tensor.numel()
            rank = dist.get_rank(group=getattr(param, "ds_process_group", None))
            lo = rank * size
            self._lp_index = frozen_flat_index(torch.Size(shape), slices, lo, min(lo + size, param.ds_numel)).to(param.ds_tensor.device)
            self._hp_index = self._lp_index
        elif getattr(param, "_hp_mapping", None) is not None:
            address = param._hp_mapping.lp_fragment_address
            index = frozen_flat_index(torch.Size(shape), slices, address.start, address.start + address.numel)
            self._hp_index = index.to(param._hp_mapping.hp_fragment.device)

    def _masked(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        for s in self.slices:
            grad.narrow(s.dim, s.start, s.stop - s.start).zero_()
        return grad

    def zero_grad(self) -> None:
        pass  # done by the hook on every micro-batch, before DeepSpeed sees the gradient

    def _hp(self) -> torch.Tensor | None:
        if self._hp_index is None or not self._hp_index.numel():
            return None
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(self.param).view(-1)
        return self.param._hp_mapping.hp_fragment.view(-1)

    def _gathered(self) -> bool:
        """ZeRO-3 persistent (small) parameters stay gathered between steps: their full tensor is live too."""
        return self.param.data.numel() == self.param.ds_numel

    def snapshot(self) -> None:
        hp = self._hp()
        self._saved_hp = None if hp is None else hp.index_select(0, self._hp_index)
        if self.zero3:
            import deepspeed

            self._saved_lp = self.param.ds_tensor.data.view(-1).index_select(0, self._lp_index)
            # Gathered (a collective: every rank snapshots every entry in the same order) for the case that this
            # parameter is persistent, i.e. kept whole between steps and re-gathered from the partitions in step().
            with deepspeed.zero.GatheredParameters([self.param]):
                self._saved_dense = [v.clone() for v in _narrow_views(self.param.data, self.slices)]
        else:
            self._saved_dense = [v.clone() for v in _narrow_views(self.param.data, self.slices)]

    def restore(self) -> None:
        hp = self._hp()
        if hp is not None and self._saved_hp is not None:
            if self.zero3:
                from deepspeed.utils import safe_set_local_fp32_param

                safe_set_local_fp32_param(self.param, hp.index_copy(0, self._hp_index, self._saved_hp))
            else:
                hp.index_copy_(0, self._hp_index, self._saved_hp)  # the master fragment itself
        if self.zero3 and self._lp_index.numel():
            self.param.ds_tensor.data.view(-1).index_copy_(0, self._lp_index, self._saved_lp)
        if self._saved_dense and (not self.zero3 or self._gathered()):
            for view, saved in zip(_narrow_views(self.param.data, self.slices), self._saved_dense):
                view.copy_(saved)


def _fsdp1_windows(root: torch.nn.Module | None) -> dict[int, tuple[torch.Size, int, int] | None]:
    """id(original parameter) -> (full shape, window start, window stop) of this rank's FSDP1 shard."""
    if root is None:
        return {}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    windows: dict[int, tuple[torch.Size, int, int] | None] = {}
    for module in FSDP.fsdp_modules(root):
        handle = module._handle
        if handle is None:
            continue
        flat = handle.flat_param
        if not handle._use_orig_params:
            raise CastError("the head mask needs FSDP's original parameters: set use_orig_params: true in the FSDP strategy (configs/strategy/fsdp.yaml)")
        for param, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos):
            if not handle.uses_sharded_strategy:
                windows[id(param)] = None  # NO_SHARD: the parameter is whole
            elif info.in_shard:
                windows[id(param)] = (shape, info.intra_param_start_idx, info.intra_param_end_idx + 1)
            else:
                windows[id(param)] = (shape, 0, 0)
    return windows


class HeadMask:
    """Freezes a set of parameter slices of ``model`` (names relative to ``model``, wrapper prefixes ignored).

    ``slices`` keep the values they have at ``snapshot()``; ``zero_slices`` (LoRA factor slices, ``lora.mask_slices``)
    are held at exactly zero: zeroed when the mask is built (``zero_values``) and at ``snapshot()``, then restored
    like the others. Only parameters that train (``requires_grad``) get an entry: a frozen scope needs no mask.

    ``sharding`` (``strategies.sharding_of``) and ``root`` (the module the strategy wrapped) say how this rank
    holds the parameters; CASTModule builds a new mask on the live parameters once the strategy has wrapped or
    partitioned them (``on_fit_start``).
    """

    def __init__(self, model: torch.nn.Module, slices: Iterable[ParamSlice], sharding: str = DENSE, root=None,
                 zero_slices: Iterable[ParamSlice] = ()):
        parameters = {clean_name(n): p for n, p in model.named_parameters()}
        grouped: dict[str, list[ParamSlice]] = {}
        zero_names: set[str] = set()
        for kind, group in ((False, slices), (True, zero_slices)):
            for s in group:
                if s.name in parameters and parameters[s.name].requires_grad:
                    grouped.setdefault(s.name, []).append(s)
                    if kind:
                        zero_names.add(s.name)
        self.slices: list[tuple[torch.nn.Parameter, ParamSlice]] = [
            (parameters[name], s) for name, group in grouped.items() for s in group
        ]
        self.sharding = sharding
        self._snapshotted = False
        windows = _fsdp1_windows(root) if sharding == FSDP1 else {}
        self.entries = []
        for name, group in grouped.items():
            param, zero = parameters[name], name in zero_names
            if sharding == DEEPSPEED:
                self.entries.append(_DeepSpeedEntry(param, group, zero))
            elif windows.get(id(param)) is not None:
                shape, lo, hi = windows[id(param)]
                self.entries.append(_FlatEntry(param, frozen_flat_index(shape, group, lo, hi), zero))
            else:
                self.entries.append(_DenseEntry(param, group, zero))
        self._shapes = {id(parameters[name]): _full_shape(parameters[name], windows) for name in grouped}

    @classmethod
    def for_heads(
        cls,
        model: torch.nn.Module,
        layout: HeadLayout,
        skip_heads: Iterable[tuple[int, int]],
        kv_policy: str = "all",
        sharding: str = DENSE,
        root=None,
    ) -> HeadMask:
        return cls(model, layout.frozen_slices(list(skip_heads), kv_policy), sharding, root)

    def __bool__(self) -> bool:
        return bool(self.slices)

    @torch.no_grad()
    def zero_values(self) -> None:
        """Set the zero-held slices to zero now (the mask is being built on whole, not yet partitioned, weights)."""
        for entry in self.entries:
            if entry.zero and hasattr(entry, "zero_values"):
                entry.zero_values()

    @property
    def num_frozen_elements(self) -> int:
        total = 0
        for p, s in self.slices:
            shape = self._shapes[id(p)]
            total += (s.stop - s.start) * (torch.Size(shape).numel() // shape[s.dim])
        return total

    def remove(self) -> None:
        """Drop hooks (DeepSpeed) before the mask is replaced."""
        for entry in self.entries:
            hook = getattr(entry, "hook", None)
            if hook is not None:
                hook.remove()

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the frozen slices' gradients (call before clipping and before the optimizer step)."""
        for entry in self.entries:
            entry.zero_grad()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the current values of the frozen slices (call once the weights are final: after loading)."""
        for entry in self.entries:
            entry.snapshot()
        self._snapshotted = True

    @torch.no_grad()
    def restore(self) -> None:
        """Write the remembered values back (call after every optimizer step)."""
        if not self._snapshotted:
            return
        for entry in self.entries:
            entry.restore()


def original_shapes(sharding: str, root) -> dict[int, torch.Size]:
    """id(parameter) -> its shape before sharding where the strategy flattened it (FSDP1); {} elsewhere."""
    if sharding != FSDP1:
        return {}
    return {key: window[0] for key, window in _fsdp1_windows(root).items() if window is not None}


def _full_shape(param: torch.nn.Parameter, windows: dict) -> tuple[int, ...]:
    if windows.get(id(param)) is not None:
        return tuple(windows[id(param)][0])
    if hasattr(param, "ds_shape"):
        return tuple(param.ds_shape)
    return tuple(param.shape)
