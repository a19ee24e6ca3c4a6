"""CASTModule: supervised fine-tuning of an HF causal LM with a head gradient mask, in a training scope.

With no skipped heads this is plain fine-tuning of the scope: baselines and CAST share one code path. The scope
(``--model.trainable``: all, attention, lora or module-name patterns; ``scopes.py``, ``lora.py``) decides what trains;
the head mask (``masking.py``) freezes the skipped heads' slices inside it, on the base weights or on the LoRA
factors. The loss is separate from both (``_loss``/``training_step``), so other objectives can replace it later.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch

from cast_lightning import layers as layer_freezing
from cast_lightning import pcgrad as gradient_surgery
from cast_lightning import scopes
from cast_lightning.checkpoints import SCOPE_KEY, SKIP_HEADS_KEY, scope_record
from cast_lightning.errors import CastError
from cast_lightning.generation import generate_greedy
from cast_lightning.heads import KV_POLICIES, HeadLayout
from cast_lightning.loading import load_causal_lm, load_tokenizer
from cast_lightning.lora import LoraOptions, check_exact, load_4bit, logical_parameters, lora_options, mask_slices, options_dict
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

# The checkpoint entry holding the frozen decoder layers (--model.skip_layers); a resume must ask for the same.
SKIP_LAYERS_KEY = "cast_skip_layers"


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


def resolve_skip_layers(layout: HeadLayout, conflict_map: str | None, skip_layers) -> list[int]:
    """The decoder layers to freeze: indices/ranges (``layers.parse_skip_layers``), or ``from_map`` (the range located
    by ``--model.conflict_map``'s layer-gap diagnosis) / ``from_map:PATH`` (that map's range, without its heads)."""
    if isinstance(skip_layers, str) and skip_layers.strip().startswith(layer_freezing.FROM_MAP):
        path = skip_layers.strip()[len(layer_freezing.FROM_MAP):].removeprefix(":").strip() or conflict_map
        if path is None:
            raise CastError("--model.skip_layers from_map needs a map: add --model.conflict_map PATH, or write "
                            "--model.skip_layers from_map:PATH")
        from cast_lightning.conflict import ConflictMap

        cmap = ConflictMap.from_json(path)
        cmap.check_layout(layout)
        return layer_freezing.located_layers(cmap.data, path, layout)
    return layer_freezing.parse_skip_layers(skip_layers, layout)


class CASTModule(L.LightningModule):
    def __init__(
        self,
        pretrained: str,
        conflict_map: str | None = None,
        skip_heads: list[list[int]] | None = None,
        kv_policy: str = "all",
        trainable: str | list[str] = "all",
        lora: LoraOptions | None = None,
        skip_layers: str | list[int | str] | None = None,
        pcgrad: str = "off",
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
                Neither = plain fine-tuning of the scope (the baseline).
            kv_policy: when a GQA key/value group is frozen: ``all`` of its query heads skipped (default),
                ``any`` of them, or ``never``.
            trainable: what trains besides the head mask: ``all`` (default), ``attention`` (the attention projections
                and their biases; everything else frozen, with no optimizer state), ``lora`` (LoRA adapters, see
                --model.lora), or a list of module-name patterns (dotted components such as mlp, layers.1, lm_head,
                or globs over parameter names; the word attention stands for the attention scope).
            lora: LoRA options (with --model.trainable lora): rank, alpha, dropout, target modules, rsLoRA, 4-bit
                base (QLoRA). The skipped heads stay exactly the base model's after merging.
            skip_layers: decoder layers frozen whole (SPPFT-style; every parameter of the layer, bit-exactly, with no
                optimizer state): indices or ranges such as [2, 3] or "2-3" or "1,4-5"; ``from_map`` = the range the
                --model.conflict_map's layer-gap diagnosis located (cast diagnose --model.scorers '[layer_gap]');
                ``from_map:PATH`` = that map's range without taking its heads.
            pcgrad: PCGrad on the safety vs utility-replay gradients: off (default), global (one projection over all
                trainable parameters) or per_tensor (one per parameter tensor). Needs --data.utility_replay > 0; one
                device or DDP.
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
        trainable = scopes.normalize(trainable)
        if lora is not None and trainable != scopes.LORA:
            raise CastError(
                f"--model.lora sets LoRA options but --model.trainable is {scopes.describe(trainable)}: add "
                f"--model.trainable lora, or drop the --model.lora options"
            )
        options = lora_options(lora) if trainable == scopes.LORA else None
        gradient_surgery.check_mode(pcgrad)
        # Plain data only: checkpoints are read back with weights_only=True, which refuses pickled objects.
        self.save_hyperparameters(ignore=["lora", "trainable"])
        self.hparams["trainable"] = trainable
        self.hparams["lora"] = None if options is None else options_dict(options)
        self.trainable, self.lora_options = trainable, options
        quantized = options is not None and options.load_in_4bit
        if quantized:
            model = load_4bit(pretrained, dtype, attn_implementation, trust_remote_code)
            self.layout = HeadLayout.from_config(model.config)
            self.layout.check_parameters(logical_parameters(model))
        else:
            model = load_causal_lm(pretrained, dtype, attn_implementation, trust_remote_code)
            self.layout = HeadLayout.from_model(model)
        self.tokenizer = load_tokenizer(pretrained, trust_remote_code)
        self.skip_heads = resolve_skip_heads(self.layout, conflict_map, skip_heads)
        scoped, _ = scopes.apply(model, self.layout, trainable, options, pretrained)
        # LoRA: train the HF model inside the peft wrapper (same class, names and generate; adapters injected in place).
        self.model = scoped.base_model.model if options is not None else scoped
        # The frozen base, fingerprinted while whole: checkpoints that leave it out are checked against it.
        self._base_fingerprint = scopes.fingerprint(self.model) if trainable != scopes.ALL else {}
        # Whole layers (after the scope and its fingerprint: the checkpoint keeps these tensors, so export and eval
        # rebuild the scope alone). requires_grad=False: no gradient, no optimizer state, bit-identical.
        self.skip_layers = resolve_skip_layers(self.layout, conflict_map, skip_layers)
        self._layer_frozen = set(layer_freezing.freeze_layers(self.model, self.layout, self.skip_layers))
        self._safety_gradients: gradient_surgery.SafetyGradients | None = None
        self.pcgrad_history: list[gradient_surgery.Projection] = []
        self.head_mask = self._build_mask()
        self.head_mask.zero_values()  # LoRA: the skipped heads' B rows / A columns start at zero
        self._check_something_trains()

    # -- the mask --------------------------------------------------------------------------------------------------

    def _sharding(self) -> tuple[str, torch.nn.Module | None]:
        """How the strategy holds the parameters (strategies.sharding_of) and the module it wrapped."""
        if self._trainer is None:
            return DENSE, None
        return sharding_of(self.trainer.strategy), self.trainer.strategy.model

    def _build_mask(self) -> HeadMask:
        if getattr(self, "head_mask", None) is not None:
            self.head_mask.remove()
        if self.lora_options is not None:
            check_exact(self.lora_options, self.skip_heads)
        sharding, root = self._sharding()
        base = self.layout.frozen_slices(self.skip_heads, self.hparams.kv_policy)
        held, zero = mask_slices(self.model, base) if self.lora_options is not None else (base, [])
        return HeadMask(self.model, held, sharding, root, zero_slices=zero)

    def _live_lora_elements(self) -> int:
        """Trainable LoRA elements that can move the merged weights: a layer whose B rows (or A columns) all belong
        to skipped heads has a merged update of zero whatever its other factor does."""
        covered: dict[tuple[str, str], set[int]] = {}
        for _, s in self.head_mask.slices:
            module, _, factor = s.name.partition(".lora_")
            covered.setdefault((module, factor[0]), set()).update(range(s.start, s.stop))
        live = 0
        parameters = dict(self.model.named_parameters())
        for name, a in parameters.items():
            if ".lora_A." not in name or not a.requires_grad:
                continue
            module = name.split(".lora_A.")[0]
            b = parameters[name.replace(".lora_A.", ".lora_B.")]
            if len(covered.get((module, "A"), ())) < a.shape[1] and len(covered.get((module, "B"), ())) < b.shape[0]:
                live += a.numel() + b.numel()
        others = sum(p.numel() for n, p in parameters.items() if p.requires_grad and ".lora_" not in n)
        return live + others

    def _check_something_trains(self) -> None:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        live = self._live_lora_elements() if self.lora_options is not None else trainable - self.head_mask.num_frozen_elements
        if live <= 0:
            raise CastError(
                f"nothing would train: --model.trainable {scopes.describe(self.trainable)} leaves {trainable} trainable "
                f"elements and the {len(self.skip_heads)} skipped heads"
                f"{f' and skipped layers {self.skip_layers}' if self.skip_layers else ''} freeze all of them; widen "
                f"--model.trainable or skip fewer heads or layers"
            )

    def set_skip_heads(self, skip_heads: list[tuple[int, int]]) -> None:
        self.skip_heads = sorted({(int(layer), int(head)) for layer, head in skip_heads})
        self.head_mask = self._build_mask()
        if self._sharding()[0] != DEEPSPEED:
            self.head_mask.zero_values()

    def configure_model(self) -> None:
        """FSDP1/FSDP2 strategies: one FSDP unit per decoder layer, then the root model (strategies.shard_model)."""
        sharding, _ = self._sharding()
        if self.lora_options is not None and self.lora_options.load_in_4bit and sharding != DENSE:
            raise CastError("QLoRA (--model.lora.load_in_4bit) runs on one device or under DDP: use --trainer.strategy ddp or auto")
        if sharding in (FSDP1, FSDP2):
            self.model = shard_model(self.model, sharding, self.device_mesh if sharding == FSDP2 else None)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.pcgrad != gradient_surgery.OFF:
            datamodule = getattr(self.trainer, "datamodule", None)
            replay = getattr(getattr(datamodule, "hparams", None), "utility_replay", None)
            if replay is not None and not replay > 0:
                raise CastError(f"--model.pcgrad {self.hparams.pcgrad} projects the safety gradient against the utility-replay "
                                f"gradient, but --data.utility_replay is {replay}: set --data.utility_replay (e.g. 0.25) with "
                                f"--data.utility_files, or --model.pcgrad off")
            if self._sharding()[0] != DENSE:
                raise CastError(f"--model.pcgrad runs on one device or under DDP, not under {self._sharding()[0]}: use "
                                f"--trainer.strategy ddp or auto, or --model.pcgrad off")

    def on_fit_start(self) -> None:
        # The strategy has wrapped/partitioned the parameters by now: rebuild the mask on the live ones.
        self.head_mask = self._build_mask()
        if self.hparams.pcgrad != gradient_surgery.OFF:
            self._safety_gradients = gradient_surgery.SafetyGradients([p for p in self.model.parameters() if p.requires_grad])

    def on_train_start(self) -> None:
        # Weights are final here (checkpoint restored, strategy set up): remember the frozen values (LoRA: zeros).
        self.head_mask.snapshot()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Runs after backward (and gradient all-reduce) and before clipping: frozen slices leave the norm.
        if self._safety_gradients is not None:
            self._apply_pcgrad()
        self.head_mask.zero_grads()
        sharding, root = self._sharding()
        norm = total_grad_norm(self.model, sharding, root)
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    @torch.no_grad()
    def _apply_pcgrad(self) -> None:
        """``.grad`` holds the step's utility gradient, the buffer its safety gradient: mask both (the skipped heads'
        slices zeroed before any inner product), project the safety one (``pcgrad.project``), write ``s' + u``."""
        buffers = self._safety_gradients
        params = buffers.parameters
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # DDP averaged .grad across ranks; the safety buffer (autograd.grad) is averaged here
            for buffer in buffers.buffers:
                torch.distributed.all_reduce(buffer)
                buffer.div_(world)
        utility = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, s in zip(params, buffers.buffers):
            p.grad = s
        self.head_mask.zero_grads()  # the safety gradient's frozen slices
        for p, u in zip(params, utility):
            p.grad = u
        self.head_mask.zero_grads()  # the utility gradient's
        projected, stats = gradient_surgery.project(buffers.buffers, utility, self.hparams.pcgrad)
        for p, s in zip(params, projected):
            p.grad.add_(s)
        buffers.reset()
        self.pcgrad_history.append(stats)
        self.log("pcgrad/conflict_fraction", stats.conflict_fraction, on_step=True, on_epoch=False)
        self.log("pcgrad/cosine", stats.cosine, on_step=True, on_epoch=False)

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

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def _omits_frozen(self) -> bool:
        """One device / DDP checkpoints of a scope that freezes parameters leave the frozen (base) tensors out."""
        return self.trainable != scopes.ALL and self._sharding()[0] == DENSE and bool(self._scope_frozen_names())

    def _scope_frozen_names(self) -> list[str]:
        """Frozen by the scope (left out of one-device/DDP checkpoints); the skipped layers' tensors are kept."""
        return [n for n in scopes.frozen_names(self.model) if n not in self._layer_frozen]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[SKIP_HEADS_KEY] = [list(head) for head in self.skip_heads]
        omit = self._omits_frozen()
        if omit and isinstance(checkpoint.get("state_dict"), dict):
            for name in self._scope_frozen_names():
                checkpoint["state_dict"].pop(f"model.{name}", None)
        checkpoint[SKIP_LAYERS_KEY] = list(self.skip_layers)
        checkpoint[SCOPE_KEY] = scope_record(self.trainable, self.hparams.lora, omit, self._base_fingerprint if omit else None)

    def _check_scope(self, checkpoint: dict) -> None:
        saved = checkpoint.get(SCOPE_KEY)
        if not isinstance(saved, dict):
            return  # written before scopes existed: trainable all, the full state
        ours = scope_record(self.trainable, self.hparams.lora, False, None)
        if (saved.get("trainable"), saved.get("lora")) != (ours["trainable"], ours["lora"]):
            raise CastError(
                f"the checkpoint was trained with --model.trainable {scopes.describe(saved.get('trainable'))}"
                f"{' and LoRA ' + str(saved.get('lora')) if saved.get('lora') else ''} but the config asks for "
                f"{scopes.describe(self.trainable)}{' and LoRA ' + str(ours['lora']) if ours['lora'] else ''}: resume with "
                f"the checkpoint's --model.trainable/--model.lora, or drop --ckpt_path"
            )
        if saved.get("frozen_from_base"):
            # Against the fingerprint taken while the weights were whole: frozen tensors never change.
            scopes.check_fingerprint(saved.get("base_fingerprint"), self._base_fingerprint, self.hparams.pretrained,
                                     "the checkpoint", "resume with the base model it was trained from, or drop --ckpt_path")

    def check_checkpoint_fits(self, checkpoint: dict) -> None:
        """The checkpoint's weights must fit this model: Lightning's strict load would fail too, but with a
        many-line RuntimeError listing every tensor, and only after the run's config and loggers are written."""
        saved_layers = checkpoint.get(SKIP_LAYERS_KEY)
        if saved_layers is not None and sorted(int(x) for x in saved_layers) != self.skip_layers:
            raise CastError(
                f"the checkpoint was trained with skipped layers {sorted(int(x) for x in saved_layers)} but the config "
                f"asks for {self.skip_layers}: resume with the checkpoint's --model.skip_layers, or drop --ckpt_path"
            )
        self._check_scope(checkpoint)
        omitted = bool((checkpoint.get(SCOPE_KEY) or {}).get("frozen_from_base"))
        # The frozen tensors a checkpoint left out stay as loaded from pretrained (their fingerprint checked above).
        self.strict_loading = not omitted
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict) or self._sharding()[0] != DENSE:
            return  # sharded strategies load their own state and check it themselves
        own = self.state_dict()
        allowed = {f"model.{name}" for name in self._scope_frozen_names()} if omitted else set()
        missing = [k for k in own if k not in state and k not in allowed]
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
        if self._safety_gradients is not None:
            return self._pcgrad_step(batch)
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def _pcgrad_step(self, batch: dict) -> torch.Tensor:
        """One forward, two backward passes: the safety part's gradient into the buffer here (divided by the
        accumulation count, as Lightning divides the returned loss), the utility part returned for Lightning's backward.
        Their sum is the default loss (``pcgrad.part_losses``)."""
        is_utility = gradient_surgery.require_utility_rows(batch)
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        safety, utility = gradient_surgery.part_losses(logits, batch["labels"], is_utility)
        self._safety_gradients.add(safety, 1.0 / max(int(self.trainer.accumulate_grad_batches), 1))
        loss = safety.detach() + utility
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return utility

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

    def test_step(self, batch: dict | list[str], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = list(self.refusal_rates)[dataloader_idx]
        prompts, indices = (batch["prompt"], batch["index"]) if isinstance(batch, dict) else (batch, None)
        # Sharded weights: every rank generates until all are done (synced_gpus), else the ranks deadlock.
        with generation_setup(self.trainer.strategy, self.model, self.trainer.world_size) as generate_kwargs:
            texts = generate_greedy(
                self.model, self.tokenizer, prompts, max_new_tokens=self.hparams.max_new_tokens, batch_size=len(prompts),
                **generate_kwargs,
            )
        metric = self.refusal_rates[name]
        metric.update(texts, indices)  # with indices, a prompt repeated by the distributed sampler counts once
        key = {"harmful": "test/refusal_rate", "benign": "test/over_refusal_rate"}[name]
        self.log(key, metric, on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=len(prompts))

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
