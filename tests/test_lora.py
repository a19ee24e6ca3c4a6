"""LoRA through peft with head-exact masking: which LoRA elements the mask holds at zero, the targets, the refusals,
and the checkpoint -> `cast export` (merged HF directory, or the adapter alone) -> `cast eval` / `cast test` path.

The oracles are computed here: the frozen slices from the published layouts (tests.test_mask_contract), the LoRA
slices from how a LoRA layer stores its factors (A: r x in, B: out x r; a Linear's output features are its weight
rows, a Conv1D's its columns), and merged weights as W + s * B @ A in float64 (tests.test_scopes.merged_weights).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from cast_lightning.errors import CastError
from cast_lightning.module import CASTModule
from tests.conftest import state_copy
from tests.test_cli import fit_args, run_cast
from tests.test_mask_contract import SKIP, frozen_mask, geometry
from tests.test_scopes import (
    _base_model,
    assert_lora_contract,
    fit,
    lora_scale,
    lora_zero_masks,
    merged_weights,
    published_projections,
)
from tests.tiny_models import ARCHITECTURES

LORA = {"r": 4, "alpha": 8.0}




# -- the mask on the factors, before any training -----------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("kv_policy", ["all", "any"])
def test_default_targets_and_the_zeroed_factor_slices(architecture, kv_policy, pretrained):
    """Default targets = the published attention projections, nothing else; after construction the A columns and B
    rows the skipped heads own are zero (A elsewhere is peft's random init, so exactly those columns are zero), the
    merged model equals the base, and the mask's LoRA entries cover exactly the oracle's elements."""
    model_dir = pretrained(architecture)
    module = CASTModule(str(model_dir), skip_heads=SKIP, kv_policy=kv_policy, trainable="lora", lora=LORA)
    config = module.model.config
    adapted = {n.rsplit(".lora_A.", 1)[0] for n, _ in module.model.named_parameters() if ".lora_A." in n}
    assert adapted == set(published_projections(geometry(config)))
    trained = state_copy(module.model)
    zeros = lora_zero_masks(config, trained, SKIP, kv_policy)
    for name, mask in zeros.items():
        if ".lora_A." in name:
            assert torch.equal(trained[name] == 0, mask), name  # zero exactly where a head owns input columns
        else:
            assert not trained[name].any()  # B starts at zero everywhere (peft's init)
    covered = {n: torch.zeros_like(m) for n, m in zeros.items()}
    for entry in module.head_mask.entries:
        name = next(n for n, p in module.model.named_parameters() if p is entry.param)
        assert entry.zero and ".lora_" in name  # the frozen base needs no entry
        for s in entry.slices:
            covered[name].narrow(s.dim, s.start, s.stop - s.start).fill_(True)
    for name in zeros:
        assert torch.equal(covered[name], zeros[name]), name
    merged = merged_weights(config, trained, lora_scale(module))
    base = state_copy(_base_model(model_dir))
    for name, tensor in base.items():
        assert torch.equal(merged[name], tensor.double()), name


def test_mlp_targets_and_rslora_keep_the_contract(pretrained, tiny_data, tmp_path):
    """MLP targets are allowed (no head owns them: their factors all train); rsLoRA's alpha / sqrt(r) scale."""
    model_dir = pretrained("llama")
    L.seed_everything(0)
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    module = CASTModule(str(model_dir), skip_heads=SKIP, trainable="lora", learning_rate=1e-2, weight_decay=0.1,
                        lora={"r": 4, "alpha": 8.0, "target_modules": targets, "use_rslora": True, "dropout": 0.1})
    assert lora_scale(module) == 8.0 / 2.0
    adapted = {n.rsplit(".lora_A.", 1)[0].rsplit(".", 1)[-1] for n, _ in module.model.named_parameters() if ".lora_A." in n}
    assert adapted == set(targets)
    fit(module, model_dir, tiny_data, tmp_path)
    trained = state_copy(module.model)
    assert_lora_contract(module.model.config, state_copy(_base_model(model_dir)), trained, SKIP, "all", lora_scale(module))
    for name, tensor in trained.items():
        if ".mlp." in name and ".lora_B." in name:
            assert (tensor != 0).float().mean() > 0.99, name


@pytest.mark.parametrize("options, skip, message", [
    ({"use_dora": True}, SKIP, "DoRA cannot keep a skipped head exact"),
    ({"r": 17}, [], r"larger than the rank of model\.layers\.0\.self_attn\.k_proj \(16 x 32, at most 16\)"),
    ({"target_modules": ["q_prj"]}, [], "matches no module"),
    ({"target_modules": ["input_layernorm"]}, [], "LlamaRMSNorm: LoRA adapts Linear"),
    ({"r": 0}, [], "not a rank"),
    ({"dropout": 1.0}, [], r"outside \[0, 1\)"),
    ({"rank": 4}, [], "unknown LoRA option"),
])
def test_lora_refusals(options, skip, message, pretrained):
    with pytest.raises(CastError, match=message):
        CASTModule(str(pretrained("llama")), skip_heads=skip, trainable="lora", lora=options)


def test_dora_without_skipped_heads_is_allowed(pretrained):
    module = CASTModule(str(pretrained("llama")), trainable="lora", lora={"use_dora": True, "r": 4})
    assert any("lora_magnitude_vector" in n for n, _ in module.model.named_parameters())
    with pytest.raises(CastError, match="DoRA cannot keep"):
        module.set_skip_heads([(0, 1)])  # e.g. a checkpoint's mask


# -- checkpoint -> export -> eval / test ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lora_run(request, pretrained, tiny_data, tmp_path_factory):
    """A LoRA run with skipped heads through `cast fit` (5 steps, accumulation 2, clipping, weight decay): its
    checkpoint, base model and trained factors (Llama: Linear; GPT-2: Conv1D)."""
    architecture = request.param
    model_dir = pretrained(architecture)
    root = tmp_path_factory.mktemp(f"lora_{architecture}")
    args = fit_args(model_dir, tiny_data, root, f"--model.skip_heads={SKIP}", "--model.trainable=lora", "--model.lora.r=4",
                    "--model.lora.alpha=8", "--model.weight_decay=0.1", "--trainer.max_steps=5",
                    "--trainer.accumulate_grad_batches=2", "--trainer.gradient_clip_val=1.0", "--seed_everything=0")
    assert run_cast(args) == 0
    (ckpt,) = list(root.rglob("*.ckpt"))
    return {"architecture": architecture, "model_dir": model_dir, "ckpt": ckpt, "root": root}


def _checkpoint_factors(ckpt) -> tuple[dict, dict]:
    saved = torch.load(ckpt, weights_only=True)
    return saved, {k[len("model."):]: v for k, v in saved["state_dict"].items()}


def with_base(base: dict, adapter: dict, config) -> dict:
    """The LoRA model's parameters by name: the adapter's factors, and the base tensors under the names peft gives
    them (an adapted projection's weight and bias move to ``<module>.base_layer``)."""
    adapted = {k.rsplit(".lora_A.", 1)[0] for k in adapter if ".lora_A." in k}
    out = {}
    for name, tensor in base.items():
        module, _, kind = name.rpartition(".")
        out[f"{module}.base_layer.{kind}" if module in adapted else name] = tensor
    return {**out, **adapter}


def test_the_checkpoint_holds_the_adapter_and_the_mask(lora_run):
    saved, state = _checkpoint_factors(lora_run["ckpt"])
    assert saved["cast_skip_heads"] == sorted(SKIP) and saved["global_step"] == 5
    assert saved["cast_scope"]["trainable"] == "lora" and saved["cast_scope"]["lora"]["r"] == 4
    assert saved["cast_scope"]["frozen_from_base"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)  # the adapter, not the 100x larger base
    base_model = _base_model(lora_run["model_dir"])
    base, config = state_copy(base_model), base_model.config
    full = with_base(base, state, config)
    assert_lora_contract(config, base, full, SKIP, "all", 8.0 / 4)


def test_export_merged_adapter_only_and_eval_read_the_same_weights(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cast_lightning.evaluation import load_for_eval

    model_dir, ckpt = lora_run["model_dir"], lora_run["ckpt"]
    base_model = _base_model(model_dir)
    base, config = state_copy(base_model), base_model.config
    _, state = _checkpoint_factors(ckpt)
    expected = merged_weights(config, with_base(base, state, config), 8.0 / 4)
    frozen = frozen_mask(config, base, SKIP)

    assert run_cast(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'merged'}"]) == 0
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    merged = state_copy(AutoModelForCausalLM.from_pretrained(merged_dir))
    assert set(merged) == set(base)  # a plain HF model: no LoRA or base_layer names
    for name, tensor in merged.items():
        assert torch.equal(tensor[frozen[name]], base[name][frozen[name]]), f"merged {name}: a skipped head moved"
        # peft merges in float32; the oracle in float64: equal up to float32 rounding of the update.
        assert torch.allclose(tensor.double(), expected[name], rtol=0, atol=1e-6), name
    marker = json.loads((merged_dir / "cast_skip_heads.json").read_text())
    assert marker["skip_heads"] == sorted(SKIP) and marker["trainable"] == "lora" and not marker["adapter_only"]

    assert run_cast(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'adapter'}", "--adapter_only"]) == 0
    adapter_dir = tmp_path / "adapter"
    config_json = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config_json["r"] == 4 and config_json["lora_alpha"] == 8 and config_json["base_model_name_or_path"] == str(model_dir)
    assert not list(adapter_dir.glob("model*.safetensors"))  # the adapter alone
    via_peft = state_copy(PeftModel.from_pretrained(_base_model(model_dir), adapter_dir).merge_and_unload())
    for name, tensor in via_peft.items():
        assert torch.equal(tensor, merged[name]), name
    assert json.loads((adapter_dir / "cast_skip_heads.json").read_text())["adapter_only"] is True

    for path, kind in ((ckpt, "lightning_checkpoint"), (merged_dir, "hf_directory"), (adapter_dir, "adapter_directory")):
        model, tokenizer, identity = load_for_eval(str(path), device="cpu")
        assert identity["kind"] == kind and identity["skip_heads"] == sorted(SKIP) and identity["trainable"] == "lora"
        loaded = state_copy(model)
        assert set(loaded) == set(base), kind
        for name, tensor in loaded.items():
            assert torch.equal(tensor, merged[name]), (kind, name)


class ScopeProbe(L.Callback):
    """`cast test` on a LoRA checkpoint: what the module was built with and whether it holds the trained adapter."""

    def __init__(self, path: str):
        self.path = path

    def on_test_start(self, trainer, pl_module) -> None:
        from pathlib import Path

        state = {k: v.tolist() for k, v in pl_module.state_dict().items() if ".lora_B." in k}
        Path(self.path).write_text(json.dumps({"trainable": pl_module.trainable, "skip_heads": pl_module.skip_heads,
                                               "lora_r": pl_module.lora_options.r, "lora_B": state}))


def test_cast_test_reads_the_adapter_and_the_mask(lora_run, tiny_data, tmp_path):
    probe = tmp_path / "probe.json"
    args = ["test", f"--model.pretrained={lora_run['model_dir']}", f"--ckpt_path={lora_run['ckpt']}",
            "--model.max_new_tokens=2", f"--data.safety_files=[{tiny_data['safety']}]",
            f"--data.utility_files=[{tiny_data['utility']}]", f"--data.harmful_eval_files=[{tiny_data['harmful']}]",
            f"--data.benign_eval_files=[{tiny_data['benign']}]", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=tests.test_lora.ScopeProbe", f"--trainer.callbacks.path={probe}"]
    assert run_cast(args) == 0
    seen = json.loads(probe.read_text())
    assert seen["trainable"] == "lora" and seen["lora_r"] == 4
    assert [tuple(h) for h in seen["skip_heads"]] == sorted(tuple(h) for h in SKIP)
    _, state = _checkpoint_factors(lora_run["ckpt"])
    assert seen["lora_B"] and all(torch.equal(torch.tensor(v), state[k[len("model."):]]) for k, v in seen["lora_B"].items())


# -- QLoRA (GPU) ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_keeps_the_contract_and_exports_onto_the_full_precision_base(pretrained, tiny_data, tmp_path):
    """4-bit NF4 base (bitsandbytes), bf16 compute: the factors' frozen slices stay zero through 5 AdamW steps with
    weight decay, accumulation and clipping; the export merges onto the full-precision base, skipped heads exact."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model_dir = pretrained("llama")
    root = tmp_path / "run"
    args = fit_args(model_dir, tiny_data, root, f"--model.skip_heads={SKIP}", "--model.trainable=lora",
                    "--model.lora.r=4", "--model.lora.alpha=8", "--model.lora.load_in_4bit=true", "--model.dtype=bfloat16",
                    "--model.weight_decay=0.1", "--trainer.max_steps=5", "--trainer.accumulate_grad_batches=2",
                    "--trainer.gradient_clip_val=1.0", "--trainer.accelerator=cuda", "--trainer.precision=bf16-mixed")
    args = [a for a in args if a != "--trainer.accelerator=cpu"]
    assert run_cast(args) == 0
    (ckpt,) = list(root.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    state = {k[len("model."):]: v.float() for k, v in saved["state_dict"].items()}
    assert state and all(".lora_" in k for k in state)
    base = state_copy(AutoModelForCausalLM.from_pretrained(model_dir))
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    zeros = lora_zero_masks(config, state, SKIP, "all")
    for name, mask in zeros.items():
        assert not state[name][mask].any(), name
        assert state[name][~mask].any(), name
    assert run_cast(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'hf'}"]) == 0
    exported = state_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    frozen = frozen_mask(config, base, SKIP)
    for name, tensor in exported.items():
        reference = base[name].to(tensor.dtype)
        assert torch.equal(tensor[frozen[name]], reference[frozen[name]]), name
