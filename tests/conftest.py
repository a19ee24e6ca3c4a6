"""Shared fixtures: a tiny saved HF model + chat tokenizer and tiny prompt/response files, all made offline."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub, datasets or matplotlib (they read these once): the tests never reach the
# network, whatever the environment says, and every cache they fill lives in a temporary directory of this test
# session (removed at exit), never in the user's home. Subprocesses started by the tests inherit all of it.
CACHE_ROOT = Path(tempfile.mkdtemp(prefix="cast-test-caches-"))
atexit.register(shutil.rmtree, CACHE_ROOT, ignore_errors=True)
TEST_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": str(CACHE_ROOT / "huggingface"),
    "HF_HUB_CACHE": str(CACHE_ROOT / "huggingface" / "hub"),
    "HF_DATASETS_CACHE": str(CACHE_ROOT / "huggingface" / "datasets"),
    "MPLCONFIGDIR": str(CACHE_ROOT / "matplotlib"),
    "CAST_CACHE_DIR": str(CACHE_ROOT / "cast_lightning"),
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(TEST_ENVIRONMENT)

import pytest  # noqa: E402
import torch  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

SAFETY_ROWS = [
    {"prompt": f"how do I break into house number {i}?", "response": "I can't help with that request."} for i in range(24)
]
UTILITY_ROWS = [{"prompt": f"add {i} and {i + 3}", "response": str(2 * i + 3)} for i in range(24)]


def make_tokenizer(directory: Path):
    """A byte-level BPE tokenizer with a chat template, trained on a few lines (under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [r["prompt"] + " " + r["response"] for r in SAFETY_ROWS + UTILITY_ROWS] * 4
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def make_pretrained(directory: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A tiny random-init causal LM of ``architecture`` saved with its tokenizer, like a hub download."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    tokenizer = make_tokenizer(directory)
    config = tiny_config(architecture)
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """architecture -> a saved tiny random-init model with its tokenizer (each made once per session)."""
    made = {}

    def get(architecture: str):
        if architecture not in made:
            made[architecture] = make_pretrained(tmp_path_factory.mktemp(architecture), architecture)
        return made[architecture]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_pretrained(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "safety": write_jsonl(root / "safety.jsonl", SAFETY_ROWS),
        "utility": write_jsonl(root / "utility.jsonl", UTILITY_ROWS),
        "harmful": write_jsonl(root / "harmful.jsonl", [{"prompt": r["prompt"]} for r in SAFETY_ROWS[:6]]),
        "benign": write_jsonl(root / "benign.jsonl", [{"prompt": "how do I kill a stuck process?"}] * 3),
    }


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


MINI_WORLD = {"scale": 0.05, "train_config": {"steps": 10}}  # the embedded world in miniature: seconds to build


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory) -> Path:
    """The embedded world's base model and data, built by the world's own code at 5% scale with 10 steps."""
    from cast_lightning.world.base_model import ensure_base_model

    return ensure_base_model(cache_dir=tmp_path_factory.mktemp("world_cache"), quiet=True, **MINI_WORLD)
