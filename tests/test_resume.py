"""Fault tolerance: `cast fit` killed with SIGKILL mid-epoch and resumed from its last checkpoint ends with the
same weights as a run that was never interrupted, with the head mask intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cast_lightning.data.resumable import ResumableSampler
from cast_lightning.heads import HeadLayout
from tests.conftest import state_copy
from tests.test_mask_contract import SKIP, assert_contract

ROOT = Path(__file__).resolve().parents[1]


class SigkillAtStep(Callback):
    """Kills its own process, as the OOM killer or a preempted node would: no cleanup, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def test_sampler_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch():
    data = list(range(23))
    sampler = ResumableSampler(data, seed=3)
    sampler.set_epoch(1)
    epoch_1 = list(sampler)
    assert sorted(epoch_1) == data and epoch_1 != data
    assert list(ResumableSampler(data, seed=3)) != epoch_1  # epoch 0 differs from epoch 1
    resumed = ResumableSampler(data, seed=3)
    resumed.resume_from(epoch=1, samples_done=10)
    resumed.set_epoch(1)
    assert list(resumed) == epoch_1[10:]
    assert list(resumed) == epoch_1  # the skip applies once: the next pass of that epoch is whole
    other_epoch = ResumableSampler(data, seed=3)
    other_epoch.resume_from(epoch=0, samples_done=10)  # the checkpoint ended epoch 0; training goes on in epoch 1
    other_epoch.set_epoch(1)
    assert list(other_epoch) == epoch_1
    # Two ranks split each epoch's order between them without overlap.
    ranks = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    assert len(set(ranks[0]) | set(ranks[1])) == len(data)


def _fit(model_dir: Path, data: dict, root: Path, *extra: str) -> subprocess.CompletedProcess:
    # 32 training rows (24 safety + 8 replayed utility) in batches of 5: 7 batches per epoch, so a checkpoint
    # every 3 steps lands mid-epoch (step 9 is batch 2 of epoch 1).
    command = [
        sys.executable, "-m", "cast_lightning.cli", "fit", "--seed_everything=0",
        f"--model.pretrained={model_dir}", f"--model.skip_heads={SKIP}",
        "--model.learning_rate=0.01", "--model.weight_decay=0.1", "--model.warmup_steps=2",
        f"--data.safety_files=[{data['safety']}]", f"--data.utility_files=[{data['utility']}]",
        "--data.utility_replay=0.25", "--data.batch_size=5",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=12", "--trainer.deterministic=true",
        "--trainer.gradient_clip_val=1.0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.save_last=true",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _weights(checkpoint: Path) -> tuple[int, dict[str, torch.Tensor]]:
    saved = torch.load(checkpoint, weights_only=True)
    return saved["global_step"], {k[len("model."):]: v for k, v in saved["state_dict"].items() if k.startswith("model.")}


@pytest.mark.multiprocess
def test_learning_rate_schedule_is_a_pure_function_of_the_step():
    """Linear warmup then cosine to the floor, by hand: warmup 4, 14 steps, floor 0.1. A pure function of the step is
    what lets a resumed run continue the schedule exactly; CASTModule and the base model's pretraining share it."""
    import math

    from cast_lightning.schedule import warmup_cosine, warmup_cosine_factor

    expected = {
        0: 1 / 4,  # (step + 1) / warmup: the first step already trains
        2: 3 / 4,
        3: 1.0,
        4: 1.0,  # cosine from progress 0
        9: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),  # halfway: 0.55
        11: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.7)),
        14: 0.1,  # the floor at the last step
        30: 0.1,  # and held there
    }
    for step, factor in expected.items():
        assert warmup_cosine_factor(step, 14, 4, 0.1) == pytest.approx(factor, abs=1e-12), step
    assert warmup_cosine_factor(9, 14, 4, 0.1) == pytest.approx(0.55, abs=1e-12)
    assert warmup_cosine_factor(0, 10, 0, 0.2) == 1.0  # no warmup: the peak at once
    assert warmup_cosine_factor(10, 10, 0, 0.2) == pytest.approx(0.2, abs=1e-12)

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = warmup_cosine(optimizer, 14, 4, 0.1)
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == 0.5 and seen[4] == 2.0 and seen[9] == pytest.approx(1.1) and seen[14] == pytest.approx(0.2)
    assert scheduler.state_dict()["lr_lambdas"] == [None]  # nothing beyond the step count to checkpoint


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tiny_llama_dir, tiny_data, tmp_path):
    straight = _fit(tiny_llama_dir, tiny_data, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _fit(tiny_llama_dir, tiny_data, tmp_path / "killed",
                  "--trainer.callbacks+=tests.test_resume.SigkillAtStep", "--trainer.callbacks.step=10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    step, _ = _weights(tmp_path / "killed" / "ckpt" / "last.ckpt")
    assert step == 9  # the last checkpoint before the kill, mid-epoch

    resumed = _fit(tiny_llama_dir, tiny_data, tmp_path / "killed", f"--ckpt_path={tmp_path / 'killed' / 'ckpt' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dataloader is not resumable" not in resumed.stderr

    step_a, expected = _weights(tmp_path / "straight" / "ckpt" / "last.ckpt")
    step_b, actual = _weights(tmp_path / "killed" / "ckpt" / "last.ckpt")
    assert step_a == step_b == 12
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"

    # The mask held across the kill: the skipped heads' slices are still the base model's, bit for bit,
    # and everything else trained.
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert_contract(HeadLayout.from_model(base_model), state_copy(base_model), actual, SKIP)
