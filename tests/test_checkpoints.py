"""`cast export` / `cast eval` read checkpoints of every strategy, and read them without running code from them.

The directories here are built in the exact layouts Lightning writes (checked against real ones in
tests/test_strategies.py: FSDP2 on 2 CPU processes; DeepSpeed ZeRO-2/3 on 2 CPU processes where deepspeed is
installed): a DeepSpeed directory (``latest`` + ``checkpoint/*_model_states.pt`` + one
``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank, pickling DeepSpeed objects under their real names), and
distributed-checkpoint directories (FSDP2: ``state_dict.*``; FSDP1 sharded: ``model.*``). DeepSpeed is never needed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cast_lightning.errors import CastError
from cast_lightning.checkpoints import (
    CKPT_DEEPSPEED,
    CKPT_DISTRIBUTED,
    CKPT_FILE,
    checkpoint_kind,
    is_lightning_checkpoint,
    read_checkpoint,
)
from tests.conftest import state_copy
from tests.test_mask_contract import SKIP

WORLD = 2


@pytest.fixture(scope="module")
def trained(tiny_llama_dir) -> dict[str, torch.Tensor]:
    """Lightning state_dict keys -> 'trained' weights: the tiny model's, each moved by a seeded amount."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return {f"model.{n}": p.detach() + 0.01 * torch.randn(p.shape, generator=generator) for n, p in base.named_parameters()}


def client_state(model_dir) -> dict:
    """What Lightning passes DeepSpeed as client state: its checkpoint without state_dict/optimizer_states."""
    return {
        "epoch": 0, "global_step": 6, "pytorch-lightning_version": "2.6.6",
        "hyper_parameters": {"pretrained": str(model_dir), "skip_heads": SKIP, "dtype": "float32"}, "hparams_name": "kwargs",
        "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {}, "lr_schedulers": [], "cast_skip_heads": sorted(SKIP),
    }


# -- DeepSpeed's pickled objects, under their real module paths, without DeepSpeed -----------------------------------


class LossScaler:
    def __init__(self):
        self.cur_scale = 1.0


class ZeroStageEnum(enum.IntEnum):
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclasses.dataclass
class fragment_address:  # noqa: N801  (DeepSpeed's name)
    numel: int
    start: int


def _touch(path):
    Path(path).write_text("ran")


class Payload:
    """Unpickling it runs _touch: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


class ForeignPayload:
    """Unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


FAKE_DEEPSPEED = {
    "deepspeed.runtime.fp16.loss_scaler": {"LossScaler": LossScaler},
    "deepspeed.runtime.zero.config": {"ZeroStageEnum": ZeroStageEnum},
    "deepspeed.utils.tensor_fragment": {"fragment_address": fragment_address},
    "deepspeed.utils.evil": {"_touch": _touch, "Payload": Payload},
}


@contextmanager
def pickled_as_deepspeed():
    """Modules under DeepSpeed's names holding the stand-in classes, so torch.save pickles them as DeepSpeed does;
    gone again on exit, so reading needs no DeepSpeed (and must import nothing by those names)."""
    parents = {"deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.zero", "deepspeed.utils"}
    with pytest.MonkeyPatch.context() as patch:
        for name in parents | set(FAKE_DEEPSPEED):
            module = types.ModuleType(name)
            for attribute, value in FAKE_DEEPSPEED.get(name, {}).items():
                setattr(module, attribute, value)
                value.__module__, value.__qualname__ = name, attribute
            patch.setitem(sys.modules, name, module)
        try:
            yield
        finally:
            for attributes in FAKE_DEEPSPEED.values():
                for value in attributes.values():
                    value.__module__, value.__qualname__ = __name__, value.__name__


def _groups(trained: dict) -> list[list[str]]:
    """Two parameter groups as CASTModule.configure_optimizers makes them (decayed matrices, the rest)."""
    return [[k for k, v in trained.items() if v.ndim >= 2], [k for k, v in trained.items() if v.ndim < 2]]


def write_deepspeed(root: Path, trained: dict, model_dir, stage: int, paddings: int = 0) -> Path:
    """A Lightning DeepSpeed checkpoint directory of ``stage`` written by WORLD ranks, the fp32 masters = ``trained``."""
    tag = root / "checkpoint"
    tag.mkdir(parents=True)
    (root / "latest").write_text("checkpoint")
    groups = _groups(trained)
    param_shapes = [OrderedDict((k, trained[k].shape) for k in group) for group in groups]
    model_states = {
        "buffer_names": [], "optimizer": None, "param_shapes": param_shapes, "frozen_param_shapes": OrderedDict(),
        "shared_params": {}, "frozen_param_fragments": OrderedDict(), "lr_scheduler": None, "data_sampler": None,
        "random_ltd": None, "skipped_steps": 0, "global_steps": 6, "global_samples": 24, "dp_world_size": WORLD,
        "mp_world_size": 1, "checkpoint_parallel_dimensions": {"dp": WORLD}, "ds_config": {"zero_optimization": {"stage": stage}},
        "ds_version": "0.19.8", **client_state(model_dir),
    }
    common = {"loss_scaler": LossScaler(), "dynamic_loss_scale": False, "overflow": False, "zero_stage": ZeroStageEnum(stage)}
    if stage <= 2:
        # Each group: its parameters flattened in order (each followed by its alignment padding), padded to a
        # multiple of 2 x world, split into equal consecutive partitions, one per rank.
        pads = [[paddings * (i % 2) for i in range(len(group))] for group in groups]
        flats, mappings = [], [OrderedDict() for _ in range(WORLD)]
        for group, group_pads in zip(groups, pads):
            pieces = []
            for key, pad in zip(group, group_pads):
                pieces += [trained[key].reshape(-1), torch.full((pad,), float("nan"))]
            flat = torch.cat(pieces)
            align = 2 * WORLD
            flat = torch.cat([flat, torch.zeros(align * math.ceil(flat.numel() / align) - flat.numel())])
            flats.append(flat.chunk(WORLD))
        torch.save({**model_states, "module": OrderedDict((k, v.clone()) for k, v in trained.items())}, tag / "mp_rank_00_model_states.pt")
        for rank in range(WORLD):
            mappings[rank]["model.lm_head.weight"] = fragment_address(numel=4, start=0)
            state = {**common, "clip_grad": 1.0, "base_optimizer_state": {"state": {}, "param_groups": []},
                     "single_partition_of_fp32_groups": [parts[rank].clone() for parts in flats], "group_paddings": [0, 0],
                     "param_alignment_paddings": pads, "partition_count": [WORLD, WORLD], "ds_version": "0.19.8",
                     "param_slice_mappings": [mappings[rank]]}
            torch.save({"optimizer_state_dict": state, "ds_config": {}, "ds_version": "0.19.8"},
                       tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        return root
    # ZeRO-3: every parameter padded to a multiple of world and cut into equal pieces; piece r is in rank r's group.
    rank_groups = [[[] for _ in groups] for _ in range(WORLD)]
    for g, group in enumerate(groups):
        for key in group:
            flat = trained[key].reshape(-1)
            piece = math.ceil(flat.numel() / WORLD)
            flat = torch.cat([flat, torch.zeros(piece * WORLD - flat.numel())])
            for rank in range(WORLD):
                rank_groups[rank][g].append(flat[rank * piece:(rank + 1) * piece])
    for rank in range(WORLD):
        module = OrderedDict((k, torch.empty(0)) for k in trained)  # ZeRO-3 saves placeholders for partitioned weights
        torch.save({**model_states, "module": module}, tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        state = {**common, "partition_count": WORLD, "optimizer_state_dict": {"state": {}, "param_groups": []},
                 "fp32_flat_groups": [torch.cat(pieces) for pieces in rank_groups[rank]]}
        torch.save({"optimizer_state_dict": state, "ds_config": {}, "ds_version": "0.19.8"},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return root


@pytest.mark.parametrize("stage", [2, 3])
def test_export_and_eval_read_a_deepspeed_directory(stage, trained, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from cast_lightning.evaluation import load_for_eval
    from cast_lightning.export import export

    with pickled_as_deepspeed():
        ckpt = write_deepspeed(tmp_path / "epoch=0-step=6.ckpt", trained, tiny_llama_dir, stage, paddings=2)
    optim = ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert "deepspeed.runtime.fp16.loss_scaler.LossScaler" in torch.serialization.get_unsafe_globals_in_checkpoint(optim)
    with pytest.raises(Exception):  # plain weights_only refuses DeepSpeed's objects: the stand-ins are needed
        torch.load(optim, weights_only=True)

    assert checkpoint_kind(str(ckpt)) == CKPT_DEEPSPEED and is_lightning_checkpoint(str(ckpt))
    saved = read_checkpoint(str(ckpt))
    assert saved["cast_skip_heads"] == sorted(SKIP) and saved["global_step"] == 6
    assert "module" not in saved and "ds_config" not in saved  # DeepSpeed's own entries are dropped
    assert set(saved["state_dict"]) == set(trained)
    for key, tensor in trained.items():
        assert torch.equal(saved["state_dict"][key], tensor), key

    export(ckpt_path=str(ckpt), output_dir=str(tmp_path / "hf"))
    exported = state_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    for key, tensor in trained.items():
        assert torch.equal(exported[key[len("model."):]], tensor), key
    assert json.loads((tmp_path / "hf" / "cast_skip_heads.json").read_text())["skip_heads"] == sorted(SKIP)

    model, _, identity = load_for_eval(str(ckpt), device="cpu")
    assert identity["kind"] == "lightning_checkpoint" and identity["global_step"] == 6
    model_files = WORLD if stage == 3 else 1
    assert len(identity["fingerprint"]["files"]) == 1 + model_files + WORLD  # latest, model states, optimizer shards
    for name, tensor in state_copy(model).items():
        assert torch.equal(tensor, trained[f"model.{name}"]), name


def test_deepspeed_objects_stand_in_inertly_and_foreign_pickles_are_refused(trained, tiny_llama_dir, tmp_path):
    """A callable pickled under a deepspeed.* name is never called (an inert record takes its place); anything
    outside deepspeed.* that weights_only refuses makes the whole checkpoint refused, before unpickling."""
    optim = tmp_path / "ds.ckpt" / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "marker"
    with pickled_as_deepspeed():
        ckpt = write_deepspeed(tmp_path / "ds.ckpt", trained, tiny_llama_dir, 2)
        state = torch.load(optim, weights_only=False)
        state["optimizer_state_dict"]["loss_scaler"] = Payload(str(marker))  # pickled as deepspeed.utils.evil._touch
        torch.save(state, optim)
    assert set(read_checkpoint(str(ckpt))["state_dict"]) == set(trained)
    assert not marker.exists()

    state["optimizer_state_dict"]["loss_scaler"] = ForeignPayload(str(marker))  # pickled as os.system: refused outright
    with pickled_as_deepspeed():
        torch.save(state, optim)
    assert [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(optim) if not n.startswith("deepspeed.")] == [
        f"{os.system.__module__}.system"
    ]
    with pytest.raises(CastError, match=r"refused checkpoint file .*\.system"):
        read_checkpoint(str(ckpt))
    assert not marker.exists()


def test_an_incomplete_deepspeed_directory_is_named(trained, tiny_llama_dir, tmp_path):
    with pickled_as_deepspeed():
        ckpt = write_deepspeed(tmp_path / "ds.ckpt", trained, tiny_llama_dir, 3)
    (ckpt / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CastError, match="written by 2 ranks but holds 1 optimizer files"):
        read_checkpoint(str(ckpt))
    (ckpt / "latest").write_text("global_step9")
    with pytest.raises(CastError, match="not a complete DeepSpeed checkpoint"):
        read_checkpoint(str(ckpt))


# -- distributed checkpoints (FSDP2, FSDP1 sharded) -----------------------------------------------------------------


def write_distributed(root: Path, trained: dict, model_dir, top: str) -> Path:
    """A distributed checkpoint as Lightning saves it: weights under ``top`` (``state_dict``: ModelParallelStrategy;
    ``model``: FSDPStrategy sharded), optimizer state beside them (param groups are pickled bytes), meta.pt."""
    from torch.distributed.checkpoint import save

    optimizer = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in trained.items()},
                 "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": list(trained)}]}
    save({top: dict(trained), "optimizer_0": optimizer}, checkpoint_id=root, no_dist=True)
    torch.save(client_state(model_dir), root / "meta.pt")
    return root


@pytest.mark.parametrize("top", ["state_dict", "model"])
def test_distributed_checkpoint_reads_only_the_model_tensors(top, trained, tiny_llama_dir, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import DefaultLoadPlanner

    ckpt = write_distributed(tmp_path / "epoch=0-step=6.ckpt", trained, tiny_llama_dir, top)

    def refuse(*args, **kwargs):
        raise AssertionError("a pickled (non-tensor) entry was read")

    monkeypatch.setattr(DefaultLoadPlanner, "load_bytes", refuse)  # torch reads those with weights_only=False
    assert checkpoint_kind(str(ckpt)) == CKPT_DISTRIBUTED and is_lightning_checkpoint(str(ckpt))
    saved = read_checkpoint(str(ckpt))
    assert saved["cast_skip_heads"] == sorted(SKIP) and saved["hyper_parameters"]["pretrained"] == str(tiny_llama_dir)
    assert set(saved["state_dict"]) == set(trained)
    for key, tensor in trained.items():
        assert torch.equal(saved["state_dict"][key], tensor), key


def test_distributed_checkpoint_metadata_naming_other_code_is_refused(trained, tiny_llama_dir, tmp_path):
    import pickle

    ckpt = write_distributed(tmp_path / "run.ckpt", trained, tiny_llama_dir, "state_dict")
    marker = tmp_path / "marker"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(CastError, match=r"refused checkpoint .*tests.test_checkpoints._touch is not allowed"):
        read_checkpoint(str(ckpt))
    assert not marker.exists()


def test_checkpoint_kinds_and_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "plain").mkdir()
    assert checkpoint_kind(str(tmp_path / "last.ckpt")) == CKPT_FILE and is_lightning_checkpoint(str(tmp_path / "last.ckpt"))
    assert not is_lightning_checkpoint(str(tmp_path / "weights.bin"))
    assert checkpoint_kind(str(tmp_path / "plain")) is None and checkpoint_kind(str(tmp_path / "missing")) is None
    with pytest.raises(CastError, match="is a directory but not a sharded checkpoint"):
        read_checkpoint(str(tmp_path / "plain"))
    with pytest.raises(CastError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing"))
    assert os.path.exists(tmp_path / "plain")


def test_a_checkpoint_of_another_model_is_named(trained, tiny_llama_dir, tmp_path):
    from cast_lightning.checkpoints import load_checkpoint_model

    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {**trained, "model.lm_head.weight": torch.zeros(3, 32)}, **client_state(tiny_llama_dir)}, path)
    with pytest.raises(CastError, match=r"does not fit the model .*1 tensors of another shape, e.g. lm_head.weight"):
        load_checkpoint_model(str(path))
