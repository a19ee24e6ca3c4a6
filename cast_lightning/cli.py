"""``cast``: the command line. fit/validate/test through LightningCLI; diagnose through LightningCLI with the
DiagnosisModule; eval/report/export/demo as typed functions whose docstrings are their help.

Errors meant for users (``CastError``, bad arguments) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

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


def _print_help() -> None:
    print("usage: cast SUBCOMMAND [--help] [options]   (add --debug to any command for full tracebacks)\n")
    print("Conflict-Aware Sparse Tuning: diagnose attention heads, fine-tune for safety while skipping the")
    print("high-conflict ones, evaluate and report.\n\nsubcommands:")
    for name, text in SUBCOMMANDS.items():
        print(f"  {name:<10}{text}")


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class CASTCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The data module tokenizes with the model's own tokenizer unless told otherwise.
            parser.link_arguments("model.pretrained", "data.tokenizer")

    return CASTCLI


def _run_lightning(argv: list[str]) -> None:
    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.module import CASTModule

    _cli_class()(CASTModule, SafetyUtilityDataModule, args=argv, save_config_kwargs={"overwrite": True})


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
    CLI(function, args=argv, prog=f"cast {name}")


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
    from cast_lightning.errors import CastError

    # Weight-loading progress bars would bury the one line that matters; Lightning shows training progress.
    import transformers

    transformers.utils.logging.disable_progress_bar()
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
        print(f"cast {command}: error: {error}", file=sys.stderr)
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
