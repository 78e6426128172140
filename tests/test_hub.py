"""Hub ids (``org/name``) for model.path, teacher.model_path and data.path, resolved from FAKE local
Hugging Face caches built here in the libraries' layouts (no network), and the errors when missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdft_ray.data import load_examples
from sdft_ray.errors import DataError
from sdft_ray.models import load_tokenizer, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_model(hub_cache: Path, repo_id: str, model_dir: Path) -> Path:
    """The hub cache layout of ``hf download repo_id``: models--org--name/{refs/main, snapshots/<commit>/...}
    (real caches link snapshot files to blobs/; plain copies read the same)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME, offline; its hub/ and datasets/ are the caches (no *_CACHE variable set)."""
    home = tmp_path / "hf_home"
    for sub in ("hub", "datasets"):
        (home / sub).mkdir(parents=True)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    return home


@pytest.fixture
def hub_cache(hf_home) -> Path:
    return hf_home / "hub"


def test_model_hub_id_resolves_from_the_local_cache(hub_cache, tiny_model_dir):
    snapshot = fake_hub_model(hub_cache, "my-org/tiny-llama", tiny_model_dir)
    folder = resolve_model_path("my-org/tiny-llama")
    assert folder == snapshot
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == len(load_tokenizer(tiny_model_dir))


def test_hub_cache_env_overrides_hf_home(hub_cache, tiny_model_dir, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    snapshot = fake_hub_model(other, "my-org/tiny-llama", tiny_model_dir)
    with pytest.raises(FileNotFoundError):
        resolve_model_path("my-org/tiny-llama")  # not under HF_HOME/hub
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_model_path("my-org/tiny-llama") == snapshot


def test_missing_hub_model_says_how_to_fetch_it(hub_cache):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path("my-org/not-here")
    text = str(err.value)
    assert text.startswith("model.path: 'my-org/not-here'")
    assert "hf download my-org/not-here" in text and "huggingface-cli download my-org/not-here" in text
    assert str(hub_cache) in text and "nothing is downloaded" in text


def test_incomplete_snapshot_is_missing_too(hub_cache, tiny_model_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokenizer.json").write_text("{}")
    fake_hub_model(hub_cache, "my-org/partial", partial)
    with pytest.raises(FileNotFoundError, match="no complete copy"):
        resolve_model_path("my-org/partial")


def test_teacher_hub_id_error_names_teacher_model_path(hub_cache, tiny_model_dir):
    from conftest import tiny_config
    from sdft_ray.variants import get_variant

    fake_hub_model(hub_cache, "my-org/teacher", tiny_model_dir)
    cfg = tiny_config(tiny_model_dir, "unused.jsonl", hub_cache / "run", algorithm={"variant": "opd"},
                      teacher={"kind": "frozen", "model_path": "my-org/teacher"})
    assert get_variant(cfg).teacher_model(tiny_model_dir) == resolve_model_path("my-org/teacher")
    cfg.teacher.model_path = "my-org/other-teacher"
    with pytest.raises(FileNotFoundError, match=r"^teacher\.model_path: 'my-org/other-teacher'.*hf download"):
        get_variant(cfg).teacher_model(tiny_model_dir)


def test_local_folders_still_win_and_bad_paths_still_fail(hub_cache, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "my-org" / "tiny-llama")  # a relative folder shaped like an id
    assert resolve_model_path("my-org/tiny-llama") == Path("my-org/tiny-llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path("empty")


# ---- datasets ------------------------------------------------------------------------------

ROWS = [{"prompt": f"What is {i} + {i}?", "demonstration": f"{i} + {i} = {2 * i}."} for i in range(5)]


def fake_cached_dataset(datasets_cache: Path, repo_id: str, splits: dict[str, list[dict]]) -> Path:
    """The datasets-cache layout ``load_dataset(repo_id)`` leaves: <org>___<name>/<config>/<version>/<hash>/
    with dataset_info.json (config name, splits) and one Arrow stream file per split, <name>-<split>.arrow."""
    import datasets

    name = repo_id.split("/")[1]
    folder = datasets_cache / repo_id.replace("/", "___") / "default" / "0.0.0" / "feedc0ffee"
    folder.mkdir(parents=True)
    split_infos = {}
    for split, rows in splits.items():
        saved = datasets_cache.parent / f"saved-{split}"
        ds = datasets.Dataset.from_list(rows)
        ds.save_to_disk(saved)  # one Arrow stream file: the cache's file format
        (arrow,) = saved.glob("*.arrow")
        shutil.copy(arrow, folder / f"{name}-{split}.arrow")
        split_infos[split] = datasets.SplitInfo(split, num_examples=len(rows), dataset_name=name)
    info = datasets.DatasetInfo(features=ds.features, config_name="default", dataset_name=name,
                                splits=datasets.SplitDict(split_infos))
    info.write_to_directory(str(folder))
    return folder


@pytest.fixture
def datasets_cache(hf_home) -> Path:
    return hf_home / "datasets"


def test_dataset_hub_id_loads_from_the_local_datasets_cache(datasets_cache, monkeypatch):
    import datasets

    fake_cached_dataset(datasets_cache, "my-org/tiny_sums", {"train": ROWS, "test": ROWS[:2]})
    # The fake is what datasets itself reads offline for this id (its own offline fallback).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert datasets.load_dataset("my-org/tiny_sums", split="train", cache_dir=str(datasets_cache)).to_list() == ROWS

    examples = load_examples("my-org/tiny_sums")
    assert [(e.prompt, e.demonstration) for e in examples] == [(r["prompt"], r["demonstration"]) for r in ROWS]
    assert examples[3].source == "my-org/tiny_sums:3"
    assert len(load_examples("my-org/tiny_sums", split="test")) == 2
    assert len(load_examples("my-org/tiny_sums", limit=3)) == 3
    with pytest.raises(DataError, match="split 'validation' not found; available splits: train, test"):
        load_examples("my-org/tiny_sums", split="validation")


def test_missing_cached_dataset_says_how_to_fetch_it(datasets_cache):
    with pytest.raises(DataError) as err:
        load_examples("my-org/not-cached")
    text = str(err.value)
    assert text.startswith("my-org/not-cached: data.path names no local file or folder")
    assert "datasets.load_dataset('my-org/not-cached')" in text and str(datasets_cache) in text
    assert "save_to_disk" in text


def test_missing_file_shaped_like_an_id_is_a_missing_file(datasets_cache):
    with pytest.raises(DataError, match="file not found"):
        load_examples("data/train.jsonl")
