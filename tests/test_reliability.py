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
    "fit: malformed dataset line": Case("fit", ("--data.safety_files=[{broken}]",), "broken.jsonl line 2: not valid JSON"),
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
    "diagnose: malformed dataset line": Case("diagnose", ("--data.safety_files=[{broken}]",), "broken.jsonl line 2: not valid JSON"),
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
    # --- training scopes and LoRA (issue #15) ----------------------------------------------------------------------
    "fit: LoRA target that matches no module": Case("fit", ("--model.trainable=lora", "--model.lora.target_modules=[q_prj]"), "matches no module"),
    "fit: LoRA target that is not a layer LoRA adapts": Case("fit", ("--model.trainable=lora", "--model.lora.target_modules=[input_layernorm]"), "LoRA adapts Linear"),
    "fit: LoRA rank larger than the layer": Case("fit", ("--model.trainable=lora", "--model.lora.r=64"), "use --model.lora.r 16 or less"),
    "fit: DoRA with head skipping": Case("fit", ("--model.trainable=lora", "--model.lora.use_dora=true", "--model.skip_heads=[[0, 1]]"), "DoRA cannot keep a skipped head exact"),
    "fit: LoRA options without the LoRA scope": Case("fit", ("--model.lora.r=4",), "add --model.trainable lora"),
    "fit: a scope that leaves nothing trainable": Case("fit", ("--model.trainable=[self_attn.q_proj]", "--model.skip_heads=[[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [1, 3]]"), "nothing would train"),
    "fit: an empty scope": Case("fit", ("--model.trainable=[]",), "selects no parameter"),
    "fit: a scope pattern that matches nothing": Case("fit", ("--model.trainable=[mpl]",), "matches no parameter"),
    "export: adapter alone from a checkpoint without LoRA": Case("export", ("--adapter_only=true",), "needs a LoRA checkpoint"),
    # --- layer freezing and PCGrad (issue #18) -------------------------------------------------------------------
    "fit: a skipped layer out of range": Case("fit", ("--model.skip_layers=[0, 5]",), "layer 5 is out of range; this llama model has layers 0-1"),
    "fit: a skipped layer range out of range": Case("fit", ("--model.skip_layers=1-2",), "layer 2 is out of range"),
    "fit: PCGrad without utility replay": Case("fit", ("--model.pcgrad=global",), "set --data.utility_replay"),
    "fit: skipped layers from a map that located none": Case(
        "fit", (f"--model.skip_layers=from_map:{REPO / 'tests' / 'data' / 'report' / 'conflict_map.json'}",),
        "has no located layers: run cast diagnose with --model.scorers '[layer_gap]'"),
    "fit: skipped layers from_map without a map": Case("fit", ("--model.skip_layers=from_map",), "add --model.conflict_map PATH"),
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
    assert err.strip().splitlines() == lines, err  # nothing else on stderr: no warning, note or tip before it
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
    assert ConflictMap.from_json(output).skip == derived.skip and len(derived.skip) == 2  # 25% of the 2 x 4 heads
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
    stamp = {"command": command_line(argv), "recipe_sha256": sha256(recipe), "skip_heads": None}
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


# --- durable atomic writes -------------------------------------------------------------------------------------------


def test_atomic_save_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    """Without the directory fsync a power cut after the rename can lose it (the new name is only in the page cache)."""
    import stat

    from cast_lightning.io import atomic_write_json

    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return fsync(fd)

    def recording_replace(src, dst):
        events.append(f"rename to {Path(dst).name}")
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    atomic_write_json(tmp_path / "results.json", {"metrics": {}})
    assert events == ["fsync file", "rename to results.json", "fsync directory"]


SIZE_LIMITED_WRITER = """
import resource, signal, sys
from cast_lightning.errors import CastError
from cast_lightning.io import atomic_write_bytes

target, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as cast's main does: the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    atomic_write_bytes(target, b"new results " * 100_000)  # 1.2 MB, over the limit
except CastError as error:
    print(error)
    sys.exit(2)
"""


@pytest.mark.parametrize("existing", [True, False], ids=["replaces_a_file", "new_file"])
def test_a_write_failing_midway_leaves_the_old_file_and_says_so(tmp_path, existing):
    """A file-size limit (the same path as a full disk: the write raises part way): the previous file is intact,
    no temporary file is left, and one line says so."""
    target = tmp_path / "results.json"
    if existing:
        target.write_bytes(b'{"metrics": {"safety.refusal_rate": 0.5}}')
    before = sorted(p.name for p in tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", SIZE_LIMITED_WRITER, str(target), str(64 * 1024)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 2, child.stderr
    kept = f"the previous {target} is intact" if existing else f"nothing was written to {target}"
    assert child.stdout.strip().splitlines() == [
        f"cannot write {target}: File too large (the write failed midway); {kept}: free disk space or raise the "
        f"file-size limit, then rerun"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left beside it
    if existing:
        assert target.read_bytes() == b'{"metrics": {"safety.refusal_rate": 0.5}}'


# --- locks: one run at a time per base-model cache and per study directory -----------------------------------------

LOCK_HOLDER = """
import sys, time
from pathlib import Path
from cast_lightning.io import exclusive

lock, release = sys.argv[1], Path(sys.argv[2])
with exclusive(lock, "the test directory"):
    print("holding", flush=True)
    while not release.exists():
        time.sleep(0.05)
"""

LOCK_WAITER = """
import sys
from pathlib import Path
from cast_lightning.io import exclusive

lock, done = sys.argv[1], Path(sys.argv[2])
with exclusive(lock, "the test directory"):
    done.write_text("got it")
"""


def _start(script: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def lock_holder(tmp_path):
    """A process holding ``lock`` until the test creates ``release`` (or ends)."""
    holders = []

    def hold(lock: Path) -> Path:
        release = tmp_path / f"release-{len(holders)}"
        holder = _start(LOCK_HOLDER, lock, release)
        holders.append((holder, release))
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        return release

    yield hold
    for holder, release in holders:
        release.touch()
        holder.wait(timeout=60)


def test_a_second_run_waits_for_the_lock_saying_so_in_one_line(tmp_path, lock_holder):
    lock, done = tmp_path / "dir" / ".cast.lock", tmp_path / "done"
    release = lock_holder(lock)
    waiter = _start(LOCK_WAITER, lock, done)
    line = waiter.stderr.readline()  # printed before it blocks
    assert line.strip() == f"[cast] waiting for another cast run to finish with the test directory (lock {lock})"
    assert waiter.poll() is None and not done.exists()  # still waiting: the holder has not let go
    release.touch()
    assert waiter.wait(timeout=60) == 0, waiter.stderr.read()
    assert done.read_text() == "got it" and waiter.stderr.read() == ""


def test_no_wait_refuses_a_study_directory_in_use(tmp_path, lock_holder, capsys, no_training):
    out = tmp_path / "study"
    lock_holder(out / ".cast.lock")
    for command in ("report", "demo"):
        args = [command, f"--output_dir={out}", "--seeds=[0]", "--max_steps=1", "--eval_limit=1", "--no_wait"]
        assert run_cast(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"cast {command}: error: the study directory {out} is in use by another cast run (lock "
                       f"{out / '.cast.lock'}): wait until it finishes, or rerun without --no_wait to wait for it"]


def test_the_study_holds_its_lock_through_every_stage_and_the_report(tmp_path, monkeypatch):
    """run_study (all the stages) and the report files are written under the study directory's lock: probed with a
    second, independent lock on the same file, which must fail to get it."""
    from filelock import FileLock, Timeout

    import cast_lightning.study.render as render
    import cast_lightning.study.stages as stages
    from cast_lightning.study.commands import write

    out = tmp_path / "study"
    held = []

    def probe() -> None:
        probe_lock = FileLock(str(out / ".cast.lock"))  # another open file: the kernel lock is per file description
        try:
            probe_lock.acquire(timeout=0)
        except Timeout:
            held.append(True)
        else:
            probe_lock.release()
            held.append(False)

    def fake_stages(plan, wait):
        probe()
        return {"runs": []}

    def fake_report(experiments, output_dir):
        probe()
        (Path(output_dir) / "report.json").write_text(json.dumps({"verdict": {"sentence": "ok"}}))
        return {"json": "report.json", "html": "report.html"}

    monkeypatch.setattr(stages, "_run_study", fake_stages)
    monkeypatch.setattr(render, "write_report", fake_report)
    monkeypatch.setattr("cast_lightning.study.commands._print_table", lambda experiments: None)
    write(_plan(out))
    assert held == [True, True]
    after = FileLock(str(out / ".cast.lock"))
    after.acquire(timeout=0)  # and let go afterwards
    after.release()


BASE_MODEL_BUILDER = """
import sys, time
from pathlib import Path
import cast_lightning.world.base_model as B

cache, hold = sys.argv[1], sys.argv[2]
if hold != "-":  # keep the lock after training until the test says go, so the second run must find it held
    pretrain = B.pretrain_base
    def slow_pretrain(*args, **kwargs):
        info = pretrain(*args, **kwargs)
        print("trained", file=sys.stderr, flush=True)
        while not Path(hold).exists():
            time.sleep(0.05)
        return info
    B.pretrain_base = slow_pretrain
print(B.ensure_base_model(cache, scale=0.05, train_config={"steps": 10}), flush=True)
"""


def test_two_concurrent_runs_build_the_base_model_once(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    first = _start(BASE_MODEL_BUILDER, cache, go)
    seen = []
    for line in first.stderr:  # until it has trained and holds the lock
        seen.append(line)
        if line.strip() == "trained":
            break
    assert any("pretraining" in line for line in seen), "".join(seen)
    second = _start(BASE_MODEL_BUILDER, cache, "-")
    waiting = second.stderr.readline()
    assert waiting.startswith("[cast] waiting for another cast run to finish with the base model cache "), waiting
    go.touch()
    out_first, err_first = first.communicate(timeout=300)
    out_second, err_second = second.communicate(timeout=300)
    assert first.returncode == second.returncode == 0, err_first + err_second
    assert out_first == out_second and Path(out_first.strip()).is_dir()  # the same directory
    assert "pretraining" not in err_second and "using the base model another run just built" in err_second
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [Path(out_first.strip()).name]


# --- clean output: a bad input prints its one line, a normal run no library noise -----------------------------------


def _cast_subprocess(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cast_lightning.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_a_bad_input_run_prints_only_its_error_line(inputs, tmp_path):
    """Before, eight lines came first: LightningCLI's args/sys.argv warning, "No seed found", the seed, GPU and TPU
    notes, the TensorBoard note and two tips."""
    fit = _cast_subprocess(*fit_args(inputs["llama"], {**inputs, "safety": inputs["broken"]}, tmp_path / "fit"))
    diagnose = _cast_subprocess("diagnose", f"--model.pretrained={inputs['llama']}", f"--data.safety_files=[{inputs['broken']}]",
                                f"--data.utility_files=[{inputs['utility']}]", "--trainer.accelerator=cpu",
                                f"--trainer.default_root_dir={tmp_path / 'diagnose'}")
    for command, run in (("fit", fit), ("diagnose", diagnose)):
        assert run.returncode == 2, run.stderr
        assert run.stderr.splitlines() == [
            f"cast {command}: error: {inputs['broken']} line 2: not valid JSON (Unterminated string starting at column 23): "
            f"fix or remove that line"], run.stderr
        assert run.stdout == "", run.stdout


LIGHTNING_NOTES = ("Seed set to ", "GPU available: ", "TPU available: ", "`Trainer.fit` stopped: ")


def test_a_normal_run_keeps_progress_and_summary_and_prints_no_spurious_warning(inputs, tmp_path):
    run = _cast_subprocess(*fit_args(inputs["llama"], inputs, tmp_path / "fit"), "--trainer.max_steps=2",
                           "--trainer.enable_progress_bar=true", "--trainer.logger=true", "--trainer.log_every_n_steps=1")
    assert run.returncode == 0, run.stderr
    assert "Trainable params" in run.stdout and "Epoch 0" in run.stdout  # Lightning's summary and progress bar
    noise = [line for line in run.stderr.splitlines() if not line.startswith(LIGHTNING_NOTES)]
    assert noise == [], run.stderr
    assert [line for line in run.stderr.splitlines() if line.startswith("Seed set to ")] == ["Seed set to 0"]
