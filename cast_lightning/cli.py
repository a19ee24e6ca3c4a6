"""``cast``: the command line. fit/validate/test through LightningCLI; diagnose through LightningCLI with the
DiagnosisModule; eval/report/export/demo as typed functions whose docstrings are their help.

Errors meant for users (``CastError``, bad arguments) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

SUBCOMMANDS = {
    "fit": "fine-tune with the head mask (CAST) or without (full fine-tuning): LightningCLI",
    "validate": "validation loss of a model or checkpoint on the validation sets: LightningCLI",
    "test": "refusal and over-refusal rates of a model or checkpoint: LightningCLI",
    "diagnose": "per-head conflict map (conflict_map.json + .png) of a base model: LightningCLI",
    "eval": "lm-eval utility tasks + refusal safety suites on a checkpoint or HF directory -> results JSON",
    "report": "variants x seeds -> safety-utility report (md, html, json, plots)",
    "export": "a cast fit checkpoint -> a Hugging Face save_pretrained directory",
    "demo": "the whole pipeline on the embedded world, offline, in minutes",
}

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

# Argument errors raise (and main prints them as one line) instead of printing the usage wall and exiting;
# abbreviations stay off so a typo such as --out is an error rather than a silent --output.
PARSER_KWARGS = {"exit_on_error": False, "allow_abbrev": False}
MAX_ERROR_CHARS = 600


def _print_help() -> None:
    print("usage: cast SUBCOMMAND [--help] [options]   (add --debug to any command for full tracebacks)\n")
    print("Conflict-Aware Sparse Tuning: diagnose attention heads, fine-tune for safety while skipping the")
    print("high-conflict ones, evaluate and report.\n\nsubcommands:")
    for name, text in SUBCOMMANDS.items():
        print(f"  {name:<10}{text}")


def _save_config_class():
    from lightning.pytorch.cli import SaveConfigCallback

    class SaveConfigWhenStarted(SaveConfigCallback):
        """LightningCLI's config.yaml, written once the run has started (the checkpoint restored) instead of at
        setup: a run that fails to start, e.g. on a damaged --ckpt_path last, leaves the previous config.yaml."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            self._stage = stage

        def _save(self, trainer, pl_module) -> None:
            super().setup(trainer, pl_module, self._stage)  # writes unless already saved; collective on every rank

        def on_fit_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module)

        def on_validation_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module)

        def on_test_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module)

    return SaveConfigWhenStarted


def _cli_class():
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
                    from cast_lightning.module import check_resume_checkpoint

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
                    from cast_lightning.module import check_checkpoint_file

                    check_checkpoint_file(str(checkpoint_path), "resume from an earlier checkpoint or drop --ckpt_path")
                return load_checkpoint(checkpoint_path, *args, **kwargs)

            strategy.load_checkpoint = checked_load_checkpoint

        before_fit = before_validate = before_test = _before_run

    return CASTCLI


def _run_lightning(argv: list[str]) -> None:
    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.module import CASTModule

    _cli_class()(
        CASTModule, SafetyUtilityDataModule, args=argv, save_config_callback=_save_config_class(),
        save_config_kwargs={"overwrite": True}, parser_kwargs=PARSER_KWARGS,
    )


def _run_diagnose(argv: list[str]) -> None:
    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.diagnosis import DiagnosisModule, run_diagnosis

    cli = _cli_class()(
        DiagnosisModule,
        SafetyUtilityDataModule,
        args=argv,
        run=False,
        # Gradients are taken inside predict: no inference mode, no checkpoints or loggers to write.
        trainer_defaults={"inference_mode": False, "logger": False, "enable_checkpointing": False},
        save_config_callback=None,
        parser_kwargs=PARSER_KWARGS,
    )
    run_diagnosis(cli.model, cli.datamodule, cli.trainer)


def _run_function(name: str, argv: list[str]) -> None:
    from jsonargparse import CLI

    if name == "export":
        from cast_lightning.export import export as function
    elif name == "eval":
        from cast_lightning.evaluation import evaluate as function
    elif name == "report":
        from cast_lightning.report import report as function
    else:
        from cast_lightning.demo import demo as function
    CLI(function, args=_bare_flags_to_true(function, argv), prog=f"cast {name}", **PARSER_KWARGS)


def _bare_flags_to_true(function, argv: list[str]) -> list[str]:
    """``--full`` alone means ``--full true`` for the function's bool options (jsonargparse wants a value)."""
    import inspect

    flags = {f"--{name}" for name, p in inspect.signature(function).parameters.items() if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        if arg in flags and following.startswith("-"):
            out.append("true")
    return out


def _config_files(argv: list[str]) -> list[str]:
    """The files given as --config/-c (either form), to name them in a config parse error."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _one_line(text: str) -> str:
    # jsonargparse messages span lines (per union member, per YAML position); stderr gets exactly one.
    return " ".join(str(text).split())


def _argument_error_line(command: str, error: Exception, argv: list[str]) -> str:
    message = _one_line(str(error))
    if len(message) > MAX_ERROR_CHARS:  # e.g. every subclass a class-typed option accepts; the fix follows
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    files = _config_files(argv)
    if files and ("Problems parsing config" in message or "Unexpected config" in message):
        return f"cast {command}: error: {message}; fix the YAML of --config {', '.join(files)} (a mapping of option: value)"
    return f"cast {command}: error: {message}; see 'cast {command} --help'"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CAST_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"cast: error: unknown subcommand {command!r}: use one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    from argparse import ArgumentError

    from cast_lightning.errors import CastError

    # Weight-loading progress bars would bury the one line that matters; Lightning shows training progress.
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not debug:
        # datasets logs a file it cannot parse at ERROR and then raises; the raise becomes the one error line.
        os.environ.setdefault("DATASETS_VERBOSITY", "critical")
        if "datasets" in sys.modules:
            sys.modules["datasets"].utils.logging.set_verbosity(logging.CRITICAL)
    try:
        if command in LIGHTNING_SUBCOMMANDS:
            _run_lightning(argv)
        elif command == "diagnose":
            _run_diagnose(rest)
        else:
            _run_function(command, rest)
    except CastError as error:
        if debug:
            traceback.print_exc()
        print(f"cast {command}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except ArgumentError as error:  # jsonargparse / LightningCLI: unknown key, wrong type, bad --config
        if debug:
            traceback.print_exc()
        print(_argument_error_line(command, error, rest), file=sys.stderr)
        return 2
    except OSError as error:  # an output under a file, a read-only or full disk: the path and what to do
        if debug:
            traceback.print_exc()
        where = f"{error.filename}: " if error.filename else ""
        reason = error.strerror or _one_line(str(error))
        print(f"cast {command}: error: {where}{reason}; check the path and its permissions", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if debug or not (error.name or "").startswith("cast_lightning"):
            raise
        print(f"cast {command}: not built yet in this version ({error.name} is missing)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cast {command}: interrupted; rerun with --ckpt_path last to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
