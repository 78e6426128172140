"""A step's metrics from what the roles report: sums and counts combined once, time per role.

Learner ranks return sums and their counts (per micro-batch means would weigh micro-batches of
different sizes wrongly); :func:`combine_learner_metrics` adds them over ranks and divides once,
so the logged ``loss`` is exactly the optimised one under either aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: logged name -> (sum key, count key) in the learners' answers
RATIOS: dict[str, tuple[str, str]] = {
    "loss": ("loss_sum", "loss_units"),  # units: sequences (sequence_mean) or tokens (token_mean)
    "divergence": ("divergence_sum", "loss_tokens"),  # mean per-token divergence where the loss counts
    "implicit_reward": ("reward_sum", "reward_tokens"),  # log pi(y|x,c) - log pi(y|x), per token
    "is_weight_mean": ("is_weight_sum", "is_weight_sequences"),
    "nll": ("nll_sum", "loss_tokens"),  # SFT
    "teacher/demonstration_shift": ("shift_sum", "loss_tokens"),  # mean KL(teacher with c || with another c)
}
#: summed over ranks and logged as they are
TOTALS = ("sequences", "response_tokens", "loss_tokens")


def ratio_metrics(per_rank: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Every ratio of :data:`RATIOS` whose sum some rank reported and whose count is not 0."""
    out: dict[str, float] = {}
    for name, (num, den) in RATIOS.items():
        count = sum(float(m.get(den, 0.0)) for m in per_rank)
        if any(num in m for m in per_rank) and count > 0:
            out[name] = sum(float(m.get(num, 0.0)) for m in per_rank) / count
    return out


def combine_learner_metrics(per_rank: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One step's learner metrics from every rank's sums and counts."""
    def total(key: str) -> float:
        return sum(float(m.get(key, 0.0)) for m in per_rank)

    out: dict[str, Any] = dict(ratio_metrics(per_rank))
    for key in TOTALS:
        out[key] = total(key)
    out["sequences"] = int(out["sequences"])
    out["response_tokens"] = int(out["response_tokens"])
    first = per_rank[0]
    out["grad_norm"], out["lr"] = first["grad_norm"], first["lr"]
    out["policy_version_min"] = min(m["policy_version_min"] for m in per_rank)
    out["teacher_version_min"] = min(m["teacher_version_min"] for m in per_rank)
    out["time/learner_busy"] = total("seconds")  # actor-seconds, all ranks
    if "ema_seconds" in first:
        out["time/ema"] = first["ema_seconds"]
    return out


def rollout_stats(receipts: Sequence[Any], score_receipts: Sequence[Any], rollout_wait: float,
                  teacher_wait: float) -> dict[str, Any]:
    """A batch's rollout and teacher statistics from the receipts the actors returned."""
    tokens = sum(r.response_tokens for r in receipts)
    seqs = sum(r.sequences for r in receipts)
    return {
        "rollout/response_len": tokens / max(seqs, 1),
        "rollout/finished_fraction": sum(r.finished_fraction * r.sequences for r in receipts) / max(seqs, 1),
        "rollout/tokens": tokens,
        "time/rollout_wait": rollout_wait,
        "time/teacher_wait": teacher_wait,
        "time/rollout_busy": sum(r.seconds for r in receipts),  # actor-seconds
        "time/teacher_busy": sum(r.seconds for r in score_receipts),
        "actors/rollout": len({r.worker for r in receipts}),
        "actors/teacher": len({r.worker for r in score_receipts}),
        "examples": sorted(i for r in receipts for i in r.example_index),
    }


#: role -> (busy actor-seconds key in a step record, actors of the role key)
BUSY: dict[str, tuple[str, str]] = {
    "rollout": ("time/rollout_busy", "actors/rollout"),
    "teacher": ("time/teacher_busy", "actors/teacher"),
    "learner": ("time/learner_busy", "actors/learner"),
    "weight sync": ("time/sync", ""),
    "checkpoint": ("time/checkpoint", ""),
}


def utilisation_summary(history: Sequence[dict[str, Any]], wall_seconds: float) -> dict[str, dict[str, float]]:
    """Per role: busy seconds per actor over the run (actor-seconds / actors) and the share of the
    wall clock that an actor of the role was busy on average. Weight sync and checkpoints are
    driver phases (one "actor")."""
    out = {}
    for role, (key, actors_key) in BUSY.items():
        busy = sum(h.get(key, 0.0) / max(1, h.get(actors_key, 1) if actors_key else 1) for h in history)
        out[role] = {"busy_s": busy, "utilisation": busy / wall_seconds if wall_seconds else 0.0,
                     "idle_s": max(0.0, wall_seconds - busy)}
    return out


def print_utilisation(summary: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="time per role (busy = working on this run's batches, per actor)")
    for column in ("role", "busy s", "idle s", "busy share of wall clock"):
        table.add_column(column)
    for role, row in summary.items():
        table.add_row(role, f"{row['busy_s']:.1f}", f"{row['idle_s']:.1f}", f"{100 * row['utilisation']:.0f}%")
    Console(stderr=True).print(table)
