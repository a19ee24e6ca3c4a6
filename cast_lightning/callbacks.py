"""Lightning callbacks: safety and utility measured during ``fit``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from cast_lightning.errors import CastError
from cast_lightning.eval_data import data_dir
from cast_lightning.evaluation import read_prompts
from cast_lightning.generation import generate_greedy
from cast_lightning.metrics import RefusalRate, exact_match
from cast_lightning.strategies import generation_setup


class RefusalCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, generate greedily on a few held-out prompts and log
    ``safety/refusal_rate`` (harmful prompts refused), ``safety/over_refusal_rate`` (benign prompts
    refused, when given) and ``utility/exact_match`` (held-out utility prompts answered exactly).

    The values go to every Lightning logger at ``step`` = the number of optimizer steps taken (only at
    the measured steps, never repeated in between) and into ``trainer.callback_metrics``, so
    ``ModelCheckpoint(monitor="safety/refusal_rate")`` can use them. Under DDP each rank generates for its share of the prompts and the counts are summed
    across ranks by torchmetrics; ranks pad their share so they run the same number of generate calls, and the
    padding is never counted: every prompt counts exactly once. Generation runs in the setup ``cast test`` uses
    (``strategies.generation_setup``: synced generation when the weights are sharded).

    Args:
        harmful: JSONL/JSON/Parquet/CSV of harmful prompts (``prompt``); default the evaluation package's
            ``harmful.jsonl``.
        utility: files of utility prompts with answers (``prompt``, ``answer`` or ``response``); default
            the package's ``utility_*.jsonl``. ``[]`` turns the utility score off.
        benign: files of benign look-alike prompts (``prompt``) for the over-refusal rate; default none.
        every_n_steps: measure after every N optimizer steps (and never at step 0).
        num_prompts: prompts taken from each set, evenly spaced through the file (the same ones every time).
        max_new_tokens: generation length.
        batch_size: prompts per generate call.

    The LightningModule must expose the HF causal LM as ``.model`` and its tokenizer as ``.tokenizer``
    (``CASTModule`` does).
    """

    def __init__(
        self,
        harmful: str | None = None,
        utility: list[str] | None = None,
        benign: list[str] | None = None,
        every_n_steps: int = 50,
        num_prompts: int = 32,
        max_new_tokens: int = 32,
        batch_size: int = 32,
    ):
        if every_n_steps < 1 or num_prompts < 1:
            raise CastError("RefusalCallback: every_n_steps and num_prompts must be >= 1")
        self.harmful_source = harmful
        self.utility_sources = utility
        self.benign_sources = benign or []
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._last_step = -1
        self.harmful: list[str] = []
        self.benign: list[str] = []
        self.utility: list[tuple[str, str]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        harmful = self.harmful_source or data_dir() / "harmful.jsonl"
        self.harmful = _spread([r["prompt"] for r in read_prompts(harmful)], self.num_prompts)
        self.benign = _spread([r["prompt"] for source in self.benign_sources for r in read_prompts(source)], self.num_prompts)
        sources = self.utility_sources
        if sources is None:
            sources = [str(p) for p in sorted(Path(data_dir()).glob("utility_*.jsonl"))]
        per_source = math.ceil(self.num_prompts / max(1, len(sources)))  # the same number from each skill file
        rows = [r for source in sources for r in read_prompts(source)[:per_source]]
        self.utility = [(r["prompt"], str(r.get("answer", r.get("response", "")))) for r in rows][: self.num_prompts]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        metrics = {name: float(value) for name, value in self.measure(trainer, pl_module).items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        # visible to ModelCheckpoint(monitor=...) / EarlyStopping like anything logged with self.log
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})

    def _shard(self, items: list, trainer: L.Trainer) -> tuple[list, int]:
        """This rank's share, padded with repeats so every rank runs the same number of generate calls."""
        world, rank = trainer.world_size, trainer.global_rank
        share = items[rank::world]
        size = math.ceil(len(items) / world)
        real = len(share)
        if items and real < size:
            share = share + [items[0]] * (size - real)
        return share, real

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        model, tokenizer = pl_module.model, pl_module.tokenizer
        device = pl_module.device
        results = {}

        def generate(prompts: Sequence[str]) -> list[str]:
            # The generation setup of `cast test` (CASTModule.test_step): synced generation when the weights are
            # sharded over ranks, FSDP1's root parameters gathered for the call.
            with generation_setup(trainer.strategy, model, trainer.world_size) as generate_kwargs:
                return generate_greedy(model, tokenizer, prompts, self.max_new_tokens, self.batch_size, **generate_kwargs)

        for key, prompts in (("safety/refusal_rate", self.harmful), ("safety/over_refusal_rate", self.benign)):
            if not prompts:
                continue
            share, real = self._shard(prompts, trainer)
            metric = RefusalRate().to(device)
            metric.update(generate(share)[:real])
            results[key] = metric.compute()
        if self.utility:
            share, real = self._shard(self.utility, trainer)
            answers = generate([p for p, _ in share])[:real]
            metric = MeanMetric().to(device)
            scores = torch.tensor([exact_match(a, t) for a, (_, t) in zip(answers, share)], dtype=torch.float32)
            metric.update(scores.to(device) if len(scores) else torch.tensor([], device=device))
            results["utility/exact_match"] = metric.compute()
        return results


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spaced through ``items`` (files are often sorted by category)."""
    if len(items) <= n:
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


class FinalCheckpoint(L.Callback):
    """Save the trained model as ``<trainer.default_root_dir>/<filename>`` when training ends, atomically: the
    checkpoint is written under a temporary name beside it and renamed over the old one, so a crash or ``kill -9``
    leaves the previous file (or none), never half a checkpoint. Study runs are cached on this file.

    Args:
        filename: name of the checkpoint inside the run directory (a file, or a directory for sharded strategies).
    """

    def __init__(self, filename: str = "final.ckpt"):
        super().__init__()
        if not filename or "/" in filename or filename in (".", ".."):
            raise CastError(f"FinalCheckpoint filename {filename!r} must be a plain file name, e.g. final.ckpt")
        self.filename = filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from cast_lightning.lightning_cli import save_checkpoint_atomically

        save_checkpoint_atomically(trainer, Path(trainer.default_root_dir) / self.filename)


class IntraOpThreads(L.Callback):
    """Run the whole fit (or diagnosis) with exactly ``threads`` torch intra-op threads, restoring the previous
    count at teardown. A recipe that names it does not depend on the machine's core count (float sums can depend on
    how many threads split them), and one thread does not spin against other jobs on a small shared machine.

    Args:
        threads: intra-op threads (``torch.set_num_threads``); 1 is also the robust choice on a small shared machine.
    """

    def __init__(self, threads: int = 1):
        super().__init__()
        if int(threads) < 1:
            raise CastError(f"IntraOpThreads threads {threads} must be >= 1")
        self.threads = int(threads)
        self._before: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._before = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None
