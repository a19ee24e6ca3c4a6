"""The LightningCLI runs behind ``cast fit/validate/test`` and ``cast diagnose``, raising instead of exiting.

``cast_lightning.cli`` turns what these raise into one error line; the study (``cast report`` / ``cast demo``)
calls them directly with a recipe YAML and its per-run overrides, so every run in a report is a ``cast fit`` or
``cast diagnose`` a user can repeat from the run's ``config.yaml``.

Besides the runs themselves, this module keeps three promises:

- Quiet start: the libraries' notes and warnings printed while a run starts (seed, accelerator, ...) are held back
  until training (or prediction) begins and printed then, so a bad input shows only its one error line. Noise that
  says nothing about the run (Lightning's advertising tips, the TensorBoard note when the CSV logger is meant,
  deprecation chatter between library versions) is dropped.
- Resume honesty (``--ckpt_path``): LightningCLI would put every hyperparameter saved in the checkpoint over the
  command line. Here the options this run sets win where that is safe (learning rate, warmup, schedule floor,
  weight decay, generation length, attention kernel; the Trainer's max_steps, clipping, logging and callbacks),
  each announced in one line; any other difference (dtype, KV policy, training data, batch size, precision,
  gradient accumulation) is refused in one line naming the key and both values. Options the run leaves unset take
  the checkpoint's values.
- Preemption: SIGTERM (a cluster's notice) and SIGUSR1 (SLURM's ``--signal``) make ``cast fit`` finish the
  current batch, save ``<default_root_dir>/preempted.ckpt`` atomically and stop with ``Preempted``, which the CLI
  prints as one line on how to resume. Lightning's own SLURM auto-requeue (its SIGUSR1 handler, ``hpc_ckpt_*.ckpt``)
  is left in place when it is active.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

# Argument errors raise (and main prints them as one line) instead of printing the usage wall and exiting;
# abbreviations stay off so a typo such as --out is an error rather than a silent --output.
PARSER_KWARGS = {"exit_on_error": False, "allow_abbrev": False}

PREEMPTED_FILENAME = "preempted.ckpt"


class Preempted(Exception):
    """A run stopped by SIGTERM/SIGUSR1; ``checkpoint`` is the resumable checkpoint saved first (None: none was)."""

    def __init__(self, signal_name: str, checkpoint: str | None, step: int | None, signum: int = signal.SIGTERM,
                 rank: int = 0):
        self.signal_name, self.checkpoint, self.step, self.signum = signal_name, checkpoint, step, int(signum)
        self.rank = rank  # under data parallelism every process stops; rank 0 says so
        super().__init__(self.line("fit"))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by this signal"

    def line(self, command: str) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        if self.checkpoint and command == "fit":
            return (f"stopped by {self.signal_name}{at}; saved {self.checkpoint}; resume: the same command with "
                    f"--ckpt_path {self.checkpoint}")
        if self.checkpoint:
            return f"stopped by {self.signal_name}{at} (saved {self.checkpoint}); rerun the same command to continue"
        return f"stopped by {self.signal_name}{at}; nothing was saved: rerun the same command"


# -- quiet start -------------------------------------------------------------------------------------------------------

_LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")
_DROPPED_WARNINGS = (
    # The CSV logger is what cast means when tensorboard is not installed: the note asks to install it.
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
    # Lightning's own pytree use against a newer torch: nothing the user can act on.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_library_noise() -> None:
    """Drop the library output that says nothing about the run (idempotent)."""
    for pattern in _DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


class HeldOutput:
    """Hold the libraries' log records and warnings while a run starts; ``release()`` prints them, in order, once
    it has started (then everything passes through); leaving the block unreleased (the run failed to start: a bad
    input) drops them, so the error line is all that is printed."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._held: list[tuple] = []
        self._saved: dict | None = None

    def __enter__(self) -> HeldOutput:
        if not self.enabled:
            return self
        held = self._held

        class Hold(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                held.append(("log", self.name, record))

        self._saved = {"showwarning": warnings.showwarning, "loggers": {}}
        for name in _LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved["loggers"][name] = (logger.handlers[:], logger.propagate)
            handler = Hold()
            handler.name = name
            logger.handlers, logger.propagate = [handler], False

        def hold_warning(message, category, filename, lineno, file=None, line=None):
            held.append(("warning", message, category, filename, lineno, file, line))

        warnings.showwarning = hold_warning
        return self

    def _restore(self) -> None:
        if self._saved is None:
            return
        for name, (handlers, propagate) in self._saved["loggers"].items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        warnings.showwarning = self._saved["showwarning"]
        self._saved = None

    def release(self) -> None:
        """Print what was held (the run has started) and let everything through from now on."""
        if self._saved is None:
            return
        self._restore()
        held, self._held = self._held, []
        for item in held:
            if item[0] == "log":
                logging.getLogger(item[1]).handle(item[2])
            else:
                warnings.showwarning(*item[1:])

    def __exit__(self, *exc) -> None:
        self._restore()
        self._held = []


def release_callback(held: HeldOutput):
    import lightning as L

    class ReleaseHeldOutput(L.Callback):
        """Prints the held start-up output when the run starts (before the model summary and progress bar)."""

        def on_fit_start(self, trainer, pl_module) -> None:
            held.release()

        on_validation_start = on_test_start = on_predict_start = on_fit_start

    return ReleaseHeldOutput()


# -- resume honesty ----------------------------------------------------------------------------------------------------

# Applied when this run sets them (the optimizer and schedule pick them up from the resumed step on).
SAFE_MODEL_KEYS = frozenset({"learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay", "max_new_tokens",
                             "attn_implementation"})
# The mask: the module compares the heads themselves (a map at another path with the same heads resumes).
MASK_KEYS = frozenset({"conflict_map", "skip_heads"})
# Never taken from a checkpoint: the model is checked separately (check_resume_checkpoint), and running a
# repository's code must be asked for by this run, not inherited from a file.
OWN_MODEL_KEYS = frozenset({"pretrained", "trust_remote_code"})
# Data options that do not change what trains, or in which order.
SAFE_DATA_KEYS = frozenset({"safety_val_files", "utility_val_files", "harmful_eval_files", "benign_eval_files",
                            "eval_batch_size", "num_workers", "diagnosis_samples"})
PATH_DATA_KEYS = frozenset({"safety_files", "utility_files", "tokenizer"})
# Trainer settings recorded in every cast fit checkpoint (ResumeGuard's state): refused or applied on resume.
REFUSED_TRAINER_KEYS = ("accumulate_grad_batches", "precision")
APPLIED_TRAINER_KEYS = ("max_steps", "gradient_clip_val", "world_size")


def _show(value) -> str:
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _same_path(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return all(_same_path(x, y) for x, y in zip(a, b))
    return False


def _plain(value):
    """A Namespace/dict/tuple from jsonargparse or a checkpoint as plain JSON-like values, to compare."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _refusal(ckpt_path: str, refused: list[tuple[str, object, object]]) -> str:
    listed = ", ".join(f"{key} (checkpoint {_show(saved)}, this run {_show(run)})" for key, saved, run in refused)
    flags = " ".join(f"--{key}={_show(saved)}" for key, saved, _ in refused)
    return (f"cannot resume from {ckpt_path}: this run differs from the checkpoint in {listed}; resume with the "
            f"checkpoint's values ({flags}), or drop --ckpt_path to start a new run")


def _announce(ckpt_path: str, key: str, saved, run) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(f"[cast] --ckpt_path {ckpt_path}: {key} is {_show(run)} in this run, {_show(saved)} in the checkpoint: "
              f"this run's value applies", flush=True)


def reconcile_resume(ckpt_path: str, checkpoint: dict, model: dict, data: dict | None, explicit: set[str] | None,
                     fit: bool = True) -> dict:
    """Compare this run's model (and data) options with the checkpoint's; return the model options to take from the
    checkpoint (those this run does not set), announce the safe differences this run sets, and raise one CastError
    line for any other difference. ``explicit``: the model options this run sets (None: all of them)."""
    from cast_lightning.errors import CastError

    saved_model = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    mask_set = explicit is None or bool(MASK_KEYS & explicit)  # a map or a head list given here: no other from there
    inherit, refused, applied = {}, [], []
    for key, saved in saved_model.items():
        if key not in model or key in OWN_MODEL_KEYS:
            continue
        saved, run = _plain(saved), _plain(model[key])
        if explicit is not None and key not in explicit:
            if key in MASK_KEYS and mask_set:
                continue
            if saved != run:
                inherit[key] = saved  # unset here: the checkpoint's value, as LightningCLI does
            continue
        if key in MASK_KEYS or saved == run:
            continue
        if key in SAFE_MODEL_KEYS or not fit:
            applied.append((f"model.{key}", saved, run))
        else:
            refused.append((f"model.{key}", saved, run))
    if fit:
        _check_mask(ckpt_path, checkpoint, model, explicit)
    saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
    if fit and data is not None:
        for key, saved in saved_data.items():
            if key not in data:
                continue
            saved, run = _plain(saved), _plain(data[key])
            if saved == run or (key in PATH_DATA_KEYS and _same_path(saved, run)):
                continue
            if key == "tokenizer" and "pretrained" in saved_model and _same_path(saved, _plain(model.get("pretrained"))):
                continue  # linked to --model.pretrained, which check_resume_checkpoint has matched
            (applied if key in SAFE_DATA_KEYS else refused).append((f"data.{key}", saved, run))
    if refused:
        raise CastError(_refusal(ckpt_path, refused))
    for key, saved, run in applied:
        _announce(ckpt_path, key, saved, run)
    return inherit


def _check_mask(ckpt_path: str, checkpoint: dict, model: dict, explicit: set[str] | None) -> None:
    """A map or head list this run gives must skip the heads the checkpoint was trained with (a map at another path
    with the same heads resumes): a resumed run with another mask would be neither run."""
    from cast_lightning.checkpoints import SKIP_HEADS_KEY
    from cast_lightning.errors import CastError

    if SKIP_HEADS_KEY not in checkpoint:
        return
    given = [key for key in ("skip_heads", "conflict_map") if model.get(key) is not None
             and (explicit is None or key in explicit)]
    if len(given) != 1:
        return  # none: the checkpoint's mask is kept; both: the module refuses the pair itself
    if given == ["skip_heads"]:
        heads = model["skip_heads"]
    else:
        from cast_lightning.conflict import ConflictMap

        try:
            heads = ConflictMap.from_json(model["conflict_map"]).skip
        except (CastError, OSError, ValueError):
            return  # an unreadable map: the module names what is wrong with it
    saved = sorted([int(layer), int(head)] for layer, head in checkpoint[SKIP_HEADS_KEY])
    asked = sorted({(int(layer), int(head)) for layer, head in heads})
    if [list(h) for h in asked] != saved:
        raise CastError(
            f"cannot resume from {ckpt_path}: this run's --model.{given[0]} skips heads {json.dumps([list(h) for h in asked])} "
            f"but the checkpoint was trained skipping {json.dumps(saved)}; resume without --model.{given[0]} (the "
            f"checkpoint's mask is kept), or drop --ckpt_path to start a new run"
        )


def trainer_settings(trainer) -> dict:
    return {"max_steps": trainer.max_steps, "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision), "gradient_clip_val": trainer.gradient_clip_val,
            "world_size": trainer.world_size}


def resume_guard_class():
    import lightning as L

    class ResumeGuard(L.Callback):
        """Records the Trainer settings a resume must match in every checkpoint and checks them on resume; applies
        this run's optimizer hyperparameters (learning rate, weight decay) and schedule over the restored ones.

        Lightning restores the optimizer's param groups (their learning rate and weight decay) and the scheduler's
        base rates from the checkpoint: a changed ``--model.learning_rate`` would be ignored. The fresh optimizer
        (built from this run's options) is remembered when fit starts, and once the checkpoint is restored its
        ``initial_lr``/``weight_decay`` and the schedule's base rates replace the restored ones; the current rate is
        recomputed from the schedule at the restored step. Unchanged options give the same numbers bit for bit."""

        def __init__(self) -> None:
            self._trainer = None
            self._fresh: list | None = None

        def setup(self, trainer, pl_module, stage: str) -> None:
            self._trainer = trainer

        def state_dict(self) -> dict:
            return {"trainer": trainer_settings(self._trainer)} if self._trainer is not None else {}

        def load_state_dict(self, state: dict) -> None:
            from cast_lightning.errors import CastError

            saved, trainer = state.get("trainer"), self._trainer
            if not saved or trainer is None:
                return
            now = trainer_settings(trainer)
            where = trainer.ckpt_path
            refused = [(f"trainer.{k}", saved[k], now[k]) for k in REFUSED_TRAINER_KEYS if k in saved and saved[k] != now[k]]
            if refused:
                raise CastError(_refusal(str(where), refused))
            for key in APPLIED_TRAINER_KEYS:
                if key in saved and saved[key] != now[key]:
                    _announce(str(where), f"trainer.{key}", saved[key], now[key])

        def on_fit_start(self, trainer, pl_module) -> None:
            # Built from this run's options, not yet overwritten by the checkpoint (restored after this hook).
            self._fresh = [
                ([{k: g[k] for k in ("initial_lr", "weight_decay") if k in g} for g in optimizer.param_groups])
                for optimizer in trainer.optimizers
            ]

        def on_train_start(self, trainer, pl_module) -> None:
            if not trainer.ckpt_path or self._fresh is None or len(self._fresh) != len(trainer.optimizers):
                return
            import torch

            for optimizer, fresh in zip(trainer.optimizers, self._fresh):
                if len(fresh) != len(optimizer.param_groups):
                    continue
                for group, values in zip(optimizer.param_groups, fresh):
                    group.update(values)
            for config in trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                    groups = scheduler.optimizer.param_groups
                    scheduler.base_lrs = [group["initial_lr"] for group in groups]
                    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
                        group["lr"] = base * factor(scheduler.last_epoch)
                    scheduler._last_lr = [group["lr"] for group in groups]
            self._fresh = None

    return ResumeGuard


# -- preemption --------------------------------------------------------------------------------------------------------


def save_checkpoint_atomically(trainer, final: Path) -> None:
    """``trainer.save_checkpoint`` under a temporary name beside ``final``, then renamed over it (a directory for
    sharded strategies is moved aside first) and the directory fsynced: a crash leaves the old file or none. Call it
    on every rank (saving is collective)."""
    import shutil

    from cast_lightning.io import fsync_directory

    tmp = Path(trainer.strategy.broadcast(str(final.with_name(f".{final.name}.tmp-{os.getpid()}"))))
    trainer.save_checkpoint(tmp, weights_only=False)  # everything a resume needs (optimizer, loops, data position)
    trainer.strategy.barrier("cast_checkpoint_written")
    if trainer.is_global_zero:
        if tmp.is_file():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.is_dir():  # a sharded checkpoint directory cannot be renamed over: move it aside first
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        fsync_directory(final.parent)  # the rename itself survives a power cut
    trainer.strategy.barrier("cast_checkpoint_renamed")


def preemption_class():
    import lightning as L

    class PreemptionCheckpoint(L.Callback):
        """SIGTERM or SIGUSR1 during ``fit``: Lightning's signal connector stops the run after the current batch
        (``SIGTERMException``); this saves ``<default_root_dir>/preempted.ckpt`` first, atomically, as a checkpoint
        that resumes exactly (the data position, optimizer, schedule and mask), and tags the exception for the one
        line ``cast`` prints.

        SIGTERM is Lightning's own (its handler, under DDP broadcast from rank 0 so every rank stops at the same
        batch). SIGUSR1 is routed to the same handler unless something already handles it, i.e. Lightning's SLURM
        auto-requeue, which then saves its ``hpc_ckpt`` and requeues the job as before.
        """

        def __init__(self, filename: str = PREEMPTED_FILENAME) -> None:
            self.filename = filename
            self.signum: int | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            # Lightning has installed its handlers by now (after the checkpoint was restored, before this hook).
            import threading

            if threading.current_thread() is not threading.main_thread():
                return
            lightning_sigterm = signal.getsignal(signal.SIGTERM)
            if not callable(lightning_sigterm):
                return

            def on_sigterm(signum, frame):
                self.signum = self.signum or signum
                lightning_sigterm(signum, frame)

            signal.signal(signal.SIGTERM, on_sigterm)  # Lightning's teardown restores the handlers of before fit
            if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGUSR1, on_sigterm)

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            from lightning.pytorch.trainer.states import TrainerFn
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
                return
            signum = self.signum or signal.SIGTERM
            exception.cast_signal = (signal.Signals(signum).name, int(signum))
            exception.cast_step = trainer.global_step
            exception.cast_rank = trainer.global_rank
            root = str(trainer.default_root_dir)
            final = Path(root) / self.filename
            if "://" in root:
                trainer.save_checkpoint(f"{root.rstrip('/')}/{self.filename}", weights_only=False)
            else:
                save_checkpoint_atomically(trainer, final)
            exception.cast_checkpoint = str(final) if "://" not in root else f"{root.rstrip('/')}/{self.filename}"

    return PreemptionCheckpoint


def preempted_from(exception: BaseException) -> Preempted:
    name, signum = getattr(exception, "cast_signal", ("SIGTERM", int(signal.SIGTERM)))
    return Preempted(name, getattr(exception, "cast_checkpoint", None), getattr(exception, "cast_step", None), signum,
                     getattr(exception, "cast_rank", 0))


# -- the CLI -----------------------------------------------------------------------------------------------------------


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


def _explicit_keys(parser, args, subcommand: str | None, group: str) -> set[str] | None:
    """The ``group`` options (e.g. model) this command line sets itself, in a --config file or as flags; None if
    that cannot be told (then every option counts as set)."""
    if args is None:
        return None
    try:
        given = parser.parse_args(args, defaults=False)
    except Exception:  # noqa: BLE001 - e.g. a required option given only through a link: count everything as set
        return None
    section = given.get(subcommand) if subcommand else given
    section = section.get(group) if section is not None else None
    if section is None:
        return set()
    return set(_plain(section))


def cli_class(held: HeldOutput | None = None):
    from lightning.pytorch.cli import LightningCLI

    class CASTCLI(LightningCLI):
        def __init__(self, *args, **kwargs) -> None:
            # Seed 0 unless the command sets one: Lightning's own default (True) seeds 0 too, but with a warning,
            # and in a process that already ran a seeded fit it would reuse that seed (PL_GLOBAL_SEED).
            kwargs.setdefault("seed_everything_default", 0)
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            # The data module tokenizes with the model's own tokenizer unless told otherwise.
            parser.link_arguments("model.pretrained", "data.tokenizer")

        def parse_arguments(self, parser, args) -> None:
            # cast always passes the command line as ``args`` (also when it came from sys.argv, minus --debug, or
            # from the study): LightningCLI's warning about ``args`` beside sys.argv is about a mistake cast cannot
            # make, so parse without it.
            if isinstance(args, dict) or hasattr(args, "as_dict"):  # a config object, as LightningCLI allows
                self._args = None
                self.config = parser.parse_object(args)
                return
            self._args = list(args) if args is not None else sys.argv[1:]
            self.config = parser.parse_args(self._args)

        def _parse_ckpt_path(self) -> None:
            """LightningCLI reads --ckpt_path's hyperparameters over the config here. Instead: check the file
            (a truncated, pickled or foreign checkpoint is one line), take the checkpoint's values only for the
            options this run leaves unset, and apply or refuse the ones it sets (``reconcile_resume``)."""
            self.checked_checkpoint = None
            self.reconciled: set[str] = set()
            subcommand = self.config.get("subcommand")
            self._explicit_model = None
            if not subcommand:
                return
            self._explicit_model = _explicit_keys(self.parser, self._args, subcommand, "model")
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if not (ckpt_path and os.path.isfile(ckpt_path)):
                return  # last / best / hpc resolve inside the Trainer: checked when it loads the file
            from cast_lightning.checkpoints import check_resume_checkpoint

            section = self.config[subcommand]
            checkpoint = check_resume_checkpoint(ckpt_path, section.model.get("pretrained"))
            if "_class_path" in (checkpoint.get("hyper_parameters") or {}):
                return super()._parse_ckpt_path()  # subclass mode is not cast's: LightningCLI's own behaviour
            inherit = reconcile_resume(str(ckpt_path), checkpoint, _plain(section.model), _plain(section.get("data")),
                                       self._explicit_model, fit=subcommand == "fit")
            if inherit:
                self.config = self.parser.parse_object({subcommand: {"model": inherit}}, self.config)
            self.checked_checkpoint = checkpoint
            self.reconciled.add(os.path.realpath(ckpt_path))

        def _before_run(self) -> None:
            """Checks after the model is built and before the Trainer writes its config, logs or checkpoints."""
            from cast_lightning.io import ensure_writable

            root = str(self.trainer.default_root_dir)
            if "://" not in root:  # remote roots (s3://...) are the logger's business
                ensure_writable(Path(root) / "config.yaml", "--trainer.default_root_dir")
            if self.checked_checkpoint is not None:
                self.model.check_checkpoint_fits(self.checked_checkpoint)
                self.checked_checkpoint = None  # memory-mapped: let the file go before training
            self._check_named_checkpoint()
            if held is not None:
                self.trainer.callbacks.insert(0, release_callback(held))
            if self.subcommand == "fit":
                self.trainer.callbacks.insert(0, resume_guard_class()())
                self.trainer.callbacks.append(preemption_class()())
                # A Hugging Face model loads in eval mode and Lightning keeps the mode it finds: fine-tune in train
                # mode (dropout as the model defines it), as Lightning's eval-mode warning asks.
                self.model.train()
            # --ckpt_path last/best resolve inside the Trainer: check whatever file it picks before it is read.
            strategy = self.trainer.strategy
            load_checkpoint = strategy.load_checkpoint

            def checked_load_checkpoint(checkpoint_path, *args, **kwargs):
                if os.path.isfile(checkpoint_path):
                    from cast_lightning.checkpoints import RESUME_FIX, check_checkpoint_file

                    checkpoint = check_checkpoint_file(str(checkpoint_path), RESUME_FIX)
                    if os.path.realpath(checkpoint_path) not in self.reconciled:
                        self._reconcile_loaded(str(checkpoint_path), checkpoint)
                return load_checkpoint(checkpoint_path, *args, **kwargs)

            strategy.load_checkpoint = checked_load_checkpoint

        def _check_named_checkpoint(self) -> None:
            """--ckpt_path best / hpc name checkpoints Lightning looks up itself; where there is none it raises a
            ValueError deep in the Trainer. Say so here, in one line, before anything is written."""
            from cast_lightning.errors import CastError

            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            if ckpt_path == "best":
                raise CastError(
                    f"--ckpt_path best means the best checkpoint of an earlier fit in this same process, which a new "
                    f"cast {self.subcommand} never has: give that checkpoint's path, or --ckpt_path last"
                )
            if ckpt_path == "hpc" and getattr(self.trainer._checkpoint_connector, "_hpc_resume_path", "") is None:
                raise CastError(
                    f"--ckpt_path hpc: no hpc_ckpt_*.ckpt in {self.trainer.default_root_dir} (Lightning's SLURM requeue "
                    f"writes them there): give a checkpoint's path, or --ckpt_path last"
                )

        def _reconcile_loaded(self, checkpoint_path: str, checkpoint: dict) -> None:
            """--ckpt_path last/best/hpc: the model is built from this run's options (the defaults where it sets
            none); the same rules, then the checkpoint's values for the options this run leaves unset -- applied
            where that is safe, refused otherwise (the run would silently train another model)."""
            from cast_lightning.checkpoints import check_resume_checkpoint
            from cast_lightning.errors import CastError

            check_resume_checkpoint(checkpoint_path, self.model.hparams.get("pretrained"))
            model = _plain(dict(self.model.hparams))
            data = _plain(dict(self.datamodule.hparams)) if self.datamodule is not None else None
            fit = self.subcommand == "fit"
            inherit = reconcile_resume(checkpoint_path, checkpoint, model, data, self._explicit_model, fit=fit)
            refused = []
            for key, saved in inherit.items():
                if key in MASK_KEYS:
                    continue  # the module adopts the checkpoint's heads itself (CASTModule.on_load_checkpoint)
                if key in SAFE_MODEL_KEYS or not fit:
                    self.model.hparams[key] = saved
                    self.config[self.subcommand]["model"][key] = saved  # config.yaml records what ran
                else:
                    refused.append((f"model.{key}", saved, model[key]))
            if refused:
                raise CastError(_refusal(checkpoint_path, refused))
            self.reconciled.add(os.path.realpath(checkpoint_path))

        before_fit = before_validate = before_test = _before_run

    return CASTCLI


# cast --debug sets this False: the libraries' start-up output as it comes.
HOLD_START_OUTPUT = True


def _held_output() -> HeldOutput:
    return HeldOutput(enabled=HOLD_START_OUTPUT)


def run_lightning(argv: list[str]) -> None:
    """``cast fit|validate|test ARGV``: LightningCLI with CASTModule and the data module (``argv`` starts with the
    subcommand)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.module import CASTModule

    quiet_library_noise()
    with _held_output() as held:
        try:
            cli_class(held)(
                CASTModule, SafetyUtilityDataModule, args=argv, save_config_callback=save_config_class(),
                save_config_kwargs={"overwrite": True}, parser_kwargs=PARSER_KWARGS,
            )
        except SIGTERMException as stop:  # a SystemExit with code None: the process would exit 0
            raise preempted_from(stop) from stop


def run_diagnose(argv: list[str]) -> None:
    """``cast diagnose ARGV``: the conflict map of ``--model.pretrained`` (``argv`` without the subcommand)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cast_lightning.data.datamodule import SafetyUtilityDataModule
    from cast_lightning.diagnosis import DIAGNOSIS_TRAINER_DEFAULTS, DiagnosisModule, run_diagnosis

    quiet_library_noise()
    with _held_output() as held:
        try:
            cli = cli_class(held)(
                DiagnosisModule,
                SafetyUtilityDataModule,
                args=argv,
                run=False,
                trainer_defaults=DIAGNOSIS_TRAINER_DEFAULTS,
                save_config_callback=None,
                parser_kwargs=PARSER_KWARGS,
            )
            cli.trainer.callbacks.insert(0, release_callback(held))
            run_diagnosis(cli.model, cli.datamodule, cli.trainer)
        except SIGTERMException as stop:
            raise preempted_from(stop) from stop
    root = str(cli.trainer.default_root_dir)
    if cli.trainer.is_global_zero and "://" not in root and Path(root).resolve() != Path.cwd().resolve():
        from cast_lightning.io import atomic_write_text

        # Beside the map: the resolved config that repeats this diagnosis (cast diagnose --config <it>).
        atomic_write_text(Path(root) / "config.yaml", cli.parser.dump(cli.config, skip_none=False))
