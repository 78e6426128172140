"""Role groups with small stand-in actors: versions, restarts per incarnation, queue-aware time-outs,
application errors, and the learner group's rank dispatch."""

from __future__ import annotations

import sys
import time

import pytest
import ray
import ray.cloudpickle as ray_cloudpickle

from actors.group import WeightHolder
from sdft_ray.errors import ActorApplicationError, ActorRestartLimit, StaleActor
from sdft_ray.roles import LearnerGroup, RoleGroup, classify, on_ranks
from sdft_ray.weight_sync import ObjectStoreSync
from sdft_ray.weights import WeightHandle

ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


class Worker(WeightHolder):
    def __init__(self):
        self.start_incarnation()

    def update_weights(self, handle: WeightHandle) -> int:
        return self.loaded(handle.version)

    def work(self, x: int, seconds: float = 0.0, fail: bool = False, expect=None):
        self.check_expected(expect)
        time.sleep(seconds)
        if fail:
            raise ValueError("bad input in work")
        return x, self.version


def make_group(n: int = 1, timeout_s: float = 60.0, max_restarts: int = 3) -> RoleGroup:
    handles = [ray.remote(Worker).options(num_cpus=0.1, max_restarts=-1, max_task_retries=0).remote()
               for _ in range(n)]  # as roles.spawn: Ray restarts, the group enforces the limit
    group = RoleGroup("rollout", handles, max_restarts=max_restarts, timeout_s=120)
    group.ready()  # starting actors takes seconds on a busy machine: the short time-out is for the calls
    group.timeout_s = timeout_s
    ObjectStoreSync(cfg=None, learners=None).attach(group)
    return group


def weights(version: int) -> WeightHandle:
    return WeightHandle(version=version, kind="student", transport="object_store")


def wait_restarted(group: RoleGroup, index: int = 0) -> None:
    """Until Ray has brought the actor back (a call to the dead incarnation fails first)."""
    old = group.members[index].incarnation
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if ray.get(group[index].ready.remote(), timeout=30)["incarnation"] != old:
                return
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.2)
    raise AssertionError("the actor was not restarted")


def test_a_death_with_many_failed_calls_is_one_restart_and_one_delivery(ray_local):
    group = make_group()
    group.push(weights(2))
    refs = {i: group.work(0, "work", i, 0.3) for i in range(4)}
    time.sleep(0.1)
    ray.kill(group[0], no_restart=False)  # dies with four calls queued on it
    results = []
    for i in range(4):
        value, refs[i] = group.result(0, refs[i], lambda i=i: group.work(0, "work", i))
        results.append(value)
    assert results == [(0, 2), (1, 2), (2, 2), (3, 2)]  # all redone, with the weights the group holds
    assert group.restarts == 1
    assert ray.get(group[0].ready.remote())["weight_updates"] == 1  # delivered once to the new incarnation
    group.kill()


def test_an_actor_restarted_while_idle_refuses_stale_work_and_is_resynced(ray_local):
    group = make_group()
    group.push(weights(3))
    ref = group.work(0, "work", 7)
    assert group.result(0, ref, lambda: group.work(0, "work", 7))[0] == (7, 3)
    ray.kill(group[0], no_restart=False)
    wait_restarted(group)  # nobody was waiting on it: the controller did not see it die
    ref = group.work(0, "work", 8)
    with pytest.raises(ray.exceptions.RayTaskError) as refused:
        ray.get(ref[0])  # the new incarnation holds its start-up weights (version 0)
    assert classify(refused.value) == "stale"
    assert isinstance(refused.value.cause, StaleActor) and refused.value.cause.holds == 0
    assert refused.value.cause.expected == 3
    value, _ = group.result(0, group.work(0, "work", 8), lambda: group.work(0, "work", 8))
    assert value == (8, 3) and group.restarts == 1
    group.kill()


def test_an_application_error_stops_at_once_with_its_traceback(ray_local):
    group = make_group()
    group.push(weights(1))
    with pytest.raises(ActorApplicationError, match="bad input in work"):
        group.result(0, group.work(0, "work", 1, 0.0, True), lambda: group.work(0, "work", 1, 0.0, True))
    info = ray.get(group[0].ready.remote())
    assert group.restarts == 0 and info["weight_updates"] == 1  # not restarted, no weights pushed again
    group.kill()


def test_calls_queued_ahead_do_not_count_against_the_time_out(ray_local):
    group = make_group(timeout_s=4.0)
    busy = [group.work(0, "work", i, 2.0) for i in range(3)]  # 6 s of work, 2 s each
    group.push(weights(5))  # queued behind them
    after = group.work(0, "work", 9)
    assert group.result(0, after, lambda: pytest.fail("re-issued: a busy actor was taken for a hung one"))[0] == (9, 5)
    assert group.restarts == 0
    assert [ray.get(refs[0]) for refs in busy] == [(0, 0), (1, 0), (2, 0)]
    group.kill()


def test_a_call_over_the_time_out_is_hung_the_actor_is_restarted(ray_local):
    group = make_group(timeout_s=10.0)  # also bounds the restart (seconds on a busy machine)
    group.push(weights(4))
    value, _ = group.result(0, group.work(0, "work", 1, 120.0), lambda: group.work(0, "work", 1))
    assert value == (1, 4) and group.restarts == 1
    group.kill()


def test_restart_limit(ray_local):
    group = make_group(max_restarts=1)
    for expected in (1, 2):
        ray.kill(group[0], no_restart=False)
        wait_restarted(group)  # ray.kill returns before the actor is gone
        if expected == 1:
            assert group.result(0, group.work(0, "work", 0), lambda: group.work(0, "work", 0))[0] == (0, 0)
        else:
            with pytest.raises(ActorRestartLimit, match="max_actor_restarts = 1"):
                group.result(0, group.work(0, "work", 0), lambda: group.work(0, "work", 0))
        assert group.restarts == expected
    group.kill()


class Rank:
    def __init__(self, rank: int):
        self.rank, self.calls = rank, 0

    @on_ranks("rank0")
    def only_rank0(self):
        self.calls += 1
        return self.rank

    @on_ranks("all_rank0_answers")
    def everyone(self):
        self.calls += 1
        return self.rank

    @on_ranks("all")
    def count(self):
        return self.calls

    def undeclared(self):
        return None


def test_learner_group_calls_the_ranks_each_method_declares(ray_local):
    learners = LearnerGroup(Rank, [ray.remote(Rank).options(num_cpus=0.1).remote(r) for r in range(2)], 60)
    assert learners.call("only_rank0") == 0
    assert learners.call("everyone") == 0  # every rank took part; rank 0's answer counts
    assert learners.call("count") == [2, 1]
    with pytest.raises(AttributeError, match="does not declare its ranks"):
        learners.send("undeclared")
    learners.kill()
