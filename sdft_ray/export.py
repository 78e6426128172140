"""Export a checkpoint's student (or EMA teacher) to a standalone Hugging Face model folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sdft_ray.checkpoint import STATE_FILE


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, weights: str = "student") -> Path:
    """Write ``out_dir`` (atomically) with config, tokenizer and safetensors weights."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    student = checkpoint / "student"
    if not (checkpoint / STATE_FILE).is_file() or not (student / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete sdft-ray checkpoint")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export target {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if weights == "student":
            shutil.copytree(student, tmp, dirs_exist_ok=True)
        elif weights == "teacher":
            ema = checkpoint / "teacher_ema.safetensors"
            if not ema.is_file():
                raise FileNotFoundError(f"{checkpoint} has no EMA teacher (teacher.kind was not 'ema')")
            from safetensors.torch import load_file
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(student)
            model.load_state_dict(load_file(str(ema)), strict=False)
            model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(student).save_pretrained(tmp)
        else:
            raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
