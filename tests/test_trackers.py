"""wandb (offline) and MLflow (local store) for real: the logged metrics read back with each
tracker's own reader equal metrics.jsonl; run name, tags and config are recorded; a resumed run
continues the same tracker run; a missing package is a clear error before anything starts."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import tiny_config
from sdft_ray.config import config_from_dict
from sdft_ray.errors import ConfigError
from sdft_ray.metrics import MetricsLogger, read_metrics, require_logger_packages
from sdft_ray.trackers import flat_params
from wandb_offline import offline_runs

RECORDS = {1: {"loss": 0.5, "divergence": 0.25, "time/sync": 0.125, "examples": [1, 2], "checkpoint": "x"},
           2: {"loss": 0.375, "divergence": 0.1875, "time/sync": 0.0625},
           3: {"loss": 0.25, "divergence": 0.125, "time/sync": 0.03125}}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()  # file:///...
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow 3 keeps the file store for existing users only (sqlite needs the full mlflow package).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off", "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path / "wandb_dir"


def output_config(tmp_path, **output):
    return config_from_dict({"output": {"dir": str(tmp_path / "run"), **output}})


def mlflow_history(client, run_id: str) -> dict[int, dict[str, float]]:
    """step -> {metric: value}; a step logged twice (a resumed run re-runs it) keeps its latest value."""
    out: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            out.setdefault(m.step, {})[key] = m.value
    return out


def jsonl_scalars(run_dir) -> dict[int, dict[str, float]]:
    """metrics.jsonl's finite numbers per step (what a tracker can plot)."""
    def number(v):
        return type(v) in (int, float) and math.isfinite(v)
    return {r["step"]: {k: v for k, v in r.items() if k not in ("step", "time") and number(v)}
            for r in read_metrics(run_dir / "metrics.jsonl")}


def test_mlflow_records_metrics_config_tags_and_resumes_the_same_run(tmp_path, mlflow_store):
    cfg = output_config(tmp_path, loggers=["mlflow"], tags=["smoke", "cpu"], project="sdft-tests")
    run_dir = tmp_path / "run"
    log = MetricsLogger.from_config(cfg, run_dir)
    for step in (1, 2, 3):
        log.log(step, RECORDS[step])
    log.close()
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    run = mlflow_store.get_run(run_id)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"  # default name: the run folder's
    assert {"smoke", "cpu"} <= set(run.data.tags)
    assert mlflow_store.get_experiment(run.info.experiment_id).name == "sdft-tests"
    assert run.data.params["output.project"] == "sdft-tests" and run.data.params["loss.alpha"] == "0.0"
    assert run.data.params["output.tags"] == '["smoke", "cpu"]'
    assert mlflow_history(mlflow_store, run_id) == jsonl_scalars(run_dir) == {
        1: {"loss": 0.5, "divergence": 0.25, "time/sync": 0.125},
        2: {"loss": 0.375, "divergence": 0.1875, "time/sync": 0.0625},
        3: {"loss": 0.25, "divergence": 0.125, "time/sync": 0.03125}}

    # Resume from a checkpoint at step 2: the same MLflow run, step 3 re-run, then step 4.
    log = MetricsLogger.from_config(cfg, run_dir, resume_step=2)
    log.log(3, {"loss": 0.3})
    log.log(4, {"loss": 0.2})
    log.close()
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] == run_id
    assert len(mlflow_store.search_runs([run.info.experiment_id])) == 1
    history = mlflow_history(mlflow_store, run_id)
    assert [history[s]["loss"] for s in (1, 2, 3, 4)] == [0.5, 0.375, 0.3, 0.2]
    assert {s: v["loss"] for s, v in jsonl_scalars(run_dir).items()} == {1: 0.5, 2: 0.375, 3: 0.3, 4: 0.2}
    assert mlflow_store.get_run(run_id).info.status == "FINISHED"

    # A fresh run (no --resume) in the same folder is a new MLflow run.
    MetricsLogger.from_config(cfg, run_dir).close()
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] != run_id


def test_wandb_offline_run_holds_the_metrics_and_resumes_the_same_run(tmp_path, wandb_offline):
    cfg = output_config(tmp_path, loggers=["wandb"], tags=["smoke"], run_name="my-run")
    run_dir = tmp_path / "run"
    log = MetricsLogger.from_config(cfg, run_dir)
    for step in (1, 2, 3):
        log.log(step, RECORDS[step])
    log.close()
    (first,) = offline_runs(wandb_offline)
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert first.run_id == run_id and first.name == "my-run" and first.tags == ["smoke"]
    assert first.config["output"]["run_name"] == "my-run" and first.config["loss"]["alpha"] == 0.0
    assert first.history == jsonl_scalars(run_dir)
    assert first.history[2] == {"loss": 0.375, "divergence": 0.1875, "time/sync": 0.0625}

    time.sleep(1.1)  # wandb names offline run folders by their start second
    log = MetricsLogger.from_config(cfg, run_dir, resume_step=3)
    log.log(4, {"loss": 0.2})
    log.close()
    first, second = offline_runs(wandb_offline)
    assert second.run_id == run_id and second.history == {4: {"loss": 0.2}}


def test_wandb_offline_run_is_whole_on_disk_when_close_returns(tmp_path, wandb_offline, monkeypatch):
    """When close() returns, no process of ours still has the run's record log open (wandb-core
    writes its tail and closes it only when it handles run.finish()'s notice, asynchronously;
    here it never gets one) and the log reads back whole: past 32 KiB blocks, with a record across
    block boundaries (a 40 kB run name)."""
    from wandb.sdk.lib.service.service_connection import ServiceConnection

    monkeypatch.setattr(ServiceConnection, "inform_finish", lambda self, run_id: None)
    name = "n" * 40_000
    cfg = output_config(tmp_path, loggers=["wandb"], run_name=name)
    run_dir = tmp_path / "run"
    log = MetricsLogger.from_config(cfg, run_dir)
    for step in range(1, 301):
        log.log(step, {"loss": 1.0 / step, "divergence": step / 1024})
    log.close()
    (folder,) = Path(wandb_offline, "wandb").glob("offline-run-*")
    (path,) = folder.glob("run-*.wandb")
    assert [p.name() for p in psutil.Process().children(recursive=True)
            if any(f.path == str(path) for f in p.open_files())] == []
    (run,) = offline_runs(wandb_offline)
    assert path.stat().st_size > 2 * 32 * 1024
    assert run.run_id == json.loads((run_dir / "trackers.json").read_text())["wandb"] and run.name == name
    assert run.history == jsonl_scalars(run_dir) and len(run.history) == 300


def test_missing_tracker_package_names_the_key_and_the_install(monkeypatch, tmp_path):
    for name, module in (("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
        cfg = output_config(tmp_path, loggers=[name])
        with pytest.raises(ConfigError) as err:
            require_logger_packages(cfg.output)
        assert err.value.field == "output.loggers"
        assert f"'{name}'" in str(err.value) and "pip install" in str(err.value)
        if name != "tensorboard":
            assert f"sdft-ray[{name}]" in str(err.value)
        with pytest.raises(ConfigError):  # the logger itself says the same
            MetricsLogger.from_config(cfg, tmp_path / "run")
    require_logger_packages(output_config(tmp_path, loggers=["jsonl"]).output)


def test_missing_tracker_package_stops_the_cli_before_ray_starts(monkeypatch, tiny_model_dir, tiny_data, tmp_path,
                                                                  capsys):
    import sdft_ray.runner
    from sdft_ray.cli import main

    ray_starts = []
    monkeypatch.setattr(sdft_ray.runner, "init_ray", lambda cfg: ray_starts.append(cfg))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    code = main(["train", "--set", f"model.path={tiny_model_dir}", "--set", f"data.path={tiny_data}",
                 "--set", f"output.dir={tmp_path / 'run'}", "--set", "output.loggers=[mlflow]"])
    err = capsys.readouterr().err
    assert code == 2 and "output.loggers" in err and "sdft-ray[mlflow]" in err, err
    assert ray_starts == [] and not (tmp_path / "run").exists()


def test_flat_params():
    assert dict(flat_params({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": {}, "g": None})) == {
        "a.b": "1", "a.c.d": "x", "e": "[1, 2]", "f": "{}", "g": "null"}


@pytest.mark.slow
def test_training_run_resumed_continues_both_tracker_runs(ray_local, tiny_model_dir, tiny_data, tmp_path,
                                                          mlflow_store, wandb_offline):
    """3 steps, a checkpoint at 2, resume: steps 3 and 4 go to the same wandb and MLflow runs."""
    from sdft_ray.runner import train

    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, tiny_data, run_dir, schedule={"max_steps": 4},
                      output={"loggers": ["jsonl", "wandb", "mlflow"], "checkpoint_every": 2, "tags": ["e2e"]})
    assert train(cfg, stop_after=3)["steps"] == 3
    ids = json.loads((run_dir / "trackers.json").read_text())
    time.sleep(1.1)  # wandb names offline run folders by their start second
    assert train(cfg, resume="latest")["steps"] == 4
    assert json.loads((run_dir / "trackers.json").read_text()) == ids

    logged = jsonl_scalars(run_dir)
    assert sorted(logged) == [1, 2, 3, 4]
    assert mlflow_history(mlflow_store, ids["mlflow"]) == logged  # step 3: the re-run's values
    first, second = offline_runs(wandb_offline)
    assert first.run_id == second.run_id == ids["wandb"]
    assert sorted(first.history) == [1, 2, 3] and sorted(second.history) == [3, 4]
    for step in (1, 2):
        assert first.history[step] == logged[step]
    for step in (3, 4):
        assert second.history[step] == logged[step]
