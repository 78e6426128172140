"""One placement group for a run: a bundle per actor, in role order (rollout, teacher, learner)."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group

from sdft_ray.config import ResourcesConfig, RunConfig


@dataclass(frozen=True)
class RoleSlots:
    """Where a role's actors go: ``count`` bundles from ``first_bundle`` on."""

    count: int
    first_bundle: int
    resources: ResourcesConfig


@dataclass(frozen=True)
class Placement:
    group: PlacementGroup
    rollout: RoleSlots
    teacher: RoleSlots
    learner: RoleSlots


def reserve(cfg: RunConfig, generating: bool, extra_teachers: int = 0) -> Placement:
    """Reserve the bundles of every role (rollout and teacher only when the variant generates;
    ``extra_teachers`` more teacher bundles for teacher groups beside the run's own, after its);
    a cluster that cannot hold them is an error naming the resources, not a hang."""
    pc = cfg.placement
    counts = {"rollout": cfg.rollout.num_workers if generating else 0,
              "teacher": cfg.teacher.num_workers + extra_teachers if generating else 0,
              "learner": cfg.learner.num_workers}
    bundles, slots, first = [], {}, 0
    for role, count in counts.items():
        res: ResourcesConfig = getattr(pc, role)
        bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
        bundle.update(pc.node_resources.get(role, {}))
        bundles += [dict(bundle) for _ in range(count)]
        slots[role] = RoleSlots(count, first, res)
        first += count
    group = placement_group(bundles, strategy=pc.strategy)
    try:
        ray.get(group.ready(), timeout=cfg.fault_tolerance.call_timeout_s)
    except GetTimeoutError:
        raise RuntimeError(
            f"placement group {bundles} could not be scheduled on cluster resources "
            f"{ray.cluster_resources()}: lower placement.*.num_cpus/num_gpus or add nodes") from None
    return Placement(group, **slots)
