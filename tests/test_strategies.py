"""Strategy switch by config alone (configs/strategy/*.yaml): the mask contract, clipping and export on every
strategy, `cast diagnose` and `cast test` equal to one process.

CPU, 2 processes over gloo (marked multiprocess): DDP and FSDP2 through `cast`; FSDP1 generation and the DeepSpeed
ZeRO-2/3 engine (mask, checkpoint, export) without Lightning, which runs FSDP1 and DeepSpeed on CUDA only; the
DeepSpeed ones need `pip install deepspeed` and are skipped without it. GPU (marked gpu, skipped without CUDA):
FSDP1 and DeepSpeed ZeRO-2/3 through `cast fit` / `cast test`: `python -m pytest tests/test_strategies.py -m gpu -q`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from cast_lightning.heads import HeadLayout
from cast_lightning.masking import _local, _local_range, clean_name, frozen_flat_index
from cast_lightning.strategies import DENSE, FSDP1, FSDP2, is_dtensor, sharding_of, total_grad_norm
from tests.conftest import state_copy
from tests.test_evaluation import REFUSAL, _benign, _harmful, models  # noqa: F401  (models: the aligned model fixture)
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
        # The trained weights as the ranks hold them at the end, gathered whole: what the checkpoint must contain.
        weights = final_weights(pl_module.model, sharding_of(trainer.strategy))
        if trainer.is_global_zero:
            torch.save(weights, f"{self.path}.weights.pt")


def final_weights(model: torch.nn.Module, sharding: str) -> dict[str, torch.Tensor]:
    """name -> full CPU tensor of every parameter (a collective under FSDP: every rank calls it)."""
    if sharding == FSDP1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            return {clean_name(n): p.detach().cpu().clone() for n, p in model.named_parameters()}
    return {clean_name(n): (p.full_tensor() if is_dtensor(p) else p).detach().cpu().clone() for n, p in model.named_parameters()}


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
    """The checkpoint holds the trained weights, exactly; `cast export` and `cast eval`'s loader turn it into the
    same weights; the frozen slices equal the base model's and everything else trained."""
    from transformers import AutoModelForCausalLM

    from cast_lightning.checkpoints import read_checkpoint
    from cast_lightning.evaluation import load_for_eval
    from cast_lightning.module import CASTModule

    checkpoints = [p for p in root.rglob("*.ckpt")]
    assert len(checkpoints) == 1, checkpoints
    saved = read_checkpoint(str(checkpoints[0]))
    assert saved["global_step"] == 5 and saved["cast_skip_heads"] == sorted(SKIP)
    trained = torch.load(root / "probe.weights.pt", weights_only=True)
    after = {k[len("model."):]: v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    assert set(after) == set(trained)
    for name, tensor in trained.items():
        assert torch.equal(after[name], tensor), name
    if checkpoints[0].is_dir():  # the restricted reader agrees with Lightning's own (unrestricted) consolidation
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        reference = _load_distributed_checkpoint(checkpoints[0])["state_dict"]
        assert set(reference) == set(saved["state_dict"])
        for key, tensor in reference.items():
            assert torch.equal(saved["state_dict"][key], tensor), key
    base = CASTModule(str(model_dir))
    before = state_copy(base.model)
    assert_contract(base.layout, before, after, SKIP)

    # The checkpoint (a file, or FSDP2's distributed-checkpoint directory) exports to an ordinary HF directory.
    run_cast("export", "--ckpt_path", checkpoints[0], "--output_dir", tmp_path / "hf")
    exported = state_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name
    assert_contract(base.layout, before, exported, SKIP)
    assert json.loads((tmp_path / "hf" / "cast_skip_heads.json").read_text())["skip_heads"] == sorted(SKIP)
    evaluated, _, identity = load_for_eval(str(checkpoints[0]), device="cpu")  # cast eval reads it the same way
    assert identity["kind"] == "lightning_checkpoint" and identity["skip_heads"] == sorted(SKIP)
    for name, tensor in state_copy(evaluated).items():
        assert torch.equal(tensor, trained[name]), name


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


# -- cast test: generation on sharded weights -------------------------------------------------------------------------


class GenerationProbe(L.Callback):
    """Writes, per rank, the ``synced_gpus`` each ``model.generate`` call of ``cast test`` got and the test metrics."""

    def __init__(self, path: str):
        self.path, self.synced = path, []

    def on_test_start(self, trainer, pl_module) -> None:
        generate = pl_module.model.generate

        def recording(*args, **kwargs):
            self.synced.append(kwargs.get("synced_gpus"))
            return generate(*args, **kwargs)

        pl_module.model.generate = recording

    def on_test_end(self, trainer, pl_module) -> None:
        del pl_module.model.generate
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps({"synced_gpus": self.synced, "metrics": metrics}))


@pytest.fixture(scope="module")
def refusal_suites(tmp_path_factory) -> dict[str, Path]:
    """Harmful and benign suites mixing both kinds of prompt, so both rates lie strictly between 0 and 1. Two ranks
    take alternate prompts: in the first batch of each suite one rank gets only benign prompts (the aligned model
    answers at length, up to max_new_tokens) and the other only harmful ones (a short refusal, then EOS), so one
    rank finishes generating first. Even sizes: Lightning's DistributedSampler would repeat a prompt otherwise."""
    root = tmp_path_factory.mktemp("suites")
    harmful = [_benign(60), _harmful(60), _benign(61), _harmful(61), *map(_harmful, range(62, 66))]
    benign = [_benign(62), _benign(63), _harmful(66), _benign(64)]
    for name, prompts in (("harmful", harmful), ("benign", benign)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"harmful": root / "harmful.jsonl", "benign": root / "benign.jsonl"}


def assert_rates_mixed(metrics: dict) -> None:
    """The suites were built so both rates lie strictly between 0 and 1 (the aligned model refuses some prompts of
    each suite and answers the rest): an equality of rates between runs then says something."""
    for name in ("test/refusal_rate", "test/over_refusal_rate"):
        assert 0 < metrics[name] < 1, (name, metrics)


def cast_test(model_dir, suites, root: Path, *extra, timeout: int = 240) -> list[dict]:
    """`cast test` with the GenerationProbe; the per-rank reports."""
    run_cast(
        "test", f"--model.pretrained={model_dir}", "--model.max_new_tokens=16",
        f"--data.harmful_eval_files={suites['harmful']}", f"--data.benign_eval_files={suites['benign']}",
        "--data.eval_batch_size=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=tests.test_strategies.GenerationProbe", f"--trainer.callbacks.path={root}/generation",
        *extra, timeout=timeout,
    )
    return [json.loads(p.read_text()) for p in sorted(root.glob("generation.rank*.json"))]


@pytest.fixture(scope="module")
def single_process_rates(models, refusal_suites, tmp_path_factory) -> dict:
    reports = cast_test(models["aligned"], refusal_suites, tmp_path_factory.mktemp("test_one"),
                        "--trainer.accelerator=cpu", "--trainer.devices=1")
    assert len(reports) == 1 and set(reports[0]["synced_gpus"]) == {None}  # one process: nothing to synchronise
    return reports[0]["metrics"]


@pytest.mark.multiprocess
def test_cast_test_fsdp2_two_cpu_processes_equals_one(models, refusal_suites, tmp_path, single_process_rates):
    """`cast test --config configs/strategy/fsdp2.yaml --trainer.devices 2`: every generate call is synchronised
    across ranks (so the rank that finishes first keeps joining the all-gathers), and the refusal and over-refusal
    rates equal the single-process ones."""
    assert_rates_mixed(single_process_rates)
    reports = cast_test(models["aligned"], refusal_suites, tmp_path, "--config", STRATEGIES / "fsdp2.yaml",
                        "--trainer.accelerator=cpu", "--trainer.devices=2")
    assert len(reports) == 2
    for report in reports:
        assert report["synced_gpus"] == [True] * 3  # 2 harmful batches + 1 benign batch per rank
    assert reports[0]["metrics"] == single_process_rates


def test_generation_setup_asks_for_synced_gpus_only_when_sharded():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from cast_lightning.strategies import FSDP2Strategy, generation_setup

    model = torch.nn.Linear(2, 2)
    cases = [(FSDP2Strategy(), 2, {"synced_gpus": True}), (FSDP2Strategy(), 1, {}),
             (FSDPStrategy(), 2, {"synced_gpus": True}), (DDPStrategy(), 2, {})]
    if importlib.util.find_spec("deepspeed") is not None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        cases += [(DeepSpeedStrategy(stage=3), 2, {"synced_gpus": True}), (DeepSpeedStrategy(stage=2), 2, {})]
    for strategy, world_size, expected in cases:
        with generation_setup(strategy, model, world_size) as kwargs:
            assert kwargs == expected, (type(strategy).__name__, world_size)


@pytest.mark.multiprocess
def test_fsdp1_generation_two_cpu_processes(models, tmp_path):
    """FSDP1 (raw torch: Lightning runs FSDP1 on CUDA only) on 2 CPU processes, wrapped as CASTModule wraps it (one
    unit per decoder layer + the root): under generation_setup, generate_greedy gives exactly the unsharded
    model's responses while one rank stops at EOS long before the other. Without it the root unit's embeddings
    are flat shards ('weight' must be 2-D)."""
    out = tmp_path / "generation"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.test_strategies", "fsdp1-generate-worker", str(models["aligned"]), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["kwargs"] == {"synced_gpus": True}
        assert report["texts"] == report["expected"]
    assert all(t != REFUSAL for t in reports[0]["texts"]) and reports[1]["texts"] == [REFUSAL, REFUSAL]


def _fsdp1_generate_worker(model_dir: str, out: str) -> None:
    import copy

    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from cast_lightning.generation import generate_greedy
    from cast_lightning.loading import load_model_and_tokenizer
    from cast_lightning.strategies import generation_setup

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model, tokenizer = load_model_and_tokenizer(model_dir)
    reference = copy.deepcopy(model)
    cpu = torch.device("cpu")
    for index, layer in enumerate(model.model.layers):
        model.model.layers[index] = FSDP(layer, use_orig_params=True, device_id=cpu)
    root = FSDP(model, use_orig_params=True, device_id=cpu)
    prompts = [[_benign(70), _benign(71)], [_harmful(70), _harmful(71)]][rank]
    with generation_setup(FSDPStrategy(), root, world_size=2) as kwargs:
        texts = generate_greedy(root, tokenizer, prompts, max_new_tokens=16, batch_size=2, **kwargs)
    expected = generate_greedy(reference, tokenizer, prompts, max_new_tokens=16, batch_size=2)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"kwargs": kwargs, "texts": texts, "expected": expected}))


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
    # cast export reads the DeepSpeed directory itself (weights_only, no DeepSpeed import): the same fp32 masters.
    from transformers import AutoModelForCausalLM

    run_cast("export", "--ckpt_path", next(root.rglob("*.ckpt")), "--output_dir", tmp_path / "hf")
    exported = state_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    for name, tensor in after.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2", "deepspeed_zero3"])
def test_cast_test_on_gpu_equals_one_device(strategy, models, refusal_suites, tmp_path):
    """`cast test` with the model sharded over the GPUs present (FSDP1 through the root unit's gathered parameters,
    ZeRO-3 through DeepSpeed's hooks): the single-device rates, every generate call synchronised."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    devices = _gpu_devices()
    one = cast_test(models["aligned"], refusal_suites, tmp_path / "one", "--trainer.accelerator=cuda", "--trainer.devices=1",
                    timeout=600)
    many = cast_test(models["aligned"], refusal_suites, tmp_path / "many", "--config", STRATEGIES / f"{strategy}.yaml",
                     "--trainer.accelerator=cuda", f"--trainer.devices={devices}", timeout=600)
    assert len(many) == devices
    for report in many:
        assert set(report["synced_gpus"]) == ({True} if devices > 1 else {None})
    assert_rates_mixed(one[0]["metrics"])
    assert many[0]["metrics"] == one[0]["metrics"]


# -- DeepSpeed engine on CPU: the ZeRO code paths without Lightning (which runs DeepSpeed on CUDA only) -----------


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage, dtype, persistence", [(2, "bf16", 100000), (3, "fp32", 0), (3, "bf16", 100000)],
                         ids=["zero2-bf16", "zero3-fp32-partitioned", "zero3-bf16-persistent"])
def test_deepspeed_engine_masking_two_cpu_processes(stage, dtype, persistence, tiny_llama_dir, tmp_path, monkeypatch):
    """deepspeed.initialize on 2 CPU processes (gloo) with ZeRO-2/3, gradient accumulation, clipping and AdamW
    weight decay: frozen gradients are zero where the engine reads them, and the frozen slices stay bit-identical in
    both the fp32 masters and the working weights, partitioned (ds_tensor) or persistent (gathered) alike.

    The engine then saves its checkpoint as Lightning's DeepSpeedStrategy does (engine.save_checkpoint with the
    Lightning checkpoint as client state, tag "checkpoint", into a `<name>.ckpt` directory): `cast export` reads it
    into exactly the trained fp32 masters, as DeepSpeed's own zero_to_fp32 does, frozen slices equal to the base."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    ckpt = tmp_path / "epoch=0-step=6.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu", "CAST_DS_PERSISTENCE": str(persistence)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.test_strategies",
               "deepspeed-worker", str(stage), dtype, str(tiny_llama_dir), str(out), str(ckpt)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["optimizer_steps"] == 6
    assert report["frozen_grad_max"] == 0.0
    assert report["frozen_changed"] == []
    # Trainable weights moved: every fp32 master element; bf16 working copies round small updates away on a few.
    assert min(report["changed_fraction"]["hp"].values()) > 0.99
    assert min(report["changed_fraction"]["lp"].values()) > (0.99 if dtype == "fp32" else 0.85)
    check_deepspeed_checkpoint(ckpt, torch.load(f"{out}.masters.pt", weights_only=True), tiny_llama_dir, dtype, tmp_path, monkeypatch)


def check_deepspeed_checkpoint(ckpt: Path, masters: dict, model_dir, dtype: str, tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from cast_lightning.checkpoints import read_checkpoint

    saved = read_checkpoint(str(ckpt))
    assert saved["cast_skip_heads"] == sorted(SKIP) and saved["global_step"] == 6
    assert saved["hyper_parameters"]["pretrained"] == str(model_dir)
    assert set(saved["state_dict"]) == set(masters)
    for key, tensor in masters.items():
        assert torch.equal(saved["state_dict"][key], tensor), key
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))  # DeepSpeed's own consolidation (unpickles freely)
    assert set(reference) == set(masters)
    for key, tensor in reference.items():
        assert torch.equal(saved["state_dict"][key], tensor), key

    run_cast("export", "--ckpt_path", ckpt, "--output_dir", tmp_path / "hf")
    exported = state_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    after = {k[len("model."):]: v for k, v in masters.items()}
    for name, tensor in after.items():
        assert torch.equal(exported[name], tensor), name
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    before = state_copy(base)
    if dtype == "bf16":  # DeepSpeed casts the weights to bf16 and builds its fp32 masters from them
        before = {n: t.bfloat16().float() for n, t in before.items()}
    assert_contract(HeadLayout.from_model(base), before, exported, SKIP)


class _LightningModuleLike(torch.nn.Module):
    """The HF model under the attribute ``model``, as in CASTModule, so parameter names match Lightning's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs)


def _deepspeed_worker(stage: int, dtype: str, model_dir: str, out: str, ckpt: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from cast_lightning.masking import HeadMask
    from cast_lightning.strategies import DEEPSPEED

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
    # Two parameter groups as CASTModule.configure_optimizers makes them: the checkpoint stores one flat group each.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=_LightningModuleLike(model), optimizer=optimizer, config=config)
    hf = engine.module.model
    params = dict(hf.named_parameters())

    def working():
        gathered = deepspeed.zero.GatheredParameters(list(params.values())) if stage == 3 else torch.no_grad()
        with gathered:
            return {n: p.detach().float().clone() for n, p in params.items()}

    def masters():
        return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in params.items()}

    frozen = frozen_mask(layout, {n: torch.empty(tuple(getattr(p, "ds_shape", p.shape))) for n, p in params.items()}, skip)
    mask = HeadMask.for_heads(hf, layout, skip, "all", DEEPSPEED)
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
    # What Lightning's DeepSpeedStrategy.save_checkpoint does with the trainer's checkpoint dict: everything but
    # state_dict/optimizer_states becomes the engine's client state, saved under the tag "checkpoint".
    client_state = {
        "epoch": 0, "global_step": engine.global_steps, "pytorch-lightning_version": L.__version__,
        "hyper_parameters": {"pretrained": model_dir, "skip_heads": SKIP, "dtype": "float32"}, "hparams_name": "kwargs",
        "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {}, "lr_schedulers": [], "cast_skip_heads": sorted(SKIP),
    }
    engine.save_checkpoint(ckpt, client_state=client_state, tag="checkpoint", exclude_frozen_parameters=False)
    if rank == 0:
        torch.save({f"model.{n}": t for n, t in after["hp"].items()}, f"{out}.masters.pt")
        Path(out).write_text(json.dumps(report))


# -- training scopes (issue #15): the attention scope and LoRA on 2 CPU processes ----------------------------------

SCOPE_RUNS = [("ddp", "attention"), ("ddp", "lora"), ("fsdp2", "lora")]
LORA_ARGS = ["--model.trainable=lora", "--model.lora.r=4", "--model.lora.alpha=32"]  # scale 8: clipping engages


def check_scope_checkpoint_and_export(model_dir, root: Path, tmp_path: Path, strategy: str, scope: str) -> None:
    """The checkpoint holds exactly the trained tensors (one file without the frozen base under DDP; FSDP2's directory
    holds every tensor); the contract holds in them (LoRA: on the merged weights); `cast export` (merged) and cast
    eval's loader give the same plain HF weights, the skipped heads the base's bit for bit."""
    from transformers import AutoModelForCausalLM

    from cast_lightning.checkpoints import read_checkpoint
    from cast_lightning.evaluation import load_for_eval
    from tests.test_scopes import assert_lora_contract, expected_trainable, merged_weights

    (checkpoint,) = list(root.rglob("*.ckpt"))
    saved = read_checkpoint(str(checkpoint))
    assert saved["global_step"] == 5 and saved["cast_skip_heads"] == sorted(SKIP)
    assert saved["cast_scope"]["trainable"] == scope
    trained = torch.load(root / "probe.weights.pt", weights_only=True)
    after = {k[len("model."):]: v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    base_model = AutoModelForCausalLM.from_pretrained(model_dir)
    base, config = state_copy(base_model), base_model.config
    trainable = expected_trainable(config, list(trained), scope)
    if strategy == "ddp":
        assert set(after) == trainable and saved["cast_scope"]["frozen_from_base"]
    else:
        assert checkpoint.is_dir() and set(after) == set(trained) and not saved["cast_scope"]["frozen_from_base"]
    for name, tensor in after.items():
        assert torch.equal(tensor, trained[name]), name
    if scope == "lora":
        assert_lora_contract(config, base, trained, SKIP, "all", 32 / 4)
        expected = {n: t for n, t in merged_weights(config, trained, 32 / 4).items()}
    else:
        assert_contract(config, base, trained, SKIP, trainable=trainable)
        expected = {n: t.double() for n, t in trained.items()}
    frozen = frozen_mask(config, base, SKIP)
    run_cast("export", "--ckpt_path", checkpoint, "--output_dir", tmp_path / "hf")
    exported = state_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    evaluated, _, identity = load_for_eval(str(checkpoint), device="cpu")
    assert identity["trainable"] == scope and identity["skip_heads"] == sorted(SKIP)
    evaluated = state_copy(evaluated)
    assert set(exported) == set(evaluated) == set(base)
    for name, tensor in exported.items():
        assert torch.equal(tensor, evaluated[name]), name
        assert torch.equal(tensor[frozen[name]], base[name][frozen[name]]), name
        assert torch.allclose(tensor.double(), expected[name], rtol=0, atol=1e-6), name
    if scope == "lora":  # the adapter alone, from either checkpoint layout
        run_cast("export", "--ckpt_path", checkpoint, "--output_dir", tmp_path / "adapter", "--adapter_only", "true")
        adapter, _, identity = load_for_eval(str(tmp_path / "adapter"), device="cpu")
        assert identity["kind"] == "adapter_directory"
        for name, tensor in state_copy(adapter).items():
            assert torch.equal(tensor, exported[name]), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy, scope", SCOPE_RUNS, ids=[f"{s}-{t}" for s, t in SCOPE_RUNS])
def test_scope_mask_contract_two_cpu_processes(strategy, scope, tiny_llama_dir, tiny_data, tmp_path):
    """`cast fit --config configs/strategy/<s>.yaml --trainer.devices 2 --model.trainable <scope>` on CPU: clipping
    blind to the frozen slices (LoRA: the zero-held factor slices), the contract in the checkpoint, exports exact."""
    root = tmp_path / "run"
    extra = LORA_ARGS if scope == "lora" else [f"--model.trainable={scope}"]
    run_cast(*fit_args(tiny_llama_dir, tiny_data, root, strategy), *extra)
    check_probe(root, ranks=2)
    check_scope_checkpoint_and_export(tiny_llama_dir, root, tmp_path, strategy, scope)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_lora_mask_contract_on_gpu(strategy, tiny_llama_dir, tiny_data, tmp_path):
    """LoRA under FSDP1 (flat-parameter views of the factors) and DeepSpeed ZeRO-2/3 (partitioned factors and their fp32
    masters) through `cast fit` on the GPUs present: the merged skipped heads stay the base's, the factors' frozen
    slices zero, and the export merges exactly."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    from cast_lightning.checkpoints import read_checkpoint
    from tests.test_scopes import assert_lora_contract

    root = tmp_path / "run"
    args = fit_args(tiny_llama_dir, tiny_data, root, strategy, accelerator="cuda", devices=_gpu_devices())
    args = [a for a in args if "GradientProbe" not in str(a) and "callbacks.path" not in str(a)]
    run_cast(*args, *LORA_ARGS, timeout=600)
    saved = read_checkpoint(str(next(root.rglob("*.ckpt"))))
    assert saved["cast_skip_heads"] == sorted(SKIP) and saved["cast_scope"]["trainable"] == "lora"
    trained = {k[len("model."):]: v.float().cpu() for k, v in saved["state_dict"].items() if k.startswith("model.")}
    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base = state_copy(base_model)
    assert_lora_contract(base_model.config, base, trained, SKIP, "all", 32 / 4)
    run_cast("export", "--ckpt_path", next(root.rglob("*.ckpt")), "--output_dir", tmp_path / "hf")
    exported = state_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    frozen = frozen_mask(base_model.config, base, SKIP)
    for name, tensor in exported.items():
        assert torch.equal(tensor[frozen[name]], base[name][frozen[name]]), name


if __name__ == "__main__" and sys.argv[1:2] == ["deepspeed-worker"]:
    _deepspeed_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
if __name__ == "__main__" and sys.argv[1:2] == ["fsdp1-generate-worker"]:
    _fsdp1_generate_worker(sys.argv[2], sys.argv[3])


@pytest.mark.multiprocess
def test_cast_test_odd_prompt_counts_on_two_processes_equal_one(models, tmp_path):
    """7 harmful and 3 benign prompts over 2 ranks: Lightning's DistributedSampler repeats one prompt of each suite
    to even out the ranks, and every prompt is still counted exactly once (RefusalRate dedupes by prompt index), so
    both rates equal the single-process ones exactly."""
    harmful = [_benign(70), _harmful(70), _harmful(71), _benign(71), _harmful(72), _harmful(73), _benign(72)]
    benign = [_benign(73), _harmful(74), _benign(74)]
    for name, prompts in (("harmful", harmful), ("benign", benign)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    suites = {"harmful": tmp_path / "harmful.jsonl", "benign": tmp_path / "benign.jsonl"}
    (one,) = cast_test(models["aligned"], suites, tmp_path / "one", "--trainer.accelerator=cpu", "--trainer.devices=1")
    assert_rates_mixed(one["metrics"])
    two = cast_test(models["aligned"], suites, tmp_path / "two", "--trainer.accelerator=cpu", "--trainer.devices=2",
                    "--trainer.strategy=ddp")
    assert len(two) == 2
    for report in two:
        assert report["metrics"] == one["metrics"]
