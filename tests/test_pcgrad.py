"""PCGrad (``--model.pcgrad global | per_tensor``): the projection on hand-built gradients, the exact split of the
default loss into its safety and utility parts, and training: at every optimizer step the gradient clipping sees equals
``s' + u`` recomputed here from separate forwards over each step's safety rows and utility rows (the skipped heads'
slices zeroed by the published-layout oracle, the projection written out here), the applied safety update has a
non-negative inner product with the utility gradient, and the head mask contract holds on top."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from cast_lightning.data.datamodule import collate_fit
from cast_lightning.errors import CastError
from cast_lightning.module import CASTModule
from cast_lightning.pcgrad import part_losses, project
from tests.conftest import state_copy
from tests.test_mask_contract import SKIP, assert_contract, datamodule, frozen_mask, make_trainer

STEPS = 6


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# -- the projection ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["global", "per_tensor"])
def test_conflicting_gradient_is_projected_onto_the_normal_plane(mode):
    out, stats = project([t(-1.0, 1.0)], [t(2.0, 0.0)], mode)
    # <s, u> = -2, ||u||^2 = 4: s' = s - (-2 / 4) u = (-1, 1) + (1, 0) = (0, 1)
    assert torch.equal(out[0], t(0.0, 1.0))
    assert stats.conflict_fraction == 1.0
    assert stats.cosine == pytest.approx(-2.0 / (math.sqrt(2.0) * 2.0))
    assert stats.dot_before == -2.0 and stats.dot_after == 0.0


@pytest.mark.parametrize("mode", ["global", "per_tensor"])
@pytest.mark.parametrize("s, cosine", [((1.0, 1.0), 1.0 / math.sqrt(2.0)), ((0.0, 3.0), 0.0)], ids=["aligned", "orthogonal"])
def test_aligned_and_orthogonal_gradients_are_left_alone(mode, s, cosine):
    safety = [t(*s)]
    out, stats = project(safety, [t(2.0, 0.0)], mode)
    assert torch.equal(out[0], safety[0]) and out[0] is not safety[0]
    assert stats.conflict_fraction == 0.0
    assert stats.cosine == pytest.approx(cosine)


def test_global_and_per_tensor_differ_where_one_tensor_conflicts():
    safety, utility = [t(-1.0, 0.0), t(3.0, 1.0)], [t(1.0, 0.0), t(1.0, 0.0)]
    # Globally <s, u> = -1 + 3 = 2 >= 0: nothing changes.
    out, stats = project(safety, utility, "global")
    assert all(torch.equal(a, b) for a, b in zip(out, safety)) and stats.conflict_fraction == 0.0
    # Per tensor the first conflicts (<s_0, u_0> = -1, ||u_0||^2 = 1: s_0' = (0, 0)); the second does not.
    out, stats = project(safety, utility, "per_tensor")
    assert torch.equal(out[0], t(0.0, 0.0)) and torch.equal(out[1], t(3.0, 1.0))
    assert stats.conflict_fraction == 0.5 and stats.dot_after == 3.0
    # A tensor with no utility gradient is neither projected nor counted.
    out, stats = project([t(-1.0, 0.0), t(5.0)], [t(1.0, 0.0), t(0.0)], "per_tensor")
    assert torch.equal(out[1], t(5.0)) and stats.conflict_fraction == 1.0


def test_a_three_dimensional_conflict_by_the_formula():
    s, u = t(1.0, -2.0, 0.5), t(0.5, 1.0, -1.0)
    dot, uu = float(s @ u), float(u @ u)  # 0.5 - 2 - 0.5 = -2, 2.25
    out, stats = project([s], [u], "global")
    assert torch.allclose(out[0], s - dot / uu * u)
    assert abs(float(out[0] @ u)) < 1e-6 and stats.conflict_fraction == 1.0


# -- the loss split ----------------------------------------------------------------------------------------------------


def test_the_parts_sum_to_the_default_loss_and_each_is_its_rows_share(tiny_llama_dir, tiny_data):
    module = CASTModule(str(tiny_llama_dir))
    dm = datamodule(tiny_llama_dir, tiny_data)
    dm.setup("fit")
    batch = collate_fit(dm.train_set[21:26], dm.tokenizer.pad_token_id)  # 3 safety rows, then 2 replayed utility rows
    assert batch["is_utility"].tolist() == [False, False, False, True, True]
    with torch.no_grad():
        default = module._loss(batch)
        logits = module(batch["input_ids"], batch["attention_mask"]).logits
        safety, utility = part_losses(logits, batch["labels"], batch["is_utility"])
        assert float(safety + utility) == pytest.approx(float(default), rel=1e-6)
        for rows, part in ((~batch["is_utility"], safety), (batch["is_utility"], utility)):
            alone = module(batch["input_ids"][rows], batch["attention_mask"][rows], batch["labels"][rows]).loss
            share = _tokens(batch["labels"][rows]) / _tokens(batch["labels"])
            assert float(part) == pytest.approx(float(alone) * share, rel=1e-5)


def _batches(dm):
    return [collate_fit(dm.train_set[i : i + 4], dm.tokenizer.pad_token_id) for i in range(0, len(dm.train_set), 4)]


def _tokens(labels) -> int:
    return int((labels[:, 1:] != -100).sum())


def test_fit_batches_mark_exactly_the_replayed_rows(tiny_llama_dir, tiny_data):
    dm = datamodule(tiny_llama_dir, tiny_data)
    dm.setup("fit")
    flags = torch.cat([b["is_utility"] for b in _batches(dm)])
    # utility_replay 0.25 of 24 safety rows: round(24 * 0.25 / 0.75) = 8 replayed rows after the safety rows.
    assert len(flags) == 24 + 8 and int(flags.sum()) == 8
    assert not flags[:24].any() and flags[24:].all()
    # The loader the Trainer gets carries the flag too, and the prompts of the flagged rows are utility prompts.
    dm.trainer = None
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_utility"].dtype == torch.bool and len(batch["is_utility"]) == 4
    texts = [dm.tokenizer.decode(ids) for ids in _batches(dm)[-1]["input_ids"]]
    assert all("add " in text for text in texts)  # UTILITY_ROWS: "add i and i + 3"


# -- training ----------------------------------------------------------------------------------------------------------


class Recording(CASTModule):
    """Keeps each step's micro-batches; at clipping time (after PCGrad wrote .grad, before clipping) recomputes the
    expected gradient from separate forwards over the safety rows and the utility rows."""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.window, self.checks = [], []

    def training_step(self, batch, batch_idx):
        self.window.append({k: v.detach().clone() for k, v in batch.items()})
        return super().training_step(batch, batch_idx)

    def _part_gradient(self, params, names, utility_rows: bool) -> list[torch.Tensor]:
        total = [torch.zeros_like(p) for p in params]
        accumulate = self.trainer.accumulate_grad_batches
        with torch.enable_grad():
            for batch in self.window:
                rows = batch["is_utility"] if utility_rows else ~batch["is_utility"]
                if not rows.any():
                    continue
                loss = self.model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                                  labels=batch["labels"][rows]).loss
                share = _tokens(batch["labels"][rows]) / _tokens(batch["labels"])
                grads = torch.autograd.grad(loss * share / accumulate, params, allow_unused=True)
                for acc, g in zip(total, grads):
                    if g is not None:
                        acc.add_(g)
        masks = frozen_mask(self.model.config, dict(zip(names, total)), SKIP)
        for name, g in zip(names, total):
            g[masks[name]] = 0
        return total

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        applied = [p.grad.detach().clone() for p in params]
        s = self._part_gradient(params, names, utility_rows=False)
        u = self._part_gradient(params, names, utility_rows=True)
        dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(s, u))
        uu = sum(float((b.double() ** 2).sum()) for b in u)
        if self.hparams.pcgrad == "global":
            c = dot / uu if dot < 0 and uu > 0 else 0.0
            expected_s = [a - c * b for a, b in zip(s, u)]
        else:
            expected_s = []
            for a, b in zip(s, u):
                d, n = float((a.double() * b.double()).sum()), float((b.double() ** 2).sum())
                expected_s.append(a - d / n * b if d < 0 and n > 0 else a)
        for name, got, es, ub in zip(names, applied, expected_s, u):
            assert torch.allclose(got, es + ub, rtol=1e-4, atol=1e-7), f"step {self.global_step}: {name} is not s' + u"
        applied_safety = [g - b for g, b in zip(applied, u)]
        safety_dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(applied_safety, u))
        norms = math.sqrt(sum(float((a.double() ** 2).sum()) for a in s)) * math.sqrt(uu)
        self.checks.append((dot, safety_dot, norms))
        self.window = []
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


@pytest.mark.parametrize("mode", ["global", "per_tensor"])
def test_pcgrad_training_applies_s_prime_plus_u_and_keeps_the_mask(mode, tiny_llama_dir, tiny_data, tmp_path):
    L.seed_everything(0)
    module = Recording(str(tiny_llama_dir), skip_heads=SKIP, pcgrad=mode, learning_rate=1e-2, weight_decay=0.1,
                       warmup_steps=1)
    before = state_copy(module.model)
    trainer = make_trainer(tmp_path, max_steps=STEPS)  # accumulation 2, clipping 1.0
    trainer.fit(module, datamodule(tiny_llama_dir, tiny_data))
    assert trainer.global_step == STEPS and len(module.checks) == STEPS == len(module.pcgrad_history)
    for (dot, safety_dot, norms), stats in zip(module.checks, module.pcgrad_history):
        # The applied safety update never opposes the utility gradient (up to float32 rounding of the projection).
        assert safety_dot >= -1e-5 * norms, (dot, safety_dot)
        assert stats.dot_after >= -1e-5 * norms
        if mode == "global":
            assert stats.conflict_fraction == float(dot < 0)
            assert stats.cosine == pytest.approx(dot / norms, rel=1e-3, abs=1e-6)
    # The seeded run conflicts at some steps (globally at step 2; per tensor at every step), so projections were checked.
    assert any(s.conflict_fraction > 0 for s in module.pcgrad_history), "no conflict: the test saw no projection"
    assert {"pcgrad/conflict_fraction", "pcgrad/cosine"} <= set(trainer.callback_metrics)
    assert_contract(module.model.config, before, state_copy(module.model), SKIP)


def test_pcgrad_without_utility_replay_is_refused(tiny_llama_dir, tiny_data, tmp_path):
    from cast_lightning.data.datamodule import SafetyUtilityDataModule

    module = CASTModule(str(tiny_llama_dir), pcgrad="global")
    dm = SafetyUtilityDataModule(safety_files=[str(tiny_data["safety"])], tokenizer=str(tiny_llama_dir), batch_size=4)
    with pytest.raises(CastError, match="--data.utility_replay is 0.0: set --data.utility_replay"):
        make_trainer(tmp_path, max_steps=1).fit(module, dm)
    with pytest.raises(CastError, match="unknown --model.pcgrad 'both'"):
        CASTModule(str(tiny_llama_dir), pcgrad="both")
