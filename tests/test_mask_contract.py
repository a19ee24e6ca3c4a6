"""The mask contract, bit for bit: skipped heads' slices never change during fine-tuning, everything else does.

The oracle (``oracle_slices``, ``frozen_mask``, ``assert_contract``) is computed here from each architecture's
published attention layout and the config's head counts, not from ``HeadLayout.frozen_slices``: a wrong slice in
heads.py fails these tests instead of agreeing with itself. ``test_oracle_agrees_with_head_layout_on_every_architecture``
compares the two element by element for every tiny architecture and KV policy.
"""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cast_lightning.data.datamodule import SafetyUtilityDataModule
from cast_lightning.errors import CastError
from cast_lightning.module import CASTModule
from tests.conftest import state_copy
from tests.tiny_models import ARCHITECTURES, tiny_model

# Layer 0: head 1 alone (its KV group 0 shares head 0, so k/v stay trainable under kv_policy "all").
# Layer 1: heads 2 and 3 = the whole KV group 1, so its k/v rows freeze too.
SKIP = [[0, 1], [1, 2], [1, 3]]


# -- the oracle: each architecture's published attention layout, written out here, independent of heads.py ----------

SEPARATE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def geometry(source) -> dict:
    """(architecture, layers, H, H_kv, d, hidden) from an HF config (the published fields), or the same numbers from
    a HeadLayout's fields when a caller holds only that."""
    if hasattr(source, "model_type"):
        arch = source.model_type
        heads = getattr(source, "num_attention_heads", None) or source.n_head
        hidden = getattr(source, "hidden_size", None) or source.n_embd
        layers = getattr(source, "num_hidden_layers", None) or source.n_layer
        kv = heads if arch in ("gpt2", "gpt_neox") else (getattr(source, "num_key_value_heads", None) or heads)
        d = getattr(source, "head_dim", None) or hidden // heads
        return dict(arch=arch, layers=layers, H=heads, H_kv=kv, d=d, hidden=hidden)
    return dict(arch=source.architecture, layers=source.num_layers, H=source.num_heads, H_kv=source.num_kv_heads,
                d=source.head_dim, hidden=source.hidden_size)


def head_slices(g: dict, layer: int, head: int) -> list[tuple[str, int, int, int]]:
    """(parameter, dim, start, stop) owned by query head ``head`` alone: its query features and its output columns."""
    d, H, h = g["d"], g["H"], head
    if g["arch"] in SEPARATE:
        p = f"model.layers.{layer}.self_attn"
        return [(f"{p}.q_proj.weight", 0, h * d, (h + 1) * d), (f"{p}.q_proj.bias", 0, h * d, (h + 1) * d),
                (f"{p}.o_proj.weight", 1, h * d, (h + 1) * d)]
    if g["arch"] == "phi3":  # qkv_proj rows [q heads | k groups | v groups]
        p = f"model.layers.{layer}.self_attn"
        return [(f"{p}.qkv_proj.weight", 0, h * d, (h + 1) * d), (f"{p}.o_proj.weight", 1, h * d, (h + 1) * d)]
    if g["arch"] == "gpt2":  # Conv1D: c_attn.weight is (in, 3 * H * d): q columns, then k, then v
        p = f"transformer.h.{layer}.attn"
        return [(f"{p}.c_attn.weight", 1, h * d, (h + 1) * d), (f"{p}.c_attn.bias", 0, h * d, (h + 1) * d),
                (f"{p}.c_proj.weight", 0, h * d, (h + 1) * d)]
    if g["arch"] == "gpt_neox":  # query_key_value rows, per head [q | k | v], each d
        p = f"gpt_neox.layers.{layer}.attention"
        q = 3 * h * d
        return [(f"{p}.query_key_value.weight", 0, q, q + d), (f"{p}.query_key_value.bias", 0, q, q + d),
                (f"{p}.dense.weight", 1, h * d, (h + 1) * d)]
    raise AssertionError(f"no published layout for {g['arch']} in the oracle")


def group_slices(g: dict, layer: int, group: int) -> list[tuple[str, int, int, int]]:
    """(parameter, dim, start, stop) of KV group ``group``'s key and value features."""
    d, H, G, k = g["d"], g["H"], g["H_kv"], group
    if g["arch"] in SEPARATE:
        p = f"model.layers.{layer}.self_attn"
        return [(f"{p}.{m}.{t}", 0, k * d, (k + 1) * d) for m in ("k_proj", "v_proj") for t in ("weight", "bias")]
    if g["arch"] == "phi3":
        p = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        return [(p, 0, H * d + k * d, H * d + (k + 1) * d), (p, 0, H * d + G * d + k * d, H * d + G * d + (k + 1) * d)]
    if g["arch"] == "gpt2":
        p = f"transformer.h.{layer}.attn.c_attn"
        out = []
        for base in (H * d, 2 * H * d):
            out += [(f"{p}.weight", 1, base + k * d, base + (k + 1) * d), (f"{p}.bias", 0, base + k * d, base + (k + 1) * d)]
        return out
    if g["arch"] == "gpt_neox":
        p = f"gpt_neox.layers.{layer}.attention.query_key_value"
        out = []
        for offset in (d, 2 * d):
            start = 3 * k * d + offset
            out += [(f"{p}.weight", 0, start, start + d), (f"{p}.bias", 0, start, start + d)]
        return out
    raise AssertionError(f"no published layout for {g['arch']} in the oracle")


def oracle_slices(source, skip, kv_policy="all") -> list[tuple[str, int, int, int]]:
    """Every frozen (parameter, dim, start, stop): each skipped head's own slices, and a KV group's k/v features when
    all (``all``) or any (``any``) of its query heads h (group h // (H / H_kv)) are skipped; never under ``never``."""
    g = geometry(source)
    skip = {(int(layer), int(head)) for layer, head in skip}
    per_group = g["H"] // g["H_kv"]
    out = [s for layer, head in sorted(skip) for s in head_slices(g, layer, head)]
    for layer in range(g["layers"]):
        for group in range(g["H_kv"]):
            members = [(layer, h) in skip for h in range(group * per_group, (group + 1) * per_group)]
            if (kv_policy == "all" and all(members)) or (kv_policy == "any" and any(members)):
                out += group_slices(g, layer, group)
    return out


def frozen_mask(source, parameters: dict[str, torch.Tensor], skip, kv_policy="all") -> dict[str, torch.Tensor]:
    """name -> boolean tensor, True where the element belongs to a frozen slice (from the oracle above)."""
    masks = {name: torch.zeros(tuple(p.shape), dtype=torch.bool) for name, p in parameters.items()}
    for name, dim, start, stop in oracle_slices(source, skip, kv_policy):
        if name in masks:
            masks[name].narrow(dim, start, stop - start).fill_(True)
    return masks


def assert_contract(source, before: dict, after: dict, skip, kv_policy="all", trainable=None) -> None:
    """Frozen slices bit-identical; more than 99% of every other element of each trainable parameter changed (AdamW
    and weight decay move them all); parameters outside the scope (``trainable``: names; None = all) bit-identical."""
    masks = frozen_mask(source, before, skip, kv_policy)
    trainable = set(before) if trainable is None else set(trainable)
    assert trainable, "the scope trains nothing"
    assert not skip or any(int(m.sum()) for m in masks.values()), "the oracle froze nothing"
    for name, old in before.items():
        new, frozen = after[name], masks[name]
        if name not in trainable:
            assert torch.equal(old, new), f"{name} is outside the scope but changed"
            continue
        # Frozen slices: bit-identical.
        assert torch.equal(old[frozen], new[frozen]), f"frozen slice of {name} changed"
        # Every other element of every trainable parameter moved (AdamW + weight decay touch them all).
        free = ~frozen
        if free.any():
            changed = (old[free] != new[free]).float().mean().item()
            assert changed > 0.99, f"{name}: only {changed:.1%} of trainable elements changed"
    g = geometry(source)
    if g["arch"] == "llama" and kv_policy == "all" and sorted(map(tuple, skip)) == sorted(map(tuple, SKIP)):
        # The oracle itself: layer 1's KV group 1 is frozen and layer 0's KV group 0 is not.
        assert masks["model.layers.1.self_attn.k_proj.weight"][g["d"] : 2 * g["d"]].all()
        assert not masks["model.layers.0.self_attn.k_proj.weight"].any()


def make_trainer(tmp_path, max_steps: int, precision: str = "32-true", callbacks=None, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        precision=precision,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks or [],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
        **kwargs,
    )


def datamodule(model_dir, data) -> SafetyUtilityDataModule:
    return SafetyUtilityDataModule(
        safety_files=[str(data["safety"])], utility_files=[str(data["utility"])], utility_replay=0.25,
        tokenizer=str(model_dir), batch_size=4, seed=0,
    )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_skipped_heads_bit_identical_and_others_change(tiny_llama_dir, tiny_data, tmp_path, precision):
    L.seed_everything(0)
    module = CASTModule(str(tiny_llama_dir), skip_heads=SKIP, learning_rate=1e-2, weight_decay=0.1, warmup_steps=1)
    before = state_copy(module.model)
    make_trainer(tmp_path, max_steps=6, precision=precision).fit(module, datamodule(tiny_llama_dir, tiny_data))
    assert module.trainer.global_step == 6
    assert_contract(module.model.config, before, state_copy(module.model), SKIP)


def test_clipping_sees_no_frozen_gradient(tiny_llama_dir, tiny_data, tmp_path):
    seen = []

    class Recording(CASTModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
            masks = frozen_mask(self.model.config, grads, SKIP)
            frozen_total = sum(float(g[masks[n]].abs().sum()) for n, g in grads.items())
            expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
            measured = torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)
            seen.append((frozen_total, float(expected), float(measured)))

    L.seed_everything(0)
    module = Recording(str(tiny_llama_dir), skip_heads=SKIP, learning_rate=1e-2, weight_decay=0.1)
    make_trainer(tmp_path, max_steps=3).fit(module, datamodule(tiny_llama_dir, tiny_data))
    assert len(seen) == 3
    for frozen_total, expected, measured in seen:
        assert frozen_total == 0.0  # the norm that clipping computes contains no frozen element
        assert measured == pytest.approx(expected, rel=1e-6) and measured > 0


def test_resume_keeps_mask_from_checkpoint(tiny_llama_dir, tiny_data, tmp_path):
    L.seed_everything(0)
    module = CASTModule(str(tiny_llama_dir), skip_heads=SKIP, learning_rate=1e-2, weight_decay=0.1)
    before = state_copy(module.model)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    make_trainer(tmp_path, max_steps=3, callbacks=[checkpoint]).fit(module, datamodule(tiny_llama_dir, tiny_data))
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["cast_skip_heads"] == sorted(SKIP)

    # Resume with no mask configured: the checkpoint's mask is restored and still holds.
    resumed = CASTModule(str(tiny_llama_dir), learning_rate=1e-2, weight_decay=0.1)
    assert resumed.skip_heads == []
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")])
    trainer.fit(resumed, datamodule(tiny_llama_dir, tiny_data), ckpt_path=str(last))
    assert resumed.skip_heads == sorted(tuple(h) for h in SKIP)
    assert trainer.global_step == 6
    assert_contract(resumed.model.config, before, state_copy(resumed.model), SKIP)


def test_resume_with_a_different_mask_is_an_error(tiny_llama_dir, tiny_data, tmp_path):
    module = CASTModule(str(tiny_llama_dir), skip_heads=SKIP)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, max_steps=1, callbacks=[checkpoint]).fit(module, datamodule(tiny_llama_dir, tiny_data))
    other = CASTModule(str(tiny_llama_dir), skip_heads=[[0, 0]])
    with pytest.raises(CastError, match="drop --model.conflict_map"):
        make_trainer(tmp_path, max_steps=2).fit(other, datamodule(tiny_llama_dir, tiny_data), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_full_fine_tuning_changes_every_parameter(tiny_llama_dir, tiny_data, tmp_path):
    L.seed_everything(0)
    module = CASTModule(str(tiny_llama_dir), learning_rate=1e-2, weight_decay=0.1)
    assert not module.head_mask
    before = state_copy(module.model)
    make_trainer(tmp_path, max_steps=3).fit(module, datamodule(tiny_llama_dir, tiny_data))
    after = state_copy(module.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.multiprocess
def test_mask_contract_under_ddp_two_processes(tiny_llama_dir, tiny_data, tmp_path):
    """`cast fit --trainer.strategy ddp --trainer.devices 2` on CPU: the contract holds in the saved weights."""
    command = [
        sys.executable, "-m", "cast_lightning.cli", "fit",
        f"--model.pretrained={tiny_llama_dir}", f"--model.skip_heads={SKIP}",
        "--model.learning_rate=0.01", "--model.weight_decay=0.1",
        f"--data.safety_files=[{tiny_data['safety']}]", f"--data.utility_files=[{tiny_data['utility']}]",
        "--data.utility_replay=0.25", "--data.batch_size=2",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.max_steps=5", "--trainer.accumulate_grad_batches=2", "--trainer.gradient_clip_val=1.0",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
    ]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    saved = torch.load(checkpoints[0], weights_only=True)
    assert saved["global_step"] == 5 and saved["cast_skip_heads"] == sorted(SKIP)
    reference = CASTModule(str(tiny_llama_dir))
    before = state_copy(reference.model)
    after = {k[len("model."):]: v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    assert_contract(reference.model.config, before, after, SKIP)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_oracle_agrees_with_head_layout_on_every_architecture(architecture):
    """The published layouts above and HeadLayout.frozen_slices freeze the same elements, for every tiny architecture,
    KV policy and a few skip sets (one head; a whole KV group; heads of several groups in both layers)."""
    from cast_lightning.heads import HeadLayout

    model = tiny_model(architecture)
    layout = HeadLayout.from_model(model)
    assert geometry(model.config) == geometry(layout)
    parameters = dict(model.named_parameters())
    for skip in ([[0, 0]], [[1, 2], [1, 3]], [[0, 1], [0, 2], [1, 0], [1, 3]], SKIP):
        for kv_policy in ("all", "any", "never"):
            expected = frozen_mask(model.config, parameters, skip, kv_policy)
            actual = {n: torch.zeros(tuple(p.shape), dtype=torch.bool) for n, p in parameters.items()}
            for s in layout.frozen_slices([tuple(h) for h in skip], kv_policy):
                if s.name in actual:
                    actual[s.name].narrow(s.dim, s.start, s.stop - s.start).fill_(True)
            for name in parameters:
                assert torch.equal(expected[name], actual[name]), (architecture, skip, kv_policy, name)
            assert sum(int(m.sum()) for m in expected.values()) > 0
