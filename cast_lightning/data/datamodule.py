"""SafetyUtilityDataModule: safety and utility prompt/response sets -> chat-formatted, labelled batches.

Each source is a local JSON/JSONL/Parquet/CSV file, a local directory (``save_to_disk`` or data files),
or an HF hub dataset name with an optional ``@split`` suffix (``PKU-Alignment/BeaverTails@30k_train``).
"""

from __future__ import annotations

import os
import random
from typing import Any
from functools import partial

import lightning as L
from torch.utils.data import DataLoader

from cast_lightning.data.formatting import IGNORE_INDEX, collate, tokenize_example
from cast_lightning.data.resumable import ResumableDataLoader, ResumableSampler
from cast_lightning.errors import CastError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str) -> list[dict]:
    """All rows of one source as dicts (see the module docstring for the accepted forms)."""
    import datasets
    import pyarrow

    datasets.disable_progress_bars()
    try:
        if os.path.isfile(source):
            builder = _BUILDERS.get(os.path.splitext(source)[1].lower())
            if builder is None:
                raise CastError(f"cannot read {source}: use a .json, .jsonl, .parquet or .csv file")
            if builder == "json" and not open(source, "rb").read(4096).strip():
                return []  # datasets cannot infer a schema from an empty file; the caller reports "no rows"
            dataset = datasets.load_dataset(builder, data_files=source, split="train")
        elif os.path.isdir(source):
            if os.path.exists(os.path.join(source, "dataset_info.json")) or os.path.exists(os.path.join(source, "state.json")):
                dataset = datasets.load_from_disk(source)
            else:
                dataset = datasets.load_dataset(source, split="train")
        elif source.startswith(("/", ".", "~")) or os.path.splitext(source)[1].lower() in _BUILDERS:
            raise CastError(f"data file {source} does not exist: check the path")
        else:
            name, _, split = source.partition("@")
            dataset = datasets.load_dataset(name, split=split or "train")
    except CastError:
        raise
    # Malformed files (datasets' build errors, Arrow/JSON/CSV parse errors are ValueErrors), a missing or unreachable
    # hub dataset (OSError: datasets' not-found errors and the hub's HTTP errors): one line, the fix named.
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise CastError(f"cannot read data source {source}: {first[:200]} (check the file format or the dataset name)") from error
    if isinstance(dataset, datasets.DatasetDict):
        raise CastError(f"{source} holds several splits ({', '.join(dataset)}): name one as {source}@SPLIT")
    return dataset.to_list()


def rows_to_pairs(rows: list[dict], fields: dict[str, str], source: str) -> list[tuple[str, str]]:
    """Map rows to (prompt, response) pairs; ``fields`` maps prompt/response or messages to column names."""
    if not rows:
        raise CastError(f"{source} has no rows: give a file with at least one prompt/response row")
    pairs = []
    if "messages" in fields:
        column = fields["messages"]
        if column not in rows[0]:
            raise CastError(f"{source} has no field {column!r} (fields: {', '.join(rows[0])}): set the messages field mapping")
        for row in rows:
            messages = row.get(column) or []
            prompt = next((m.get("content", "") for m in messages if m.get("role") == "user"), "")
            response = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "assistant"), "")
            pairs.append((prompt, response))
        return pairs
    for role in ("prompt", "response"):
        column = fields.get(role, role)
        if column not in rows[0]:
            raise CastError(
                f"{source} has no field {column!r} (fields: {', '.join(rows[0])}): "
                f"rename the column or map it, e.g. --data.{'{safety,utility}'}_fields '{{\"{role}\": \"<column>\"}}'"
            )
    for index, row in enumerate(rows):
        prompt, response = row.get(fields.get("prompt", "prompt")), row.get(fields.get("response", "response"))
        if prompt is None or response is None:
            raise CastError(f"{source} row {index} misses a prompt or response: fix or remove that row")
        pairs.append((str(prompt), str(response)))
    return pairs


class SafetyUtilityDataModule(L.LightningDataModule):
    def __init__(
        self,
        safety_files: str | list[str] | None = None,
        utility_files: str | list[str] | None = None,
        safety_val_files: str | list[str] | None = None,
        utility_val_files: str | list[str] | None = None,
        harmful_eval_files: str | list[str] | None = None,
        benign_eval_files: str | list[str] | None = None,
        tokenizer: str | None = None,
        safety_fields: dict[str, str] | None = None,
        utility_fields: dict[str, str] | None = None,
        safety_where: dict[str, Any] | None = None,
        utility_where: dict[str, Any] | None = None,
        utility_replay: float = 0.0,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        max_length: int = 256,
        max_samples: int | None = None,
        diagnosis_samples: int | None = None,
        bad_rows: str = "skip",
        seed: int = 0,
        num_workers: int = 0,
    ):
        """Safety (harmful prompt -> refusal) and utility (instruction -> answer) data for fit, diagnosis and test.

        Args:
            safety_files: safety training sources (files, directories or hub names with optional @split).
            utility_files: utility sources: replayed during fit, and the utility objective of diagnosis.
            safety_val_files: optional safety validation sources (val loss).
            utility_val_files: optional utility validation sources (val loss).
            harmful_eval_files: harmful prompts for ``cast test`` refusal rate (a ``prompt`` field suffices).
            benign_eval_files: benign look-alike prompts for ``cast test`` over-refusal rate.
            tokenizer: tokenizer path or hub name; linked to --model.pretrained by the CLI.
            safety_fields: column mapping for safety sources, e.g. {"prompt": "question", "response": "refusal"}
                or {"messages": "messages"}.
            utility_fields: column mapping for utility sources (Alpaca: {"prompt": "instruction", "response": "output"}).
            safety_where: keep only safety rows whose fields equal these values, e.g. {"is_safe": true} (BeaverTails).
            utility_where: the same filter for utility rows.
            utility_replay: fraction of the fit mix drawn from the utility set (0 = safety only).
            batch_size: micro-batch size per process for fit and diagnosis.
            eval_batch_size: generation batch size for ``cast test``.
            max_length: token budget per example; longer responses are cut, prompts that fill it are bad rows.
            max_samples: use at most this many rows per source (seeded sample), for quick runs.
            diagnosis_samples: use at most this many rows per objective for diagnosis.
            bad_rows: ``skip`` (count, report and drop empty or over-long rows) or ``error`` (fail on the first).
            seed: seed of sampling and shuffling.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        if bad_rows not in ("skip", "error"):
            raise CastError(f"unknown bad_rows policy {bad_rows!r}: use skip or error")
        if not 0.0 <= utility_replay < 1.0:
            raise CastError(f"utility_replay must be in [0, 1), got {utility_replay}")
        self.save_hyperparameters()
        self._tokenizer = None
        self.bad_row_counts: dict[str, int] = {}
        self.val_names: list[str] = []

    # -- tokenizer and sets ----------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.hparams.tokenizer is None:
                raise CastError("no tokenizer: pass --data.tokenizer (the CLI links it to --model.pretrained)")
            from cast_lightning.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def _pairs(
        self, sources: list[str] | str | None, fields: dict | None, where: dict | None, limit: int | None = None
    ) -> list[tuple[str, str]]:
        if isinstance(sources, str):
            sources = [sources]
        fields = fields or {"prompt": "prompt", "response": "response"}
        pairs = []
        for source in sources or []:
            rows = load_rows(source)
            if where and rows:
                rows = [row for row in rows if all(row.get(key) == value for key, value in where.items())]
                if not rows:
                    raise CastError(f"no row of {source} matches {where}: check the *_where filter")
            pairs += rows_to_pairs(rows, fields, source)
        limit = limit if limit is not None else self.hparams.max_samples
        if limit is not None and len(pairs) > limit:
            pairs = random.Random(self.hparams.seed).sample(pairs, limit)
        return pairs

    def tokenize(self, pairs: list[tuple[str, str]], name: str) -> list[dict]:
        """Tokenize pairs; empty or label-less rows are counted (``bad_rows=skip``) or fatal (``error``)."""
        examples, bad = [], 0
        for index, (prompt, response) in enumerate(pairs):
            example = None
            if prompt.strip() and response.strip():
                example = tokenize_example(self.tokenizer, prompt, response, self.hparams.max_length)
                if all(label == IGNORE_INDEX for label in example["labels"]):
                    example = None  # the prompt alone fills max_length: nothing to learn from
            if example is None:
                if self.hparams.bad_rows == "error":
                    raise CastError(
                        f"{name} row {index} is empty or its prompt fills max_length={self.hparams.max_length}: "
                        f"fix the row, raise --data.max_length or set --data.bad_rows skip"
                    )
                bad += 1
                continue
            examples.append(example)
        self.bad_row_counts[name] = bad
        if bad:
            print(f"[cast] {name}: skipped {bad} of {len(pairs)} rows (empty, or prompt longer than max_length)")
        if not examples:
            raise CastError(f"{name} has no usable rows: check the files and the field mapping")
        return examples

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in ("fit", None):
            if not h.safety_files:
                raise CastError("no safety data: pass --data.safety_files PATH (JSON/JSONL/Parquet/CSV of prompt/response rows)")
            safety = self.tokenize(self._pairs(h.safety_files, h.safety_fields, h.safety_where), "safety")
            replay = []
            if h.utility_replay > 0:
                if not h.utility_files:
                    raise CastError("utility_replay > 0 needs --data.utility_files")
                utility = self.tokenize(self._pairs(h.utility_files, h.utility_fields, h.utility_where), "utility")
                count = round(len(safety) * h.utility_replay / (1 - h.utility_replay))
                rng = random.Random(h.seed)
                replay = [utility[rng.randrange(len(utility))] for _ in range(count)]
            self.train_set = safety + replay
            self.val_sets, self.val_names = [], []
            for name, files, fields, where in (
                ("safety", h.safety_val_files, h.safety_fields, h.safety_where),
                ("utility", h.utility_val_files, h.utility_fields, h.utility_where),
            ):
                if files:
                    self.val_sets.append(self.tokenize(self._pairs(files, fields, where), f"{name}_val"))
                    self.val_names.append(name)
        if stage == "validate":
            self.setup("fit")
        if stage == "test":
            self.test_suites = self.eval_prompts()
            self.test_names = list(self.test_suites)

    # -- loaders ---------------------------------------------------------------------------------------------------

    def _loader(self, examples: list[dict], shuffle: bool) -> DataLoader:
        return DataLoader(
            examples,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch), split across data-parallel ranks, resumable mid-epoch from a checkpoint."""
        sampler_kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        sampler = ResumableSampler(self.train_set, seed=self.hparams.seed, **(sampler_kwargs or {}))
        return ResumableDataLoader(
            self.train_set,
            sampler=sampler,
            batches_done=self._batches_done_this_epoch,
            batch_size=self.hparams.batch_size,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def _batches_done_this_epoch(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(examples, shuffle=False) for examples in self.val_sets]

    def test_dataloader(self) -> list[DataLoader]:
        """Batches of raw prompt strings per refusal suite (generation tokenizes them with left padding)."""
        return [
            DataLoader(prompts, batch_size=self.hparams.eval_batch_size, shuffle=False, collate_fn=list)
            for prompts in self.test_suites.values()
        ]

    def diagnosis_dataloaders(self) -> list[DataLoader]:
        """[safety, utility] loaders over the diagnosis sets, unshuffled (the map must not depend on order)."""
        h = self.hparams
        if not h.safety_files or not h.utility_files:
            raise CastError("diagnosis needs both --data.safety_files and --data.utility_files")
        safety = self.tokenize(self._pairs(h.safety_files, h.safety_fields, h.safety_where, h.diagnosis_samples), "safety")
        utility = self.tokenize(self._pairs(h.utility_files, h.utility_fields, h.utility_where, h.diagnosis_samples), "utility")
        return [self._loader(safety, shuffle=False), self._loader(utility, shuffle=False)]

    def eval_prompts(self) -> dict[str, list[str]]:
        """Prompts of the refusal suites for ``cast test``: {"harmful": [...], "benign": [...]}."""
        h = self.hparams
        suites = {}
        for name, files in (("harmful", h.harmful_eval_files), ("benign", h.benign_eval_files)):
            if files:
                rows = []
                for source in [files] if isinstance(files, str) else files:
                    rows += load_rows(source)
                if not rows or "prompt" not in rows[0]:
                    raise CastError(f"{name} eval files need rows with a 'prompt' field")
                suites[name] = [str(row["prompt"]) for row in rows]
        if not suites:
            raise CastError("cast test needs --data.harmful_eval_files and/or --data.benign_eval_files")
        return suites
