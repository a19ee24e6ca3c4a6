"""`cast` end to end through the CLI: help, every shipped config, fit -> export -> from_pretrained, bad input."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from cast_lightning.cli import SUBCOMMANDS, main
from tests.conftest import make_pretrained



def run_cast(args: list[str]) -> int:
    # Library log handlers keep the stderr of the test that imported them; point them at this test's capture.
    for logger in list(logging.root.manager.loggerDict.values()):
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and handler.stream is not sys.stderr:
                handler.stream = sys.stderr  # setStream would flush the closed old one
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_:  # jsonargparse exits on --help/--print_config (argument errors are main's one line)
        return int(exit_.code or 0)


def test_help_lists_every_subcommand(capsys):
    assert run_cast(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "diagnose", "eval", "report", "export", "demo"):
        assert f"  {name} " in out
    assert set(SUBCOMMANDS) == {"fit", "validate", "test", "diagnose", "eval", "report", "export", "demo"}


def test_unknown_subcommand_is_one_line_error(capsys):
    assert run_cast(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use one of" in err[0]


# Every shipped config is built (not only parsed) in tests/test_configs.py.


def fit_args(model_dir, data, root, *extra) -> list:
    return [
        "fit", "--seed_everything=0", f"--model.pretrained={model_dir}", "--model.learning_rate=0.01",
        f"--data.safety_files=[{data['safety']}]", f"--data.utility_files=[{data['utility']}]", "--data.batch_size=4",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=3", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", *extra,
    ]


def test_fit_then_export_loads_with_from_pretrained(tiny_llama_dir, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run_cast(fit_args(tiny_llama_dir, tiny_data, tmp_path / "run", "--model.skip_heads=[[0, 1]]")) == 0
    (checkpoint,) = list((tmp_path / "run").rglob("*.ckpt"))
    assert (tmp_path / "run" / "config.yaml").exists()  # the run directory keeps the resolved config
    assert run_cast(["export", "--ckpt_path", checkpoint, "--output_dir", tmp_path / "hf"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tmp_path / "hf")
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, parameter in exported.named_parameters():
        assert torch.equal(parameter, saved[f"model.{name}"]), name
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, exported.model.layers[0].self_attn.q_proj.weight)
    # Head 1 of layer 0 was skipped: its q rows are the base model's.
    d = base.config.head_dim
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight[d : 2 * d], exported.model.layers[0].self_attn.q_proj.weight[d : 2 * d])
    assert json.loads((tmp_path / "hf" / "cast_skip_heads.json").read_text()) == {"skip_heads": [[0, 1]]}


# Bad input (one line, exit 2, nothing lost) for every command: tests/test_reliability.py.
def test_debug_flag_shows_the_traceback(tiny_llama_dir, tiny_data, tmp_path, capsys):
    assert run_cast(fit_args(tiny_llama_dir, tiny_data, tmp_path, "--model.skip_heads=[[0, 9]]", "--debug")) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("architecture", ["qwen2", "gpt2", "gpt_neox", "phi3"])
def test_fit_works_for_other_architectures(architecture, tiny_data, tmp_path):
    model_dir = make_pretrained(tmp_path / architecture, architecture)
    assert run_cast(fit_args(model_dir, tiny_data, tmp_path / "run", "--model.skip_heads=[[1, 0]]", "--trainer.max_steps=2")) == 0
    assert list((tmp_path / "run").rglob("*.ckpt"))


def test_bare_bool_flag_means_true():
    from cast_lightning.cli import _bare_flags_to_true

    def command(*, full: bool = False, seeds: list[int] | None = None) -> None:
        """A typed subcommand with one bool option."""

    assert _bare_flags_to_true(command, ["--full"]) == ["--full", "true"]
    assert _bare_flags_to_true(command, ["--full", "--seeds", "[0]"]) == ["--full", "true", "--seeds", "[0]"]
    assert _bare_flags_to_true(command, ["--full", "false"]) == ["--full", "false"]


CONFTEST_PROBE = """
import json
import tests.conftest as conftest  # what pytest imports first
import datasets.config, huggingface_hub.constants, matplotlib
print(json.dumps({"root": str(conftest.CACHE_ROOT), "offline": huggingface_hub.constants.HF_HUB_OFFLINE,
                  "datasets_offline": datasets.config.HF_HUB_OFFLINE, "hub_cache": huggingface_hub.constants.HF_HUB_CACHE,
                  "datasets_cache": str(datasets.config.HF_DATASETS_CACHE), "mpl": matplotlib.get_cachedir()}))
"""


def test_the_tests_run_offline_with_every_cache_in_a_temporary_directory(tmp_path):
    """An environment that says otherwise (online, caches in the home directory) does not win over conftest."""
    import os
    import subprocess

    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(home / "hf"), "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "ds"),
           "MPLCONFIGDIR": str(home / "mpl")}
    probe = subprocess.run([sys.executable, "-c", CONFTEST_PROBE], env=env, capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[1])
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["offline"] is True and seen["datasets_offline"] is True
    for key in ("hub_cache", "datasets_cache", "mpl"):
        assert Path(seen[key]).is_relative_to(seen["root"]), (key, seen)
    assert not home.exists()  # matplotlib would have created its cache directory there
    from tests import conftest

    assert seen["root"] != str(conftest.CACHE_ROOT)  # each session its own directory
    assert os.environ["HF_HUB_OFFLINE"] == "1" and Path(os.environ["HF_HOME"]).is_relative_to(conftest.CACHE_ROOT)
