"""Experiment trackers for ``output.loggers``: Weights & Biases and MLflow.

Each is a :class:`~sdft_ray.metrics.StepLogger` imported only when listed (the packages are the
optional extras ``sdft-ray[wandb]`` / ``sdft-ray[mlflow]``; the driver checks them with
:func:`sdft_ray.metrics.require_logger_packages` before anything starts). A run records its name
(``output.run_name``, default the last part of ``output.dir``), the resolved config and
``output.tags``. The tracker's run id is kept in ``<output.dir>/trackers.json``, so that
``--resume`` continues the same tracker run: its metrics go on at the resumed steps.

Connection settings are the trackers' own environment variables: ``WANDB_MODE``
(``offline`` on machines without internet), ``WANDB_API_KEY``, ``WANDB_ENTITY``, ``WANDB_DIR``
(default: the run folder); ``MLFLOW_TRACKING_URI`` (a server, ``sqlite:///...`` or ``file:...``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.metrics import StepLogger, import_logger_package, scalar_metrics

if TYPE_CHECKING:
    from sdft_ray.config import RunConfig

log = logging.getLogger("sdft_ray")
TRACKER_IDS_FILE = "trackers.json"


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker records about a run, and the tracker run to continue (``resume_id``)."""

    name: str
    project: str
    tags: tuple[str, ...]
    config: dict[str, Any]
    run_dir: Path
    resume_id: str | None = None


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", "1")``: a nested config as flat string parameters."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flat_params(value, name + ".")
        else:
            yield name, value if isinstance(value, str) else json.dumps(value)


class WandbLogger:
    """A Weights & Biases run (``wandb.init``); ``WANDB_MODE=offline`` writes it under
    ``<WANDB_DIR or output.dir>/wandb/`` for ``wandb sync`` later."""

    def __init__(self, run: TrackerRun):
        wandb = import_logger_package("wandb")
        self._run = wandb.init(
            project=run.project, name=run.name, tags=list(run.tags) or None, config=run.config,
            id=run.resume_id, resume="allow" if run.resume_id else None, allow_val_change=run.resume_id is not None,
            dir=os.environ.get("WANDB_DIR") or str(run.run_dir))
        self.run_id: str = self._run.id
        self._wandb = wandb

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        # wandb keeps the first value of a step: after a resume from an earlier checkpoint, the
        # steps re-run since it are not logged again (metrics.jsonl and MLflow hold the re-run).
        self._run.log(scalar_metrics(metrics), step=step)

    def close(self) -> None:
        self._run.finish()
        # finish() returns once wandb-core has the run's exit, but wandb-core writes the rest of
        # the run's record log (run-<id>.wandb, all an offline run has) and closes it only when
        # it gets to the finish notice, after finish() has returned. teardown() waits for that
        # (and stops wandb-core; a later wandb.init starts a new one).
        self._wandb.teardown()


class MlflowLogger:
    """An MLflow run in experiment ``output.project`` at ``MLFLOW_TRACKING_URI`` (MLflow's own
    default otherwise): the config as parameters and as ``config.yaml``, tags, step metrics."""

    PARAMS_PER_CALL = 100  # MLflow's log_batch limit

    def __init__(self, run: TrackerRun):
        import_logger_package("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient()
        if run.resume_id is not None:
            self.run_id = self._client.get_run(run.resume_id).info.run_id
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name(run.project)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(run.project)
            self.run_id = self._client.create_run(experiment_id, run_name=run.name,
                                                  tags={tag: "" for tag in run.tags}).info.run_id
            params = [Param(k, v) for k, v in flat_params(run.config)]
            for i in range(0, len(params), self.PARAMS_PER_CALL):
                self._client.log_batch(self.run_id, params=params[i:i + self.PARAMS_PER_CALL])
        self._client.log_text(self.run_id, yaml.safe_dump(run.config, sort_keys=False), "config.yaml")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in scalar_metrics(metrics).items()]
        try:
            self._client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:  # a tracking server hiccup must not end a training run
            log.warning("MLflow: step %d not logged (%s: %s); metrics.jsonl has it", step, type(exc).__name__, exc)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


TRACKERS: dict[str, type] = {"wandb": WandbLogger, "mlflow": MlflowLogger}


def read_tracker_ids(run_dir: Path) -> dict[str, str]:
    path = Path(run_dir) / TRACKER_IDS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def open_trackers(cfg: RunConfig, run_dir: str | Path, resumed: bool = False) -> list[StepLogger]:
    """Start (or, ``resumed``, continue) the tracker runs of ``cfg.output.loggers`` and record
    their ids in ``run_dir/trackers.json``."""
    run_dir = Path(run_dir)
    names = [name for name in cfg.output.loggers if name in TRACKERS]
    if not names:
        return []
    previous = read_tracker_ids(run_dir) if resumed else {}
    out = cfg.output
    opened: list[StepLogger] = []
    ids: dict[str, str] = {}
    try:
        for name in names:
            run = TrackerRun(name=out.run_name or run_dir.resolve().name, project=out.project,
                             tags=tuple(out.tags), config=cfg.model_dump(mode="json"), run_dir=run_dir,
                             resume_id=previous.get(name))
            tracker = TRACKERS[name](run)
            opened.append(tracker)
            ids[name] = tracker.run_id
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    atomic_write_text(run_dir / TRACKER_IDS_FILE, json.dumps(ids, indent=1, sort_keys=True) + "\n")
    return opened
