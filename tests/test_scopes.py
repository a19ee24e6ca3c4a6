"""Training scopes (``--model.trainable``: all, attention, lora, patterns) with the head mask, through Lightning.

Every architecture HeadLayout supports x every scope, each run with its own KV policy so that each (scope, policy)
and each (architecture, policy) pair occurs: 5 AdamW steps with weight decay 0.1, accumulation 2, clipping 1.0. The
oracles are computed here: the frozen slices from the published layouts (``tests.test_mask_contract``), the scope's
parameter names from the published module names, and for LoRA the merged weights ``W + s * B @ A`` (transposed for
GPT-2's Conv1D) in float64 from the trained factors. bf16-mixed and resume (exact, with the checkpoint's mask) run per
scope on the tiny Llama; the 2-process DDP/FSDP2 cases are in tests/test_strategies.py.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cast_lightning.errors import CastError
from cast_lightning.module import CASTModule
from tests.conftest import make_pretrained, state_copy
from tests.test_mask_contract import SEPARATE, SKIP, assert_contract, datamodule, frozen_mask, geometry, make_trainer, oracle_slices
from tests.tiny_models import ARCHITECTURES

SCOPES = ("all", "attention", "lora")
POLICIES = ("all", "any", "never")
STEPS = 5




# -- oracles ----------------------------------------------------------------------------------------------------------


def published_projections(g: dict) -> list[str]:
    """The attention projection modules of every layer, by the architectures' published names."""
    leaves = {
        **{arch: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj") for arch in SEPARATE},
        "phi3": ("self_attn.qkv_proj", "self_attn.o_proj"),
        "gpt2": ("attn.c_attn", "attn.c_proj"),
        "gpt_neox": ("attention.query_key_value", "attention.dense"),
    }[g["arch"]]
    layer = {"gpt2": "transformer.h.{}", "gpt_neox": "gpt_neox.layers.{}"}.get(g["arch"], "model.layers.{}")
    return [f"{layer.format(i)}.{leaf}" for i in range(g["layers"]) for leaf in leaves]


def expected_trainable(config, names: list[str], scope) -> set[str]:
    """Parameter names the scope must train (base names; LoRA: the adapter factors)."""
    if scope == "all":
        return set(names)
    if scope == "lora":
        return {n for n in names if ".lora_A." in n or ".lora_B." in n}
    modules = published_projections(geometry(config))
    return {n for n in names if n.rsplit(".", 1)[0] in modules}


def is_conv1d(config) -> bool:
    return config.model_type == "gpt2"  # transformers' Conv1D stores weights as (in, out)


def merged_weights(config, trained: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Base parameter name -> the effective float64 weight of every parameter: ``W + scale * B @ A`` for an adapted
    layer (transposed for Conv1D), the base tensor for everything else."""
    out = {}
    for name, tensor in trained.items():
        if ".lora_" in name:
            continue
        module, _, kind = name.rpartition(".")
        if module.endswith(".base_layer"):
            owner = module[: -len(".base_layer")]
            value = tensor.double()
            if kind == "weight":
                A, B = trained[f"{owner}.lora_A.default.weight"].double(), trained[f"{owner}.lora_B.default.weight"].double()
                delta = scale * (B @ A)
                value = value + (delta.T if is_conv1d(config) else delta)
            out[f"{owner}.{kind}"] = value
        else:
            out[name] = tensor.double()
    return out


def lora_zero_masks(config, trained: dict[str, torch.Tensor], skip, kv_policy) -> dict[str, torch.Tensor]:
    """name -> True where a LoRA factor must be zero: B rows of the frozen output features, A columns of the frozen
    input features (output features: Linear weight rows, Conv1D weight columns)."""
    masks = {n: torch.zeros(tuple(t.shape), dtype=torch.bool) for n, t in trained.items() if ".lora_" in n}
    output_dim = 1 if is_conv1d(config) else 0
    for name, dim, start, stop in oracle_slices(config, skip, kv_policy):
        module, _, kind = name.rpartition(".")
        if kind != "weight" or f"{module}.lora_A.default.weight" not in trained:
            continue
        if dim == output_dim:
            masks[f"{module}.lora_B.default.weight"][start:stop, :] = True
        else:
            masks[f"{module}.lora_A.default.weight"][:, start:stop] = True
    return masks


def assert_lora_contract(config, base: dict, trained: dict, skip, kv_policy, scale: float) -> None:
    """Merged skipped heads bit-identical to the base; every other merged element of an adapted weight changed;
    the base tensors untouched; the LoRA factors zero exactly where the heads own features, and moved elsewhere."""
    assert any(".lora_" in n for n in trained), "no LoRA factors trained"
    for name, tensor in trained.items():
        if ".lora_" not in name:
            base_name = name.replace(".base_layer.", ".")
            assert torch.equal(tensor, base[base_name]), f"base tensor {name} changed"
    merged = merged_weights(config, trained, scale)
    frozen = frozen_mask(config, base, skip, kv_policy)
    adapted = {n.replace(".lora_A.default.weight", ".weight") for n in trained if n.endswith(".lora_A.default.weight")}
    for name in adapted:
        old, new, f = base[name].double(), merged[name], frozen[name]
        assert torch.equal(new[f], old[f]), f"merged frozen slice of {name} differs from the base"
        changed = (new[~f] != old[~f]).float().mean().item()
        assert changed > 0.99, f"merged {name}: only {changed:.1%} of its free elements changed"
    zeros = lora_zero_masks(config, trained, skip, kv_policy)
    for name, mask in zeros.items():
        values = trained[name]
        assert torch.equal(values[mask], torch.zeros_like(values[mask])), f"{name}: frozen LoRA slice is not zero"
        moved = (values[~mask] != 0).float().mean().item() if name.endswith("lora_B.default.weight") else None
        if moved is not None:
            assert moved > 0.99, f"{name}: only {moved:.1%} of its free elements left zero"
    assert sum(int(m.sum()) for m in zeros.values()) > 0


def lora_scale(module: CASTModule) -> float:
    options = module.lora_options
    return options.alpha / (math.sqrt(options.r) if options.use_rslora else options.r)


class StopAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit(module, model_dir, data, root, steps=STEPS, precision="32-true", callbacks=None, ckpt_path=None):
    trainer = make_trainer(root, max_steps=steps, precision=precision, callbacks=callbacks)
    trainer.fit(module, datamodule(model_dir, data), ckpt_path=ckpt_path)
    assert trainer.global_step == steps
    return trainer


def check_scope(module, config, base: dict, skip, kv_policy, scope) -> None:
    trained = state_copy(module.model)
    names = list(trained)
    expected = expected_trainable(config, names, scope)
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == expected
    # The optimizer keeps state for the scope's parameters and nothing else.
    optimizer = module.trainer.optimizers[0]
    with_state = {id(p) for p in optimizer.state}
    assert with_state == {id(p) for p in module.model.parameters() if p.requires_grad}
    if scope == "lora":
        assert_lora_contract(config, base, trained, skip, kv_policy, lora_scale(module))
    else:
        assert_contract(config, base, trained, skip, kv_policy, trainable=expected)


CASES = [(arch, scope, POLICIES[(i + j) % 3]) for i, arch in enumerate(ARCHITECTURES) for j, scope in enumerate(SCOPES)]


@pytest.mark.parametrize("architecture, scope, kv_policy", CASES, ids=[f"{a}-{s}-kv_{p}" for a, s, p in CASES])
def test_mask_contract_through_training(architecture, scope, kv_policy, pretrained, tiny_data, tmp_path):
    model_dir = pretrained(architecture)
    L.seed_everything(0)
    module = CASTModule(str(model_dir), skip_heads=SKIP, kv_policy=kv_policy, trainable=scope, learning_rate=1e-2,
                        weight_decay=0.1, warmup_steps=1, lora={"r": 4, "alpha": 8.0} if scope == "lora" else None)
    base = state_copy(module.model if scope != "lora" else _base_model(model_dir))
    fit(module, model_dir, tiny_data, tmp_path)
    check_scope(module, module.model.config, base, SKIP, kv_policy, scope)


def _base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_every_architecture_and_policy_is_covered():
    assert {a for a, _, _ in CASES} == set(ARCHITECTURES) >= {"mixtral", "gemma", "gemma3_text"}
    from cast_lightning.heads import SUPPORTED_ARCHITECTURES

    assert set(ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)
    for scope in SCOPES:
        assert {p for _, s, p in CASES if s == scope} == set(POLICIES)
    for arch in ARCHITECTURES:
        assert {p for a, _, p in CASES if a == arch} == set(POLICIES)


@pytest.mark.parametrize("scope", SCOPES)
def test_mask_contract_in_bf16_mixed(scope, pretrained, tiny_data, tmp_path):
    model_dir = pretrained("llama")
    L.seed_everything(0)
    module = CASTModule(str(model_dir), skip_heads=SKIP, trainable=scope, learning_rate=1e-2, weight_decay=0.1,
                        lora={"r": 4, "alpha": 8.0} if scope == "lora" else None)
    base = state_copy(_base_model(model_dir))
    fit(module, model_dir, tiny_data, tmp_path, precision="bf16-mixed")
    check_scope(module, module.model.config, base, SKIP, "all", scope)


@pytest.mark.parametrize("scope", SCOPES)
def test_resume_is_exact_and_keeps_the_mask(scope, pretrained, tiny_data, tmp_path):
    """3 steps, checkpoint, resume with no mask configured to 6 steps == 6 steps straight, bit for bit; the
    checkpoint holds the mask and the scope, and for a frozen-base scope only the trained tensors."""
    model_dir = pretrained("llama")
    lora = {"r": 4, "alpha": 8.0} if scope == "lora" else None

    def module(skip=SKIP):
        return CASTModule(str(model_dir), skip_heads=skip, trainable=scope, lora=lora, learning_rate=1e-2,
                          weight_decay=0.1, warmup_steps=1)

    L.seed_everything(0)
    straight = module()
    fit(straight, model_dir, tiny_data, tmp_path / "straight", steps=6)

    L.seed_everything(0)
    first = module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    # The same 6-step run (schedule included), stopped after step 3 as an interruption would.
    trainer = make_trainer(tmp_path / "first", max_steps=6, callbacks=[checkpoint, StopAtStep(3)])
    trainer.fit(first, datamodule(model_dir, tiny_data))
    assert trainer.global_step == 3
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["cast_skip_heads"] == sorted(SKIP)
    assert saved["cast_scope"]["trainable"] == scope
    state_names = {k[len("model."):] for k in saved["state_dict"]}
    trainable = {n for n, p in first.model.named_parameters() if p.requires_grad}
    if scope == "all":
        assert state_names == set(state_copy(first.model)) and not saved["cast_scope"]["frozen_from_base"]
    else:  # only the trained tensors: the adapter (LoRA) or the attention projections
        assert state_names == trainable and saved["cast_scope"]["frozen_from_base"]
        assert set(saved["cast_scope"]["base_fingerprint"]) == {n for n, p in first.model.named_parameters() if not p.requires_grad}

    L.seed_everything(0)
    resumed = module(skip=None)
    assert resumed.skip_heads == []
    fit(resumed, model_dir, tiny_data, tmp_path / "resumed", steps=6,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")], ckpt_path=str(last))
    assert resumed.skip_heads == sorted(tuple(h) for h in SKIP)
    expected, actual = state_copy(straight.model), state_copy(resumed.model)
    different = [n for n in expected if not torch.equal(expected[n], actual[n])]
    assert not different, f"the resumed run differs from the straight one in {different}"
    check_scope(resumed, resumed.model.config, state_copy(_base_model(model_dir)), SKIP, "all", scope)


# -- patterns ---------------------------------------------------------------------------------------------------------


PATTERN_CASES = {
    # patterns -> the parameter names of the tiny 2-layer Llama they must select, spelled out
    "mlp+lm_head": (["mlp", "lm_head"], [f"model.layers.{i}.mlp.{m}_proj.weight" for i in (0, 1) for m in ("gate", "up", "down")] + ["lm_head.weight"]),
    "layer 1 + final norm": (["layers.1", "model.norm"], None),
    "glob: q_proj everywhere": (["model.layers.*.self_attn.q_proj.*"], ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]),
    "attention + embeddings": (["attention", "embed_tokens"], None),
}


@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_pattern_scopes_select_exactly_their_parameters(case, pretrained):
    patterns, expected = PATTERN_CASES[case]
    module = CASTModule(str(pretrained("llama")), skip_heads=SKIP, trainable=patterns)
    names = [n for n, _ in module.model.named_parameters()]
    if case == "layer 1 + final norm":
        expected = [n for n in names if n.startswith("model.layers.1.")] + ["model.norm.weight"]
    if case == "attention + embeddings":
        expected = sorted(expected_trainable(module.model.config, names, "attention")) + ["model.embed_tokens.weight"]
    assert sorted(n for n, p in module.model.named_parameters() if p.requires_grad) == sorted(expected)
    assert "model.layers.0.input_layernorm.weight" not in expected  # "norm" components never match *_layernorm


def test_pattern_scope_trains_through_the_mask(pretrained, tiny_data, tmp_path):
    """A pattern scope holding half the heads' projections: the mask still applies inside it."""
    model_dir = pretrained("qwen2")  # q/k/v biases too
    L.seed_everything(0)
    module = CASTModule(str(model_dir), skip_heads=SKIP, trainable=["q_proj", "k_proj", "mlp"], learning_rate=1e-2, weight_decay=0.1)
    base = state_copy(module.model)
    fit(module, model_dir, tiny_data, tmp_path)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in base if ".q_proj." in n or ".k_proj." in n or ".mlp." in n}
    assert_contract(module.model.config, base, state_copy(module.model), SKIP, trainable=trainable)


# -- refusals and checks (direct construction; the CLI's one-line errors are in tests/test_reliability.py) ----------


@pytest.mark.parametrize("kwargs, message", [
    (dict(trainable=[]), "selects no parameter"),
    (dict(trainable=["mpl"]), "matches no parameter"),
    (dict(trainable=["self_attn.q_proj"], skip_heads=[[l, h] for l in range(2) for h in range(4)]), "nothing would train"),
    # every adapted layer's B rows or A columns belong to skipped heads: the merged update is zero whatever trains
    (dict(trainable="lora", skip_heads=[[l, h] for l in range(2) for h in range(4)]), "nothing would train"),
    (dict(trainable=["lora", "mlp"]), "stands alone"),
    (dict(lora={"r": 4}), "add --model.trainable lora"),
])
def test_scope_refusals(kwargs, message, pretrained):
    with pytest.raises(CastError, match=message):
        CASTModule(str(pretrained("llama")), **kwargs)


def test_resume_refuses_another_scope_and_a_changed_base(pretrained, tiny_data, tmp_path):
    model_dir = pretrained("llama")
    module = CASTModule(str(model_dir), skip_heads=SKIP, trainable="attention")
    fit(module, model_dir, tiny_data, tmp_path / "run", steps=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    last = str(tmp_path / "ckpt" / "last.ckpt")
    other = CASTModule(str(model_dir), trainable="lora")
    with pytest.raises(CastError, match="trained with --model.trainable attention"):
        make_trainer(tmp_path / "other", max_steps=2).fit(other, datamodule(model_dir, tiny_data), ckpt_path=last)

    # The checkpoint left the frozen MLPs out: a base whose weights changed since is refused, not silently used.
    changed = make_pretrained(tmp_path / "changed", "llama", seed=1)
    again = CASTModule(str(changed), trainable="attention")
    with pytest.raises(CastError, match="differ from the ones it was trained on"):
        make_trainer(tmp_path / "again", max_steps=2).fit(again, datamodule(changed, tiny_data), ckpt_path=last)
    from cast_lightning.checkpoints import load_checkpoint_model

    saved = torch.load(last, weights_only=True)
    saved["hyper_parameters"]["pretrained"] = str(changed)
    torch.save(saved, tmp_path / "moved.ckpt")
    with pytest.raises(CastError, match="pair it with the base model it was trained from"):
        load_checkpoint_model(str(tmp_path / "moved.ckpt"))


def test_fingerprint_of_a_tensor_larger_than_float32_can_index():
    """A 32000 x 1024 embedding (over 2^24 values): evenly spaced samples must stay inside the tensor, and the digest
    must see its last element."""
    import torch

    from cast_lightning.scopes import fingerprint

    embedding = torch.nn.Embedding(32000, 1024)
    embedding.weight.requires_grad_(False)
    before = fingerprint(embedding)["weight"]
    with torch.no_grad():
        embedding.weight.view(-1)[-1] += 1.0
    assert fingerprint(embedding)["weight"] != before
