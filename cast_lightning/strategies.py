"""What each Lightning strategy does with the model: how it holds the parameters, how to shard the model, the
gradient norm and clipping it needs, generation on a sharded model, and ``FSDP2Strategy`` for the config files.

The head mask itself is in ``masking.py``; it asks ``sharding_of`` which kind of parameter it is looking at.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from cast_lightning.errors import CastError

DENSE, FSDP1, FSDP2, DEEPSPEED = "dense", "fsdp", "fsdp2", "deepspeed"


def sharding_of(strategy) -> str:
    """``dense`` (one device, DDP), ``fsdp`` (FSDP1), ``fsdp2`` (ModelParallelStrategy) or ``deepspeed``."""
    if isinstance(strategy, DeepSpeedStrategy):
        return DEEPSPEED
    if isinstance(strategy, FSDPStrategy):
        return FSDP1
    if isinstance(strategy, ModelParallelStrategy):
        return FSDP2
    return DENSE


def shards_parameters(strategy) -> bool:
    """Whether a forward pass gathers parameters from the other ranks (FSDP1, FSDP2, ZeRO-3): then every rank
    must run the same number of forward passes."""
    sharding = sharding_of(strategy)
    if sharding == DEEPSPEED:
        return bool(getattr(strategy, "zero_stage_3", False))
    return sharding in (FSDP1, FSDP2)


def is_dtensor(tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


# -- generation on a sharded model (CASTModule.test_step) -----------------------------------------------------------


@contextmanager
def generation_setup(strategy, model: torch.nn.Module, world_size: int) -> Iterator[dict]:
    """The keyword arguments ``model.generate`` needs under ``strategy``, inside the context it must run in.

    Sharded parameters (FSDP1/FSDP2/ZeRO-3) over several ranks: ``synced_gpus=True``, so a rank whose sequences
    all ended keeps running forward passes until every rank is done; otherwise the ranks' parameter all-gathers
    fall out of step and the run hangs or mixes up collectives. FSDP1: ``generate`` runs the wrapped model's
    forward, not the root FSDP unit's, so the root unit's own parameters (embeddings, final norm, head) would stay
    flat shards; they are gathered for the duration (``recurse=False``: the decoder layers gather their own).
    """
    kwargs = {"synced_gpus": True} if world_size > 1 and shards_parameters(strategy) else {}
    context = nullcontext()
    if sharding_of(strategy) == FSDP1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        roots = FSDP.fsdp_modules(model, root_only=True)
        if roots:
            context = FSDP.summon_full_params(roots[0], recurse=False, writeback=False)
    with context:
        yield kwargs


# -- strategy-aware gradient norm and clipping ---------------------------------------------------------------------


@torch.no_grad()
def total_grad_norm(model: torch.nn.Module, sharding: str = DENSE, root=None) -> torch.Tensor | None:
    """The global 2-norm of all gradients of ``model`` as the optimizer sees them; None where ``.grad`` is not
    where the gradients live (DeepSpeed: ask the engine, ``get_global_grad_norm``)."""
    if sharding == DEEPSPEED:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    group = None
    if sharding == FSDP2 and is_dtensor(grads[0]):
        group = grads[0].device_mesh.get_group()
        grads = [g.to_local() for g in grads]
    elif sharding == FSDP1 and root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        roots = FSDP.fsdp_modules(root, root_only=True)
        if roots and any(m.sharding_strategy.name != "NO_SHARD" for m in FSDP.fsdp_modules(root)):
            group = roots[0].process_group
    squares = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    if group is not None:
        torch.distributed.all_reduce(squares, group=group)
    return squares.sqrt()


def clip_fsdp1(root: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """FSDP1 norm clipping (Lightning's FSDPPrecision refuses it): the root FSDP module's ``clip_grad_norm_``,
    which reduces the sharded norms across ranks."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    roots = FSDP.fsdp_modules(root, root_only=True)
    if not roots:
        raise CastError("FSDP gradient clipping needs an FSDP-wrapped model: use configs/strategy/fsdp.yaml")
    return roots[0].clip_grad_norm_(max_norm)


# -- sharding the model (CASTModule.configure_model) ----------------------------------------------------------------


def shard_model(model: torch.nn.Module, sharding: str, mesh=None) -> torch.nn.Module:
    """One FSDP unit per decoder layer, then the root model; returns the module to keep as ``self.model``.

    Decoder layers are the model's ``_no_split_modules`` classes, so any HF architecture works without a wrap
    policy. FSDP2: ``fully_shard`` over the data-parallel dimension of ``mesh`` (the model keeps its identity).
    FSDP1: ``wrap`` inside Lightning's ``enable_wrap`` context, so the strategy's kwargs (``use_orig_params``,
    mixed precision, sharding strategy) apply; the root is wrapped too, else Lightning, seeing wrapped children,
    would leave embeddings, final norm and head unsharded and unsynchronized.
    """
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [(name, module) for name, module in model.named_modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise CastError(f"cannot find the decoder layers of {type(model).__name__} to shard: use --trainer.strategy ddp")
    if sharding == FSDP2:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(model, FSDPModule):  # configure_model runs again for validate/test after fit
            return model
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise CastError("CAST shards with FSDP2 only: use configs/strategy/fsdp2.yaml (tensor_parallel_size 1)")
        data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
        for _, layer in layers:
            fully_shard(layer, mesh=data_parallel)
        fully_shard(model, mesh=data_parallel)
        return model
    if sharding == FSDP1:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import wrap

        if isinstance(model, FullyShardedDataParallel):
            return model
        modules = dict(model.named_modules())
        for name, layer in layers:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, wrap(layer))
        return wrap(model)
    return model


# -- FSDP2 for the config files -------------------------------------------------------------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` used as pure FSDP2: one data-parallel mesh over every process
    (``num_nodes x devices``), no tensor parallelism. ``CASTModule.configure_model`` applies ``fully_shard``.

    Args:
        data_parallel_size: processes in the data-parallel mesh; ``auto`` = the world size.
        save_distributed_checkpoint: each rank writes its shard (a checkpoint directory; ``cast export`` reads
            it); False gathers the full state on rank 0 into one file.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs (default: chosen from the device).
    """

    def __init__(
        self,
        data_parallel_size: int | str = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
