"""The truncation warning: pure unit tests of TruncationWatch, and one end-to-end run that must warn."""

from __future__ import annotations

import logging

import pytest

from conftest import tiny_config
from sdft_ray.run_checks import TruncationWatch


def test_warns_once_after_the_window_and_names_the_key():
    watch = TruncationWatch(40, window=3)
    seen = [watch.observe(step, f) for step, f in enumerate([0.1, 0.2, 0.0, 0.1, 0.0], start=1)]
    assert seen[:2] == [None, None] and seen[3:] == [None, None]  # not before the window, never twice
    assert "rollout.max_new_tokens = 40" in seen[2] and "e.g. to 80" in seen[2] and "step 3" in seen[2]
    assert "rollout/finished_fraction" in seen[2]


def test_a_single_bad_step_or_an_interrupted_streak_does_not_warn():
    watch = TruncationWatch(64, window=3)
    # below, below, recovered (resets), below, below: never 3 in a row
    assert [watch.observe(s, f) for s, f in enumerate([0.4, 0.3, 0.5, 0.2, 0.49], start=1)] == [None] * 5
    assert watch.observe(6, 0.1) is not None  # the third consecutive step below 0.5


def test_threshold_is_strict_and_a_window_of_one_warns_at_once():
    assert TruncationWatch(8, window=1).observe(1, 0.5) is None  # 0.5 is not below 0.5
    assert TruncationWatch(8, window=1).observe(1, 0.49) is not None
    with pytest.raises(ValueError, match="window"):
        TruncationWatch(8, window=0)


@pytest.mark.slow
def test_a_run_where_nothing_finishes_warns(ray_local, tiny_model_dir, tiny_data, tmp_path, caplog):
    from sdft_ray.runner import train

    # Two new tokens: the tiny random model essentially never ends that fast.
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", rollout={"max_new_tokens": 2}, loss={"skip_first_tokens": 1},
                      output={"save_final": False}, fault_tolerance={"call_timeout_s": 900})
    with caplog.at_level(logging.WARNING, logger="sdft_ray"):
        summary = train(cfg)
    fractions = [h["rollout/finished_fraction"] for h in summary["history"]]
    assert len(fractions) == 2 and all(f < 0.5 for f in fractions)
    warnings = [r.getMessage() for r in caplog.records if "rollout/finished_fraction" in r.getMessage()]
    assert len(warnings) == 1 and "rollout.max_new_tokens = 2" in warnings[0] and "step 2" in warnings[0]
