"""Step metrics: the plain progress line, the progress mode, the logger fan-out and its config."""

from __future__ import annotations

import pytest
import yaml

from sdft_ray.config import config_from_dict, load_config
from sdft_ray.errors import ConfigError
from sdft_ray.metrics import (MetricsLogger, Progress, format_duration, format_step_line, progress_mode,
                              read_metrics, scalar_metrics)

# A step record shaped like the controller's (values made up, some keys the line leaves out).
RECORD = {
    "loss": 0.241234, "divergence": 0.23981, "implicit_reward": -0.3, "grad_norm": 1.5,
    "throughput/tokens_per_s": 152.34, "rollout/response_len": 38.25, "rollout/finished_fraction": 0.625,
    "staleness": 0, "time/rollout_wait": 4.312, "time/teacher_wait": 1.2, "time/learner": 5.019,
    "time/sync": 0.305, "time/step": 10.836, "examples": [3, 1, 2], "checkpoint": "/runs/x/checkpoints/step-3",
}


def test_step_line_of_a_hand_made_record():
    assert format_step_line(3, 20, RECORD, eta_s=182.4) == (
        "step=3/20 loss=0.2412 divergence=0.2398 tokens_per_s=152.3 response_len=38.2 finished=0.62 "
        "staleness=0 rollout_wait=4.31s teacher_wait=1.20s learner=5.02s sync=0.30s step_time=10.84s eta=3m02s")


def test_step_line_leaves_out_what_the_record_lacks():
    # An SFT step has no rollout, teacher or staleness; a checkpoint step has its time.
    sft = {"loss": 1.5e-05, "time/learner": 0.5, "time/checkpoint": 2.0, "time/step": 2.6, "flag": True}
    assert format_step_line(10, 10, sft) == "step=10/10 loss=1.5e-05 learner=0.50s checkpoint=2.00s step_time=2.60s"
    assert format_step_line(1, 5, {"loss": float("nan")}) == "step=1/5 loss=nan"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (3599, "59m59s"),
                                            (3600, "1h00m"), (7 * 3600 + 5 * 60 + 59, "7h05m"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_mode_follows_the_terminal_only_on_auto():
    assert progress_mode("auto", True) == "bar" and progress_mode("auto", False) == "lines"
    for forced in ("bar", "lines", "off"):
        assert progress_mode(forced, True) == forced and progress_mode(forced, False) == forced


def test_progress_lines_every_n_steps_and_the_last(capsys):
    progress = Progress(total=5, mode="lines", start=0, log_every=2)
    for step in range(1, 6):
        progress.update(step, {"loss": step / 10})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" eta=")[0] for line in lines] == ["step=2/5 loss=0.2", "step=4/5 loss=0.4", "step=5/5 loss=0.5"]
    assert lines[-1].endswith("eta=0s")


def test_progress_auto_writes_lines_when_stdout_is_not_a_terminal(capsys):
    progress = Progress(total=2, mode="auto")  # pytest's captured stdout is no terminal
    assert progress.mode == "lines"
    progress.update(1, RECORD)
    assert capsys.readouterr().out.startswith("step=1/2 loss=0.2412 ")


def test_progress_off_writes_nothing(capsys):
    progress = Progress(total=2, mode="off")
    progress.update(1, RECORD)
    progress.update(2, RECORD)
    progress.close()
    assert capsys.readouterr().out == ""


def test_progress_config_values():
    assert load_config(None).output.progress == "auto"
    # YAML 1.1 reads off/on/false/true as booleans: they mean off and auto.
    for text, mode in (("off", "off"), ("false", "off"), ("on", "auto"), ("true", "auto"), ("lines", "lines")):
        tree = yaml.safe_load(f"output: {{progress: {text}}}")
        assert config_from_dict(tree).output.progress == mode
    with pytest.raises(ConfigError) as err:
        load_config(None, ["output.progress=sometimes"])
    assert err.value.field == "output.progress"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["output.log_every=0"])
    assert err.value.field == "output.log_every"


def test_loggers_config_always_writes_jsonl_and_names_the_renamed_key():
    assert load_config(None).output.loggers == ["jsonl", "tensorboard"]
    assert load_config(None, ["output.loggers=[mlflow, wandb, mlflow]"]).output.loggers == ["jsonl", "mlflow", "wandb"]
    assert load_config(None, ["output.loggers=[]"]).output.loggers == ["jsonl"]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["output.loggers=[comet]"])
    assert err.value.field.startswith("output.loggers")
    with pytest.raises(ConfigError, match="output.tensorboard was replaced by output.loggers"):
        load_config(None, ["output.tensorboard=false"])


def test_scalar_metrics_keeps_finite_numbers_only():
    assert scalar_metrics({"a": 1, "b": 2.5, "c": float("inf"), "d": float("nan"), "e": True, "f": [1], "g": "x"}) \
        == {"a": 1, "b": 2.5}


def test_jsonl_and_tensorboard_hold_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_dict({"output": {"dir": str(tmp_path), "loggers": ["tensorboard"]}})
    log = MetricsLogger.from_config(cfg, tmp_path)
    records = {1: {"loss": 0.5, "time/sync": 0.25, "examples": [1, 2]}, 2: {"loss": 0.375, "time/sync": 0.125}}
    for step, record in records.items():
        log.log(step, record)
    log.close()
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2] and logged[0]["examples"] == [1, 2]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "time/sync"]
    for key in ("loss", "time/sync"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(r["step"], r[key]) for r in logged]


def test_resumed_jsonl_is_cut_back_to_the_checkpoint(tmp_path):
    cfg = config_from_dict({"output": {"dir": str(tmp_path), "loggers": ["jsonl"]}})
    log = MetricsLogger.from_config(cfg, tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.close()
    log = MetricsLogger.from_config(cfg, tmp_path, resume_step=2)
    log.log(3, {"loss": 30.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert not (tmp_path / "trackers.json").exists()  # no tracker listed, nothing to continue


def test_fan_out_closes_every_logger_even_if_one_fails():
    closed = []

    class Sink:
        def __init__(self, name, fail=False):
            self.name, self.fail, self.seen = name, fail, []

        def log(self, step, metrics):
            self.seen.append((step, dict(metrics)))

        def close(self):
            closed.append(self.name)
            if self.fail:
                raise OSError(self.name)

    a, b, c = Sink("a"), Sink("b", fail=True), Sink("c")
    fan = MetricsLogger([a, b, c])
    fan.log(7, {"loss": 1.0})
    assert a.seen == b.seen == c.seen == [(7, {"loss": 1.0})]
    with pytest.raises(OSError, match="b"):
        fan.close()
    assert closed == ["a", "b", "c"]
