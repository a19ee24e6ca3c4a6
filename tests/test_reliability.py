"""Issue #10, reliability: bad input is one line on stderr naming the fix, exit code 2, and nothing already
written is lost; a writer killed with SIGKILL mid-way leaves the old file (or export directory) intact.

The table ``BAD_INPUTS`` drives one test per case through the real CLI (``cast <command> ...`` in-process).
Every case fails before training, diagnosis or evaluation starts, so the whole table runs in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import make_pretrained, write_jsonl
from tests.test_cli import fit_args, run_cast

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("fit", "diagnose", "eval", "report", "export", "demo")


@dataclass(frozen=True)
class Case:
    command: str
    args: tuple[str, ...]  # appended to the command's working arguments, formatted with the paths below
    expected: str  # a substring of the error line that names what is wrong or the fix


BAD_INPUTS: dict[str, Case] = {
    # --- cast fit (LightningCLI) ---------------------------------------------------------------------------------
    "fit: malformed YAML config": Case("fit", ("--config={bad_yaml}",), "fix the YAML of --config"),
    "fit: unknown key": Case("fit", ("--model.learning_rat=0.1",), "--model.learning_rat"),
    "fit: unknown key in a config file": Case("fit", ("--config={unknown_key_yaml}",), "learning_rat"),
    "fit: wrong type": Case("fit", ("--trainer.max_steps=many",), 'key "trainer.max_steps"'),
    "fit: skip list and map together": Case("fit", ("--model.skip_heads=[[0, 0]]", "--model.conflict_map={other_map}"), "not both"),
    "fit: head out of range": Case("fit", ("--model.skip_heads=[[0, 9]]",), "out of range"),
    "fit: layer out of range": Case("fit", ("--model.skip_heads=[[5, 0]]",), "out of range"),
    "fit: conflict map for another model shape": Case("fit", ("--model.conflict_map={other_map}",), "run cast diagnose on this model"),
    "fit: conflict map without statistics": Case("fit", ("--model.conflict_map={incomplete_map}",), "lacks oc, fs, score"),
    "fit: missing field": Case("fit", ("--data.safety_files=[{missing_field}]",), "has no field 'response'"),
    "fit: empty dataset": Case("fit", ("--data.safety_files=[{empty}]",), "no rows"),
    "fit: malformed dataset line": Case("fit", ("--data.safety_files=[{broken}]",), "cannot read data source"),
    "fit: missing data file": Case("fit", ("--data.safety_files=[/nonexistent/safety.jsonl]",), "does not exist"),
    "fit: unsupported architecture": Case("fit", ("--model.pretrained={bert}",), "unsupported architecture"),
    "fit: resume from another model's checkpoint": Case("fit", ("--ckpt_path={qwen_ckpt}",), "resume with --model.pretrained"),
    "fit: resume from weights of another shape": Case("fit", ("--ckpt_path={foreign_ckpt}",), "weights do not fit"),
    "fit: resume from a pickled checkpoint": Case("fit", ("--ckpt_path={pickled_ckpt}",), "weights_only=True"),
    "fit: resume from a truncated checkpoint": Case("fit", ("--ckpt_path={truncated_ckpt}",), "truncated or corrupt"),
    "fit: resume 'last' left truncated": Case("fit", ("--ckpt_path=last",), "truncated or corrupt"),
    "fit: resume from a non-CAST checkpoint": Case("fit", ("--ckpt_path={plain_ckpt}",), "not a cast fit checkpoint"),
    "fit: root under a regular file": Case("fit", ("--trainer.default_root_dir={blocked}",), "writable --trainer.default_root_dir"),
    # --- cast diagnose (LightningCLI, run=False) -------------------------------------------------------------------
    "diagnose: malformed YAML config": Case("diagnose", ("--config={bad_yaml}",), "fix the YAML of --config"),
    "diagnose: unknown key": Case("diagnose", ("--model.scorer=oc",), "--model.scorer"),
    "diagnose: invalid choice": Case("diagnose", ("--model.score=best",), 'key "model.score"'),
    "diagnose: unsupported architecture": Case("diagnose", ("--model.pretrained={bert}",), "unsupported architecture"),
    "diagnose: empty dataset": Case("diagnose", ("--data.utility_files=[{empty}]",), "no rows"),
    "diagnose: malformed dataset line": Case("diagnose", ("--data.safety_files=[{broken}]",), "cannot read data source"),
    "diagnose: missing data file": Case("diagnose", ("--data.utility_files=[/nonexistent/u.jsonl]",), "does not exist"),
    "diagnose: output under a regular file": Case("diagnose", ("--model.output={blocked}",), "writable --model.output"),
    # --- cast eval (jsonargparse.CLI) ------------------------------------------------------------------------------
    "eval: malformed YAML config": Case("eval", ("--config={bad_yaml}",), "fix the YAML of --config"),
    "eval: unknown key": Case("eval", ("--limits=2",), "--limits"),
    "eval: wrong type": Case("eval", ("--limit=two",), 'key "limit"'),
    "eval: unknown suite": Case("eval", ("--suite=safe",), "unknown suite"),
    "eval: missing checkpoint": Case("eval", ("--model=/nonexistent/run/last.ckpt",), "does not exist"),
    "eval: checkpoint of another model": Case("eval", ("--model={foreign_ckpt}",), "pair it with the model it was trained from"),
    "eval: pickled checkpoint": Case("eval", ("--model={pickled_ckpt}",), "weights_only=True"),
    "eval: truncated checkpoint": Case("eval", ("--model={truncated_ckpt}",), "truncated or corrupt"),
    "eval: malformed prompt file": Case("eval", ("--harmful={broken_prompts}",), "fix or remove the line"),
    "eval: missing prompt file": Case("eval", ("--benign=/nonexistent/benign.jsonl",), "is missing"),
    "eval: output under a regular file": Case("eval", ("--output={blocked}",), "writable --output"),
    "eval: output is a directory": Case("eval", ("--output={existing_dir}",), "give a file path as --output"),
    # --- cast report (jsonargparse.CLI) ----------------------------------------------------------------------------
    "report: malformed YAML config": Case("report", ("--config={bad_yaml}",), "fix the YAML of --config"),
    "report: config that is not a mapping": Case("report", ("--config={list_yaml}",), "fix the YAML of --config"),
    "report: unknown key": Case("report", ("--variant=[cast]",), "--variant"),
    "report: wrong type": Case("report", ("--max_steps=ten",), 'key "max_steps"'),
    "report: unknown variant": Case("report", ("--variants=[base, lora]",), "unknown variant(s) lora"),
    "report: skip ratio out of range": Case("report", ("--skip_ratios=[0.1, 1.5]",), "outside (0, 1]"),
    "report: no seeds": Case("report", ("--seeds=[]",), "no seeds given"),
    "report: zero steps": Case("report", ("--max_steps=0",), "at least 1 optimizer step"),
    "report: output under a regular file": Case("report", ("--output_dir={blocked}",), "writable --output_dir"),
    # --- cast export (jsonargparse.CLI) ----------------------------------------------------------------------------
    "export: unknown key": Case("export", ("--out_dir={blocked}",), "--out_dir"),
    "export: missing checkpoint": Case("export", ("--ckpt_path=/nonexistent/last.ckpt",), "does not exist"),
    "export: checkpoint of another model": Case("export", ("--ckpt_path={foreign_ckpt}",), "pair it with the model it was trained from"),
    "export: pickled checkpoint": Case("export", ("--ckpt_path={pickled_ckpt}",), "weights_only=True"),
    "export: truncated checkpoint": Case("export", ("--ckpt_path={truncated_ckpt}",), "truncated or corrupt"),
    "export: non-CAST checkpoint": Case("export", ("--ckpt_path={plain_ckpt}",), "not a cast fit checkpoint"),
    "export: output under a regular file": Case("export", ("--output_dir={blocked}",), "writable --output_dir"),
    "export: output is a regular file": Case("export", ("--output_dir={blocker}",), "not a directory"),
    "export: output is a directory that is not an export": Case("export", ("--output_dir={existing_dir}",), "is not a cast export"),
    # --- cast demo (jsonargparse.CLI) ------------------------------------------------------------------------------
    "demo: malformed YAML config": Case("demo", ("--config={bad_yaml}",), "fix the YAML of --config"),
    "demo: wrong type": Case("demo", ("--full=maybe",), 'key "full"'),
    "demo: skip ratio out of range": Case("demo", ("--skip_ratio=0",), "outside (0, 1]"),
    "demo: zero steps": Case("demo", ("--max_steps=0",), "at least 1 optimizer step"),
    "demo: zero eval limit": Case("demo", ("--eval_limit=0",), "eval_limit 0 is below 1"),
    "demo: no seeds": Case("demo", ("--seeds=[]",), "no seeds given"),
    "demo: output under a regular file": Case("demo", ("--output_dir={blocked}",), "writable --output_dir"),
}


class Evil:
    """Unpickling this runs ``os.mkdir(marker)``: proof that a checkpoint's code would have been executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def inputs(tiny_llama_dir, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """The bad (and a few good) inputs every case draws on, made once."""
    from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel

    root = tmp_path_factory.mktemp("bad_inputs")
    paths: dict[str, Path] = {"llama": tiny_llama_dir, **tiny_data}

    bert = root / "bert"
    BertLMHeadModel(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, is_decoder=True)).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bert / name).write_bytes((tiny_llama_dir / name).read_bytes())
    paths["bert"] = bert
    paths["qwen2"] = make_pretrained(root / "qwen2", "qwen2")

    # A real cast fit checkpoint of the tiny Llama, and checkpoints derived from it.
    assert run_cast(fit_args(tiny_llama_dir, tiny_data, root / "run", "--trainer.max_steps=1")) == 0
    (good,) = (root / "run").rglob("*.ckpt")
    checkpoint = torch.load(good, weights_only=True)
    qwen_state = {f"model.{k}": v for k, v in AutoModelForCausalLM.from_pretrained(paths["qwen2"]).state_dict().items()}
    # Trained from another model: a complete checkpoint of the tiny Qwen2.
    torch.save({**checkpoint, "state_dict": qwen_state, "hyper_parameters": {**checkpoint["hyper_parameters"],
                "pretrained": str(paths["qwen2"])}}, root / "qwen2.ckpt")
    # Weights that do not fit the model the checkpoint names (its base directory was replaced, say).
    torch.save({**checkpoint, "state_dict": qwen_state}, root / "foreign.ckpt")
    torch.save({**checkpoint, "evil": Evil(root / "code_ran")}, root / "pickled.ckpt")
    data = good.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])  # what an interrupted save leaves
    torch.save({"weight": torch.zeros(2)}, root / "plain.ckpt")
    paths.update({"ckpt": good, "qwen_ckpt": root / "qwen2.ckpt", "foreign_ckpt": root / "foreign.ckpt",
                  "pickled_ckpt": root / "pickled.ckpt", "truncated_ckpt": root / "truncated.ckpt",
                  "plain_ckpt": root / "plain.ckpt", "code_ran": root / "code_ran"})

    # A complete map of a 3-layer model (the tiny Llama has 2), and a map missing its statistics.
    other = json.loads((REPO / "tests" / "data" / "report" / "conflict_map.json").read_text())
    other["model"]["num_layers"] = 3
    for key in ("oc", "fs", "score"):
        other[key] = other[key] + other[key][:1]
    paths["other_map"] = root / "other_map.json"
    paths["other_map"].write_text(json.dumps(other))
    paths["incomplete_map"] = root / "incomplete_map.json"
    paths["incomplete_map"].write_text(json.dumps({"schema_version": 1, "model": other["model"], "skip": [[0, 0]]}))
    paths["missing_field"] = write_jsonl(root / "nofield.jsonl", [{"prompt": "hi", "answer": "x"}])
    paths["empty"] = write_jsonl(root / "empty.jsonl", [])
    paths["broken"] = root / "broken.jsonl"
    paths["broken"].write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "cut off", "respo\n')
    paths["broken_prompts"] = root / "broken_prompts.jsonl"
    paths["broken_prompts"].write_text('{"prompt": "hi"}\n{"prompt": \n')
    paths["bad_yaml"] = root / "bad.yaml"
    paths["bad_yaml"].write_text("model:\n  pretrained: [unclosed\ntrainer: {\n")
    paths["list_yaml"] = root / "list.yaml"
    paths["list_yaml"].write_text("- base\n- cast\n")
    paths["unknown_key_yaml"] = root / "unknown_key.yaml"
    paths["unknown_key_yaml"].write_text("model:\n  learning_rat: 0.1\n")
    return paths


def _outputs(tmp_path: Path, inputs: dict[str, Path]) -> dict[str, Path]:
    """What earlier runs left where the commands write (results, maps, reports, an export, checkpoints, a config)
    and a user's files in the way: made fresh for every case; every byte must survive the failed command."""
    files = {
        "fit_last": tmp_path / "run" / "checkpoints" / "last.ckpt",
        "fit_config": tmp_path / "run" / "config.yaml",
        "map": tmp_path / "diagnosis" / "conflict_map.json",
        "map_png": tmp_path / "diagnosis" / "conflict_map.png",
        "results": tmp_path / "eval" / "results.json",
        "report_md": tmp_path / "report" / "report.md",
        "report_json": tmp_path / "report" / "report.json",
        "experiments": tmp_path / "report" / "experiments.json",
        "export_weights": tmp_path / "hf" / "model.safetensors",
        "export_sentinel": tmp_path / "hf" / "cast_skip_heads.json",
        "demo_report": tmp_path / "demo" / "report.md",
        "demo_experiments": tmp_path / "demo" / "experiments.json",
        "blocker": tmp_path / "blocker",
        "existing_dir_file": tmp_path / "existing" / "notes.txt",
    }
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"earlier {name} \x00 must survive\n".encode())
    # The last checkpoint of an earlier run, cut short (only --ckpt_path last reads it).
    files["fit_last"].write_bytes(inputs["truncated_ckpt"].read_bytes())
    return {**files, "blocked": files["blocker"] / "out" / "file.json", "existing_dir": files["existing_dir_file"].parent}


def _base_args(command: str, p: dict[str, Path]) -> list:
    if command == "fit":
        return fit_args(p["llama"], p, p["fit_config"].parent)
    if command == "diagnose":
        return ["diagnose", f"--model.pretrained={p['llama']}", f"--data.safety_files=[{p['safety']}]",
                f"--data.utility_files=[{p['utility']}]", "--data.batch_size=4", "--trainer.accelerator=cpu",
                "--trainer.devices=1", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={p['map'].parent}",
                f"--model.output={p['map']}"]
    if command == "eval":
        return ["eval", f"--model={p['ckpt']}", "--suite=safety", f"--output={p['results']}", f"--harmful={p['harmful']}",
                f"--benign={p['benign']}", "--limit=2", "--max_new_tokens=2", "--device=cpu"]
    if command == "report":
        return ["report", f"--output_dir={p['report_md'].parent}", "--variants=[base, cast]", "--seeds=[0]",
                "--single_head_validity=0", "--max_steps=1", "--eval_limit=1"]
    if command == "export":
        return ["export", f"--ckpt_path={p['ckpt']}", f"--output_dir={p['export_weights'].parent}"]
    return ["demo", f"--output_dir={p['demo_report'].parent}", "--seeds=[0]", "--max_steps=1", "--eval_limit=1"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): _digest(p) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """report/demo cases must fail in validation: reaching the study's stages (minutes of building and training)
    fails fast."""
    import cast_lightning.study.stages as stages

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input reached the study's stages instead of failing validation")

    monkeypatch.setattr(stages, "run_study", refuse)
    monkeypatch.setattr(stages, "prepare", refuse)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_loses_nothing(case, inputs, tmp_path, capsys, no_training):
    spec = BAD_INPUTS[case]
    paths = {**inputs, **_outputs(tmp_path, inputs)}
    args = [*_base_args(spec.command, paths), *(a.format(**paths) for a in spec.args)]
    before, before_inputs = _tree(tmp_path), {name: _digest(p) for name, p in inputs.items() if p.is_file()}

    code = run_cast(args)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cast {spec.command}: error:"), err
    assert spec.expected in lines[0], err
    # Nothing was written: every earlier output byte-identical, no new file (checkpoint, map, results, config...).
    assert _tree(tmp_path) == before
    assert {name: _digest(p) for name, p in inputs.items() if p.is_file()} == before_inputs
    assert not inputs["code_ran"].exists(), "a pickled checkpoint's code ran"


def test_table_covers_every_command_at_least_three_times():
    counts = {command: sum(c.command == command for c in BAD_INPUTS.values()) for command in COMMANDS}
    assert len(BAD_INPUTS) >= 25 and min(counts.values()) >= 3, counts


def test_debug_shows_the_traceback_of_an_argument_error(capsys):
    assert run_cast(["report", "--max_steps=ten", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ArgumentError" in err
    assert err.strip().splitlines()[-1].startswith("cast report: error:")


def test_an_os_error_mid_command_is_one_line_naming_the_path(monkeypatch, capsys):
    """A disk that fills up or a permission lost after the up-front checks: no traceback either."""
    import cast_lightning.export as export_module

    @functools.wraps(export_module.export)
    def export(**kwargs):
        raise PermissionError(13, "Permission denied", "/data/runs/hf")

    monkeypatch.setattr(export_module, "export", export)
    assert run_cast(["export", "--ckpt_path=last.ckpt", "--output_dir=hf"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "cast export: error: /data/runs/hf: Permission denied; check the path and its permissions"


def test_help_and_print_config_still_exit_zero(capsys):
    for command in COMMANDS:
        assert run_cast([command, "--help"]) == 0, command
        assert "usage:" in capsys.readouterr().out
    assert run_cast(["report", "--seeds=[4]", "--print_config"]) == 0
    assert "- 4" in capsys.readouterr().out


# --- cached stages of cast report / cast demo ------------------------------------------------------------------------


def _plan(tmp_path, **fields):
    from cast_lightning.study.plan import StudyPlan

    return StudyPlan(output_dir=str(tmp_path), fit_config="configs/world/fit.yaml",
                     diagnose_config="configs/world/diagnose.yaml", variants=["full"], skip_ratios=[0.1], seeds=[0],
                     **fields)


def test_damaged_cached_results_are_recomputed(tmp_path, monkeypatch, capsys):
    """Every stage file is written atomically, so a damaged one came from outside (a copy cut short, an edit):
    the study redoes that stage instead of stopping on a JSON traceback."""
    import cast_lightning.evaluation as evaluation
    from cast_lightning.study.stages import eval_stage

    output = tmp_path / "runs" / "cast-r0.1-s0" / "eval.json"
    output.parent.mkdir(parents=True)
    output.write_text('{"metrics": {"safety.refusal_rate": 0.5')  # half a file
    calls = []

    def fake_evaluate(*, model, output, **kwargs):
        calls.append(model)
        results = {"metrics": {"safety.refusal_rate": 0.75}}
        Path(output).write_text(json.dumps(results))
        return results

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    plan = _plan(tmp_path)
    assert eval_stage(plan, tmp_path / "final.ckpt", output)["metrics"] == {"safety.refusal_rate": 0.75}
    assert calls == [str(tmp_path / "final.ckpt")]
    assert "is unreadable" in capsys.readouterr().out
    # A readable cached result is reused, not recomputed ...
    assert eval_stage(plan, tmp_path / "final.ckpt", output)["metrics"] == {"safety.refusal_rate": 0.75} and len(calls) == 1
    # ... unless the evaluation would now run with other options.
    eval_stage(_plan(tmp_path, eval_limit=3), tmp_path / "final.ckpt", output)
    assert len(calls) == 2 and "changed since it ran" in capsys.readouterr().out


def test_damaged_cached_map_is_recomputed(tmp_path, capsys):
    from cast_lightning.conflict import ConflictMap
    from cast_lightning.study.stages import variant_map

    cmap = ConflictMap.from_json(REPO / "tests" / "data" / "report" / "conflict_map.json")
    output = tmp_path / "conflict_map.json"
    output.write_text('{"schema_version": 1, "model": {')
    derived = variant_map(cmap, "0" * 64, "random", 0.25, 0, output)
    assert ConflictMap.from_json(output).skip == derived.skip and len(derived.skip) >= 1
    assert "is unreadable" in capsys.readouterr().out
    # Derived from another diagnosis map (its hash changed): recomputed, not reused.
    stamp = output.stat().st_mtime_ns
    assert variant_map(cmap, "0" * 64, "random", 0.25, 0, output).skip == derived.skip
    assert output.stat().st_mtime_ns == stamp
    variant_map(cmap, "1" * 64, "random", 0.25, 0, output)
    assert output.stat().st_mtime_ns != stamp
    assert ConflictMap.from_json(output).options["derived_from"]["sha256"] == "1" * 64


def test_truncated_cached_checkpoint_is_refit_and_its_results_redone(tiny_llama_dir, tiny_data, tmp_path, capsys, monkeypatch):
    from cast_lightning.checkpoints import check_checkpoint_file
    from cast_lightning.study.stages import command_line, fit_command, fit_stage, sha256

    recipe = tmp_path / "fit.yaml"
    recipe.write_text(
        f"model: {{pretrained: {tiny_llama_dir}}}\n"
        f"data: {{safety_files: [{tiny_data['safety']}], utility_files: [{tiny_data['utility']}], batch_size: 4}}\n"
        "trainer: {accelerator: cpu, devices: 1, max_steps: 1, logger: false, enable_checkpointing: false,\n"
        "  enable_progress_bar: false, callbacks: [{class_path: cast_lightning.callbacks.FinalCheckpoint}]}\n"
    )
    plan = _plan(tmp_path, fit_args=[])
    plan.fit_config = str(recipe)
    monkeypatch.chdir(tmp_path)
    run_dir = Path("full-s0")
    run_dir.mkdir()
    argv = fit_command(plan, run_dir, seed=0)
    (run_dir / "final.ckpt").write_bytes(b"PK\x03\x04 cut off by a crash")
    (run_dir / "eval.json").write_text(json.dumps({"metrics": {"safety.refusal_rate": 1.0}}))  # of the lost weights
    stamp = {"command": command_line(argv), "recipe_sha256": sha256(recipe), "conflict_map_sha256": None}
    (run_dir / "stage.json").write_text(json.dumps(stamp))  # the stamp says the fit finished: the file is what is wrong
    final, seconds = fit_stage(plan, recipe, argv, run_dir)
    assert seconds is not None and check_checkpoint_file(str(final), "")["global_step"] == 1
    assert not (run_dir / "eval.json").exists()
    assert "is unreadable" in capsys.readouterr().out
    assert json.loads((run_dir / "stage.json").read_text()) == stamp
    assert fit_stage(plan, recipe, argv, run_dir)[1] is None  # now whole: reused


# --- atomic writes under SIGKILL -------------------------------------------------------------------------------------


def _kill_when_marked(script: str, args: list, marker: Path, timeout: float = 120.0) -> None:
    """Run ``script`` in a child Python, wait until it creates ``marker`` (it is then mid-write), SIGKILL it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the writer exited ({child.returncode}) before it was killed: {child.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the writer never reached the middle of its write")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL


ATOMIC_WRITER = """
import sys, time
from pathlib import Path
from cast_lightning.io import atomic_save

target, marker = sys.argv[1], Path(sys.argv[2])

def write(tmp):
    with open(tmp, "wb") as handle:
        handle.write(b"NEW HALF " * 4096)
        handle.flush()
        marker.touch()
        time.sleep(600)
        handle.write(b"never written")

atomic_save(target, write)
"""


def test_sigkill_during_atomic_save_leaves_the_old_file(tmp_path):
    from cast_lightning.io import atomic_write_json

    target = tmp_path / "results.json"
    old = json.dumps({"metrics": {"safety.refusal_rate": 0.5}}).encode()
    target.write_bytes(old)
    _kill_when_marked(ATOMIC_WRITER, [target, tmp_path / "marker"], tmp_path / "marker")
    assert target.read_bytes() == old
    leftovers = list(tmp_path.glob(".results.json.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].read_bytes().startswith(b"NEW HALF")  # it was killed mid-write
    atomic_write_json(target, {"metrics": {"safety.refusal_rate": 0.25}})  # the leftover does not get in the way
    assert json.loads(target.read_text()) == {"metrics": {"safety.refusal_rate": 0.25}}


EXPORT_WRITER = """
import sys, time
from pathlib import Path
import transformers
from cast_lightning.export import export

ckpt, output_dir, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
save_pretrained = transformers.PreTrainedModel.save_pretrained

def slow_save_pretrained(self, directory, **kwargs):
    save_pretrained(self, directory, **kwargs)  # the weights are half of the export: then hang
    marker.touch()
    time.sleep(600)

transformers.PreTrainedModel.save_pretrained = slow_save_pretrained
export(ckpt_path=ckpt, output_dir=output_dir)
"""


def test_sigkill_during_export_leaves_the_old_export(inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from cast_lightning.export import export

    output = tmp_path / "hf"
    export(ckpt_path=str(inputs["ckpt"]), output_dir=str(output))
    (output / "sentinel.txt").write_text("from the earlier export\n")
    before = _tree(output)
    _kill_when_marked(EXPORT_WRITER, [inputs["ckpt"], output, tmp_path / "marker"], tmp_path / "marker")
    assert _tree(output) == before
    AutoModelForCausalLM.from_pretrained(output)
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
    assert len(staging) == 1 and list(staging[0].glob("*.safetensors"))  # killed with the new weights half-exported
    export(ckpt_path=str(inputs["ckpt"]), output_dir=str(output))  # a later export succeeds beside the leftover
    assert not (output / "sentinel.txt").exists() and (output / "cast_skip_heads.json").exists()
    AutoModelForCausalLM.from_pretrained(output)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".old")]


# --- every writer of maps, results, reports and exports is atomic ----------------------------------------------------


def test_report_and_map_files_are_all_written_atomically(tmp_path, monkeypatch):
    """render_report and the map writer put every file (JSON, Markdown, HTML, PNG) through io.atomic_save."""
    import cast_lightning.io as io
    from cast_lightning.conflict import ConflictMap
    from cast_lightning.diagnosis import write_map
    from cast_lightning.study.render import write_report

    saved = []
    atomic_save = io.atomic_save

    def recording(path, write):
        saved.append(Path(path).name)
        return atomic_save(path, write)

    for module in ("cast_lightning.io", "cast_lightning.study.render", "cast_lightning.study.plots", "cast_lightning.conflict"):
        monkeypatch.setattr(f"{module}.atomic_save", recording, raising=False)
    data = REPO / "tests" / "data" / "report"
    experiments = json.loads((data / "experiments.json").read_text())
    out = tmp_path / "report"
    write_report(experiments, out)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(saved) and {"report.md", "report.html", "report.json", "pareto.png"} <= set(written)

    saved.clear()
    write_map(ConflictMap.from_json(data / "conflict_map.json"), tmp_path / "map" / "conflict_map.json")
    assert sorted(saved) == sorted(p.name for p in (tmp_path / "map").iterdir()) == ["conflict_map.json", "conflict_map.png"]
