"""LoRA adapters (``model.lora``), the way every role holds them.

Every role injects the same adapters into its copy of the base model in place
(:func:`add_adapters`), so the module stays the model class the role already drives (generation,
forward hooks, DeepSpeed) and a parameter has the same name everywhere
(``model.layers.0.self_attn.q_proj.lora_A.default.weight``). The learner trains only the adapter
tensors; the EMA teacher is the base model plus an EMA of the adapters; weight sync sends only
adapters. ``lora_B`` starts at zero, so freshly injected adapters leave the base model's function
unchanged whatever ``lora_A`` each process drew.

On disk a LoRA student is a standard PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors`` + the tokenizer), which ``peft.PeftModel.from_pretrained`` loads;
:func:`sdft_ray.models.load_causal_lm` loads such a folder as the merged model, so evaluation,
export and the study read LoRA checkpoints like any other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from sdft_ray.config import LoraSettings

ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: PEFT's file format: keys as in a PeftModel's state dict, without the adapter name
_PEFT_PREFIX = "base_model.model."


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("model.lora needs the peft package: pip install 'sdft-ray[lora]' (or pip install peft)") from None
    return peft


def peft_config(settings: LoraSettings, base_folder: str | os.PathLike[str] | None = None):
    peft = _require_peft()
    targets: str | list[str] = "all-linear" if settings.target_modules == ["all-linear"] else list(settings.target_modules)
    return peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                           target_modules=targets, bias="none", task_type="CAUSAL_LM",
                           base_model_name_or_path=None if base_folder is None else str(base_folder))


def add_adapters(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Inject the adapters into ``model`` in place; only adapter tensors require grad."""
    peft = _require_peft()
    try:
        model = peft.inject_adapter_in_model(peft_config(settings), model, adapter_name=ADAPTER_NAME)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules {settings.target_modules} matched no module of the model "
                         f"({e})") from None
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    return model


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    return ((n, t) for n, t in named if is_adapter(n))


def to_peft_keys(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """In-place adapter names -> PEFT file keys (``...lora_A.default.weight`` ->
    ``base_model.model....lora_A.weight``)."""
    out = {}
    for name, tensor in named:
        if not is_adapter(name):
            raise ValueError(f"{name} is not an adapter tensor")
        out[_PEFT_PREFIX + name.replace(f".{ADAPTER_NAME}.", ".")] = tensor.detach().to("cpu").contiguous()
    return out


def is_adapter_folder(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def base_folder_of(folder: str | os.PathLike[str]) -> Path:
    """The base model an adapter folder was trained on (``base_model_name_or_path``)."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"{folder}/{ADAPTER_CONFIG}: base_model_name_or_path {base!r} is not a local model "
                                "folder")
    return Path(base)


def save_adapter(folder: str | os.PathLike[str], named: Iterable[tuple[str, torch.Tensor]], settings: LoraSettings,
                 base_folder: str | os.PathLike[str]) -> Path:
    """Write a PEFT adapter folder (config + safetensors) from in-place adapter tensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_peft_keys(named), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config(settings, Path(base_folder).resolve()).save_pretrained(str(folder))
    return folder


def load_merged(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
                trust_remote_code: bool = False) -> torch.nn.Module:
    """An adapter folder as a plain model: its base with the adapters merged into the weights."""
    peft = _require_peft()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder_of(folder), dtype=dtype, trust_remote_code=trust_remote_code)
    return peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


def merged_folder(adapter: Mapping[str, torch.Tensor], settings: LoraSettings, base_folder: str | os.PathLike[str],
                  out_dir: str | os.PathLike[str]) -> Path:
    """Save base + ``adapter`` (in-place names) merged as a standalone model folder in ``out_dir``."""
    from sdft_ray.models import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="adapter-"))
    try:
        save_adapter(tmp, adapter.items(), settings, base_folder)
        load_merged(tmp).save_pretrained(str(out_dir), safe_serialization=True)
        load_tokenizer(base_folder).save_pretrained(str(out_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(out_dir)


def settings_of(folder: str | os.PathLike[str]) -> LoraSettings:
    """The :class:`LoraSettings` an adapter folder was saved with."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    return LoraSettings(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                        target_modules=targets)
