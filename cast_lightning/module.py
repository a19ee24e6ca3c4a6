"""CASTModule: supervised fine-tuning of an HF causal LM with a head gradient mask.

With no skipped heads this is plain full fine-tuning: baselines and CAST share one code path.
The loss is separate from the masking, so other objectives can replace ``training_step`` later.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch

from cast_lightning.checkpoints import SKIP_HEADS_KEY
from cast_lightning.errors import CastError
from cast_lightning.generation import generate_greedy
from cast_lightning.heads import KV_POLICIES, HeadLayout
from cast_lightning.loading import load_causal_lm, load_tokenizer
from cast_lightning.masking import HeadMask, original_shapes
from cast_lightning.schedule import warmup_cosine
from cast_lightning.strategies import (
    DEEPSPEED,
    DENSE,
    FSDP1,
    FSDP2,
    clip_fsdp1,
    generation_setup,
    shard_model,
    sharding_of,
    total_grad_norm,
)

# configure_gradient_clipping is overridden only to clip under FSDP1; under DeepSpeed it defers to the engine's
# own clipping (trainer.gradient_clip_val goes into the DeepSpeed config), so Lightning's warning does not apply.
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")


def resolve_skip_heads(
    layout: HeadLayout, conflict_map: str | None, skip_heads: list[list[int]] | None
) -> list[tuple[int, int]]:
    """The heads to skip from a conflict map file or an explicit list (never both)."""
    if conflict_map is not None and skip_heads is not None:
        raise CastError("give either --model.conflict_map or --model.skip_heads, not both")
    if conflict_map is not None:
        from cast_lightning.conflict import ConflictMap

        cmap = ConflictMap.from_json(conflict_map)
        cmap.check_layout(layout)
        skip_heads = cmap.skip
    heads = []
    for entry in skip_heads or []:
        if len(entry) != 2:
            raise CastError(f"skip head {entry!r} is not a [layer, head] pair: write e.g. --model.skip_heads '[[0, 1], [2, 3]]'")
        layer, head = int(entry[0]), int(entry[1])
        layout.check_head(layer, head)
        heads.append((layer, head))
    return sorted(set(heads))


class CASTModule(L.LightningModule):
    def __init__(
        self,
        pretrained: str,
        conflict_map: str | None = None,
        skip_heads: list[list[int]] | None = None,
        kv_policy: str = "all",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = 48,
    ):
        """Fine-tune a causal LM for safety while skipping (freezing) the high-conflict attention heads.

        Args:
            pretrained: HF hub name or local directory of the causal LM (and its tokenizer).
            conflict_map: path of a ``conflict_map.json`` from ``cast diagnose``; its ``skip`` heads are frozen.
            skip_heads: heads to freeze given directly, as ``[[layer, head], ...]``; exclusive with conflict_map.
                Neither = full fine-tuning (the baseline).
            kv_policy: when a GQA key/value group is frozen: ``all`` of its query heads skipped (default),
                ``any`` of them, or ``never``.
            learning_rate: AdamW peak learning rate.
            weight_decay: AdamW decoupled weight decay (frozen slices stay bit-identical regardless).
            warmup_steps: linear warmup steps before the cosine decay (``cast_lightning.schedule``).
            min_lr_ratio: the cosine schedule decays to ``learning_rate * min_lr_ratio``.
            dtype: weight dtype: float32, bfloat16 or float16 (use the Trainer's precision for mixed precision).
            attn_implementation: transformers attention implementation (eager, sdpa, flash_attention_2); default: the model's.
            trust_remote_code: run code shipped with the model repository (off unless you trust it).
            max_new_tokens: generation length for refusal evaluation in ``cast test``.
        """
        super().__init__()
        if kv_policy not in KV_POLICIES:
            raise CastError(f"unknown kv_policy {kv_policy!r}: use one of {', '.join(KV_POLICIES)}")
        self.save_hyperparameters()
        self.model = load_causal_lm(pretrained, dtype, attn_implementation, trust_remote_code)
        self.layout = HeadLayout.from_model(self.model)
        self.tokenizer = load_tokenizer(pretrained, trust_remote_code)
        self.skip_heads = resolve_skip_heads(self.layout, conflict_map, skip_heads)
        self.head_mask = HeadMask.for_heads(self.model, self.layout, self.skip_heads, kv_policy)

    # -- the mask --------------------------------------------------------------------------------------------------

    def _sharding(self) -> tuple[str, torch.nn.Module | None]:
        """How the strategy holds the parameters (strategies.sharding_of) and the module it wrapped."""
        if self._trainer is None:
            return DENSE, None
        return sharding_of(self.trainer.strategy), self.trainer.strategy.model

    def _build_mask(self) -> HeadMask:
        if getattr(self, "head_mask", None) is not None:
            self.head_mask.remove()
        sharding, root = self._sharding()
        return HeadMask.for_heads(self.model, self.layout, self.skip_heads, self.hparams.kv_policy, sharding, root)

    def set_skip_heads(self, skip_heads: list[tuple[int, int]]) -> None:
        self.skip_heads = sorted({(int(layer), int(head)) for layer, head in skip_heads})
        self.head_mask = self._build_mask()

    def configure_model(self) -> None:
        """FSDP1/FSDP2 strategies: one FSDP unit per decoder layer, then the root model (strategies.shard_model)."""
        sharding, _ = self._sharding()
        if sharding in (FSDP1, FSDP2):
            self.model = shard_model(self.model, sharding, self.device_mesh if sharding == FSDP2 else None)

    def on_fit_start(self) -> None:
        # The strategy has wrapped/partitioned the parameters by now: rebuild the mask on the live ones.
        self.head_mask = self._build_mask()

    def on_train_start(self) -> None:
        # Weights are final here (checkpoint restored, strategy set up): remember the frozen values.
        self.head_mask.snapshot()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Runs after backward (and gradient all-reduce) and before clipping: frozen slices leave the norm.
        self.head_mask.zero_grads()
        sharding, root = self._sharding()
        norm = total_grad_norm(self.model, sharding, root)
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        sharding, root = self._sharding()
        if sharding == FSDP1 and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            clip_fsdp1(root, gradient_clip_val)  # Lightning's FSDP1 precision plugin refuses norm clipping
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Undo weight decay (or any optimizer drift) on the frozen slices: bit-identical by construction.
        self.head_mask.restore()
        sharding, engine = self._sharding()
        if sharding == DEEPSPEED:
            norm = engine.get_global_grad_norm()  # the engine's last norm, computed from the masked gradients
            if norm is not None:
                self.log("train/grad_norm", float(norm), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[SKIP_HEADS_KEY] = [list(head) for head in self.skip_heads]

    def check_checkpoint_fits(self, checkpoint: dict) -> None:
        """The checkpoint's weights must fit this model: Lightning's strict load would fail too, but with a
        many-line RuntimeError listing every tensor, and only after the run's config and loggers are written."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict) or self._sharding()[0] != DENSE:
            return  # sharded strategies load their own state and check it themselves
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or reshaped:
            example = (reshaped or missing or unexpected)[0]
            saved = (checkpoint.get("hyper_parameters") or {}).get("pretrained", "unknown")
            raise CastError(
                f"the checkpoint's weights do not fit {self.hparams.pretrained} ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(reshaped)} of another shape, e.g. {example}; the checkpoint names "
                f"{saved}): resume with the model the checkpoint was trained from, or drop --ckpt_path"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint_fits(checkpoint)
        if SKIP_HEADS_KEY not in checkpoint:
            return
        saved = sorted((int(layer), int(head)) for layer, head in checkpoint[SKIP_HEADS_KEY])
        configured = self.hparams.conflict_map is not None or self.hparams.skip_heads is not None
        if configured and saved != self.skip_heads:
            raise CastError(
                f"the checkpoint was trained with {len(saved)} skipped heads but the config asks for "
                f"{len(self.skip_heads)} different ones: drop --model.conflict_map/--model.skip_heads to resume with the checkpoint's mask"
            )
        self.set_skip_heads(saved)

    # -- training --------------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def _loss(self, batch: dict) -> torch.Tensor:
        # HF shifts labels and averages over the response tokens (labels -100 elsewhere).
        return self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = self._loss(batch)
        name = self.trainer.datamodule.val_names[dataloader_idx] if self._has_named_val() else str(dataloader_idx)
        self.log(f"val/{name}_loss", loss, sync_dist=True, add_dataloader_idx=False, batch_size=batch["input_ids"].size(0))

    # -- cast test: refusal suites --------------------------------------------------------------------------------

    def on_test_start(self) -> None:
        from cast_lightning.metrics import RefusalRate

        names = getattr(self.trainer.datamodule, "test_names", ["harmful"])
        # One metric per suite; torchmetrics sums counts across ranks at compute time.
        self.refusal_rates = torch.nn.ModuleDict({name: RefusalRate() for name in names}).to(self.device)

    def test_step(self, batch: list[str], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = list(self.refusal_rates)[dataloader_idx]
        # Sharded weights: every rank generates until all are done (synced_gpus), else the ranks deadlock.
        with generation_setup(self.trainer.strategy, self.model, self.trainer.world_size) as generate_kwargs:
            texts = generate_greedy(
                self.model, self.tokenizer, batch, max_new_tokens=self.hparams.max_new_tokens, batch_size=len(batch), **generate_kwargs
            )
        metric = self.refusal_rates[name]
        metric.update(texts)
        key = {"harmful": "test/refusal_rate", "benign": "test/over_refusal_rate"}[name]
        self.log(key, metric, on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=len(batch))

    def _has_named_val(self) -> bool:
        return self.trainer is not None and hasattr(getattr(self.trainer, "datamodule", None), "val_names")

    def configure_optimizers(self):
        decay, no_decay = [], []
        shapes = original_shapes(*self._sharding())  # FSDP1 hands the optimizer flattened 1-D shards
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                # Norms, biases and embeddings-free 1-D tensors are not decayed (standard LLM practice).
                ndim = len(shapes.get(id(parameter), parameter.shape))
                (no_decay if ndim < 2 else decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.learning_rate,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = warmup_cosine(optimizer, total, self.hparams.warmup_steps, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
