"""Run metrics: where each step's record goes, and how a run shows its progress.

Every step's record goes to ``<output.dir>/metrics.jsonl`` and to the other loggers named in
``output.loggers`` (TensorBoard here; wandb and MLflow in :mod:`sdft_ray.trackers`), all behind
one interface, :class:`StepLogger`; :class:`MetricsLogger` fans a record out to them.
:class:`Progress` shows the run: a rich bar on a terminal, or (job logs, files, pipes) one
plain ``key=value`` line per step, made by :func:`format_step_line`.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.errors import ConfigError

if TYPE_CHECKING:
    from sdft_ray.config import OutputConfig, RunConfig


class StepLogger(Protocol):
    """One place step metrics go (metrics.jsonl, TensorBoard, wandb, MLflow)."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (what the trackers plot; lists, paths and flags are left out)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass(frozen=True)
class LoggerPackage:
    module: str  # what is imported
    install: str  # how to get it


LOGGER_PACKAGES: dict[str, LoggerPackage] = {
    "tensorboard": LoggerPackage("tensorboard", "pip install tensorboard"),
    "wandb": LoggerPackage("wandb", "pip install 'sdft-ray[wandb]' (from a checkout: pip install -e '.[wandb]')"),
    "mlflow": LoggerPackage("mlflow", "pip install 'sdft-ray[mlflow]' (from a checkout: pip install -e '.[mlflow]')"),
}


def import_logger_package(name: str):
    """Import the package behind logger ``name``; a :class:`ConfigError` naming ``output.loggers``
    and the install command if it is missing."""
    package = LOGGER_PACKAGES[name]
    try:
        return importlib.import_module(package.module)
    except ImportError as exc:
        raise ConfigError(f"output.loggers lists {name!r}, but the {package.module!r} package cannot be imported "
                          f"({exc}): {package.install}, or remove {name!r} from output.loggers",
                          field="output.loggers") from None


def require_logger_packages(output: OutputConfig) -> None:
    """Check, in the driver before any actor starts, that every listed logger can be imported."""
    for name in output.loggers:
        if name in LOGGER_PACKAGES:
            import_logger_package(name)


class JsonlLogger:
    """``metrics.jsonl``: one JSON object per step (``step``, ``time`` and the whole record)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        """A fresh log, or (``resume_step`` given) the existing one cut back to that step and continued."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self._file = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    def __init__(self, log_dir: str | Path):
        import_logger_package("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in scalar_metrics(metrics).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsLogger:
    """Fans each step's record out to every configured :class:`StepLogger`."""

    def __init__(self, loggers: Sequence[StepLogger]):
        self.loggers = list(loggers)

    @classmethod
    def from_config(cls, cfg: RunConfig, run_dir: str | Path, resume_step: int | None = None) -> MetricsLogger:
        """The loggers of ``cfg.output.loggers`` for the run in ``run_dir``; with ``resume_step``
        (a resumed run) metrics.jsonl is cut back to that step and wandb/MLflow continue the run
        recorded in ``run_dir/trackers.json``."""
        from sdft_ray.trackers import open_trackers

        run_dir = Path(run_dir)
        loggers: list[StepLogger] = [JsonlLogger(run_dir / "metrics.jsonl", resume_step)]
        try:
            if "tensorboard" in cfg.output.loggers:
                loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
            loggers += open_trackers(cfg, run_dir, resumed=resume_step is not None)
        except BaseException:
            cls(loggers).close()
            raise
        return cls(loggers)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ---- progress ------------------------------------------------------------------------------


class LineField(NamedTuple):
    key: str  # in the step record
    label: str  # in the line
    fmt: str


STEP_LINE_FIELDS: tuple[LineField, ...] = (
    LineField("loss", "loss", "{:.4g}"),
    LineField("divergence", "divergence", "{:.4g}"),
    LineField("throughput/tokens_per_s", "tokens_per_s", "{:.1f}"),
    LineField("rollout/response_len", "response_len", "{:.1f}"),
    LineField("rollout/finished_fraction", "finished", "{:.2f}"),
    LineField("staleness", "staleness", "{:g}"),
    LineField("time/rollout_wait", "rollout_wait", "{:.2f}s"),
    LineField("time/teacher_wait", "teacher_wait", "{:.2f}s"),
    LineField("time/learner", "learner", "{:.2f}s"),
    LineField("time/sync", "sync", "{:.2f}s"),
    LineField("time/checkpoint", "checkpoint", "{:.2f}s"),
    LineField("time/step", "step_time", "{:.2f}s"),
)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_step_line(step: int, total: int, record: Mapping[str, Any], eta_s: float | None = None) -> str:
    """One plain, greppable ``key=value`` line for a step (fields missing from ``record``, as in
    variants without rollouts, are left out): ``step=3/20 loss=0.2412 ... step_time=10.84s eta=3m02s``."""
    parts = [f"step={step}/{total}"]
    for field in STEP_LINE_FIELDS:
        value = record.get(field.key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{field.label}={field.fmt.format(value)}")
    if eta_s is not None:
        parts.append(f"eta={format_duration(eta_s)}")
    return " ".join(parts)


def progress_mode(setting: str, stdout_is_terminal: bool) -> str:
    """``bar``, ``lines`` or ``off`` for ``output.progress`` (``auto``: a bar only on a terminal)."""
    if setting == "auto":
        return "bar" if stdout_is_terminal else "lines"
    return setting


class Progress:
    """The run's progress: a rich bar with the latest loss, one line per ``log_every`` steps
    (and at the last step) on stdout, flushed at once, or nothing."""

    def __init__(self, total: int, mode: str = "auto", start: int = 0, log_every: int = 1):
        self.total = total
        self.mode = progress_mode(mode, sys.stdout.isatty())
        self.log_every = log_every
        self._start_step = start
        self._started = time.monotonic()
        self._bar = None
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]SDFT"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, record: Mapping[str, Any]) -> None:
        if self._bar is not None:
            info = f"loss {record['loss']:.4f}" if "loss" in record else ""
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "lines" and (step % self.log_every == 0 or step == self.total):
            done = step - self._start_step
            eta = (time.monotonic() - self._started) / done * (self.total - step) if done > 0 else None
            print(format_step_line(step, self.total, record, eta), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
