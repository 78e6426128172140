"""Hugging Face hub ids (``org/name``) resolved from the local caches only: nothing is downloaded.

``model.path`` / ``teacher.model_path``: a model in the hub cache (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), as ``hf download org/name`` or any
``from_pretrained("org/name")`` leaves it. ``data.path``: a dataset in the ``datasets`` cache
(``$HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``), as ``datasets.load_dataset("org/name")``
leaves it; it is read the way ``load_dataset`` reads it offline (``HF_HUB_OFFLINE=1``).
Both caches are looked up where the environment says *now* (the libraries read it once, at
import), so a path set by the launcher or a test counts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdft_ray.errors import DataError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_id(text: str) -> bool:
    """``org/name`` (one slash, hub characters only); whether it exists is not checked."""
    return HUB_ID.fullmatch(text) is not None


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")


def hub_cache_dir() -> Path:
    """The model hub cache: HF_HUB_CACHE, else HF_HOME/hub (huggingface_hub's order)."""
    return Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or _hf_home() / "hub").expanduser()


def datasets_cache_dir() -> Path:
    """The ``datasets`` cache: HF_DATASETS_CACHE, else HF_HOME/datasets (datasets' order)."""
    return Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()


def cached_model_folder(repo_id: str, field: str = "model.path") -> Path:
    """The snapshot folder of hub model ``repo_id`` (revision ``main``) in the local hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except LocalEntryNotFoundError:
        folder = None
    if folder is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{field}: {repo_id!r} is not a local model folder, and the Hugging Face cache {cache} holds no "
            f"complete copy of it (nothing is downloaded at run time). On a machine with internet run "
            f"`hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`), then copy "
            f"that machine's hub cache here (or point HF_HUB_CACHE / HF_HOME at it); or give {field} a local "
            "folder with config.json.")
    return folder


def load_cached_dataset(repo_id: str):
    """Every split of hub dataset ``repo_id`` from the local ``datasets`` cache (a DatasetDict),
    read as ``datasets.load_dataset(repo_id)`` reads it offline: its newest cached version."""
    import datasets
    # The builder load_dataset falls back to offline; using it directly never reaches the network.
    from datasets.packaged_modules.cache.cache import Cache

    cache = datasets_cache_dir()
    try:
        builder = Cache(cache_dir=str(cache), repo_id=repo_id, dataset_name=repo_id.split("/")[-1],
                        version="auto", hash="auto")
        return builder.as_dataset()
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DataError(repo_id, (
            f"data.path names no local file or folder, and the datasets cache {cache} holds no copy of dataset "
            f"{repo_id!r} "
            f"({exc}; nothing is downloaded at run time). On a machine with internet run "
            f"`python -c \"import datasets; datasets.load_dataset('{repo_id}')\"`, then copy that machine's "
            "datasets cache here (or point HF_DATASETS_CACHE / HF_HOME at it); or save the dataset with "
            "save_to_disk(FOLDER) and set data.path to FOLDER.")) from None
