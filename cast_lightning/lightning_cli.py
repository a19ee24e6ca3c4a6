"""The LightningCLI runs behind ``cast fit/validate/test`` and ``cast diagnose``, raising instead of exiting.

``cast_lightning.cli`` turns what these raise into one error line; the study (``cast report`` / ``cast demo``)
calls them directly with a recipe YAML and its per-run overrides, so every run in a report is a ``cast fit`` or
``cast diagnose`` a user can repeat from the run's ``config.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

# Argument errors raise (and main prints them as one line) instead of printing the usage wall and exiting;
# abbreviations stay off so a typo such as --out is an error rather than a silent --output.
PARSER_KWARGS = {"exit_on_error": False, "allow_abbrev": False}


def save_config_class():
    from lightning.pytorch.cli import SaveConfigCallback

    class SaveConfigWhenStarted(SaveConfigCallback):
        """LightningCLI's config.yaml, written once the run has started (the checkpoint restored) instead of at
        setup: a run that fails to start, e.g. on a damaged --ckpt_path last, leaves the previous config.yaml."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            self._stage = stage

        def _save(self, trainer, pl_module) -> None:
            super().setup(trainer, pl_module, self._stage)  # writes unless already saved; collective on every rank

        def save_config(self, trainer, pl_module, stage: str) -> None:
            # Rank zero only. Beside the logger's copy, the run directory itself keeps the resolved config: the
            # one file that repeats this run (cast fit --config <run>/config.yaml).
            root = str(trainer.default_root_dir)
            # Only into a run directory the user named: the working directory may hold their own config.yaml.
            if "://" not in root and Path(root).resolve() != Path.cwd().resolve():
                from cast_lightning.io import atomic_write_text

                atomic_write_text(Path(root) / self.config_filename, self.parser.dump(self.config, skip_none=False))

        def on_fit_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module)

        def on_validation_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module)

        def on_test_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module)

    return SaveConfigWhenStarted


def cli_class():
    from lightning.pytorch.cli import LightningCLI

    class CASTCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The data module tokenizes with the model's own tokenizer unless told otherwise.
            parser.link_arguments("model.pretrained", "data.tokenizer")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads --ckpt_path's hyperparameters over the config here. Check the file first, so a
            # truncated, pickled or foreign checkpoint is one line, not a traceback or a silent model switch.
            self.checked_checkpoint = None
            subcommand = self.config.get("subcommand")
            if subcommand:
                ckpt_path = self.config[subcommand].get("ckpt_path")
                if ckpt_path and os.path.isfile(ckpt_path):
                    from cast_lightning.checkpoints import check_resume_checkpoint

                    pretrained = self.config[subcommand].model.get("pretrained")
                    self.checked_checkpoint = check_resume_checkpoint(ckpt_path, pretrained)
            super()._parse_ckpt_path()

        def _before_run(self) -> None:
            """Checks after the model is built and before the Trainer writes its config, logs or checkpoints."""
            from cast_lightning.io import ensure_writable

            root = str(self.trainer.default_root_dir)
            if "://" not in root:  # remote roots (s3://...) are the logger's business
                ensure_writable(Path(root) / "config.yaml", "--trainer.default_root_dir")
            if self.checked_checkpoint is not None:
                self.model.check_checkpoint_fits(self.checked_checkpoint)
                self.checked_checkpoint = None  # memory-mapped: let the file go before training
            # --ckpt_path last/best resolve inside the Trainer: check whatever file it picks before it is read.
            strategy = self.trainer.strategy
            load_checkpoint = strategy.load_checkpoint

            def checked_load_checkpoint(checkpoint_path, *args, **kwargs):
                if os.path.isfile(checkpoint_path):
                    from cast_lightning.checkpoints import RESUME_FIX, check_checkpoint_file

                    check_checkpoint_file(str(checkpoint_path), RESUME_FIX)
                return load_checkpoint(checkpoint_path, *args, **kwargs)

            strategy.load_checkpoint = checked_load_checkpoint

        before_fit = before_validate = before_test = _before_run

    return CASTCLI


def run_lightning(argv: list[str]) -> None:
    """``cast fit|validate|test ARGV``: LightningCLI with CASTModule and the data module (``argv`` starts with the
    subcommand)."""
    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.module import CASTModule

    cli_class()(
        CASTModule, SafetyUtilityDataModule, args=argv, save_config_callback=save_config_class(),
        save_config_kwargs={"overwrite": True}, parser_kwargs=PARSER_KWARGS,
    )


def run_diagnose(argv: list[str]) -> None:
    """``cast diagnose ARGV``: the conflict map of ``--model.pretrained`` (``argv`` without the subcommand)."""
    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.diagnosis import DIAGNOSIS_TRAINER_DEFAULTS, DiagnosisModule, run_diagnosis

    cli = cli_class()(
        DiagnosisModule,
        SafetyUtilityDataModule,
        args=argv,
        run=False,
        trainer_defaults=DIAGNOSIS_TRAINER_DEFAULTS,
        save_config_callback=None,
        parser_kwargs=PARSER_KWARGS,
    )
    run_diagnosis(cli.model, cli.datamodule, cli.trainer)
    root = str(cli.trainer.default_root_dir)
    if cli.trainer.is_global_zero and "://" not in root and Path(root).resolve() != Path.cwd().resolve():
        from cast_lightning.io import atomic_write_text

        # Beside the map: the resolved config that repeats this diagnosis (cast diagnose --config <it>).
        atomic_write_text(Path(root) / "config.yaml", cli.parser.dump(cli.config, skip_none=False))
