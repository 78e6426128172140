"""A step's metrics: learner sums over ranks divided once; time per role per actor."""

from __future__ import annotations

import pytest

from sdft_ray.step_metrics import combine_learner_metrics, utilisation_summary


def rank(**sums):
    return {"sequences": 2, "response_tokens": 10, "grad_norm": 0.5, "lr": 1e-3, "policy_version_min": 3,
            "teacher_version_min": 2, "seconds": 1.0, **sums}


def test_learner_metrics_divide_sums_by_counts_once():
    # token_mean: rank 0 has 3 loss tokens summing to 0.9, rank 1 has 1 token of 0.5 (units = tokens)
    per_rank = [rank(loss_sum=0.9, loss_units=3, divergence_sum=0.9, loss_tokens=3, reward_sum=-3.0, reward_tokens=2),
                rank(loss_sum=0.5, loss_units=1, divergence_sum=0.5, loss_tokens=1, reward_sum=-1.0, reward_tokens=2,
                     policy_version_min=2)]
    out = combine_learner_metrics(per_rank)
    assert out["loss"] == pytest.approx(1.4 / 4)  # not the mean of the ranks' means (0.4)
    assert out["divergence"] == pytest.approx(1.4 / 4)
    assert out["implicit_reward"] == pytest.approx(-4.0 / 4)  # per token with a known teacher log-prob
    assert out["sequences"] == 4 and out["response_tokens"] == 20 and out["loss_tokens"] == 4
    assert out["policy_version_min"] == 2 and out["teacher_version_min"] == 2
    assert out["time/learner_busy"] == 2.0  # actor-seconds
    assert "is_weight_mean" not in out and "nll" not in out  # nothing reported, nothing invented


def test_a_ratio_without_count_is_left_out():
    out = combine_learner_metrics([rank(loss_sum=0.0, loss_units=0, reward_sum=0.0, reward_tokens=0)])
    assert "loss" not in out and "implicit_reward" not in out


def test_utilisation_is_per_actor_for_every_role():
    """Two rollout workers busy 3 s each and two teachers busy 2 s each in a 10 s run: both roles
    were busy 30% / 20% of the time per actor (rollout used to be a max, teacher a sum)."""
    history = [{"time/rollout_busy": 6.0, "actors/rollout": 2, "time/teacher_busy": 4.0, "actors/teacher": 2,
                "time/learner_busy": 5.0, "actors/learner": 1, "time/sync": 1.0}]
    out = utilisation_summary(history, 10.0)
    assert out["rollout"]["utilisation"] == pytest.approx(0.3)
    assert out["teacher"]["utilisation"] == pytest.approx(0.2)
    assert out["learner"]["busy_s"] == pytest.approx(5.0) and out["learner"]["idle_s"] == pytest.approx(5.0)
    assert out["weight sync"]["busy_s"] == pytest.approx(1.0)
