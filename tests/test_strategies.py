"""Strategy switch by config alone (configs/strategy/*.yaml): the mask contract, clipping and export on every
strategy, and `cast diagnose` equal to one process.

CPU, 2 processes over gloo (marked multiprocess): DDP and FSDP2. GPU (marked gpu, skipped without CUDA): FSDP1 and
DeepSpeed ZeRO-2/3, which Lightning runs on CUDA only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from cast_lightning.heads import HeadLayout
from cast_lightning.masking import DENSE, FSDP1, FSDP2, _local, _local_range, frozen_flat_index, sharding_of, total_grad_norm
from tests.conftest import state_copy
from tests.test_mask_contract import SKIP, assert_contract, frozen_mask

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ROOT / "configs" / "strategy"
MAX_NORM = 1.0


def run_cast(*args, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "cast_lightning.cli", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


class GradientProbe(L.Callback):
    """Records, per optimizer step and rank, what clipping had to work with and what it produced.

    ``free``: the global norm of the non-frozen gradients before the mask and clipping (callbacks'
    on_before_optimizer_step runs before the module's, so nothing is masked yet); ``clipped``: the global norm of
    all gradients after clipping (before the next zero_grad); ``frozen``: the norm of the frozen slices' gradients
    after clipping. Clipping that ignores the frozen slices gives clipped == min(free, max_norm) and frozen == 0.
    """

    def __init__(self, path: str, accumulate: int = 2):
        self.path, self.accumulate, self.rows, self._free = path, accumulate, [], None

    @staticmethod
    def _local_frozen_mask(entry, grad: torch.Tensor) -> torch.Tensor:
        """True where the locally held gradient element belongs to a frozen slice."""
        if hasattr(entry, "index"):  # FSDP1: a window of the flattened parameter
            mask = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
            mask[entry.index] = True
            return mask.view_as(grad)
        local, offset = _local(grad)  # the full tensor (offset 0) or a DTensor's row shard
        mask = torch.zeros_like(local, dtype=torch.bool)
        for s in entry.slices:
            bounds = _local_range(s, mask, offset)
            if bounds is not None:
                mask.narrow(s.dim, bounds[0], bounds[1] - bounds[0]).fill_(True)
        return mask

    def _split_norms(self, module) -> tuple[float, float, float]:
        """(global norm of free grads, global norm of all grads, max |frozen grad|) from the live (sharded) grads."""
        entries = {id(e.param): e for e in module.head_mask.entries}
        free_sq, all_sq, frozen_sq = (torch.zeros((), dtype=torch.float64) for _ in range(3))
        for p in module.model.parameters():
            if p.grad is None:
                continue
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            grad = grad.detach().double().cpu()
            mask = self._local_frozen_mask(entries[id(p)], p.grad).cpu() if id(p) in entries else torch.zeros_like(grad, dtype=torch.bool)
            all_sq += grad.pow(2).sum()
            free_sq += grad[~mask].pow(2).sum()
            frozen_sq += grad[mask].pow(2).sum()
        sums = torch.stack([free_sq, all_sq, frozen_sq])
        if sharding_of(module.trainer.strategy) in (FSDP1, FSDP2):
            sums = sums.to(module.device)
            torch.distributed.all_reduce(sums)  # each rank holds disjoint shards: squares add up
        return tuple(float(v) for v in sums.cpu().sqrt())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._free = self._split_norms(pl_module)[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate or self._free is None:
            return
        _, clipped, frozen = self._split_norms(pl_module)
        self.rows.append({"free": self._free, "clipped": clipped, "frozen": frozen})
        self._free = None

    def on_train_end(self, trainer, pl_module) -> None:
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def fit_args(model_dir, data, root, strategy: str, accelerator: str = "cpu", devices: int = 2, precision="32-true"):
    return [
        "fit", "--config", STRATEGIES / f"{strategy}.yaml",
        f"--model.pretrained={model_dir}", f"--model.skip_heads={SKIP}",
        "--model.learning_rate=0.01", "--model.weight_decay=0.1",
        f"--data.safety_files=[{data['safety']}]", f"--data.utility_files=[{data['utility']}]",
        "--data.utility_replay=0.25", "--data.batch_size=2",
        f"--trainer.accelerator={accelerator}", f"--trainer.devices={devices}", f"--trainer.precision={precision}",
        "--trainer.max_steps=5", "--trainer.accumulate_grad_batches=2", f"--trainer.gradient_clip_val={MAX_NORM}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=tests.test_strategies.GradientProbe", f"--trainer.callbacks.path={root}/probe",
    ]


def check_probe(root: Path, ranks: int, steps: int = 5) -> None:
    for rank in range(ranks):
        rows = json.loads((root / f"probe.rank{rank}.json").read_text())
        assert len(rows) == steps
        assert any(r["free"] > MAX_NORM for r in rows), "clipping never engaged: raise the learning rate"
        for r in rows:
            assert r["frozen"] == 0.0
            # Only the free gradients count: a norm over frozen ones too would clip below min(free, max_norm).
            assert r["clipped"] == pytest.approx(min(r["free"], MAX_NORM), rel=1e-4)


def check_checkpoint_and_export(model_dir, root: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from cast_lightning.loading import read_checkpoint
    from cast_lightning.module import CASTModule

    checkpoints = [p for p in root.rglob("*.ckpt")]
    assert len(checkpoints) == 1, checkpoints
    saved = read_checkpoint(str(checkpoints[0]))
    assert saved["global_step"] == 5 and saved["cast_skip_heads"] == sorted(SKIP)
    reference = CASTModule(str(model_dir))
    before = state_copy(reference.model)
    after = {k[len("model."):]: v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    assert_contract(reference.layout, before, after, SKIP)

    # The sharded checkpoint exports to an ordinary HF directory that keeps the contract.
    run_cast("export", "--ckpt_path", checkpoints[0], "--output_dir", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert_contract(reference.layout, before, state_copy(exported), SKIP)
    assert json.loads((tmp_path / "hf" / "cast_skip_heads.json").read_text())["skip_heads"] == sorted(SKIP)


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_mask_contract_two_cpu_processes(strategy, tiny_llama_dir, tiny_data, tmp_path):
    """`cast fit --config configs/strategy/<s>.yaml --trainer.devices 2` on CPU: frozen slices bit-identical, the
    rest trained, clipping blind to frozen slices, the checkpoint exports to HF."""
    root = tmp_path / "run"
    run_cast(*fit_args(tiny_llama_dir, tiny_data, root, strategy))
    check_probe(root, ranks=2)
    check_checkpoint_and_export(tiny_llama_dir, root, tmp_path)
    if strategy == "fsdp2":
        assert next(root.rglob("*.ckpt")).is_dir()  # a distributed checkpoint directory, consolidated on read


# -- diagnosis ------------------------------------------------------------------------------------------------------


def diagnose_args(model_dir, data, output: Path, *extra) -> list:
    return [
        "diagnose", f"--model.pretrained={model_dir}", f"--data.safety_files=[{data['safety']}]",
        f"--data.utility_files=[{data['utility']}]", "--data.batch_size=4", f"--model.output={output}",
        "--model.plot=false", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={output.parent}", *extra,
    ]


def _fsdp2_diagnosis_supported() -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from cast_lightning.diagnosis import DiagnosisModule

    return is_overridden("configure_model", DiagnosisModule, L.LightningModule)


@pytest.fixture(scope="module")
def single_process_map(tiny_llama_dir, tiny_data, tmp_path_factory):
    from cast_lightning.conflict import ConflictMap

    output = tmp_path_factory.mktemp("one") / "map.json"
    run_cast(*diagnose_args(tiny_llama_dir, tiny_data, output, "--trainer.devices=1"))
    return ConflictMap.from_json(output)


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_diagnose_two_cpu_processes_equals_one(strategy, tiny_llama_dir, tiny_data, tmp_path, single_process_map):
    """`cast diagnose --config configs/strategy/<s>.yaml --trainer.devices 2` gives the single-process map."""
    from cast_lightning.conflict import ConflictMap

    if strategy == "fsdp2" and not _fsdp2_diagnosis_supported():
        pytest.skip("DiagnosisModule has no configure_model: ModelParallelStrategy refuses it (see the strategy report)")
    run_cast(*diagnose_args(tiny_llama_dir, tiny_data, tmp_path / "two" / "map.json", "--config",
                            STRATEGIES / f"{strategy}.yaml", "--trainer.devices=2"))
    one = single_process_map
    two = ConflictMap.from_json(tmp_path / "two" / "map.json")
    assert (one.data["world_size"], two.data["world_size"]) == (1, 2)
    assert two.data["safety_samples"] == one.data["safety_samples"] > 0
    for name in ("oc", "fs", "score"):
        assert torch.allclose(torch.tensor(getattr(two, name)), torch.tensor(getattr(one, name)), rtol=1e-4, atol=1e-7), name
    assert two.skip == one.skip


# -- unit checks of the shard geometry (fast, one process) ----------------------------------------------------------


def test_flat_window_index_matches_a_dense_mask():
    """FSDP1 / ZeRO partitions hold a window of the row-major flattened parameter: the index picks exactly the
    frozen elements of that window, for row slices, column slices and a window cutting through rows."""
    from cast_lightning.heads import ParamSlice

    shape = torch.Size([6, 5])
    slices = [ParamSlice("w", 0, 1, 3), ParamSlice("w", 1, 4, 5)]
    dense = torch.zeros(shape, dtype=torch.bool)
    dense[1:3] = True
    dense[:, 4] = True
    for lo, hi in [(0, 30), (7, 19), (13, 14), (20, 30), (30, 30)]:
        index = frozen_flat_index(shape, slices, lo, hi)
        expected = dense.reshape(-1)[lo:hi].nonzero().squeeze(1)
        assert torch.equal(index, expected), (lo, hi)


def test_total_grad_norm_dense_and_sharding_of_defaults(tiny_llama_dir):
    from cast_lightning.module import CASTModule

    module = CASTModule(str(tiny_llama_dir), skip_heads=SKIP)
    for i, p in enumerate(module.model.parameters()):
        p.grad = torch.full_like(p, float(i % 3))
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.model.parameters()]))
    assert float(total_grad_norm(module.model, DENSE)) == pytest.approx(float(expected), rel=1e-6)
    assert sharding_of(L.Trainer(accelerator="cpu", devices=1, logger=False).strategy) == DENSE
    assert module.head_mask.num_frozen_elements == sum(
        int(m.sum()) for m in frozen_mask(module.layout, dict(module.model.named_parameters()), SKIP).values()
    )


# -- GPU: FSDP1 and DeepSpeed (Lightning runs them on CUDA only) ----------------------------------------------------


def _gpu_devices() -> int:
    return min(torch.cuda.device_count(), 2) if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_mask_contract_on_gpu(strategy, precision, tiny_llama_dir, tiny_data, tmp_path):
    """FSDP1 (flat-parameter views) and DeepSpeed ZeRO-2/3 (partitioned grads and fp32 masters) through
    `cast fit --config configs/strategy/<s>.yaml` on the GPUs present: 2 where there are; on 1, FSDP1 falls back to
    NO_SHARD (the dense path) while ZeRO still partitions (world size 1)."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    root = tmp_path / "run"
    devices = _gpu_devices()
    args = fit_args(tiny_llama_dir, tiny_data, root, strategy, accelerator="cuda", devices=devices, precision=precision)
    if strategy.startswith("deepspeed"):  # gradients live inside the engine: no probe on .grad
        args = [a for a in args if "GradientProbe" not in str(a) and "callbacks.path" not in str(a)]
    run_cast(*args, timeout=600)
    if strategy == "fsdp":
        check_probe(root, ranks=devices)
        check_checkpoint_and_export(tiny_llama_dir, root, tmp_path)
        return
    # DeepSpeed writes its own checkpoint directory: consolidate the fp32 masters with Lightning's converter.
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from cast_lightning.module import CASTModule

    converted = convert_zero_checkpoint_to_fp32_state_dict(str(next(root.rglob("*.ckpt"))), str(tmp_path / "fp32.ckpt"))
    assert converted["cast_skip_heads"] == sorted(SKIP)
    reference = CASTModule(str(tiny_llama_dir))
    before = state_copy(reference.model)
    if precision == "bf16-mixed":  # DeepSpeed casts the weights to bf16 and builds its fp32 masters from them
        before = {n: t.bfloat16().float() for n, t in before.items()}
    after = {k[len("model."):]: v.float().cpu() for k, v in converted["state_dict"].items() if k.startswith("model.")}
    assert_contract(reference.layout, before, after, SKIP)


# -- DeepSpeed engine on CPU: the ZeRO code paths without Lightning (which runs DeepSpeed on CUDA only) -----------


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage, dtype, persistence", [(2, "bf16", 100000), (3, "fp32", 0), (3, "bf16", 100000)],
                         ids=["zero2-bf16", "zero3-fp32-partitioned", "zero3-bf16-persistent"])
def test_deepspeed_engine_masking_two_cpu_processes(stage, dtype, persistence, tiny_llama_dir, tmp_path):
    """deepspeed.initialize on 2 CPU processes (gloo) with ZeRO-2/3, gradient accumulation, clipping and AdamW
    weight decay: frozen gradients are zero where the engine reads them, and the frozen slices stay bit-identical in
    both the fp32 masters and the working weights, partitioned (ds_tensor) or persistent (gathered) alike."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu", "CAST_DS_PERSISTENCE": str(persistence)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.test_strategies", "deepspeed-worker", str(stage), dtype, str(tiny_llama_dir), str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["optimizer_steps"] == 6
    assert report["frozen_grad_max"] == 0.0
    assert report["frozen_changed"] == []
    # Trainable weights moved: every fp32 master element; bf16 working copies round small updates away on a few.
    assert min(report["changed_fraction"]["hp"].values()) > 0.99
    assert min(report["changed_fraction"]["lp"].values()) > (0.99 if dtype == "fp32" else 0.85)


def _deepspeed_worker(stage: int, dtype: str, model_dir: str, out: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from cast_lightning.masking import DEEPSPEED, HeadMask

    skip = [tuple(h) for h in SKIP]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    layout = HeadLayout.from_model(model)
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": int(os.environ["CAST_DS_PERSISTENCE"])},
        "zero_allow_untested_optimizer": True, "bf16": {"enabled": dtype == "bf16"},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    params = dict(engine.module.named_parameters())

    def working():
        gathered = deepspeed.zero.GatheredParameters(list(params.values())) if stage == 3 else torch.no_grad()
        with gathered:
            return {n: p.detach().float().clone() for n, p in params.items()}

    def masters():
        return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in params.items()}

    frozen = frozen_mask(layout, {n: torch.empty(tuple(getattr(p, "ds_shape", p.shape))) for n, p in params.items()}, skip)
    mask = HeadMask.for_heads(engine.module, layout, skip, "all", DEEPSPEED)
    mask.snapshot()
    before = {"lp": working(), "hp": masters()}
    torch.manual_seed(rank)
    frozen_grad_max = 0.0
    for _ in range(12):
        ids = torch.randint(5, 300, (2, 12))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        if engine.is_gradient_accumulation_boundary():
            for n, p in params.items():
                grad = safe_get_full_grad(p)
                if grad is not None and frozen[n].any():
                    frozen_grad_max = max(frozen_grad_max, float(grad.float().reshape(frozen[n].shape)[frozen[n]].abs().max()))
        engine.step()
        mask.restore()
    after = {"lp": working(), "hp": masters()}
    report = {"optimizer_steps": engine.global_steps, "frozen_grad_max": frozen_grad_max, "frozen_changed": [],
              "changed_fraction": {"lp": {}, "hp": {}}}
    for kind in ("lp", "hp"):
        for n, old in before[kind].items():
            new, f = after[kind][n], frozen[n]
            if not torch.equal(old[f], new[f]):
                report["frozen_changed"].append(f"{kind}:{n}")
            if (~f).any():
                report["changed_fraction"][kind][n] = (old[~f] != new[~f]).float().mean().item()
    if rank == 0:
        Path(out).write_text(json.dumps(report))


if __name__ == "__main__" and sys.argv[1:2] == ["deepspeed-worker"]:
    _deepspeed_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
