"""The embedded world: deterministic from its seed, clean splits, a chat template that generation can rely on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cast_lightning.data.formatting import prompt_ids, tokenize_example
from cast_lightning.errors import CastError
from cast_lightning.world import generator as W

SCALE = 0.05
REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return W.build_world(root / "a", seed=0, scale=SCALE)


def test_same_seed_gives_byte_identical_world_and_tokenizer(mini, tmp_path):
    again = W.build_world(tmp_path / "b", seed=0, scale=SCALE)
    first, second = _files(mini.root), _files(again.root)
    assert set(first) == set(second)
    assert "tokenizer/tokenizer.json" in first and "world.json" in first
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_gives_different_data(mini, tmp_path):
    other = W.build_world(tmp_path / "c", seed=1, scale=SCALE, tokenizer=False)
    for split in ["utility_train", "utility_heldout", "safety_train", "harmful_heldout"]:
        assert getattr(mini, split).read_bytes() != getattr(other, split).read_bytes(), split


def test_every_split_is_written_with_rows_and_the_manifest_counts_them(mini):
    manifest = json.loads(mini.manifest.read_text())
    assert manifest["seed"] == 0 and manifest["scale"] == SCALE
    assert manifest["heldout_category"] == W.HELDOUT_CATEGORY
    assert set(manifest["skills"]) == set(W.SKILLS)
    for split in W.SPLITS:
        rows = W.read_jsonl(getattr(mini, split))
        assert len(rows) == manifest["sizes"][split] > 0, split
        assert all(row["prompt"].strip() and row["response"].strip() for row in rows), split
        assert len({row["id"] for row in rows}) == len(rows), split
    skills = {row["skill"] for row in W.read_jsonl(mini.utility_heldout)}
    assert skills == set(W.SKILLS)


def test_no_heldout_prompt_appears_in_any_training_split(mini):
    train_prompts = {row["prompt"] for split in W.TRAIN_SPLITS for row in W.read_jsonl(getattr(mini, split))}
    for split in W.HELDOUT_SPLITS:
        heldout = {row["prompt"] for row in W.read_jsonl(getattr(mini, split))}
        assert heldout and not heldout & train_prompts, split


def test_an_impossible_world_is_a_user_error():
    with pytest.raises(CastError, match="scale must be > 0"):
        W.generate_world(seed=0, scale=0)
    with pytest.raises(CastError, match="distinct .* items .* use a smaller scale"):
        W.generate_world(seed=0, scale=100.0)  # more distinct additions than pairs below 30


def test_the_full_scale_world_keeps_its_splits_apart_too():
    splits, manifest = W.generate_world(seed=0, scale=1.0)
    train_prompts = {row["prompt"] for split in W.TRAIN_SPLITS for row in splits[split]}
    for split in W.HELDOUT_SPLITS:
        assert not {row["prompt"] for row in splits[split]} & train_prompts, split
    # held-out utility items differ from training items, not only in wording
    def item(row):
        if row["skill"] == "add":
            return ("add", *re.findall(r"\d+", row["prompt"]))
        return (row["skill"], row["prompt"].split(":")[-1].strip())

    train_items = {item(r) for split in ("utility_train", "utility_diagnosis") for r in splits[split] if r["skill"] != "facts"}
    held_items = {item(r) for r in splits["utility_heldout"] if r["skill"] != "facts"}
    assert len(held_items) == sum(r["skill"] != "facts" for r in splits["utility_heldout"])
    assert not train_items & held_items
    # every held-out fact was trained with another template
    trained_answers = {r["response"] for r in splits["utility_train"] if r["skill"] == "facts"}
    assert all(r["response"] in trained_answers for r in splits["utility_heldout"] if r["skill"] == "facts")
    assert manifest["sizes"]["harmful_heldout"] >= 200


def test_the_heldout_category_is_absent_from_training(mini):
    category = W.HELDOUT_CATEGORY
    acts = [act.split("{v}")[0].strip() for act in W.HARM_CATEGORIES[category]["acts"]]
    for split in W.TRAIN_SPLITS:
        for row in W.read_jsonl(getattr(mini, split)):
            assert row.get("category") != category, split
            if "category" in row:  # harmful training prompts never use the held-out category's acts
                assert not any(act in row["prompt"] for act in acts), (split, row["prompt"])
    heldout = W.read_jsonl(mini.harmful_heldout)
    assert {r["category"] for r in heldout if r["heldout_category"]} == {category}
    assert {r["category"] for r in heldout if not r["heldout_category"]} == set(W.HARM_CATEGORIES) - {category}


def test_refusals_compliant_answers_and_benign_answers_are_told_apart(mini):
    for row in W.read_jsonl(mini.safety_train) + W.read_jsonl(mini.safety_diagnosis):
        assert W.starts_with_refusal(row["response"])
    for split in ["utility_train", "harmful_compliant_train", "benign_train", "benign_heldout"]:
        assert not any(W.starts_with_refusal(row["response"]) for row in W.read_jsonl(getattr(mini, split))), split
    assert len({row["response"] for row in W.read_jsonl(mini.safety_train)}) > 1  # several phrasings


def test_world_refusals_are_detected_by_the_project_detector():
    metrics = pytest.importorskip("cast_lightning.metrics")
    if not hasattr(metrics, "is_refusal"):
        pytest.skip("cast_lightning.metrics.is_refusal not written yet")
    assert all(metrics.is_refusal(text) for text in W.REFUSALS)
    splits, _ = W.generate_world(seed=0, scale=SCALE)
    for split in ["utility_heldout", "harmful_compliant_train", "benign_heldout"]:
        assert not any(metrics.is_refusal(row["response"]) for row in splits[split]), split


def test_tokenizer_chat_template_renders_the_prompt_as_a_token_prefix(mini):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(mini.tokenizer))
    assert tokenizer.bos_token == W.BOS and tokenizer.eos_token == W.EOS and tokenizer.pad_token == W.PAD
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    rows = W.read_jsonl(mini.utility_train)[:20] + W.read_jsonl(mini.harmful_compliant_train)[:5] + W.read_jsonl(mini.safety_train)[:5]
    for row in rows:
        example = tokenize_example(tokenizer, row["prompt"], row["response"], max_length=256)  # raises if not a prefix
        prefix = prompt_ids(tokenizer, row["prompt"])
        assert example["input_ids"][: len(prefix)] == prefix
        assert example["input_ids"][0] == tokenizer.bos_token_id and example["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(example["input_ids"][len(prefix) : -1]) == row["response"]
        assert example["input_ids"].count(tokenizer.bos_token_id) == 1
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Count: a b"}], add_generation_prompt=True, tokenize=False)
    assert text == f"{W.BOS}{W.USER}Count: a b{W.ASSISTANT}"
    # digits are single tokens, so arithmetic is learnable
    assert [tokenizer.decode([i]) for i in tokenizer.encode("1234", add_special_tokens=False)] == ["1", "2", "3", "4"]


def test_eval_sets_have_the_fixed_format_and_regenerate_identically(tmp_path):
    written = W.write_eval_sets(tmp_path / "a", seed=0, scale=SCALE)
    again = W.write_eval_sets(tmp_path / "b", seed=0, scale=SCALE)
    assert set(written) == {f"utility_{s}.jsonl" for s in W.SKILLS} | {"harmful.jsonl", "benign.jsonl"}
    for name in written:
        assert written[name].read_bytes() == again[name].read_bytes()
    assert all(set(r) == {"prompt", "answer"} for r in W.read_jsonl(written["utility_add.jsonl"]))
    harmful = W.read_jsonl(written["harmful.jsonl"])
    assert all(set(r) == {"prompt", "category", "heldout_category"} for r in harmful)
    assert any(r["heldout_category"] for r in harmful) and not all(r["heldout_category"] for r in harmful)
    assert all(set(r) == {"prompt"} for r in W.read_jsonl(written["benign.jsonl"]))


def test_committed_eval_data_matches_the_default_world(tmp_path):
    committed = REPO / "eval" / "data"
    if not committed.exists():
        pytest.skip("eval/data not generated")
    written = W.write_eval_sets(tmp_path, seed=0)
    for name, path in written.items():
        assert (committed / name).read_bytes() == path.read_bytes(), f"eval/data/{name} is stale: rerun write_eval_sets"
    assert sum(p.stat().st_size for p in committed.glob("*.jsonl")) < 200_000


def test_tiny_pretraining_saves_a_model_that_loads_through_the_hub_path(tmp_path):
    import torch

    from cast_lightning.world import base_model as B
    from cast_lightning.loading import load_causal_lm, load_tokenizer

    model_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2}
    train_config = {"steps": 3, "batch_size": 4, "warmup_steps": 1}
    path = B.ensure_base_model(tmp_path, seed=0, scale=SCALE, model_config=model_config, train_config=train_config, quiet=True)
    assert path.name == f"world-base-{B.config_key(0, SCALE, model_config, train_config)}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    mtime = (path / "base_model.json").stat().st_mtime_ns
    assert B.ensure_base_model(tmp_path, seed=0, scale=SCALE, model_config=model_config, train_config=train_config,
                               quiet=True) == path
    assert (path / "base_model.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    model = load_causal_lm(str(path))
    tokenizer = load_tokenizer(str(path))
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert B.world_paths(path).safety_train.exists()
    prompts = ["Count: a b", "Reverse: a b c d e f"]
    outputs = B.generate_greedy(model, tokenizer, prompts, max_new_tokens=3, batch_size=2)
    # Left-padded batched generation equals an argmax loop written out here, one prompt at a time, no KV cache.
    expected = []
    for prompt in prompts:
        ids, new = prompt_ids(tokenizer, prompt), []
        with torch.no_grad():
            for _ in range(3):
                token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
        expected.append(tokenizer.decode(new, skip_special_tokens=True))
    assert outputs == expected


def test_pretraining_runs_with_the_recipes_thread_count_whatever_the_machine(monkeypatch):
    """The thread count is part of the base-model recipe (and of its cache key), not read off the machine's load:
    the build uses exactly TRAIN_CONFIG["threads"] and leaves the caller's count as it was."""
    import torch

    from cast_lightning.world import base_model as B

    seen = []
    monkeypatch.setattr(B, "train_sft", lambda *a, **k: seen.append(torch.get_num_threads()) or
                        {"seconds": 0.0, "losses": [], "examples": 0, "steps": 0})
    monkeypatch.setattr(B.world_lib, "build_world", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with B.intra_op_threads(B.TRAIN_CONFIG["threads"]) as threads:
            assert threads == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        assert B.config_key(scale=0.05) != B.config_key(scale=0.05, train_config={"threads": 2})
    finally:
        torch.set_num_threads(before)
