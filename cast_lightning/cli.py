"""``cast``: the command line. Every subcommand is one entry of ``COMMANDS``: its help line and how it runs, a
LightningCLI runner (fit/validate/test, diagnose) or a typed function run by jsonargparse's ``CLI``, whose docstring
is its help (eval, export, report, demo). Each target is imported only when its subcommand runs.

Errors meant for users (``CastError``, bad arguments) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass


def _lightning_run(name: str, target: Callable, rest: list[str]) -> None:
    """``run_lightning(argv)``: LightningCLI's own subcommands take the whole command line."""
    target([name, *rest])


def _rest_run(name: str, target: Callable, rest: list[str]) -> None:
    """``run_diagnose(argv)``: a LightningCLI without subcommands takes the arguments after the name."""
    target(rest)


def _function_run(name: str, target: Callable, rest: list[str]) -> None:
    """A typed function: jsonargparse builds the parser from its signature and docstring."""
    from jsonargparse import CLI

    from cast_lightning.lightning_cli import PARSER_KWARGS

    CLI(target, args=_bare_flags_to_true(target, rest), prog=f"cast {name}", **PARSER_KWARGS)


@dataclass(frozen=True)
class Command:
    """One ``cast`` subcommand: its help line, the ``module:attribute`` it runs (imported when it runs) and how."""

    help: str
    target: str
    run: Callable[[str, Callable, list[str]], None] = _function_run

    def resolve(self) -> Callable:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


COMMANDS: dict[str, Command] = {
    "fit": Command("fine-tune with the head mask (CAST) or without (full fine-tuning): LightningCLI",
                   "cast_lightning.lightning_cli:run_lightning", _lightning_run),
    "validate": Command("validation loss of a model or checkpoint on the validation sets: LightningCLI",
                        "cast_lightning.lightning_cli:run_lightning", _lightning_run),
    "test": Command("refusal and over-refusal rates of a model or checkpoint: LightningCLI",
                    "cast_lightning.lightning_cli:run_lightning", _lightning_run),
    "diagnose": Command("per-head conflict map (conflict_map.json + .png) of a base model: LightningCLI",
                        "cast_lightning.lightning_cli:run_diagnose", _rest_run),
    "eval": Command("lm-eval utility tasks + refusal safety suites on a checkpoint or HF directory -> results JSON",
                    "cast_lightning.evaluation:evaluate"),
    "report": Command("variants x seeds -> safety-utility report (md, html, json, plots)",
                      "cast_lightning.study.commands:report"),
    "export": Command("a cast fit checkpoint -> a Hugging Face save_pretrained directory", "cast_lightning.export:export"),
    "demo": Command("the whole pipeline on the embedded world, offline, in minutes", "cast_lightning.study.commands:demo"),
}

# name -> help line, e.g. for listing the subcommands
SUBCOMMANDS = {name: command.help for name, command in COMMANDS.items()}

MAX_ERROR_CHARS = 600


def _print_help() -> None:
    print("usage: cast SUBCOMMAND [--help] [options]   (add --debug to any command for full tracebacks)\n")
    print("Conflict-Aware Sparse Tuning: diagnose attention heads, fine-tune for safety while skipping the")
    print("high-conflict ones, evaluate and report.\n\nsubcommands:")
    for name, text in SUBCOMMANDS.items():
        print(f"  {name:<10}{text}")


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
    if command not in COMMANDS:
        print(f"cast: error: unknown subcommand {command!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if hasattr(signal, "SIGXFSZ") and signal.getsignal(signal.SIGXFSZ) == signal.SIG_DFL:
        # Past a file-size limit (ulimit -f) a write fails with EFBIG, which io.atomic_save reports in one line
        # (the previous file intact), instead of the process being killed mid-write by the signal.
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from argparse import ArgumentError

    from cast_lightning import lightning_cli
    from cast_lightning.errors import CastError
    from cast_lightning.lightning_cli import Preempted

    lightning_cli.HOLD_START_OUTPUT = not debug  # --debug: the libraries' start-up output as it comes

    # Weight-loading progress bars would bury the one line that matters; Lightning shows training progress.
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not debug:
        # datasets logs a file it cannot parse at ERROR and then raises; the raise becomes the one error line.
        os.environ.setdefault("DATASETS_VERBOSITY", "critical")
        if "datasets" in sys.modules:
            sys.modules["datasets"].utils.logging.set_verbosity(logging.CRITICAL)
    try:
        entry = COMMANDS[command]
        entry.run(command, entry.resolve(), rest)
    except Preempted as stop:  # SIGTERM / SIGUSR1: a resumable checkpoint was saved (cast fit), how to go on
        if debug:
            traceback.print_exc()
        if stop.rank == 0:
            print(f"cast {command}: {stop.line(command)}", file=sys.stderr)
        return stop.exit_code
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
