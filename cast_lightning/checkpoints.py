"""Reading and checking ``cast fit`` checkpoints, as every strategy writes them, without executing code from them.
The one home of every checkpoint check: resume (``cast fit --ckpt_path``), ``cast export`` and ``cast eval`` all
read through here.

Checkpoint layouts (``checkpoint_kind``):

* ``file``: one ``.ckpt`` (DDP, one device, FSDP1 ``state_dict_type: full``, FSDP2 with
  ``save_distributed_checkpoint: false``), read with ``torch.load(weights_only=True)``, tensors memory-mapped.
* ``distributed``: a torch distributed-checkpoint directory (FSDP2, FSDP1 ``state_dict_type: sharded``):
  ``.metadata`` (a pickle of torch's checkpoint metadata classes, read by an unpickler that resolves only those
  classes), ``__<rank>_0.distcp`` shards (tensors, read ``weights_only``) and Lightning's ``meta.pt`` (read
  ``weights_only``). Only the model's tensors are read; optimizer state is skipped.
* ``deepspeed``: Lightning's DeepSpeed directory ``<dir>/latest`` + ``<dir>/checkpoint/`` with
  ``*_model_states.pt`` (Lightning's client state: hyper_parameters, cast_skip_heads, ...) and one
  ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank holding that rank's fp32 master partition. The weights
  are the fp32 masters put back together as DeepSpeed's ``zero_to_fp32`` does, without importing DeepSpeed.
  The optimizer files pickle a few DeepSpeed objects (``LossScaler``, ``ZeroStageEnum``, ``fragment_address``);
  they are read ``weights_only`` with each ``deepspeed.*`` name mapped (``torch.serialization.safe_globals``) to an
  inert record class that only stores what it is given, so no DeepSpeed (or other) code runs; any other
  non-tensor global refuses the file.

Every refusal is a ``CastError`` naming the file and what to do instead.

The training scope travels as ``cast_scope`` (``scope_record``): ``trainable`` (all, attention, lora or patterns),
the LoRA options, and whether the frozen tensors were left out (one device / DDP checkpoints of a scope that freezes
parameters) with a fingerprint of them. ``load_checkpoint_model`` rebuilds the scope on the base model (the LoRA
adapters included), loads the saved tensors, takes the left-out ones from the base after checking the fingerprint,
and merges LoRA adapters into the base weights unless asked for the adapter model.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
import zipfile
from glob import glob

import torch

from cast_lightning import scopes
from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout
from cast_lightning.loading import load_model_and_tokenizer

# The checkpoint entry in which CASTModule saves its skipped heads ([[layer, head], ...]); export and eval read it.
SKIP_HEADS_KEY = "cast_skip_heads"
# The checkpoint entry holding the training scope (scope_record).
SCOPE_KEY = "cast_scope"


def scope_record(trainable, lora: dict | None, frozen_from_base: bool, base_fingerprint: dict | None) -> dict:
    """What a checkpoint says about its scope: plain data, read back ``weights_only``."""
    return {
        "trainable": trainable if isinstance(trainable, str) else list(trainable),
        "lora": None if lora is None else dict(lora),
        "frozen_from_base": bool(frozen_from_base),
        "base_fingerprint": dict(base_fingerprint) if base_fingerprint else None,
    }


def checkpoint_scope(checkpoint: dict) -> dict:
    """The checkpoint's ``scope_record``; checkpoints from before scopes trained everything and hold every tensor."""
    saved = checkpoint.get(SCOPE_KEY)
    if isinstance(saved, dict):
        return scope_record(saved.get("trainable", scopes.ALL), saved.get("lora"), saved.get("frozen_from_base", False),
                            saved.get("base_fingerprint"))
    hp = checkpoint.get("hyper_parameters") or {}
    return scope_record(hp.get("trainable", scopes.ALL), hp.get("lora"), False, None)

READ_FIX = "give a checkpoint written by cast fit"
RESUME_FIX = "resume from an earlier checkpoint or drop --ckpt_path"

# What torch.load raises on a truncated or corrupt file (e.g. one an interrupted save left): a zip archive without
# its central directory (RuntimeError), a file cut short (EOFError), bytes that are no checkpoint at all (KeyError,
# ValueError), a broken archive member (zipfile.BadZipFile, OSError).
UNREADABLE_FILE_ERRORS = (RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError, zipfile.BadZipFile)


def _checkpoint_exception() -> type[BaseException]:
    """What torch's distributed-checkpoint loader raises when a shard is missing or damaged."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


# -- one checkpoint file ---------------------------------------------------------------------------------------------


def _same_model(a: str, b: str) -> bool:
    if str(a) == str(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


def _load_weights_only(ckpt_path: str) -> dict:
    try:
        # mmap: the tensors are not read, so checking a many-GB checkpoint before the real load costs little.
        return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap can only be used" not in str(error):  # a legacy (non-zip) torch.save file: read it whole
            raise
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)


def _require_cast_checkpoint(checkpoint, ckpt_path: str, fix: str) -> dict:
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "pretrained" not in hparams or "state_dict" not in checkpoint:
        raise CastError(f"{ckpt_path} is not a cast fit checkpoint (no state_dict / hyper_parameters.pretrained); {fix}")
    return checkpoint


def _unreadable(ckpt_path: str, error: BaseException, fix: str) -> CastError:
    return CastError(
        f"cannot read checkpoint {ckpt_path} ({error.__class__.__name__}): it is truncated or corrupt, "
        f"e.g. left by an interrupted save; {fix}"
    )


def _refused_pickle(ckpt_path: str, fix: str) -> CastError:
    return CastError(
        f"refused checkpoint {ckpt_path}: it holds pickled objects, and checkpoints are read with weights_only=True "
        f"so that no code in them runs; {fix}"
    )


def check_checkpoint_file(ckpt_path: str, fix: str = READ_FIX) -> dict:
    """A ``cast fit`` checkpoint file, read as Lightning and ``read_checkpoint`` read it, first and cheaply (tensors
    memory-mapped), so a bad file is one line naming ``fix`` instead of a traceback.

    Refused: a file ``torch.load(weights_only=True)`` cannot read because it holds pickled objects (they are
    never unpickled, so no code in a checkpoint runs), a truncated or corrupt one (an interrupted save), and
    one that is not a CASTModule checkpoint.
    """
    try:
        checkpoint = _load_weights_only(ckpt_path)
    except pickle.UnpicklingError as error:
        raise _refused_pickle(ckpt_path, fix) from error
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # not damage: the CLI names the path and the reason
    except UNREADABLE_FILE_ERRORS as error:
        raise _unreadable(ckpt_path, error, fix) from error
    return _require_cast_checkpoint(checkpoint, ckpt_path, fix)


def check_resume_checkpoint(ckpt_path: str, pretrained: str | None = None) -> dict:
    """``--ckpt_path`` of ``cast fit/validate/test``: ``check_checkpoint_file``, and the checkpoint must come from
    ``--model.pretrained`` (LightningCLI would otherwise silently switch to the checkpoint's model)."""
    checkpoint = check_checkpoint_file(ckpt_path, RESUME_FIX)
    saved = str(checkpoint["hyper_parameters"]["pretrained"])
    if pretrained is not None and not _same_model(saved, str(pretrained)):
        raise CastError(
            f"checkpoint {ckpt_path} was trained from {saved}, not --model.pretrained {pretrained}: "
            f"resume with --model.pretrained {saved}, or drop --ckpt_path to start a new run"
        )
    return checkpoint


# -- checkpoints of every strategy ----------------------------------------------------------------------------------

CKPT_FILE, CKPT_DISTRIBUTED, CKPT_DEEPSPEED = "file", "distributed", "deepspeed"
DEEPSPEED_TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under


def checkpoint_kind(path: str) -> str | None:
    """``file``, ``distributed`` or ``deepspeed`` (see the module docstring); None for anything else."""
    if os.path.isfile(path):
        return CKPT_FILE
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, ".metadata")):
        return CKPT_DISTRIBUTED
    if os.path.isfile(os.path.join(path, "latest")) or glob(os.path.join(path, DEEPSPEED_TAG, "*model_states.pt")):
        return CKPT_DEEPSPEED
    return None


def is_lightning_checkpoint(path: str) -> bool:
    """A checkpoint ``cast fit`` wrote: a ``.ckpt`` file or a sharded checkpoint directory."""
    kind = checkpoint_kind(path)
    return kind in (CKPT_DISTRIBUTED, CKPT_DEEPSPEED) or (kind == CKPT_FILE and path.endswith(".ckpt"))


def checkpoint_files(path: str) -> list[str]:
    """Every file of a checkpoint (one, or all under its directory), e.g. to fingerprint it."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)


def read_checkpoint(ckpt_path: str, fix: str = READ_FIX) -> dict:
    """A ``cast fit`` checkpoint of any strategy as one Lightning checkpoint dict (``state_dict`` whole, on the
    CPU, plus hyper_parameters, cast_skip_heads, global_step, ...), read without executing code from it."""
    kind = checkpoint_kind(ckpt_path)
    if kind is None:
        if os.path.isdir(ckpt_path):
            raise CastError(
                f"{ckpt_path} is a directory but not a sharded checkpoint (no .metadata, no DeepSpeed 'latest'): "
                f"give the .ckpt file or directory written by cast fit"
            )
        raise CastError(f"checkpoint {ckpt_path} does not exist: give the .ckpt written by cast fit")
    if kind == CKPT_FILE:
        return check_checkpoint_file(ckpt_path, fix)
    reader = _read_distributed if kind == CKPT_DISTRIBUTED else _read_deepspeed
    try:
        checkpoint = reader(ckpt_path)
    except CastError:
        raise
    except pickle.UnpicklingError as error:  # meta.pt or a model-states file pickling objects
        raise _refused_pickle(ckpt_path, fix) from error
    except (PermissionError, FileNotFoundError):
        raise  # not damage: the CLI names the path and the reason
    # Damaged shards, and files of the right names holding something else (missing keys, other structures).
    except (*UNREADABLE_FILE_ERRORS, TypeError, AttributeError, _checkpoint_exception()) as error:
        raise _unreadable(ckpt_path, error, fix) from error
    return _require_cast_checkpoint(checkpoint, ckpt_path, fix)


def load_checkpoint_model(ckpt_path: str, fix: str = READ_FIX, merge: bool = True):
    """(model, tokenizer, checkpoint) from a CASTModule checkpoint of any strategy: the base model named in its
    hyper_parameters, in its training scope, with the trained weights. The checkpoint is read and checked before any
    model loads. LoRA checkpoints: the adapters are merged into the base weights (a plain HF model), or with
    ``merge=False`` the peft model is returned (``cast export --adapter_only`` saves its adapter). A QLoRA checkpoint
    is applied to the full-precision base."""
    checkpoint = read_checkpoint(ckpt_path, fix)
    hp = checkpoint["hyper_parameters"]
    scope = checkpoint_scope(checkpoint)
    model, tokenizer = load_model_and_tokenizer(
        hp["pretrained"], hp.get("dtype", "float32"), hp.get("attn_implementation"), hp.get("trust_remote_code", False)
    )
    peft_model = None
    if scope["trainable"] != scopes.ALL:
        lora = None if scope["lora"] is None else {**scope["lora"], "load_in_4bit": False}
        scoped, _ = scopes.apply(model, HeadLayout.from_model(model), scope["trainable"], lora, hp["pretrained"])
        if lora is not None:
            peft_model, model = scoped, scoped.base_model.model
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    own = model.state_dict()
    reshaped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if reshaped:
        raise CastError(
            f"checkpoint {ckpt_path} does not fit the model {hp['pretrained']} ({len(reshaped)} tensors of another "
            f"shape, e.g. {reshaped[0]}): pair it with the model it was trained from"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embed_tokens) may be stored once; left-out frozen tensors come from the base (checked
    # by fingerprint); anything else missing means another model.
    from_base = set(scopes.frozen_names(model)) if scope["frozen_from_base"] else set()
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and "lm_head" not in k and k not in from_base]
    if missing or unexpected:
        raise CastError(
            f"checkpoint {ckpt_path} does not fit the model {hp['pretrained']} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors): pair it with the model it was trained from"
        )
    if scope["frozen_from_base"]:
        scopes.check_fingerprint(scope["base_fingerprint"], scopes.fingerprint(model), hp["pretrained"],
                                 f"checkpoint {ckpt_path}", "pair it with the base model it was trained from")
    if peft_model is not None:
        from cast_lightning.lora import merge as merge_lora

        model = merge_lora(peft_model) if merge else peft_model
    return model, tokenizer, checkpoint


# -- distributed checkpoint directories (FSDP2; FSDP1 sharded) ------------------------------------------------------

# Top-level keys under which Lightning saves the module's state dict: ModelParallelStrategy, FSDPStrategy.
_DCP_MODEL_KEYS = ("state_dict", "model")


def _dcp_metadata_globals() -> dict[tuple[str, str], object]:
    """The only globals a distributed checkpoint's ``.metadata`` pickle may name: torch's metadata dataclasses,
    dtypes, ``torch.Size``, the layout helper and the path class of the checkpoint id."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], object] = {}
    for name in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
                 "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            allowed[(metadata.__name__, name)] = getattr(metadata, name)
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        cls = getattr(pathlib, name)
        allowed[("pathlib", name)] = allowed[(cls.__module__, name)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle`` restricted to ``_dcp_metadata_globals``: anything else in the file is refused, never imported."""

    allowed: dict = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a distributed checkpoint's .metadata")
        return self.allowed[(module, name)]


def _read_dcp_metadata(path: str):
    _MetadataUnpickler.allowed = _dcp_metadata_globals()
    with open(os.path.join(path, ".metadata"), "rb") as handle:
        try:
            return _MetadataUnpickler(handle).load()
        except pickle.UnpicklingError as error:
            raise CastError(f"refused checkpoint {path}: {error}; give a checkpoint directory written by cast fit") from error


def _read_distributed(path: str) -> dict:
    """The model tensors of a distributed checkpoint (no optimizer state) and Lightning's ``meta.pt``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

    metadata = _read_dcp_metadata(path)
    paths = getattr(metadata, "planner_data", None) or {}
    wanted: dict[str, str] = {}  # checkpoint fqn -> Lightning state_dict key
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue  # non-tensor entries are pickles (optimizer param groups): never read
        route = paths.get(fqn)
        if route and len(route) == 2 and route[0] in _DCP_MODEL_KEYS:
            wanted[fqn] = str(route[1])
        elif not route:
            top, _, key = fqn.partition(".")
            if top in _DCP_MODEL_KEYS and key:
                wanted[fqn] = key
    if not wanted:
        raise CastError(f"{path} holds no model weights (no state_dict.* tensors): give a checkpoint written by cast fit")
    tensors = {
        fqn: torch.empty(metadata.state_dict_metadata[fqn].size, dtype=metadata.state_dict_metadata[fqn].properties.dtype)
        for fqn in wanted
    }

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            # The metadata read above, by the restricted unpickler (FileSystemReader's own uses plain pickle.load).
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process on purpose
        planner = DefaultLoadPlanner(flatten_state_dict=False, allow_partial_load=True)
        load(tensors, storage_reader=Reader(path), planner=planner, no_dist=True)
    extra = os.path.join(path, "meta.pt")
    checkpoint = torch.load(extra, map_location="cpu", weights_only=True) if os.path.isfile(extra) else {}
    checkpoint["state_dict"] = {wanted[fqn]: tensor for fqn, tensor in tensors.items()}
    return checkpoint


# -- DeepSpeed checkpoint directories -------------------------------------------------------------------------------

# DeepSpeed's own entries in the model-states file; the rest is Lightning's client state.
_DEEPSPEED_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params", "frozen_param_fragments",
    "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names", "csr_tensor_module_names", "skipped_steps",
    "global_steps", "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config",
    "ds_version",
})


class DeepSpeedRecord:
    """Stands in for every ``deepspeed.*`` object pickled in a DeepSpeed checkpoint (loss scaler, ZeRO stage enum,
    fragment addresses): keeps the constructor arguments and pickled state as plain data and runs no code."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _load_deepspeed_file(file: str) -> dict:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    foreign = [name for name in names if not name.startswith("deepspeed.")]
    if foreign:
        raise CastError(
            f"refused checkpoint file {file}: it pickles {', '.join(foreign[:3])}, which a DeepSpeed checkpoint does not; "
            f"give a checkpoint directory written by cast fit"
        )
    with torch.serialization.safe_globals([(DeepSpeedRecord, name) for name in names]):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _rank_of(file: str) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", os.path.basename(file))
    return int(match.group(1)) if match else 0


def _deepspeed_tag_dir(path: str) -> str:
    latest = os.path.join(path, "latest")
    tag = open(latest).read().strip() if os.path.isfile(latest) else DEEPSPEED_TAG
    return os.path.join(path, tag)


def _read_deepspeed(path: str) -> dict:
    """Lightning's client state from the (rank 0) model-states file, with ``state_dict`` = the fp32 masters."""
    tag_dir = _deepspeed_tag_dir(path)
    model_files = sorted(glob(os.path.join(tag_dir, "*model_states.pt")), key=_rank_of)
    optim_files = sorted(glob(os.path.join(tag_dir, "*optim_states.pt")), key=_rank_of)
    if not model_files or not optim_files:
        raise CastError(
            f"{path} is not a complete DeepSpeed checkpoint (no *model_states.pt / *optim_states.pt under {tag_dir}): "
            f"give the checkpoint directory cast fit wrote"
        )
    models = [_load_deepspeed_file(f) for f in model_files]
    optims = [_load_deepspeed_file(f)["optimizer_state_dict"] for f in optim_files]
    partitions = optims[0].get("partition_count")
    world = max(partitions) if isinstance(partitions, (list, tuple)) else int(partitions)
    if world != len(optim_files):
        raise CastError(
            f"DeepSpeed checkpoint {path} was written by {world} ranks but holds {len(optim_files)} optimizer files: "
            f"it is incomplete (an interrupted save?); use an earlier checkpoint"
        )
    if "fp32_flat_groups" in optims[0]:
        state = _zero3_weights(models, [o["fp32_flat_groups"] for o in optims], world)
    elif "single_partition_of_fp32_groups" in optims[0]:
        state = _zero12_weights(models[0], [o["single_partition_of_fp32_groups"] for o in optims], world,
                                optims[0].get("param_alignment_paddings"))
    else:
        raise CastError(f"{path}: the optimizer files hold no ZeRO fp32 partitions; give a checkpoint written by cast fit")
    first = models[0]
    for name in first.get("buffer_names") or []:
        state[name] = first["module"][name]
    for name, source in (first.get("shared_params") or {}).items():
        if source in state:
            state[name] = state[source]
    checkpoint = {k: v for k, v in first.items() if k not in _DEEPSPEED_KEYS}
    # Lightning < 2.1 saved the module behind a wrapper: drop its prefix (as Lightning's own converter does).
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    return checkpoint


def _consumed_check(consumed: int, available: int, align: int, path_hint: str) -> None:
    def aligned(n: int) -> int:
        return align * math.ceil(n / align)

    if aligned(consumed) != aligned(available):
        raise CastError(f"DeepSpeed checkpoint {path_hint}: the parameter shapes use {consumed} of {available} saved values; it is inconsistent")


def _zero12_weights(model_states: dict, partitions: list[list[torch.Tensor]], world: int, paddings) -> dict:
    """ZeRO-1/2: per parameter group the ranks' partitions, in rank order, are the flattened group (plus padding)."""
    state = {}
    for name, shape in (model_states.get("frozen_param_shapes") or {}).items():
        state[name] = model_states["frozen_param_fragments"][name].reshape(shape)
    for group, shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([rank_groups[group] for rank_groups in partitions])
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            state[name] = flat.narrow(0, offset, numel).view(tuple(shape))
            offset += numel + (paddings[group][index] if paddings else 0)
        # Partitions are padded to a multiple of 2 x world size (DeepSpeed aligns them for communication).
        _consumed_check(offset, flat.numel(), 2 * world, f"group {group}")
    return state


def _flat_slice(groups: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of the concatenation of ``groups``, without concatenating them."""
    pieces, base = [], 0
    for tensor in groups:
        lo, hi = max(start - base, 0), min(start + length - base, tensor.numel())
        if lo < hi:
            pieces.append(tensor.narrow(0, lo, hi - lo))
        base += tensor.numel()
    return torch.cat(pieces) if len(pieces) != 1 else pieces[0]


def _zero3_weights(model_states: list[dict], partitions: list[list[torch.Tensor]], world: int) -> dict:
    """ZeRO-3: every parameter is split into ``world`` equal (padded) pieces, piece r in rank r's flat groups at
    the same offset; parameters follow one another in ``param_shapes`` order."""
    state = {}
    first = model_states[0]
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        fragments = torch.cat([m["frozen_param_fragments"][name].reshape(-1) for m in model_states])
        state[name] = fragments.narrow(0, 0, math.prod(shape)).view(tuple(shape))
    offset = 0
    for shapes in first["param_shapes"]:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            piece = math.ceil(numel / world)
            full = torch.cat([_flat_slice(rank_groups, offset, piece) for rank_groups in partitions])
            state[name] = full.narrow(0, 0, numel).view(tuple(shape))
            offset += piece
    _consumed_check(offset, sum(t.numel() for t in partitions[0]), 1, "ZeRO-3 partitions")
    return state
