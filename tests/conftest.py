"""Shared fixtures: a tiny random model with a real tokenizer, tiny data, one local Ray."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from conftest_tokenizer import make_test_tokenizer  # noqa: E402

FACTS = [("Zorbia", "Quelmarsh"), ("Velandor", "Tirrik"), ("Ostravel", "Nimbrel"), ("Karzun", "Plovidar"),
         ("Estmoor", "Vantiss"), ("Drellia", "Omburg"), ("Sarnoth", "Keldwyn"), ("Ulvania", "Brastok")]


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add overhead (a lot of it on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sdft_ray.models import build_random_model

    # A wide initialisation makes the random model's next-token distributions depend on the context,
    # so that the demonstration-conditioned teacher differs measurably from the student.
    return build_random_model(tmp_path_factory.mktemp("tiny_model"), make_test_tokenizer(), initializer_range=0.3)


def write_facts(path: Path, n: int = 8) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            country, capital = FACTS[i % len(FACTS)]
            fh.write(json.dumps({"prompt": f"What is the capital of {country}?",
                                 "demonstration": f"The capital of {country} is {capital}."}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_facts(tmp_path_factory.mktemp("data") / "facts.jsonl")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    from sdft_ray.runner import REPO_ROOT

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}})
    yield ray


def tiny_config(model_dir: Path, data_path: Path, out: Path, **sections):
    """A RunConfig for the tiny model; ``sections`` override whole-section fields, e.g. loss={"alpha": 1}."""
    from sdft_ray.config import config_from_dict

    tree = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path)},
        "rollout": {"num_workers": 1, "max_new_tokens": 8, "batch_size": 8},
        "teacher": {"num_workers": 1, "micro_batch_size": 8},
        "learner": {"num_workers": 1, "lr": 1e-3, "micro_batch_size": 4, "warmup_ratio": 0.0, "lr_schedule": "constant"},
        "schedule": {"prompts_per_step": 4, "max_steps": 2, "seed": 0},
        "placement": {r: {"num_cpus": 0.5, "torch_threads": 1} for r in ("rollout", "teacher", "learner")},
        "fault_tolerance": {"call_timeout_s": 300},
        "output": {"dir": str(out), "loggers": ["jsonl"], "progress": "off"},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return config_from_dict(tree, "tiny_config")
