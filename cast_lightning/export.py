"""``cast export``: a CASTModule checkpoint -> an ordinary HF ``save_pretrained`` directory (LoRA adapters merged into
the base weights), or with ``--adapter_only`` the LoRA adapter alone as a peft directory (``adapter_config.json`` +
``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained`` on the base model it names)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from cast_lightning.checkpoints import SKIP_HEADS_KEY, checkpoint_scope, load_checkpoint_model, read_checkpoint
from cast_lightning.errors import CastError
from cast_lightning.io import ensure_writable

# Written into every export: it marks a directory export() may replace (and records the frozen heads).
MARKER = "cast_skip_heads.json"


def _check_output_dir(output_dir: str) -> None:
    """Refuse, before loading anything, an output_dir that cannot be written or is not ours to replace."""
    ensure_writable(output_dir, "--output_dir", directory=True)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.exists(os.path.join(output_dir, MARKER)):
        # Replacing the directory deletes what is in it: only ever do that to an earlier export.
        raise CastError(
            f"--output_dir {output_dir} exists and is not a cast export (no {MARKER}); "
            f"choose a new or empty --output_dir so nothing in it is deleted"
        )


def _fsync_tree(directory: str) -> None:
    # The rename below must publish whole files, also after a power cut (the page cache would be lost).
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


def export(*, ckpt_path: str, output_dir: str, safe_serialization: bool = True, adapter_only: bool = False) -> str:
    """Write the fine-tuned model and its tokenizer as a Hugging Face directory.

    Args:
        ckpt_path: a checkpoint written by ``cast fit`` (a .ckpt file or a sharded checkpoint directory).
        output_dir: the directory to write: new, empty, or an earlier export, which is replaced atomically
            (kept until the new one is complete); any other existing directory is refused.
        safe_serialization: write safetensors (default) rather than pickle-based .bin weights.
        adapter_only: LoRA checkpoints: write the adapter alone (a peft directory naming its base model) instead of
            the merged model.
    """
    output_dir = os.path.abspath(output_dir)
    _check_output_dir(output_dir)
    if adapter_only:
        scope = checkpoint_scope(read_checkpoint(ckpt_path))
        if scope["lora"] is None:
            raise CastError(
                f"--adapter_only needs a LoRA checkpoint, but {ckpt_path} trained --model.trainable "
                f"{scope['trainable'] if isinstance(scope['trainable'], str) else scope['trainable']}: drop --adapter_only to export the whole model"
            )
    # The checkpoint is checked (damaged, pickled, not from cast fit, another model) before anything is written.
    model, tokenizer, checkpoint = load_checkpoint_model(ckpt_path, merge=not adapter_only)
    scope = checkpoint_scope(checkpoint)
    parent, name = os.path.dirname(output_dir), os.path.basename(output_dir)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=parent)
    old = None
    try:
        # A peft model saves only its adapter (adapter_config.json names the base model); a plain one everything.
        model.save_pretrained(staging, safe_serialization=safe_serialization)
        tokenizer.save_pretrained(staging)
        skip = checkpoint.get(SKIP_HEADS_KEY, [])
        record = {"skip_heads": skip}
        if scope["trainable"] != "all":  # the scope it was trained in, and for an adapter the base it applies to
            record.update({"trainable": scope["trainable"], "lora": scope["lora"], "adapter_only": bool(adapter_only),
                           "pretrained": checkpoint["hyper_parameters"]["pretrained"]})
        with open(os.path.join(staging, MARKER), "w") as handle:
            handle.write(json.dumps(record) + "\n")
        _fsync_tree(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; an export is shared like any save_pretrained directory
        if os.path.exists(output_dir):
            # Two renames: a crash between them leaves the old export whole under the unique .old name.
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
            os.replace(output_dir, old)
            os.replace(staging, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        if old is not None and os.path.isdir(old) and not os.path.exists(output_dir):
            os.replace(old, output_dir)  # the second rename failed: put the earlier export back
        elif old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"[cast] exported {ckpt_path} -> {output_dir}")
    return output_dir
