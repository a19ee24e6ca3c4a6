"""SafetyUtilityDataModule: safety and utility prompt/response sets -> chat-formatted, labelled batches.

Each source is a local JSON/JSONL/Parquet/CSV file, a local directory (``save_to_disk`` or data files, with an
optional ``@split``), or an HF hub dataset name with an optional ``@split`` suffix
(``PKU-Alignment/BeaverTails@30k_train``).

Every data error is one ``CastError`` line naming the file and the place in it: the line (JSONL, JSON) or the row
(CSV, Parquet, datasets) and the field. A row with a missing, empty or non-text field, or whose prompt alone fills
``max_length``, is a bad row: ``bad_rows=skip`` drops and counts them (one report line per set), ``error`` stops at
the first.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from cast_lightning.data.formatting import IGNORE_INDEX, collate, tokenize_example
from cast_lightning.data.resumable import ResumableDataLoader, ResumableSampler
from cast_lightning.errors import CastError

# Empty validation sets are not an error (validation is optional): Lightning's note about a zero-length list of
# validation loaders says nothing to the user.
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")

_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


@dataclass
class Source:
    """The rows of one data source and where each came from (a JSONL line, a JSON item, a CSV/Parquet/dataset row),
    so an error names the file and the place in it."""

    name: str
    rows: list[dict]
    unit: str = "row"  # "line" (JSONL: the file's line number), "item" (a JSON array's element) or "row"
    numbers: list[int] | None = None  # per row: its line or 1-based position (None: position)

    def where(self, index: int) -> str:
        number = self.numbers[index] if self.numbers is not None else index + 1
        return f"{self.name} {self.unit} {number}"


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _read_jsonl(path: str) -> Source:
    rows, numbers = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CastError(f"{path} line {number}: not UTF-8 text ({error.reason} at byte {error.start}): "
                                f"save the file as UTF-8") from error
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise CastError(f"{path} line {number}: not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno}): "
                                f"fix or remove that line") from error
            if not isinstance(row, dict):
                raise CastError(f"{path} line {number}: {_kind(row)}, not an object of fields: write one JSON object "
                                f"per line, e.g. {{\"prompt\": ..., \"response\": ...}}")
            rows.append(row)
            numbers.append(number)
    return Source(path, rows, "line", numbers)


def _read_json(path: str) -> Source:
    raw = open(path, "rb").read().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise CastError(f"{path} line {line}: not UTF-8 text ({error.reason}): save the file as UTF-8") from error
    if not text.strip():
        return Source(path, [])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object per line under a .json name
            return _read_jsonl(path)
        raise CastError(f"{path} line {error.lineno} column {error.colno}: not valid JSON ({error.msg.removesuffix(' at')}): "
                        f"fix the file") from error
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(data) == 1 and lists and all(isinstance(item, dict) for item in lists[0]):
            data = lists[0]  # {"data": [{...}, ...]}
        elif data and len(lists) == len(data) and len({len(value) for value in lists}) == 1:
            data = [dict(zip(data, values)) for values in zip(*data.values())]  # {"prompt": [...], "response": [...]}
        else:
            raise CastError(f"{path} holds one JSON object, not rows: give a list of objects, one object per line "
                            f"(JSONL), or columns as {{\"prompt\": [...], \"response\": [...]}}")
    if not isinstance(data, list):
        raise CastError(f"{path} holds {_kind(data)}, not rows: give a list of objects or one object per line (JSONL)")
    for number, item in enumerate(data, 1):
        if not isinstance(item, dict):
            raise CastError(f"{path} item {number}: {_kind(item)}, not an object of fields: every item must be "
                            f"an object such as {{\"prompt\": ..., \"response\": ...}}")
    return Source(path, data, "item")


def _read_csv(path: str) -> Source:
    import pandas

    # Every cell as the text it is (a prompt "007" stays "007"), empty cells as "" (a bad row, not a float NaN).
    try:
        frame = pandas.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except pandas.errors.EmptyDataError:
        return Source(path, [])
    except (pandas.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        first = " ".join(str(error).split())
        raise CastError(f"cannot read {path} as CSV: {first[:200]}: fix that line (quote cells holding commas or "
                        f"line breaks)") from error
    return Source(path, frame.to_dict("records"), "row")


def _read_parquet(path: str) -> Source:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError, ValueError) as error:
        first = " ".join(str(error).split())
        raise CastError(f"cannot read {path} as Parquet: {first[:200]} (is it a whole .parquet file?)") from error
    return Source(path, rows, "row")


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_dataset(source: str, load: Callable, split: str | None) -> Source:
    """A ``datasets`` dataset (a saved directory, a directory of data files, a hub name)."""
    import datasets
    import pyarrow

    datasets.disable_progress_bars()
    try:
        dataset = load()
    except CastError:
        raise
    # Malformed files (datasets' build errors, Arrow/JSON/CSV parse errors are ValueErrors), a missing or unreachable
    # hub dataset (OSError: datasets' not-found errors and the hub's HTTP errors): one line, the fix named.
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        cause = error.__cause__ or error.__context__
        if cause is not None and str(cause).strip() and first.startswith("An error occurred while generating"):
            first = str(cause).strip().splitlines()[0]  # datasets' wrapper says nothing; its cause does
        raise CastError(f"cannot read data source {source}: {first[:200]} (check the file format or the dataset name)") from error
    if isinstance(dataset, datasets.DatasetDict):
        if split is not None and split in dataset:
            dataset = dataset[split]
        elif split is None and len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            named = f"has no split {split!r}" if split is not None else "holds several splits"
            raise CastError(f"{source} {named} ({', '.join(dataset)}): name one as {source.partition('@')[0]}@SPLIT")
    return Source(source, dataset.to_list(), "row")


def read_source(source: str) -> Source:
    """All rows of one source and where each came from (see the module docstring for the accepted forms).

    Local JSON/JSONL are read line by line by Python's json (an error names the line and column), CSV by pandas
    with every cell as text, Parquet by pyarrow; directories and hub names through ``datasets``."""
    source = str(source)
    if os.path.isfile(source):
        reader = _READERS.get(os.path.splitext(source)[1].lower())
        if reader is None:
            raise CastError(f"cannot read {source}: use a .json, .jsonl, .parquet or .csv file")
        return reader(source)
    path, _, split = source.rpartition("@") if "@" in source else (source, "", "")
    if os.path.isdir(source) or (split and os.path.isdir(path)):
        directory = source if os.path.isdir(source) else path
        split_name = split if directory == path and split else None
        import datasets

        if os.path.exists(os.path.join(directory, "dataset_info.json")) or os.path.exists(os.path.join(directory, "state.json")) \
                or os.path.exists(os.path.join(directory, "dataset_dict.json")):
            return _read_dataset(source, lambda: datasets.load_from_disk(directory), split_name)
        return _read_dataset(source, lambda: datasets.load_dataset(directory, split=split_name or "train"), split_name)
    if source.startswith(("/", ".", "~")) or os.path.splitext(source)[1].lower() in _SUFFIXES:
        raise CastError(f"data file {source} does not exist: check the path")
    import datasets

    name, _, split = source.partition("@")
    return _read_dataset(source, lambda: datasets.load_dataset(name, split=split or "train"), split or None)


def load_rows(source: str) -> list[dict]:
    """All rows of one source as dicts (see ``read_source``)."""
    return read_source(source).rows


def _text(row: dict, column: str) -> tuple[str | None, str | None]:
    """(the text of ``column``, None) or (None, what is wrong with it)."""
    if column not in row or row[column] is None:
        return None, f"field {column!r} is missing"
    value = row[column]
    if isinstance(value, (dict, list)):
        return None, f"field {column!r} is {_kind(value)}, not text"
    value = str(value)
    if not value.strip():
        return None, f"field {column!r} is empty"
    return value, None


def _from_messages(row: dict, column: str) -> tuple[tuple[str, str] | None, str | None]:
    messages = row.get(column)
    if messages is None:
        return None, f"field {column!r} is missing"
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None, f"field {column!r} is {_kind(messages)}, not a list of {{role, content}} turns"
    prompt = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    response = next((m.get("content") for m in reversed(messages) if m.get("role") == "assistant"), None)
    if not isinstance(prompt, str) or not prompt.strip():
        return None, f"field {column!r} has no user turn with text"
    if not isinstance(response, str) or not response.strip():
        return None, f"field {column!r} has no assistant turn with text"
    return (prompt, response), None


def located_pairs(source: Source, fields: dict[str, str]) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(prompt, response, where) of every usable row and (where, problem) of every bad one; a field that no row has
    is a mapping error (CastError naming the fields there are)."""
    if not source.rows:
        raise CastError(f"{source.name} has no rows: give a file with at least one prompt/response row")
    columns = [fields["messages"]] if "messages" in fields else [fields.get(r, r) for r in ("prompt", "response")]
    for column in columns:
        if not any(column in row for row in source.rows):
            role = "messages" if "messages" in fields else ("prompt" if column == columns[0] else "response")
            raise CastError(
                f"{source.name} has no field {column!r} (fields: {', '.join(source.rows[0])}): "
                f"rename the column or map it, e.g. --data.{'{safety,utility}'}_fields '{{\"{role}\": \"<column>\"}}'"
            )
    pairs, bad = [], []
    for index, row in enumerate(source.rows):
        if "messages" in fields:
            pair, problem = _from_messages(row, columns[0])
        else:
            (prompt, problem), pair = _text(row, columns[0]), None
            if problem is None:
                response, problem = _text(row, columns[1])
                pair = (prompt, response) if problem is None else None
        if problem is not None:
            bad.append((source.where(index), problem))
        else:
            pairs.append((pair[0], pair[1], source.where(index)))
    return pairs, bad


def rows_to_pairs(rows: list[dict], fields: dict[str, str], source: str) -> list[tuple[str, str]]:
    """Map rows to (prompt, response) pairs; ``fields`` maps prompt/response or messages to column names. Any bad
    row is an error naming its position and field."""
    pairs, bad = located_pairs(Source(source, rows), fields)
    if bad:
        raise CastError(f"{bad[0][0]}: {bad[0][1]}: fix or remove that row")
    return [(prompt, response) for prompt, response, _ in pairs]


def _check_fields(option: str, fields: dict | None) -> None:
    """A field mapping names prompt and/or response, or messages (alone), each to a column name."""
    if fields is None:
        return
    roles = set(fields)
    unknown = sorted(roles - {"prompt", "response", "messages"})
    if unknown or not roles or ("messages" in roles and len(roles) > 1):
        raise CastError(
            f"--data.{option} {json.dumps(fields)} must map prompt and/or response, or messages alone, to your column "
            f"names, e.g. '{{\"prompt\": \"instruction\", \"response\": \"output\"}}' or '{{\"messages\": \"conversation\"}}'"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    bad = [role for role, column in fields.items() if not isinstance(column, str) or not column]
    if bad:
        raise CastError(f"--data.{option}: the column of {bad[0]!r} must be a column name, got {fields[bad[0]]!r}")


def _matches(cell, wanted) -> bool:
    """A *_where filter value against a cell; CSV cells are text, so true / 1 also match "true" / "1"."""
    if cell == wanted:
        return True
    if isinstance(cell, str) and not isinstance(wanted, str) and wanted is not None:
        return cell.strip().lower() == str(wanted).lower()
    return False


class UtilityRow(dict):
    """A tokenized utility-replay example in the fit set (equal to the plain dict it copies)."""


def collate_fit(examples: list[dict], pad_token_id: int) -> dict:
    """``collate`` plus ``is_utility``: a bool per row, True for utility-replay rows (``UtilityRow``)."""
    import torch

    batch = collate(examples, pad_token_id)
    batch["is_utility"] = torch.tensor([isinstance(e, UtilityRow) for e in examples], dtype=torch.bool)
    return batch


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
            max_samples: use at most this many rows per set (the safety set, the utility set, each validation set;
                a seeded sample of the usable rows), for quick runs.
            diagnosis_samples: use at most this many rows per objective for diagnosis.
            bad_rows: ``skip`` (count, report in one line and drop rows with a missing, empty or non-text field, or a
                prompt that fills max_length) or ``error`` (fail on the first, naming its file, line or row and field).
            seed: seed of sampling and shuffling.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        if bad_rows not in ("skip", "error"):
            raise CastError(f"unknown bad_rows policy {bad_rows!r}: use skip or error")
        if not 0.0 <= utility_replay < 1.0:
            raise CastError(f"utility_replay must be in [0, 1), got {utility_replay}")
        for option, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                     ("max_length", max_length, 2), ("max_samples", max_samples, 1),
                                     ("diagnosis_samples", diagnosis_samples, 1), ("num_workers", num_workers, 0)):
            if value is not None and value < least:
                raise CastError(f"--data.{option} must be at least {least}, got {value}")
        for option, mapping in (("safety_fields", safety_fields), ("utility_fields", utility_fields)):
            _check_fields(option, mapping)
        self.save_hyperparameters()
        self._tokenizer = None
        self.bad_row_counts: dict[str, int] = {}
        self._pending_bad: dict[str, tuple[list, int]] = {}
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
        self, sources: list[str] | str | None, fields: dict | None, where: dict | None, limit: int | None = None,
        name: str = "data",
    ) -> list[tuple[str, str, str]]:
        """(prompt, response, where) of every usable row of ``sources``, filtered, at most ``limit`` (a seeded sample).
        Rows with a missing, empty or non-text field are bad rows (``bad_rows``)."""
        if isinstance(sources, str):
            sources = [sources]
        fields = fields or {"prompt": "prompt", "response": "response"}
        pairs, bad = [], []
        for source in sources or []:
            loaded = read_source(source)
            if where and loaded.rows:
                missing = [key for key in where if not any(key in row for row in loaded.rows)]
                if missing:
                    raise CastError(f"{source} has no field {missing[0]!r} (fields: {', '.join(loaded.rows[0])}) to filter "
                                    f"on: check the *_where filter {where}")
                kept = [i for i, row in enumerate(loaded.rows) if all(_matches(row.get(k), v) for k, v in where.items())]
                if not kept:
                    raise CastError(f"no row of {source} matches {where}: check the *_where filter")
                numbers = [loaded.numbers[i] if loaded.numbers is not None else i + 1 for i in kept]
                loaded = Source(loaded.name, [loaded.rows[i] for i in kept], loaded.unit, numbers)
            good, wrong = located_pairs(loaded, fields)
            pairs += good
            bad += wrong
        if bad and self.hparams.bad_rows == "error":
            self._bad_rows(name, bad, len(pairs) + len(bad))
        self._pending_bad[name] = (bad, len(pairs) + len(bad))  # reported with the tokenizer's in one line
        limit = limit if limit is not None else self.hparams.max_samples
        if limit is not None and len(pairs) > limit:
            pairs = random.Random(self.hparams.seed).sample(pairs, limit)
        return pairs

    def _bad_rows(self, name: str, bad: list[tuple[str, str]], total: int) -> None:
        """``bad_rows=error``: the first bad row is a CastError naming where it is and what is wrong with it;
        ``skip``: the count is ``bad_row_counts[name]``, reported in one line (with the first one)."""
        self.bad_row_counts[name] = len(bad)
        if not bad:
            return
        where, problem = bad[0]
        if self.hparams.bad_rows == "error":
            raise CastError(f"{where}: {problem}: fix or remove that row, or set --data.bad_rows skip")
        print(f"[cast] {name}: skipped {len(bad)} of {total} rows (first: {where}: {problem})", flush=True)

    def tokenize(self, pairs: list[tuple], name: str) -> list[dict]:
        """Tokenize (prompt, response[, where]) pairs; rows whose prompt alone fills ``max_length`` (nothing left to
        learn) or that are empty are bad rows: counted (``bad_rows=skip``) or fatal (``error``)."""
        examples, bad = [], []
        earlier, read = self._pending_bad.pop(name, ([], len(pairs)))  # rows _pairs found bad already
        for index, pair in enumerate(pairs):
            prompt, response = pair[0], pair[1]
            where = pair[2] if len(pair) > 2 else f"{name} row {index + 1}"
            if not (prompt.strip() and response.strip()):
                bad.append((where, "the prompt or the response is empty"))
                continue
            example = tokenize_example(self.tokenizer, prompt, response, self.hparams.max_length)
            if all(label == IGNORE_INDEX for label in example["labels"]):
                bad.append((where, f"the prompt alone fills max_length={self.hparams.max_length} "
                                   f"(raise --data.max_length)"))
                continue
            examples.append(example)
        self._bad_rows(name, earlier + bad, read)
        if not examples:
            raise CastError(f"{name} has no usable rows: check the files and the field mapping")
        return examples

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in ("fit", None):
            if not h.safety_files:
                raise CastError("no safety data: pass --data.safety_files PATH (JSON/JSONL/Parquet/CSV of prompt/response rows)")
            safety = self.tokenize(self._pairs(h.safety_files, h.safety_fields, h.safety_where, name="safety"), "safety")
            replay = []
            if h.utility_replay > 0:
                if not h.utility_files:
                    raise CastError("utility_replay > 0 needs --data.utility_files")
                utility = self.tokenize(self._pairs(h.utility_files, h.utility_fields, h.utility_where, name="utility"), "utility")
                count = round(len(safety) * h.utility_replay / (1 - h.utility_replay))
                rng = random.Random(h.seed)
                replay = [utility[rng.randrange(len(utility))] for _ in range(count)]
            # Replayed rows are marked by their type (batch["is_utility"] in fit batches): PCGrad splits the loss by
            # it; the default loss ignores it.
            self.train_set = safety + [UtilityRow(e) for e in replay]
            self.val_sets, self.val_names = [], []
            for name, files, fields, where in (
                ("safety", h.safety_val_files, h.safety_fields, h.safety_where),
                ("utility", h.utility_val_files, h.utility_fields, h.utility_where),
            ):
                if files:
                    self.val_sets.append(self.tokenize(self._pairs(files, fields, where, name=f"{name}_val"), f"{name}_val"))
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
            collate_fn=partial(collate_fit, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def _batches_done_this_epoch(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(examples, shuffle=False) for examples in self.val_sets]

    def test_dataloader(self) -> list[DataLoader]:
        """Batches per refusal suite: ``{"prompt": [raw strings], "index": tensor}``, each prompt's number in its suite
        (generation tokenizes the strings with left padding; the index lets ``RefusalRate`` count a prompt once when
        Lightning's distributed sampler repeats some to even out the ranks)."""
        return [
            DataLoader(list(enumerate(prompts)), batch_size=self.hparams.eval_batch_size, shuffle=False,
                       collate_fn=_collate_prompts)
            for prompts in self.test_suites.values()
        ]

    def diagnosis_dataloaders(self) -> list[DataLoader]:
        """[safety, utility] loaders over the diagnosis sets, unshuffled (the map must not depend on order)."""
        h = self.hparams
        if not h.safety_files or not h.utility_files:
            raise CastError("diagnosis needs both --data.safety_files and --data.utility_files")
        safety = self.tokenize(self._pairs(h.safety_files, h.safety_fields, h.safety_where, h.diagnosis_samples, "safety"), "safety")
        utility = self.tokenize(self._pairs(h.utility_files, h.utility_fields, h.utility_where, h.diagnosis_samples, "utility"),
                                "utility")
        return [self._loader(safety, shuffle=False), self._loader(utility, shuffle=False)]

    def eval_prompts(self) -> dict[str, list[str]]:
        """Prompts of the refusal suites for ``cast test``: {"harmful": [...], "benign": [...]}."""
        h = self.hparams
        suites = {}
        for name, files in (("harmful", h.harmful_eval_files), ("benign", h.benign_eval_files)):
            if files:
                prompts = []
                for source in [files] if isinstance(files, str) else files:
                    loaded = read_source(source)
                    if not loaded.rows or not any("prompt" in row for row in loaded.rows):
                        raise CastError(f"{name} eval file {source} needs rows with a 'prompt' field")
                    for index, row in enumerate(loaded.rows):
                        prompt, problem = _text(row, "prompt")
                        if problem is not None:
                            raise CastError(f"{loaded.where(index)}: {problem}: every {name} eval row needs a prompt")
                        prompts.append(prompt)
                suites[name] = prompts
        if not suites:
            raise CastError("cast test needs --data.harmful_eval_files and/or --data.benign_eval_files")
        return suites


def _collate_prompts(items: list[tuple[int, str]]) -> dict:
    return {"prompt": [prompt for _, prompt in items], "index": torch.tensor([index for index, _ in items], dtype=torch.long)}
