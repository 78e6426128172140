"""Export a checkpoint's student (or EMA teacher) to a standalone Hugging Face model folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sdft_ray.checkpoint import STATE_FILE


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, weights: str = "student",
                      adapter_only: bool = False) -> Path:
    """Write ``out_dir`` (atomically) with config, tokenizer and safetensors weights. A LoRA run's
    checkpoint exports merged into its base model, or with ``adapter_only`` as the PEFT adapter
    folder alone (``peft.PeftModel.from_pretrained(base, out_dir)``)."""
    from sdft_ray.lora import is_adapter_folder
    from sdft_ray.models import is_model_folder

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    student = checkpoint / "student"
    if not (checkpoint / STATE_FILE).is_file() or not is_model_folder(student):
        raise FileNotFoundError(f"{checkpoint} is not a complete sdft-ray checkpoint")
    lora = is_adapter_folder(student)
    if adapter_only and not lora:
        raise ValueError(f"{checkpoint} holds full weights, not a LoRA adapter (the run had no model.lora)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export target {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if weights not in ("student", "teacher"):
            raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
        if lora:
            _export_lora(checkpoint, student, tmp, weights, adapter_only)
        elif weights == "student":
            shutil.copytree(student, tmp, dirs_exist_ok=True)
        else:
            from safetensors.torch import load_file
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(student)
            model.load_state_dict(load_file(str(_ema_file(checkpoint))), strict=False)
            model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(student).save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _ema_file(checkpoint: Path) -> Path:
    ema = checkpoint / "teacher_ema.safetensors"
    if not ema.is_file():
        raise FileNotFoundError(f"{checkpoint} has no EMA teacher (teacher.kind was not 'ema')")
    return ema


def _export_lora(checkpoint: Path, student: Path, out: Path, weights: str, adapter_only: bool) -> None:
    """The student adapter (or the EMA of it), merged into the base model or as the adapter alone."""
    from safetensors.torch import load_file

    from sdft_ray.lora import base_folder_of, load_merged, merged_folder, save_adapter, settings_of
    from sdft_ray.models import load_tokenizer

    base = base_folder_of(student)
    if weights == "student" and adapter_only:
        shutil.copytree(student, out, dirs_exist_ok=True)
    elif weights == "student":
        load_merged(student).save_pretrained(str(out), safe_serialization=True)
        load_tokenizer(student).save_pretrained(str(out))
    elif adapter_only:
        save_adapter(out, load_file(str(_ema_file(checkpoint))).items(), settings_of(student), base)
        load_tokenizer(student).save_pretrained(str(out))
    else:
        merged_folder(load_file(str(_ema_file(checkpoint))), settings_of(student), base, out)
