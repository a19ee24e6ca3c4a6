"""The mask contract, bit for bit: skipped heads' slices never change during fine-tuning, everything else does."""

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
from cast_lightning.heads import HeadLayout
from cast_lightning.module import CASTModule
from tests.conftest import state_copy

# Layer 0: head 1 alone (its KV group 0 shares head 0, so k/v stay trainable under kv_policy "all").
# Layer 1: heads 2 and 3 = the whole KV group 1, so its k/v rows freeze too.
SKIP = [[0, 1], [1, 2], [1, 3]]


def frozen_mask(layout: HeadLayout, parameters: dict[str, torch.Tensor], skip, kv_policy="all") -> dict[str, torch.Tensor]:
    """name -> boolean tensor, True where the element belongs to a frozen slice."""
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in parameters.items()}
    for s in layout.frozen_slices([tuple(h) for h in skip], kv_policy):
        if s.name in masks:
            masks[s.name].narrow(s.dim, s.start, s.stop - s.start).fill_(True)
    return masks


def assert_contract(layout, before: dict, after: dict, skip, kv_policy="all") -> None:
    masks = frozen_mask(layout, before, skip, kv_policy)
    assert sum(int(m.sum()) for m in masks.values()) > 0
    for name, old in before.items():
        new, frozen = after[name], masks[name]
        # Frozen slices: bit-identical.
        assert torch.equal(old[frozen], new[frozen]), f"frozen slice of {name} changed"
        # Every other element of every trainable parameter moved (AdamW + weight decay touch them all).
        free = ~frozen
        if free.any():
            changed = (old[free] != new[free]).float().mean().item()
            assert changed > 0.99, f"{name}: only {changed:.1%} of trainable elements changed"
    # Under kv_policy "all", layer 1's KV group 1 is frozen and layer 0's KV group 0 is not.
    assert masks["model.layers.1.self_attn.k_proj.weight"][layout.head_dim : 2 * layout.head_dim].all()
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
    assert_contract(module.layout, before, state_copy(module.model), SKIP)


def test_clipping_sees_no_frozen_gradient(tiny_llama_dir, tiny_data, tmp_path):
    seen = []

    class Recording(CASTModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
            masks = frozen_mask(self.layout, grads, SKIP)
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
    assert_contract(resumed.layout, before, state_copy(resumed.model), SKIP)


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
    assert_contract(reference.layout, before, after, SKIP)
