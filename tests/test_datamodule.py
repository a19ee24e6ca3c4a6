"""SafetyUtilityDataModule: every source form it reads (JSONL, JSON, CSV, Parquet, a saved-dataset directory, a hub
name), chat ``messages``, filters, ``max_samples``, the bad-row policies and the exact utility-replay count; every
data error names the file and the line (JSONL/JSON) or the row (CSV/Parquet/datasets) and the field."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cast_lightning.data.datamodule import SafetyUtilityDataModule, load_rows, read_source, rows_to_pairs
from cast_lightning.data.formatting import tokenize_example
from cast_lightning.errors import CastError
from tests.conftest import SAFETY_ROWS, UTILITY_ROWS, write_jsonl

ROWS = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(6)]


def _module(tokenizer_dir, **options) -> SafetyUtilityDataModule:
    return SafetyUtilityDataModule(tokenizer=str(tokenizer_dir), **options)


def _pairs(module: SafetyUtilityDataModule, files, fields=None, where=None, name="safety") -> list[tuple[str, str]]:
    return [(prompt, response) for prompt, response, _ in module._pairs(files, fields, where, name=name)]


# --- file formats ------------------------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('\ufeff{"prompt": "a", "response": "b"}\n\n  \n{"prompt": "c", "response": "d"}\n')
    source = read_source(str(path))
    assert source.rows == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    assert [source.where(i) for i in range(2)] == [f"{path} line 1", f"{path} line 4"]  # blank lines counted


@pytest.mark.parametrize("text, expected", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "cut off", "respo\n', "line 2: not valid JSON (Unterminated string"),
    ('{"prompt": "a", "response": "b"}\n[1, 2]\n', "line 2: a list, not an object of fields"),
    ('{"prompt": "a", "response": "b"}\n"just text"\n', "line 2: a string, not an object of fields"),
], ids=["cut_off", "a_list", "a_string"])
def test_a_broken_jsonl_line_is_named(tmp_path, text, expected):
    path = tmp_path / "broken.jsonl"
    path.write_text(text)
    with pytest.raises(CastError) as error:
        load_rows(str(path))
    assert str(error.value).startswith(f"{path} {expected}"), error.value


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(CastError, match=r"latin1\.jsonl line 2: not UTF-8 text"):
        load_rows(str(path))


def test_json_arrays_columns_and_json_lines_under_a_json_name(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS[:2], indent=1))
    assert load_rows(str(array)) == ROWS[:2]
    assert read_source(str(array)).where(1) == f"{array} item 2"
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"prompt": ["p0", "p1"], "response": ["r0", "r1"]}))
    assert load_rows(str(columns)) == [{"prompt": "p0", "response": "r0"}, {"prompt": "p1", "response": "r1"}]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS[:3]}))
    assert load_rows(str(wrapped)) == ROWS[:3]
    lines = tmp_path / "lines.json"
    write_jsonl(lines, ROWS[:2])
    assert load_rows(str(lines)) == ROWS[:2] and read_source(str(lines)).where(1) == f"{lines} line 2"
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c",]\n')
    with pytest.raises(CastError, match=r"broken\.json line 3 column 18: not valid JSON"):
        load_rows(str(broken))
    scalar_item = tmp_path / "scalar_item.json"
    scalar_item.write_text('[{"prompt": "a", "response": "b"}, 7]')
    with pytest.raises(CastError, match=r"scalar_item\.json item 2: a number, not an object"):
        load_rows(str(scalar_item))


def test_csv_cells_are_text_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,response,is_safe\n"say ""hi"", please",007,true\n"two\nlines",2.50,false\n')
    assert load_rows(str(path)) == [
        {"prompt": 'say "hi", please', "response": "007", "is_safe": "true"},  # "007" stays text, not 7
        {"prompt": "two\nlines", "response": "2.50", "is_safe": "false"},
    ]
    assert read_source(str(path)).where(1) == f"{path} row 2"
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("prompt,response\na,b\nc,d,e\n")
    with pytest.raises(CastError, match=r"cannot read .*ragged\.csv as CSV: .*line 3"):
        load_rows(str(ragged))
    empty_cell = tmp_path / "empty_cell.csv"
    empty_cell.write_text("prompt,response\na,b\nc,\n")
    with pytest.raises(CastError, match=rf"^{empty_cell} row 2: field 'response' is empty"):
        rows_to_pairs(load_rows(str(empty_cell)), {"prompt": "prompt", "response": "response"}, str(empty_cell))


def test_parquet_rows_and_a_damaged_file(tmp_path, tiny_llama_dir):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "rows.parquet"
    rows = [*ROWS[:3], {"prompt": "no answer", "response": None}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    assert load_rows(str(path)) == rows
    module = _module(tiny_llama_dir, bad_rows="error")
    with pytest.raises(CastError, match=rf"^{path} row 4: field 'response' is missing: fix or remove that row"):
        module._pairs([str(path)], None, None, name="safety")
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CastError, match=r"cannot read .*damaged\.parquet as Parquet"):
        load_rows(str(damaged))


def test_a_saved_dataset_directory_and_its_splits(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS[:4]).save_to_disk(str(single))
    assert load_rows(str(single)) == ROWS[:4]
    assert read_source(str(single)).where(0) == f"{single} row 1"
    split = tmp_path / "split"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:5])}).save_to_disk(str(split))
    with pytest.raises(CastError, match=rf"{split} holds several splits \(train, test\): name one as {split}@SPLIT"):
        load_rows(str(split))
    assert load_rows(f"{split}@test") == ROWS[2:5]
    with pytest.raises(CastError, match=r"has no split 'valid' \(train, test\)"):
        load_rows(f"{split}@valid")


def test_a_hub_name_loads_that_dataset_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return datasets.Dataset.from_list(ROWS[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_rows("PKU-Alignment/BeaverTails@30k_train") == ROWS[:2]
    assert load_rows("tatsu-lab/alpaca") == ROWS[:2]
    assert calls == [("PKU-Alignment/BeaverTails", "30k_train", {}), ("tatsu-lab/alpaca", "train", {})]


def test_missing_files_and_unknown_suffixes(tmp_path):
    with pytest.raises(CastError, match=r"data file /nonexistent/x\.jsonl does not exist"):
        load_rows("/nonexistent/x.jsonl")
    odd = tmp_path / "rows.txt"
    odd.write_text("prompt response\n")
    with pytest.raises(CastError, match=r"use a \.json, \.jsonl, \.parquet or \.csv file"):
        load_rows(str(odd))


# --- fields, chat messages and filters ---------------------------------------------------------------------------


def test_field_mapping_and_a_field_no_row_has(tmp_path, tiny_llama_dir):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "add 1 and 2", "output": "3"}])
    module = _module(tiny_llama_dir)
    assert _pairs(module, [str(path)], {"prompt": "instruction", "response": "output"}) == [("add 1 and 2", "3")]
    with pytest.raises(CastError, match=r"has no field 'prompt' \(fields: instruction, output\): rename the column or map it"):
        module._pairs([str(path)], None, None, name="safety")


def test_chat_messages_take_the_first_user_and_the_last_assistant_turn(tmp_path, tiny_llama_dir):
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "draft"}, {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation},
                                                 {"messages": [{"role": "user", "content": "no reply"}]},
                                                 {"messages": "not a list"}])
    module = _module(tiny_llama_dir, bad_rows="skip")
    assert _pairs(module, [str(path)], {"messages": "messages"}) == [("hi", "hello")]
    strict = _module(tiny_llama_dir, bad_rows="error")
    with pytest.raises(CastError, match=rf"^{path} line 2: field 'messages' has no assistant turn with text"):
        strict._pairs([str(path)], {"messages": "messages"}, None, name="safety")
    only_third = write_jsonl(tmp_path / "third.jsonl", [{"messages": conversation}, {"messages": "not a list"}])
    with pytest.raises(CastError, match=r"line 2: field 'messages' is a string, not a list of \{role, content\} turns"):
        strict._pairs([str(only_third)], {"messages": "messages"}, None, name="safety")


def test_where_filters_rows_and_matches_csv_text(tmp_path, tiny_llama_dir):
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "is_safe": i % 3 == 0, "category": "x" if i < 3 else "y"}
            for i in range(6)]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,response,is_safe,category\n" + "".join(
        f"{r['prompt']},{r['response']},{'True' if r['is_safe'] else 'False'},{r['category']}\n" for r in rows))
    module = _module(tiny_llama_dir)
    for path in (jsonl, csv):
        assert _pairs(module, [str(path)], where={"is_safe": True}) == [("q0", "a0"), ("q3", "a3")], path
        assert _pairs(module, [str(path)], where={"is_safe": False, "category": "y"}) == [("q4", "a4"), ("q5", "a5")]
    with pytest.raises(CastError, match=r"no row of .*rows\.jsonl matches \{'category': 'z'\}: check the \*_where filter"):
        module._pairs([str(jsonl)], None, {"category": "z"}, name="safety")
    # A filtered-out row's problem is not reported; a kept row's keeps its own line number.
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "response": "", "keep": False},
                                                   {"prompt": "p", "response": None, "keep": True}])
    with pytest.raises(CastError, match=rf"^{mixed} line 2: field 'response' is missing"):
        _module(tiny_llama_dir, bad_rows="error")._pairs([str(mixed)], None, {"keep": True}, name="safety")


# --- max_samples, bad rows, replay --------------------------------------------------------------------------------


def test_max_samples_is_an_exact_seeded_sample_per_set(tiny_llama_dir, tiny_data):
    files = [str(tiny_data["safety"])]
    first = _pairs(_module(tiny_llama_dir, max_samples=10, seed=3), files)
    assert len(first) == 10 and len(set(first)) == 10
    assert set(first) <= {(r["prompt"], r["response"]) for r in SAFETY_ROWS}
    assert _pairs(_module(tiny_llama_dir, max_samples=10, seed=3), files) == first  # the seed fixes it
    assert _pairs(_module(tiny_llama_dir, max_samples=10, seed=4), files) != first
    expected = random.Random(3).sample([(r["prompt"], r["response"]) for r in SAFETY_ROWS], 10)
    assert first == expected
    assert len(_pairs(_module(tiny_llama_dir, max_samples=100), files)) == len(SAFETY_ROWS)  # fewer rows: all of them
    module = _module(tiny_llama_dir, safety_files=files, utility_files=[str(tiny_data["utility"])], max_samples=7,
                     utility_replay=0.5, safety_val_files=files)
    module.setup("fit")
    assert len(module.val_sets[0]) == 7 and len(module.train_set) == 7 + 7  # per set: safety, replayed utility


def test_bad_rows_skip_counts_and_reports_them_in_one_line(tmp_path, tiny_llama_dir, capsys):
    long_prompt = " ".join(["word"] * 400)
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        *ROWS[:3],
        {"prompt": "no response"},  # line 4: missing
        {"prompt": "   ", "response": "blank prompt"},  # line 5: empty
        {"prompt": ["a", "list"], "response": "x"},  # line 6: not text
        {"prompt": long_prompt, "response": "too long"},  # line 7: fills max_length
    ])
    module = _module(tiny_llama_dir, safety_files=[str(path)], bad_rows="skip", max_length=64)
    module.setup("fit")
    assert len(module.train_set) == 3 and module.bad_row_counts["safety"] == 4
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"[cast] safety: skipped 4 of 7 rows (first: {path} line 4: field 'response' is missing)"]


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "no response"}, "field 'response' is missing"),
    ({"prompt": "p", "response": "  "}, "field 'response' is empty"),
    ({"prompt": {"text": "nested"}, "response": "r"}, "field 'prompt' is an object, not text"),
    ({"prompt": " ".join(["word"] * 400), "response": "r"}, "the prompt alone fills max_length=64 (raise --data.max_length)"),
], ids=["missing", "empty", "not_text", "too_long"])
def test_bad_rows_error_names_file_line_and_field(row, problem, tmp_path, tiny_llama_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", [*ROWS[:2], row])
    module = _module(tiny_llama_dir, safety_files=[str(path)], bad_rows="error", max_length=64)
    with pytest.raises(CastError) as error:
        module.setup("fit")
    assert str(error.value) == f"{path} line 3: {problem}: fix or remove that row, or set --data.bad_rows skip"


@pytest.mark.parametrize("option, value, least", [("batch_size", 0, 1), ("eval_batch_size", 0, 1), ("max_length", 1, 2),
                                                  ("max_samples", -1, 1), ("diagnosis_samples", 0, 1), ("num_workers", -2, 0)])
def test_sizes_out_of_range_are_refused_up_front(option, value, least, tiny_llama_dir):
    with pytest.raises(CastError, match=rf"^--data\.{option} must be at least {least}, got {value}$"):
        _module(tiny_llama_dir, **{option: value})


@pytest.mark.parametrize("fields", [{"instruction": "prompt"}, {}, {"messages": "m", "prompt": "p"}, {"prompt": ""}])
def test_a_field_mapping_that_maps_nothing_known_is_refused(fields, tiny_llama_dir):
    with pytest.raises(CastError, match=r"^--data\.utility_fields"):
        _module(tiny_llama_dir, utility_fields=fields)


def test_a_filter_on_a_field_no_row_has_names_the_fields(tiny_llama_dir, tiny_data):
    with pytest.raises(CastError, match=r"safety\.jsonl has no field 'is_saf' \(fields: prompt, response\) to filter on"):
        _module(tiny_llama_dir)._pairs([str(tiny_data["safety"])], None, {"is_saf": True}, name="safety")


def test_unknown_bad_rows_policy_and_only_bad_rows(tmp_path, tiny_llama_dir):
    with pytest.raises(CastError, match="unknown bad_rows policy 'drop': use skip or error"):
        _module(tiny_llama_dir, bad_rows="drop")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": ""}, {"prompt": "q"}])
    with pytest.raises(CastError, match="safety has no usable rows"):
        _module(tiny_llama_dir, safety_files=[str(path)]).setup("fit")


@pytest.mark.parametrize("replay, extra", [(0.25, 8), (0.5, 24), (0.0, 0)])
def test_utility_replay_adds_exactly_round_n_r_over_1_minus_r_utility_examples(replay, extra, tiny_llama_dir, tiny_data):
    """24 safety rows: replay r adds round(24 r / (1 - r)) utility examples (8 at 0.25, 24 at 0.5), drawn with a
    seeded RNG from the utility set, after the safety examples."""
    module = _module(tiny_llama_dir, safety_files=[str(tiny_data["safety"])], utility_files=[str(tiny_data["utility"])],
                     utility_replay=replay, seed=5)
    module.setup("fit")
    assert len(module.train_set) == len(SAFETY_ROWS) + extra
    tokenizer = module.tokenizer
    safety = [tokenize_example(tokenizer, r["prompt"], r["response"], 256) for r in SAFETY_ROWS]
    utility = [tokenize_example(tokenizer, r["prompt"], r["response"], 256) for r in UTILITY_ROWS]
    assert module.train_set[: len(SAFETY_ROWS)] == safety
    rng = random.Random(5)
    assert module.train_set[len(SAFETY_ROWS):] == [utility[rng.randrange(len(utility))] for _ in range(extra)]


def test_replay_needs_utility_files_and_a_fraction_below_one(tiny_llama_dir, tiny_data):
    with pytest.raises(CastError, match=r"utility_replay must be in \[0, 1\), got 1.0"):
        _module(tiny_llama_dir, utility_replay=1.0)
    with pytest.raises(CastError, match="utility_replay > 0 needs --data.utility_files"):
        _module(tiny_llama_dir, safety_files=[str(tiny_data["safety"])], utility_replay=0.5).setup("fit")


def test_eval_prompts_name_a_row_without_a_prompt(tmp_path, tiny_llama_dir):
    path = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": "p1"}, {"prompt": ""}])
    module = _module(tiny_llama_dir, harmful_eval_files=[str(path)])
    with pytest.raises(CastError, match=rf"^{path} line 2: field 'prompt' is empty: every harmful eval row needs a prompt"):
        module.setup("test")
    ok = write_jsonl(tmp_path / "benign.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}])
    module = _module(tiny_llama_dir, benign_eval_files=[str(ok)])
    module.setup("test")
    assert module.test_suites == {"benign": ["p1", "p2"]}
