"""Fault tolerance and resume honesty.

- `cast fit` killed with SIGKILL mid-epoch and resumed from its last checkpoint, or stopped by SIGTERM / SIGUSR1
  (a cluster's preemption notice) and resumed from the checkpoint it saved on the signal, ends with the same weights
  as a run that was never interrupted, with the head mask intact; Lightning's own SLURM requeue (SIGUSR1 ->
  hpc_ckpt + scontrol requeue, then an automatic resume) keeps working.
- On --ckpt_path, an option this run sets that differs from the checkpoint is applied (learning rate, weight decay,
  max_steps: the optimizer and schedule really use it) or refused in one line naming the key and both values; an
  option it leaves unset takes the checkpoint's value.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cast_lightning.data.resumable import ResumableSampler
from tests.conftest import state_copy
from tests.test_cli import run_cast
from tests.test_mask_contract import SKIP, assert_contract

ROOT = Path(__file__).resolve().parents[1]


class SignalAtStep(Callback):
    """Sends its own process ``signal`` when ``step`` optimizer steps are done, as a cluster's preemption notice
    would arrive at some point of a batch."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class LearningRateProbe(Callback):
    """Appends (step, lr and weight decay of every param group) to ``path`` before each optimizer step's batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "lr": [g["lr"] for g in groups],
                                     "weight_decay": [g["weight_decay"] for g in groups]}) + "\n")


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


def _fit(model_dir: Path, data: dict, root: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
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
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
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


@pytest.fixture(scope="module")
def straight(tiny_llama_dir, tiny_data, tmp_path_factory) -> tuple[int, dict[str, torch.Tensor]]:
    """The uninterrupted run every interrupted one must end equal to: (global step, weights) of its last.ckpt."""
    root = tmp_path_factory.mktemp("straight")
    run = _fit(tiny_llama_dir, tiny_data, root)
    assert run.returncode == 0, run.stderr[-3000:]
    return _weights(root / "ckpt" / "last.ckpt")


def _assert_same_as_straight(straight, checkpoint: Path, base_dir: Path) -> None:
    step_a, expected = straight
    step_b, actual = _weights(checkpoint)
    assert step_a == step_b == 12
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
    # The mask held across the interruption: the skipped heads' slices are still the base model's, bit for bit,
    # and everything else trained.
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base_dir)
    assert_contract(base_model.config, state_copy(base_model), actual, SKIP)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tiny_llama_dir, tiny_data, tmp_path, straight):
    killed = _fit(tiny_llama_dir, tiny_data, tmp_path / "killed",
                  "--trainer.callbacks+=tests.test_resume.SigkillAtStep", "--trainer.callbacks.step=10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    step, _ = _weights(tmp_path / "killed" / "ckpt" / "last.ckpt")
    assert step == 9  # the last checkpoint before the kill, mid-epoch

    resumed = _fit(tiny_llama_dir, tiny_data, tmp_path / "killed", f"--ckpt_path={tmp_path / 'killed' / 'ckpt' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dataloader is not resumable" not in resumed.stderr
    _assert_same_as_straight(straight, tmp_path / "killed" / "ckpt" / "last.ckpt", tiny_llama_dir)


def _preempt(tiny_llama_dir, tiny_data, root: Path, signame: str) -> subprocess.CompletedProcess:
    """A fit that receives ``signame`` during the batch after step 7 (mid-epoch 1: 7 batches per epoch)."""
    return _fit(tiny_llama_dir, tiny_data, root, "--trainer.callbacks+=tests.test_resume.SignalAtStep",
                "--trainer.callbacks.step=7", f"--trainer.callbacks.signal={signame}")


@pytest.fixture(scope="module")
def sigterm_stop(tiny_llama_dir, tiny_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("sigterm") / "run"
    return root, _preempt(tiny_llama_dir, tiny_data, root, "SIGTERM")


def test_sigterm_saves_a_checkpoint_that_resumes_bit_identically(tiny_llama_dir, tiny_data, straight, sigterm_stop):
    """SIGTERM: the batch in flight finishes, preempted.ckpt is saved, the exit code says SIGTERM (143) and the one
    line says how to resume; resuming from it ends bit for bit as the uninterrupted run."""
    root, stopped = sigterm_stop
    checkpoint = root / "preempted.ckpt"
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    ours = [line for line in stopped.stderr.splitlines() if line.startswith("cast fit:")]
    assert ours == [f"cast fit: stopped by SIGTERM at step 8; saved {checkpoint}; resume: the same command with "
                    f"--ckpt_path {checkpoint}"], stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-1] == ours[0]  # the last word
    assert _weights(checkpoint)[0] == 8 and _weights(root / "ckpt" / "last.ckpt")[0] == 6  # newer than the periodic one
    assert not list(root.glob(".preempted.ckpt.*"))  # written atomically: no temporary file left

    resumed = _fit(tiny_llama_dir, tiny_data, root, f"--ckpt_path={checkpoint}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as_straight(straight, root / "ckpt" / "last.ckpt", tiny_llama_dir)


def test_sigusr1_saves_the_same_checkpoint_as_sigterm(tiny_llama_dir, tiny_data, tmp_path, sigterm_stop):
    """SLURM's --signal=USR1 outside Lightning's auto-requeue: the same stop and the same checkpoint (bit for bit in
    every tensor as SIGTERM's, which resumes exactly), exit code 138."""
    root = tmp_path / "preempted"
    stopped = _preempt(tiny_llama_dir, tiny_data, root, "SIGUSR1")
    checkpoint = root / "preempted.ckpt"
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-1] == (f"cast fit: stopped by SIGUSR1 at step 8; saved {checkpoint}; resume: "
                                               f"the same command with --ckpt_path {checkpoint}")
    ours, theirs = (torch.load(p, weights_only=True) for p in (checkpoint, sigterm_stop[0] / "preempted.ckpt"))
    assert ours["global_step"] == theirs["global_step"] == 8
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        assert _tensors(ours[key]) == _tensors(theirs[key]), key


def _tensors(tree) -> list:
    """Every leaf of a checkpoint section, tensors as bytes, so two sections compare bit for bit."""
    if isinstance(tree, dict):
        return [(k, _tensors(v)) for k, v in sorted(tree.items(), key=lambda kv: str(kv[0]))]
    if isinstance(tree, (list, tuple)):
        return [_tensors(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return [str(tree.dtype), list(tree.shape), tree.numpy().tobytes()]
    return tree


FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "{log}"
"""


def test_lightnings_slurm_requeue_still_works(tiny_llama_dir, tiny_data, tmp_path):
    """Under SLURM with Lightning's auto-requeue, SIGUSR1 stays Lightning's: it saves hpc_ckpt_1.ckpt, runs
    `scontrol requeue <job>` and training goes on (no preemption stop of ours); the requeued job then resumes from
    the hpc checkpoint by itself, through cast's checkpoint checks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format(log=log))
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "cast-fit", "SLURM_JOB_ID": "4242",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    root = tmp_path / "slurm"
    first = _fit(tiny_llama_dir, tiny_data, root, "--trainer.callbacks+=tests.test_resume.SignalAtStep",
                 "--trainer.callbacks.step=4", "--trainer.callbacks.signal=SIGUSR1", env=slurm)
    assert first.returncode == 0, first.stderr[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    assert (root / "hpc_ckpt_1.ckpt").is_file() and not (root / "preempted.ckpt").exists()
    assert _weights(root / "ckpt" / "last.ckpt")[0] == 12  # the run went on after the requeue signal

    # The requeued job: the same command, no --ckpt_path; Lightning picks the hpc checkpoint itself.
    hpc_step = _weights(root / "hpc_ckpt_1.ckpt")[0]
    (root / "ckpt").rename(tmp_path / "first_run_ckpt")
    again = _fit(tiny_llama_dir, tiny_data, root, env=slurm)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {root / 'hpc_ckpt_1.ckpt'}" in again.stderr
    checkpoints = sorted((root / "ckpt").glob("epoch=*.ckpt"))
    assert checkpoints and min(_weights(p)[0] for p in checkpoints) > hpc_step  # it went on from there


# --- resume honesty ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tiny_data, tmp_path_factory) -> Path:
    """A 3-step fit (learning rate 0.01, warmup 2, no weight decay, batches of 4) to resume from."""
    root = tmp_path_factory.mktemp("trained")
    assert run_cast(_resume_args(tiny_llama_dir, tiny_data, root, "--trainer.max_steps=3", "--model.learning_rate=0.01",
                                 "--model.warmup_steps=2", "--trainer.callbacks+=cast_lightning.callbacks.FinalCheckpoint")) == 0
    return root / "final.ckpt"


def _resume_args(model_dir, data, root, *extra) -> list:
    return ["fit", "--seed_everything=0", f"--model.pretrained={model_dir}", f"--data.safety_files=[{data['safety']}]",
            "--data.batch_size=4", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}", *extra]


def _probed(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_changed_learning_rate_and_weight_decay_apply_on_resume(trained, tiny_llama_dir, tiny_data, tmp_path, capsys):
    """LightningCLI alone would reload the checkpoint's hyperparameters over these flags, and Lightning's optimizer
    restore would keep the old rate even then: here the resumed steps run at 0.02 on the schedule of the new
    max_steps, with weight decay 0.5 on the decayed group, and each applied change is one announced line."""
    from cast_lightning.schedule import warmup_cosine_factor

    probe = tmp_path / "lr.jsonl"
    args = _resume_args(tiny_llama_dir, tiny_data, tmp_path / "run", f"--ckpt_path={trained}", "--trainer.max_steps=6",
                        "--model.learning_rate=0.02", "--model.weight_decay=0.5",
                        "--trainer.callbacks+=tests.test_resume.LearningRateProbe", f"--trainer.callbacks.path={probe}")
    assert run_cast(args) == 0
    out = capsys.readouterr().out
    for key, now, before in (("model.learning_rate", 0.02, 0.01), ("model.weight_decay", 0.5, 0.0),
                             ("trainer.max_steps", 6, 3)):
        assert (f"[cast] --ckpt_path {trained}: {key} is {now} in this run, {before} in the checkpoint: "
                f"this run's value applies") in out, out
    rows = _probed(probe)
    assert [row["step"] for row in rows] == [3, 4, 5]
    for row in rows:  # warmup 2 is the checkpoint's (not set here): inherited
        expected = 0.02 * warmup_cosine_factor(row["step"], 6, 2, 0.1)
        assert row["lr"] == [pytest.approx(expected, rel=1e-12)] * 2, row
        assert row["weight_decay"] == [0.5, 0.0], row
    (last,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 6 and saved["hyper_parameters"]["learning_rate"] == 0.02 and saved["hyper_parameters"]["warmup_steps"] == 2


def test_options_left_unset_take_the_checkpoints_values(trained, tiny_llama_dir, tiny_data, tmp_path):
    probe = tmp_path / "lr.jsonl"
    args = _resume_args(tiny_llama_dir, tiny_data, tmp_path / "run", f"--ckpt_path={trained}", "--trainer.max_steps=5",
                        "--trainer.callbacks+=tests.test_resume.LearningRateProbe", f"--trainer.callbacks.path={probe}")
    assert run_cast(args) == 0
    from cast_lightning.schedule import warmup_cosine_factor

    rows = _probed(probe)
    assert [row["step"] for row in rows] == [3, 4]
    for row in rows:
        assert row["lr"] == [pytest.approx(0.01 * warmup_cosine_factor(row["step"], 5, 2, 0.1), rel=1e-12)] * 2, row


@pytest.mark.parametrize("flags, named", [
    (["--model.dtype=bfloat16"], "model.dtype (checkpoint float32, this run bfloat16)"),
    (["--model.kv_policy=never"], "model.kv_policy (checkpoint all, this run never)"),
    (["--data.batch_size=5"], "data.batch_size (checkpoint 4, this run 5)"),
    (["--data.seed=3", "--data.max_length=64"], "data.max_length (checkpoint 256, this run 64), data.seed (checkpoint 0, this run 3)"),
    (["--trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches (checkpoint 1, this run 2)"),
    (["--trainer.precision=bf16-true"], "trainer.precision (checkpoint 32-true, this run bf16-true)"),
], ids=["dtype", "kv_policy", "batch_size", "data_seed_and_max_length", "accumulation", "precision"])
def test_an_unsafe_change_on_resume_is_refused_in_one_line(flags, named, trained, tiny_llama_dir, tiny_data, tmp_path, capsys):
    root = tmp_path / "run"
    assert run_cast(_resume_args(tiny_llama_dir, tiny_data, root, f"--ckpt_path={trained}", "--trainer.max_steps=6", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cast fit: error: cannot resume from {trained}: "), err
    assert f"this run differs from the checkpoint in {named}; resume with the checkpoint's values" in err[0], err
    assert "or drop --ckpt_path to start a new run" in err[0]
    assert not list(root.rglob("*.ckpt")) and not (root / "config.yaml").exists()


def test_ckpt_path_last_follows_the_same_rules(trained, tiny_llama_dir, tiny_data, tmp_path, capsys):
    """--ckpt_path last resolves inside the Trainer, after the model is built: an unset option still takes the
    checkpoint's value where that is safe, and an unset one that is not (dtype here) is refused, naming it."""
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    saved = torch.load(trained, weights_only=True)
    torch.save(saved, root / "checkpoints" / "last.ckpt")
    torch.save({**saved, "hyper_parameters": {**saved["hyper_parameters"], "dtype": "bfloat16"}}, tmp_path / "bf16.ckpt")
    probe = tmp_path / "lr.jsonl"
    common = ["--trainer.max_steps=4", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              f"--trainer.callbacks.dirpath={root / 'checkpoints'}", "--trainer.callbacks.save_last=true",
              "--trainer.callbacks+=tests.test_resume.LearningRateProbe", f"--trainer.callbacks.path={probe}"]
    assert run_cast(_resume_args(tiny_llama_dir, tiny_data, root, "--ckpt_path=last", *common)) == 0
    from cast_lightning.schedule import warmup_cosine_factor

    (row,) = _probed(probe)  # learning rate 0.01 and warmup 2: the checkpoint's, not the defaults 1e-4 and 0
    assert row["step"] == 3 and row["lr"] == [pytest.approx(0.01 * warmup_cosine_factor(3, 4, 2, 0.1), rel=1e-12)] * 2
    capsys.readouterr()
    (root / "checkpoints" / "last.ckpt").write_bytes((tmp_path / "bf16.ckpt").read_bytes())
    assert run_cast(_resume_args(tiny_llama_dir, tiny_data, root, "--ckpt_path=last", *common[:4])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.dtype (checkpoint bfloat16, this run float32)" in err[0], err


@pytest.mark.parametrize("name, expected", [
    ("best", "--ckpt_path best means the best checkpoint of an earlier fit in this same process"),
    ("hpc", "--ckpt_path hpc: no hpc_ckpt_*.ckpt in"),
])
def test_ckpt_path_best_or_hpc_without_such_a_checkpoint_is_one_line(name, expected, tiny_llama_dir, tiny_data, tmp_path, capsys):
    """Lightning raises a bare ValueError from inside the Trainer for these (a traceback before)."""
    root = tmp_path / "run"
    assert run_cast(_resume_args(tiny_llama_dir, tiny_data, root, f"--ckpt_path={name}", "--trainer.max_steps=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cast fit: error: {expected}"), err
    assert not list(root.rglob("*.ckpt")) and not (root / "config.yaml").exists()


def test_another_mask_on_resume_is_refused_naming_both_head_lists(trained, tiny_llama_dir, tiny_data, tmp_path, capsys):
    """The checkpoint trained every head (full fine-tuning): resuming it as CAST would be neither run."""
    root = tmp_path / "run"
    args = _resume_args(tiny_llama_dir, tiny_data, root, f"--ckpt_path={trained}", "--trainer.max_steps=4")
    assert run_cast([*args, "--model.skip_heads=[[0, 1]]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cast fit: error: cannot resume from {trained}: this run's --model.skip_heads skips heads [[0, 1]] "
                   f"but the checkpoint was trained skipping []; resume without --model.skip_heads (the checkpoint's "
                   f"mask is kept), or drop --ckpt_path to start a new run"]
    assert run_cast([*args, "--model.skip_heads=[]"]) == 0  # the same (empty) mask, given explicitly: resumes
