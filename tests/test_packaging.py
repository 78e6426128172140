"""pyproject.toml as setuptools reads it: no warnings (deprecations included), and a build
requirement that admits only setuptools versions that understand it."""

from __future__ import annotations

import warnings

import pytest
from packaging.requirements import Requirement

from sdft_ray.runner import REPO_ROOT


def test_setuptools_reads_pyproject_without_warnings(monkeypatch):
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO_ROOT)  # readme and package paths are relative to the project
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
    assert not [c for c in dist.metadata.classifiers or [] if c.startswith("License ::")]  # PEP 639: not both


def test_build_requires_setuptools_with_spdx_license_support():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    (setuptools,) = [Requirement(r) for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    # SPDX `license` strings (PEP 639) arrived in setuptools 77.0.0.
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("77.0.0")
    assert set(project["project"]["optional-dependencies"]) >= {"test", "wandb", "mlflow"}
