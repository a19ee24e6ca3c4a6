"""Every shipped YAML builds, not only parses (as litgpt's config-hub test does).

- fit / diagnose recipes construct their LightningModule, data module and Trainer through ``cast fit`` /
  ``cast diagnose`` with the run itself patched out; the embedded world's recipes run inside a study directory of
  a miniature world (their relative paths resolve there), the hub recipes with a tiny stand-in of the same
  architecture for the hub model (nothing can be downloaded here) and on the CPU;
- strategy configs build on top of the world's fit recipe (those that need CUDA or DeepSpeed say so and skip);
- eval configs build their ``cast eval`` arguments (the evaluation itself patched out);
- study YAMLs construct and check their plan.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from tests.conftest import make_pretrained
from tests.test_cli import run_cast

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


@pytest.fixture(scope="session")
def world_study(mini_world, tmp_path_factory) -> Path:
    """A study directory as ``cast demo`` lays it out: ``base_model`` and ``world`` link to a miniature world."""
    study = tmp_path_factory.mktemp("study")
    (study / "base_model").symlink_to(mini_world, target_is_directory=True)
    (study / "world").symlink_to(mini_world / "world", target_is_directory=True)
    return study


@pytest.fixture
def built(monkeypatch):
    """Patch out Trainer.fit / the diagnosis run / the evaluation; record what the command built."""
    record: dict = {}

    def fake_fit(trainer, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None):
        record.update(trainer=trainer, model=model, datamodule=datamodule)

    def fake_diagnosis(model, datamodule, trainer):
        record.update(trainer=trainer, model=model, datamodule=datamodule)

    import cast_lightning.diagnosis as diagnosis
    import cast_lightning.evaluation as evaluation

    real_evaluate = evaluation.evaluate

    @functools.wraps(real_evaluate)  # jsonargparse reads the real signature through __wrapped__
    def fake_evaluate(**kwargs):
        record.update(kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", fake_fit)
    monkeypatch.setattr(diagnosis, "run_diagnosis", fake_diagnosis)
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    return record


def _stand_in(recipe: dict, tmp_path: Path) -> Path:
    name = str(recipe["model"]["pretrained"]).lower()
    return make_pretrained(tmp_path / "stand_in", "qwen2" if "qwen" in name else "llama")


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_every_shipped_config_builds(config, built, world_study, tmp_path, monkeypatch, capsys):
    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.diagnosis import DiagnosisModule
    from cast_lightning.module import CASTModule

    recipe = yaml.safe_load(config.read_text())
    assert isinstance(recipe, dict) and recipe, f"{config} is empty"
    folder = config.parent.name
    world_fit = REPO / "configs" / "world" / "fit.yaml"
    if folder == "strategy":
        strategy = str(recipe["trainer"]["strategy"])
        if "deepspeed" in strategy and importlib.util.find_spec("deepspeed") is None:
            assert run_cast(["fit", "--config", world_fit, "--config", config, "--print_config"]) == 0
            pytest.skip("DeepSpeed is not installed (pip install 'cast-lightning[deepspeed]'): parsed, not built")
        if "FSDPStrategy" in strategy:
            assert run_cast(["fit", "--config", world_fit, "--config", config, "--print_config"]) == 0
            pytest.skip("FSDP1 needs CUDA: parsed, not built")
        monkeypatch.chdir(world_study)
        args = ["fit", "--config", world_fit, "--config", config, f"--trainer.default_root_dir={tmp_path}"]
    elif folder == "eval":
        args = ["eval", "--config", config, "--model", "base_model", f"--output={tmp_path / 'results.json'}"]
        monkeypatch.chdir(world_study)
    elif config.stem in ("fit", "diagnose"):
        args = [config.stem, "--config", config, f"--trainer.default_root_dir={tmp_path / 'run'}"]
        if folder == "world":
            monkeypatch.chdir(world_study)
        else:  # a hub recipe: a tiny local model of the same architecture stands in, on the CPU
            args += [f"--model.pretrained={_stand_in(recipe, tmp_path)}", "--trainer.accelerator=cpu", "--trainer.devices=1"]
            if config.stem == "fit":
                args.append("--model.conflict_map=null")  # made by the recipe's diagnose step
    else:
        from cast_lightning.study.commands import load_study

        monkeypatch.chdir(tmp_path)
        plan = load_study(config).check()
        assert plan.variants and plan.seeds
        assert Path(plan.fit_config).name == "fit.yaml" and Path(plan.diagnose_config).name == "diagnose.yaml"
        return
    code = run_cast(args)
    assert code == 0, capsys.readouterr().err
    if folder == "eval":
        assert built["model"] == "base_model" and built["suite"] == recipe.get("suite", "all")
        return
    module_class = DiagnosisModule if config.stem == "diagnose" else CASTModule
    assert isinstance(built["model"], module_class) and isinstance(built["datamodule"], SafetyUtilityDataModule)
    assert built["datamodule"].hparams.batch_size == recipe.get("data", {}).get("batch_size", built["datamodule"].hparams.batch_size)
    if folder == "world":
        # The recipe's numbers are what was built.
        for key, value in recipe["model"].items():
            assert built["model"].hparams[key] == value, key
        for key, value in recipe["data"].items():
            assert built["datamodule"].hparams[key] == value, key
        if config.stem == "fit":
            trainer = built["trainer"]
            assert trainer.max_steps == recipe["trainer"]["max_steps"] and trainer.gradient_clip_val == 1.0
            assert any(type(c).__name__ == "FinalCheckpoint" for c in trainer.callbacks)


def test_every_config_folder_is_covered():
    """A new kind of config must say how it is built (one of the branches above)."""
    kinds = {p.parent.name if p.parent.name in ("strategy", "eval", "world") else p.stem for p in CONFIGS}
    assert kinds <= {"strategy", "eval", "world", "fit", "diagnose"}, kinds
