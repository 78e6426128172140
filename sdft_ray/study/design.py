"""The study's data design (pure functions over rows): which facts are trained, which are
controls, and the teacher's prompts (query + demonstration through a template)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FactPair", "pick_rows", "select_facts", "teacher_rows"]

FactPair = tuple[str, str]  # (entity, fact)


def _pair(row: Mapping[str, Any], where: str) -> FactPair:
    try:
        return str(row["entity"]), str(row["fact"])
    except KeyError as e:
        raise ValueError(f"{where}: row has no {e.args[0]!r} column (needed to pair facts)") from None


def select_facts(rows: Sequence[Mapping[str, Any]], n_train: int, n_control: int,
                 seed: int) -> tuple[list[FactPair], list[FactPair]]:
    """Trained and control (entity, fact) pairs, chosen deterministically from ``rows``.

    Entities are shuffled with ``seed``; entity ``i`` contributes one pair, its fact type taken
    round-robin over the sorted fact types (so every type gets a near-equal share in both sets).
    The first ``n_train`` entities are trained, the next ``n_control`` are controls: the two sets
    share no entity, so training on one fact of an entity cannot help a control about it. Only
    pairs present in ``rows`` are chosen."""
    present: dict[str, set[str]] = {}
    for i, row in enumerate(rows):
        entity, fact = _pair(row, f"row {i}")
        present.setdefault(entity, set()).add(fact)
    types = sorted({f for facts in present.values() for f in facts})
    entities = sorted(present)
    random.Random(seed).shuffle(entities)
    chosen: list[FactPair] = []
    for entity in entities:
        if len(chosen) == n_train + n_control:
            break
        wanted = types[len(chosen) % len(types)]
        fact = wanted if wanted in present[entity] else sorted(present[entity])[0]
        chosen.append((entity, fact))
    if len(chosen) < n_train + n_control:
        raise ValueError(f"select_facts: {n_train} trained + {n_control} control pairs need as many distinct "
                         f"entities, the data has {len(entities)}")
    return chosen[:n_train], chosen[n_train:]


def pick_rows(rows: Sequence[Mapping[str, Any]], pairs: Sequence[FactPair]) -> list[dict[str, Any]]:
    """The rows about ``pairs`` (file order kept)."""
    wanted = set(pairs)
    return [dict(r) for i, r in enumerate(rows) if _pair(r, f"row {i}") in wanted]


def teacher_rows(rows: Sequence[Mapping[str, Any]], demonstrations: Sequence[str], template: str,
                 prompt_column: str = "prompt") -> list[dict[str, Any]]:
    """``rows`` with the prompt replaced by the teacher's user turn: ``template`` filled with the
    row's question and its demonstration (one per row), as the SDFT teacher sees it."""
    from sdft_ray.prompts import fill_template

    if len(demonstrations) != len(rows):
        raise ValueError(f"teacher_rows: {len(rows)} rows but {len(demonstrations)} demonstrations")
    return [{**r, prompt_column: fill_template(template, r[prompt_column], demo), "demonstration_used": demo}
            for r, demo in zip(rows, demonstrations)]


def fact_training_rows(rows: Sequence[Mapping[str, Any]], train_rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """For every eval row, the (first) training row of the same (entity, fact)."""
    by_pair: dict[FactPair, Mapping[str, Any]] = {}
    for i, r in enumerate(train_rows):
        by_pair.setdefault(_pair(r, f"train row {i}"), r)
    missing = [_pair(r, f"row {i}") for i, r in enumerate(rows) if _pair(r, f"row {i}") not in by_pair]
    if missing:
        raise ValueError(f"no training demonstration for {missing[:3]} ({len(missing)} rows)")
    return [by_pair[_pair(r, "")] for r in rows]


def fact_demonstrations(rows: Sequence[Mapping[str, Any]], train_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """For every eval row, the training demonstration of the same (entity, fact)."""
    return [r["demonstration"] for r in fact_training_rows(rows, train_rows)]


def reference_demonstrations(rows: Sequence[Mapping[str, Any]], reference_column: str = "reference") -> list[str]:
    """Tool calls: the demonstration of a request is its reference call as JSON, exactly the
    format of the training demonstrations."""
    return [json.dumps(r[reference_column]) for r in rows]
