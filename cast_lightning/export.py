"""``cast export``: a CASTModule checkpoint -> an ordinary HF ``save_pretrained`` directory."""

from __future__ import annotations

import os
import shutil
import tempfile

from cast_lightning.errors import CastError
from cast_lightning.loading import load_checkpoint_model


def export(*, ckpt_path: str, output_dir: str, safe_serialization: bool = True) -> str:
    """Write the fine-tuned model and its tokenizer as a Hugging Face directory.

    Args:
        ckpt_path: a checkpoint written by ``cast fit`` (a .ckpt file or a sharded checkpoint directory).
        output_dir: the directory to write; replaced atomically (an existing one is kept until the new one is complete).
        safe_serialization: write safetensors (default) rather than pickle-based .bin weights.
    """
    model, tokenizer, checkpoint = load_checkpoint_model(ckpt_path)
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.", dir=parent)
    except OSError as error:
        raise CastError(f"cannot write {output_dir}: {error.strerror}; choose a writable --output_dir") from error
    try:
        model.save_pretrained(staging, safe_serialization=safe_serialization)
        tokenizer.save_pretrained(staging)
        skip = checkpoint.get("cast_skip_heads", [])
        with open(os.path.join(staging, "cast_skip_heads.json"), "w") as handle:
            handle.write(__import__("json").dumps({"skip_heads": skip}) + "\n")
        if os.path.exists(output_dir):
            old = output_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output_dir, old)
            os.replace(staging, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"[cast] exported {ckpt_path} -> {output_dir}")
    return output_dir
