"""Diagnosis on tiny models: every statistic against an explicit reference computation, batch and rank invariance,
the Lightning path (single process, CLI, 2-process DDP), NaN reporting, and restoring the model afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from cast_lightning.conflict import ConflictMap, optimization_conflict
from cast_lightning.data.formatting import collate, per_sample_loss
from cast_lightning.diagnosis import DiagnosisModule, DiagnosisOptions, HeadStatistics, diagnose, run_diagnosis
from cast_lightning.errors import CastError
from cast_lightning.heads import HeadLayout
from tests.tiny_models import ARCHITECTURES, VOCAB_SIZE, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def token_rows(n: int, seed: int, vocab: int = VOCAB_SIZE) -> list[dict]:
    """Prompt/response rows of random token ids (3..vocab), prompt labels -100, varied lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def loader(rows: list[dict], batch_size: int) -> DataLoader:
    return DataLoader(rows, batch_size=batch_size, collate_fn=partial(collate, pad_token_id=0))


SAFETY, UTILITY = token_rows(6, seed=1), token_rows(7, seed=2)


def explicit_gradients(model, rows) -> dict[str, torch.Tensor]:
    """Sum over samples of each sample's loss gradient, one sample at a time (no batching, no hooks)."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for row in rows:
        batch = collate([row], 0)
        loss = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum()
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                total[n] += g
    return total


def head_vector(grads, layout: HeadLayout, layer: int, head: int, with_kv: bool) -> torch.Tensor:
    slices = layout.query_slices(layer, head) + layout.output_slices(layer, head)
    if with_kv:
        slices += layout.kv_slices(layer, layout.kv_group(head))
    parts = [grads[s.name].narrow(s.dim, s.start, s.stop - s.start).reshape(-1) for s in slices if s.name in grads]
    return torch.cat(parts)


# -- OC ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_policy,variant", [("all", "cosine"), ("any", "cosine"), ("all", "projection")])
def test_oc_matches_explicit_per_sample_gradients(kv_policy, variant):
    model = tiny_model("qwen2")  # GQA + q/k/v biases
    layout = HeadLayout.from_model(model)
    cmap = diagnose(model, loader(SAFETY, 4), loader(UTILITY, 3), kv_policy=kv_policy, conflict=variant, plot=False)
    gs, gu = explicit_gradients(model, SAFETY), explicit_gradients(model, UTILITY)
    expected = torch.tensor(
        [
            [
                optimization_conflict(
                    head_vector(gs, layout, layer, head, kv_policy == "any"),
                    head_vector(gu, layout, layer, head, kv_policy == "any"),
                    variant,
                ).item()
                for head in range(layout.num_heads)
            ]
            for layer in range(layout.num_layers)
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(torch.tensor(cmap.oc, dtype=torch.float64), expected, rtol=1e-4, atol=1e-6)
    assert cmap.options["oc_slices"] == "q rows + o columns" + (" + KV-group k/v rows" if kv_policy == "any" else "")


def test_map_independent_of_batching():
    model = tiny_model("llama")
    a = diagnose(model, loader(SAFETY, 1), loader(UTILITY, 1), plot=False)
    b = diagnose(model, loader(SAFETY, 6), loader(UTILITY, 4), plot=False)
    for name in ("oc", "fs", "score"):
        assert torch.allclose(torch.tensor(getattr(a, name)), torch.tensor(getattr(b, name)), rtol=1e-4, atol=1e-7), name
    assert a.skip == b.skip
    assert a.data["utility_samples"] == 7 and a.data["safety_samples"] == 6
    assert a.data["utility_tokens"] == sum(sum(label != -100 for label in r["labels"][1:]) for r in UTILITY)


# -- FS ----------------------------------------------------------------------------------------------------------------


def explicit_gate_fs(model, rows) -> torch.Tensor:
    """mean over samples of |dL_sample / d gate_h|, with a real gate parameter multiplying each head's output."""
    layout = HeadLayout.from_model(model)
    d = layout.head_dim
    gates = [torch.ones(layout.num_heads, requires_grad=True) for _ in range(layout.num_layers)]
    modules = dict(model.named_modules())
    handles = [
        modules[layout.output_proj_name(layer)].register_forward_pre_hook(
            lambda module, args, layer=layer: (args[0] * gates[layer].repeat_interleave(d), *args[1:])
        )
        for layer in range(layout.num_layers)
    ]
    fs = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    try:
        for row in rows:
            batch = collate([row], 0)
            loss = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum()
            fs += torch.stack(torch.autograd.grad(loss, gates)).abs().double()
    finally:
        for handle in handles:
            handle.remove()
    return fs / len(rows)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_taylor_fs_equals_explicit_gate_gradient(architecture):
    model = tiny_model(architecture)
    cmap = diagnose(model, loader(SAFETY, 3), loader(UTILITY, 3), plot=False)
    expected = explicit_gate_fs(model, UTILITY)
    assert expected.abs().max() > 1e-4  # the heads do matter in this model
    assert torch.allclose(torch.tensor(cmap.fs, dtype=torch.float64), expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gpt_neox"])
def test_ablation_fs_equals_zeroing_the_heads_weights(architecture):
    """Zeroing head h's output-projection slice removes exactly its output: the exact ablation reference."""
    model = tiny_model(architecture)
    layout = HeadLayout.from_model(model)
    cmap = diagnose(model, loader(SAFETY, 3), loader(UTILITY, 3), sensitivity="ablation", heads_per_pass=3, plot=False)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(
                per_sample_loss(model(input_ids=collate([r], 0)["input_ids"]).logits, collate([r], 0)["labels"]).item()
                for r in UTILITY
            ) / len(UTILITY)

    base = mean_loss()
    params = dict(model.named_parameters())
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        (s,) = layout.output_slices(layer, head)
        saved = params[s.name].detach().clone()
        with torch.no_grad():
            params[s.name].narrow(s.dim, s.start, s.stop - s.start).zero_()
        increase = mean_loss() - base
        with torch.no_grad():
            params[s.name].copy_(saved)
        assert cmap.fs[layer][head] == pytest.approx(increase, rel=1e-3, abs=1e-6)
    assert cmap.options["heads_per_pass"] == 3 and "fs_taylor" in cmap.extra
    other = diagnose(model, loader(SAFETY, 3), loader(UTILITY, 3), sensitivity="ablation", heads_per_pass=1, plot=False)
    assert torch.allclose(torch.tensor(other.fs), torch.tensor(cmap.fs), rtol=1e-4, atol=1e-7)
    assert torch.allclose(torch.tensor(other.extra["fs_taylor"]), torch.tensor(cmap.extra["fs_taylor"]))


def _copy_reverse_rows(n: int, seed: int, vocab: int) -> list[dict]:
    """A task that needs attention: copy (marker 1) or reverse (marker 3) a random token string."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        k = int(torch.randint(3, 7, (1,), generator=g))
        tokens = torch.randint(4, vocab, (k,), generator=g).tolist()
        prompt = [3 if i % 2 else 1] + tokens
        response = tokens[::-1] if i % 2 else tokens
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def test_taylor_fs_rank_correlates_with_exact_ablation(capsys):
    """On a tiny model trained briefly on copy/reverse (random-init heads carry no function to measure)."""
    from transformers import AutoModelForCausalLM

    vocab = 32
    config = tiny_config("llama")
    config.vocab_size, config.num_attention_heads, config.num_key_value_heads = vocab, 8, 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = DataLoader(_copy_reverse_rows(150 * 16, 5, vocab), batch_size=16, shuffle=True,
                       collate_fn=partial(collate, pad_token_id=0), generator=torch.Generator().manual_seed(0))
    for batch in train:
        loss = per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    cmap = diagnose(model, loader(_copy_reverse_rows(16, 0, vocab), 8), loader(_copy_reverse_rows(48, 1, vocab), 16),
                    sensitivity="ablation", heads_per_pass=8, plot=False)
    rho = spearmanr(torch.tensor(cmap.fs).flatten(), torch.tensor(cmap.extra["fs_taylor"]).flatten()).statistic
    with capsys.disabled():
        print(f"\n[diagnosis] Spearman(taylor FS, ablation FS) over 16 heads of a trained tiny llama: {rho:.3f}")
    assert rho > 0.5


# -- selection through diagnose --------------------------------------------------------------------------------------


def test_random_selection_reproducible_by_seed_and_budget_matched():
    model = tiny_model("llama")
    runs = {seed: diagnose(model, loader(SAFETY, 6), loader(UTILITY, 7), score="random", top_k=3, seed=seed, plot=False)
            for seed in (0, 0, 1, 2)}
    again = diagnose(model, loader(SAFETY, 6), loader(UTILITY, 7), score="random", top_k=3, seed=0, plot=False)
    assert again.skip == runs[0].skip and again.score == runs[0].score
    assert len({tuple(map(tuple, m.skip)) for m in runs.values()}) == 3
    cast = diagnose(model, loader(SAFETY, 6), loader(UTILITY, 7), top_k=3, plot=False)
    assert all(len(m.skip) == len(cast.skip) == 3 for m in runs.values())
    assert cast.oc == again.oc and cast.fs == again.fs  # the control differs only in the score


def test_skip_ratio_skips_at_least_one_head():
    model = tiny_model("llama")
    cmap = diagnose(model, loader(SAFETY, 6), loader(UTILITY, 7), skip_ratio=0.01, plot=False)
    assert len(cmap.skip) == 1
    best = max(((l, h) for l in range(2) for h in range(4)), key=lambda lh: cmap.score[lh[0]][lh[1]])
    assert cmap.skip == [list(best)]


# -- robustness --------------------------------------------------------------------------------------------------------


def test_model_restored_after_diagnosis():
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(False)
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    diagnose(model, loader(SAFETY, 3), loader(UTILITY, 3), sensitivity="ablation", plot=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert model.training


def test_nonfinite_statistics_reported_by_head():
    model = tiny_model("llama")
    layout = HeadLayout.from_model(model)
    with HeadStatistics(model, layout, DiagnosisOptions()) as stats:
        for batch in loader(SAFETY, 3):
            stats.safety_batch(batch)
        for batch in loader(UTILITY, 3):
            stats.utility_batch(batch)
        (s, *_) = layout.query_slices(1, 3)
        stats.grad_u[s.name].narrow(s.dim, s.start, s.stop - s.start)[0, 0] = float("nan")
        stats.taylor_sum[0, 2] = float("inf")
        with pytest.raises(CastError) as info:
            stats.conflict_map()
    message = str(info.value)
    assert "utility_grad_sq_norm at 1 head(s) [1, 3]" in message
    assert "oc at 1 head(s) [1, 3]" in message and "fs at 1 head(s) [0, 2]" in message
    assert "\n" not in message


def test_nan_weights_fail_the_run():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[16:24] = float("nan")  # head 2 of layer 1
    with pytest.raises(CastError, match=r"non-finite diagnosis statistics .*\[1, 2\]"):
        diagnose(model, loader(SAFETY, 3), loader(UTILITY, 3), plot=False)


def test_empty_and_bad_options():
    model = tiny_model("llama")
    no_labels = [{"input_ids": r["input_ids"], "labels": [-100] * len(r["labels"])} for r in UTILITY]
    with pytest.raises(CastError, match="utility diagnosis set has no sample"):
        diagnose(model, loader(SAFETY, 3), loader(no_labels, 3), plot=False)
    with pytest.raises(CastError, match="unknown sensitivity"):
        diagnose(model, loader(SAFETY, 3), loader(UTILITY, 3), sensitivity="gradient")
    with pytest.raises(CastError, match="only one"):
        diagnose(model, loader(SAFETY, 3), loader(UTILITY, 3), top_k=2, threshold=0.1)


def test_diagnose_writes_map_and_heatmap(tmp_path):
    model = tiny_model("gpt_neox")
    cmap = diagnose(model, loader(SAFETY, 3), loader(UTILITY, 3), output=tmp_path / "cm" / "conflict_map.json")
    assert sorted(p.name for p in (tmp_path / "cm").iterdir()) == ["conflict_map.json", "conflict_map.png"]
    back = ConflictMap.from_json(tmp_path / "cm" / "conflict_map.json")
    assert back == cmap
    assert back.model["architecture"] == "gpt_neox" and back.model["num_layers"] == 2
    for key in ("conflict", "sensitivity", "score", "weight_lambda", "skip_ratio", "top_k", "threshold", "kv_policy"):
        assert key in back.options
    assert {"total_s", "safety_s", "utility_s"} <= set(back.timing) and back.seed == 0


# -- Lightning -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("diag_llama")
    tiny_model("llama").save_pretrained(directory)
    return directory


def _trainer(root: Path, **kwargs):
    import lightning as L

    from cast_lightning.diagnosis import DIAGNOSIS_TRAINER_DEFAULTS

    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=root, enable_progress_bar=False,
                     **{**DIAGNOSIS_TRAINER_DEFAULTS, **kwargs})


def test_lightning_module_equals_plain_diagnose(saved_llama, tmp_path):
    module = DiagnosisModule(str(saved_llama), sensitivity="ablation", top_k=2)
    _trainer(tmp_path).predict(module, dataloaders=[loader(SAFETY, 4), loader(UTILITY, 3)], return_predictions=False)
    written = ConflictMap.from_json(tmp_path / "conflict_map.json")
    assert (tmp_path / "conflict_map.png").exists() and written == module.conflict_map
    plain = diagnose(tiny_model("llama"), loader(SAFETY, 2), loader(UTILITY, 7), sensitivity="ablation", top_k=2)
    for name in ("oc", "fs", "score"):
        assert torch.allclose(torch.tensor(getattr(written, name)), torch.tensor(getattr(plain, name)), rtol=1e-4, atol=1e-7)
    assert written.skip == plain.skip
    assert written.model["name"] == str(saved_llama) and written.model["path"] == str(saved_llama.resolve())
    written.check_layout(HeadLayout.from_model(module.model))
    assert all(p.requires_grad for p in module.model.parameters())  # restored


def test_lightning_inference_mode_is_a_clear_error(saved_llama, tmp_path):
    module = DiagnosisModule(str(saved_llama))
    with pytest.raises(CastError, match="inference_mode"):
        _trainer(tmp_path, inference_mode=True).predict(
            module, dataloaders=[loader(SAFETY, 4), loader(UTILITY, 3)], return_predictions=False
        )
    assert all(p.requires_grad for p in module.model.parameters())


def test_run_diagnosis_with_the_datamodule(tiny_llama_dir, tiny_data, tmp_path):
    from cast_lightning.data.datamodule import SafetyUtilityDataModule

    data = SafetyUtilityDataModule(safety_files=[str(tiny_data["safety"])], utility_files=[str(tiny_data["utility"])],
                                   tokenizer=str(tiny_llama_dir), batch_size=5)
    module = DiagnosisModule(str(tiny_llama_dir), skip_ratio=0.25, output=str(tmp_path / "out" / "map.json"))
    cmap = run_diagnosis(module, data, _trainer(tmp_path))
    assert cmap.data["safety_samples"] == 24 and cmap.data["utility_samples"] == 24
    assert len(cmap.skip) == 2  # round(0.25 * 8)
    assert ConflictMap.from_json(tmp_path / "out" / "map.json") == cmap
    assert (tmp_path / "out" / "map.png").exists()


def test_cast_fit_rejects_a_map_of_another_shape(tmp_path):
    from cast_lightning.module import resolve_skip_heads

    cmap = diagnose(tiny_model("llama"), loader(SAFETY, 3), loader(UTILITY, 3), top_k=1, output=tmp_path / "m.json",
                    plot=False)
    assert resolve_skip_heads(HeadLayout.from_model(tiny_model("llama")), str(tmp_path / "m.json"), None) == [
        tuple(cmap.skip[0])
    ]
    with pytest.raises(CastError, match="conflict map was computed for .*llama 2 layers x 4 heads.*this model is gpt2"):
        resolve_skip_heads(HeadLayout.from_model(tiny_model("gpt2")), str(tmp_path / "m.json"), None)


def _cast(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(Path(sys.executable).parent / "cast"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _common_args(tiny_llama_dir, tiny_data) -> list[str]:
    # list syntax: SafetyUtilityDataModule types the file options list[str]
    return ["diagnose", "--model.pretrained", str(tiny_llama_dir), "--data.safety_files", f"[{tiny_data['safety']}]",
            "--data.utility_files", f"[{tiny_data['utility']}]", "--data.batch_size", "4", "--data.diagnosis_samples", "23",
            "--model.sensitivity", "ablation", "--model.heads_per_pass", "4", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false"]


@pytest.mark.multiprocess
def test_ddp_two_processes_equal_single_process(tiny_llama_dir, tiny_data, tmp_path):
    """`cast diagnose --trainer.devices 2 --trainer.strategy ddp` on CPU gives the single-process map."""
    from cast_lightning.data.datamodule import SafetyUtilityDataModule

    result = _cast(*_common_args(tiny_llama_dir, tiny_data), "--trainer.devices", "2", "--trainer.strategy", "ddp",
                   "--trainer.default_root_dir", str(tmp_path / "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = ConflictMap.from_json(tmp_path / "ddp" / "conflict_map.json")
    assert ddp.data["world_size"] == 2

    data = SafetyUtilityDataModule(safety_files=[str(tiny_data["safety"])], utility_files=[str(tiny_data["utility"])],
                                   tokenizer=str(tiny_llama_dir), batch_size=4, diagnosis_samples=23)
    module = DiagnosisModule(str(tiny_llama_dir), sensitivity="ablation", heads_per_pass=4,
                             output=str(tmp_path / "single.json"))
    single = run_diagnosis(module, data, _trainer(tmp_path))
    assert single.data["world_size"] == 1
    assert {k: v for k, v in ddp.data.items() if k != "world_size"} == pytest.approx(
        {k: v for k, v in single.data.items() if k != "world_size"}, rel=1e-5)
    assert ddp.data["safety_samples"] == 23  # uneven split 12 / 11: no sample duplicated or dropped
    for name in ("oc", "fs", "score"):
        assert torch.allclose(torch.tensor(getattr(ddp, name)), torch.tensor(getattr(single, name)), rtol=1e-4, atol=1e-7), name
    assert torch.allclose(torch.tensor(ddp.extra["fs_taylor"]), torch.tensor(single.extra["fs_taylor"]), rtol=1e-4)
    assert ddp.skip == single.skip


def test_cli_diagnose_single_process_and_config(tiny_llama_dir, tiny_data, tmp_path, capsys):
    from cast_lightning.cli import main

    config = tmp_path / "diag.yaml"
    config.write_text("model:\n  score: rank\n  top_k: 3\n")
    args = _common_args(tiny_llama_dir, tiny_data)
    assert main([*args, "--config", str(config), "--model.output", str(tmp_path / "maps" / "cm.json")]) == 0
    cmap = ConflictMap.from_json(tmp_path / "maps" / "cm.json")
    assert cmap.options["score"] == "rank" and len(cmap.skip) == 3 and (tmp_path / "maps" / "cm.png").exists()
    capsys.readouterr()
    assert main([*args, "--model.top_k", "2", "--model.threshold", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cast diagnose: error:") and "only one" in err[-1]
