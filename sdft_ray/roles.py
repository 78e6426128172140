"""Role groups: the Ray actors of one role, the weights they must hold, and their restarts.

``RoleGroup`` (rollout workers, teacher scorers) knows its members: each member's actor handle,
its incarnation (a fresh id every time Ray starts the actor, so a restart is seen even when the
actor was idle), the weight version delivered to that incarnation and the calls queued on it.
The group holds the weights every member must hold (a :class:`~sdft_ray.weights.WeightHandle`);
every work call carries the incarnation and version it is meant for, and an actor that is another
incarnation or holds other weights refuses it (:class:`~sdft_ray.errors.StaleActor`). :meth:`RoleGroup.result` waits for a call and,
when the member was lost, hung or refused, brings it back (:meth:`RoleGroup.recover`: restart
counted once per incarnation, weights delivered again) and re-issues the work; an error raised by
the actor's own code stops the run with its traceback.

A member's calls run in the order they were sent, so the time-out of a call counts from the
moment the calls queued before it on that member have finished: a healthy actor working through
``k`` pipelined batches is never mistaken for a hung one.

``LearnerGroup`` drives the DeepSpeed learner ranks: which ranks a method runs on and whose
answer counts is declared once per method on the worker class (:func:`on_ranks`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.group import worker_runtime_env
from sdft_ray.config import ResourcesConfig
from sdft_ray.errors import ActorApplicationError, ActorRestartLimit, LearnerFailure, StaleActor
from sdft_ray.weights import WeightHandle

log = logging.getLogger("sdft_ray")

#: What a failed remote call means for the actor behind it.
Failure = Literal["lost", "hung", "stale", "application"]
CALL_FAILURES = (RayActorError, GetTimeoutError, RayTaskError)


def classify(error: BaseException) -> Failure:
    """``lost``: the actor died (Ray restarts it); ``hung``: no answer within the time-out;
    ``stale``: the actor refused work meant for another incarnation or other weights; ``application``: the actor's
    own code raised (it is alive: retrying would only repeat the error)."""
    if isinstance(error, GetTimeoutError):
        return "hung"
    if isinstance(error, RayActorError):
        return "lost"
    if isinstance(error, StaleActor) or isinstance(getattr(error, "cause", None), StaleActor):
        return "stale"
    return "application"


def application_error(role: str, index: int, error: BaseException) -> ActorApplicationError:
    return ActorApplicationError(f"{role} actor {index} raised an error (the run stops; it is not restarted):\n{error}")


def spawn(actor_cls: type, count: int, placement_group: PlacementGroup, first_bundle: int,
          resources: ResourcesConfig, make_args: Callable[[int], tuple[tuple, dict]], max_restarts: int = 0,
          extra_env: dict[str, str] | None = None) -> list[Any]:
    """Start ``count`` actors, actor ``i`` on bundle ``first_bundle + i`` of the placement group.
    With ``max_restarts > 0`` Ray restarts them as often as needed: the role group counts restarts
    and enforces the limit for the whole role (with an error that says so)."""
    remote_cls = actor_cls if hasattr(actor_cls, "remote") else ray.remote(actor_cls)
    handles = []
    for rank in range(count):
        args, kwargs = make_args(rank)
        handles.append(remote_cls.options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_restarts=-1 if max_restarts > 0 else 0,
            max_task_retries=0, runtime_env=worker_runtime_env(resources, extra_env),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=first_bundle + rank),
        ).remote(*args, **kwargs))
    return handles


@dataclass
class Member:
    """One actor of a role group."""

    index: int
    handle: Any
    incarnation: str | None = None  # from ready(); a new one after every (re)start
    holds: int | None = None  # weight version delivered to this incarnation (None: its start-up weights)
    queue: deque[ray.ObjectRef] = field(default_factory=deque)  # calls sent and not yet waited for
    sync_token: str | None = None  # its membership of the role's weight sync group (collective transport)


#: ``deliver(group, member)`` makes ``member`` hold ``group.weights`` (see sdft_ray.weight_sync).
Deliver = Callable[["RoleGroup", Member], None]


class RoleGroup:
    """The actors of one role (``rollout`` or ``teacher``) and the weights they must hold."""

    def __init__(self, role: str, handles: Sequence[Any], *, max_restarts: int, timeout_s: float,
                 weights_kind: str = "student"):
        self.role = role
        self.weights_kind = weights_kind  # the learner weights it follows: student, or a teacher's ema/live/frozen
        self.members = [Member(i, h) for i, h in enumerate(handles)]
        self.max_restarts = max_restarts
        self.timeout_s = timeout_s
        self.weights: WeightHandle | None = None  # what every member must hold (None: the model folder's)
        self.restarts = 0
        self.deliver: Deliver | None = None  # set by the weight sync that feeds this group
        self.sync_group_stale = False  # collective transport: a member left the sync group; rebuild it

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> Any:
        return self.members[index].handle

    @property
    def version(self) -> int:
        """The weight version every member must hold (0 = the model folder's weights)."""
        return self.weights.version if self.weights is not None else 0

    # ---- calls -------------------------------------------------------------------------------
    def ready(self) -> list[dict]:
        """Wait until every member has started; record the incarnations."""
        infos = ray.get([m.handle.ready.remote() for m in self.members], timeout=self.timeout_s)
        for member, info in zip(self.members, infos):
            member.incarnation = info["incarnation"]
            member.holds = info["version"]
        return infos

    def send(self, index: int, method: str, *args, num_returns: int = 1, **kwargs) -> list[ray.ObjectRef]:
        """Send a call to member ``index`` (no version check); returns its refs, the first of which
        completes when the call has run."""
        member = self.members[index]
        refs = getattr(member.handle, method).options(num_returns=num_returns).remote(*args, **kwargs)
        refs = list(refs) if num_returns > 1 else [refs]
        member.queue.append(refs[0])
        return refs

    def work(self, index: int, method: str, *args, num_returns: int = 1) -> list[ray.ObjectRef]:
        """Send a work call that only the member's known incarnation, holding the group's current
        weights, may run (anything else refuses it: see :meth:`recover`)."""
        expect = (self.members[index].incarnation, self.version)
        return self.send(index, method, *args, num_returns=num_returns, expect=expect)

    def wait(self, index: int, ref: ray.ObjectRef) -> Any:
        """The value of ``ref``, a call sent to member ``index``. The calls queued on the member
        before it are waited for first, each with the full time-out (calls run in order)."""
        member = self.members[index]
        while member.queue and member.queue[0] != ref:
            ray.get(member.queue.popleft(), timeout=self.timeout_s)
        if member.queue:
            member.queue.popleft()
        return ray.get(ref, timeout=self.timeout_s)

    def result(self, index: int, refs: list[ray.ObjectRef], reissue: Callable[[], list[ray.ObjectRef]]
               ) -> tuple[Any, list[ray.ObjectRef]]:
        """Wait for ``refs[0]``; if the member was lost, hung or refused, recover it and re-issue
        the work (``reissue()`` returns the new refs). Returns the value and the refs it came from."""
        for _ in range(self.max_restarts + 3):  # each round needs a restart or a re-delivery
            try:
                return self.wait(index, refs[0]), refs
            except CALL_FAILURES as exc:
                self.recover(index, exc)
                refs = reissue()
        raise ActorRestartLimit(f"{self.role} actor {index}: its work failed again after every recovery")

    def drain(self) -> None:
        """Wait for every call sent so far (weight pushes included); errors are recovered from."""
        for member in self.members:
            while member.queue:
                try:
                    self.wait(member.index, member.queue[-1])
                except CALL_FAILURES as exc:
                    self.recover(member.index, exc)

    # ---- weights and recovery ----------------------------------------------------------------
    def push(self, weights: WeightHandle) -> None:
        """Every member must now hold ``weights``: queue the update on each (it runs after the
        calls already queued and before any later work call, so it is not waited for here)."""
        self.weights = weights
        for member in self.members:
            self.send(member.index, "update_weights", weights)
            member.holds = weights.version

    def recover(self, index: int, error: BaseException) -> None:
        """Bring member ``index`` back after ``error`` and make it hold the group's weights.

        A restart is counted once per new incarnation, however many of the member's calls
        failed with it; an error raised by the actor's own code stops the run.
        """
        kind = classify(error)
        if kind == "application":
            raise application_error(self.role, index, error) from error
        log.warning("%s actor %d %s (%s); bringing it back and re-issuing its work", self.role, index,
                    {"lost": "was lost", "hung": "did not answer in time",
                     "stale": "was restarted or holds other weights"}[kind],
                    type(error).__name__)
        if self.max_restarts == 0 and kind in ("lost", "hung"):
            raise ActorRestartLimit(f"{self.role} actor {index} was lost and fault_tolerance.max_actor_restarts "
                                    f"is 0: {error}") from error
        if kind == "hung":  # kill it so that Ray restarts it
            ray.kill(self.members[index].handle, no_restart=False)
        self.check(index, error)

    def check(self, index: int, error: BaseException | None = None) -> None:
        """Make sure member ``index`` is up and holds the group's weights: a new incarnation counts
        as one restart (its queued calls are gone) and gets the weights delivered again."""
        member = self.members[index]
        info = self._ready_after_restart(member)
        if info["incarnation"] != member.incarnation:
            self.restarts += 1
            log.warning("%s actor %d was restarted (restart %d of at most %d)", self.role, index,
                        self.restarts, self.max_restarts)
            if self.restarts > self.max_restarts:
                raise ActorRestartLimit(f"{self.role} actors were restarted {self.restarts} times "
                                        f"(fault_tolerance.max_actor_restarts = {self.max_restarts}); "
                                        f"last error: {error}") from error
            member.incarnation = info["incarnation"]
            member.queue.clear()  # calls sent to the lost incarnation will not run
            member.sync_token = None
        member.holds = info["version"]  # ready() ran after every call sent before it: this is current
        if member.holds != self.version:
            if self.deliver is None:
                raise RuntimeError(f"{self.role} group has no weight delivery to re-sync actor {index}")
            self.deliver(self, member)

    def _ready_after_restart(self, member: Member) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return ray.get(member.handle.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        for member in self.members:
            ray.kill(member.handle, no_restart=True)


# ---- roles hosted by the learner actors (placement.mode: colocated) -----------------------------

class HostedRole:
    """A role that lives inside another actor: ``view.method.options(...).remote(*args)`` calls
    ``handle.role_call(role, "method", *args)`` there (see ``actors/colocated.py``), so a
    :class:`RoleGroup` drives it as it drives an actor of its own."""

    def __init__(self, handle: Any, role: str):
        self.handle, self.role = handle, role

    def __getattr__(self, method: str) -> _HostedMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _HostedMethod(self.handle, self.role, method, {})


@dataclass(frozen=True)
class _HostedMethod:
    handle: Any
    role: str
    method: str
    call_options: dict[str, Any]

    def options(self, **options: Any) -> _HostedMethod:
        return _HostedMethod(self.handle, self.role, self.method, {**self.call_options, **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.handle.role_call.options(**self.call_options).remote(self.role, self.method, *args, **kwargs)


class ColocatedRoleGroup(RoleGroup):
    """A role hosted by the learner ranks (``placement.mode: colocated``): member ``i`` is learner
    rank ``i``. Versions, stale-call refusal and re-delivery work as for actors of their own; a
    member lost or hung is a learner rank lost (:class:`LearnerFailure`: the run may resume from a
    checkpoint), and the learner group owns (and kills) the actors."""

    def __init__(self, role: str, learner_handles: Sequence[Any], *, timeout_s: float, weights_kind: str = "student"):
        super().__init__(role, [HostedRole(h, role) for h in learner_handles], max_restarts=0, timeout_s=timeout_s,
                         weights_kind=weights_kind)

    def recover(self, index: int, error: BaseException) -> None:
        if classify(error) in ("lost", "hung"):
            raise LearnerFailure(f"learner rank {index}, which also holds the {self.role} role, was lost or hung: "
                                 f"{error}") from error
        super().recover(index, error)

    def kill(self) -> None:
        """Nothing of its own to kill: the learner group kills the actors."""


# ---- learners ------------------------------------------------------------------------------------

Ranks = Literal["all", "all_rank0_answers", "rank0"]


def on_ranks(ranks: Ranks):
    """Declare how a learner method is called: ``all`` (every rank, every answer), ``all_rank0_answers``
    (every rank takes part, e.g. in ZeRO-3 gathers; rank 0's answer counts) or ``rank0`` (rank 0 only)."""

    def mark(fn):
        fn.ranks = ranks
        return fn

    return mark


class LearnerGroup:
    """The DeepSpeed learner ranks. A lost or hung rank fails the step (:class:`LearnerFailure`,
    from which the run may resume a checkpoint); an error of the learner's own code stops the run."""

    def __init__(self, worker_cls: type, handles: Sequence[Any], timeout_s: float):
        self.worker_cls = worker_cls
        self.handles = list(handles)
        self.timeout_s = timeout_s

    def __len__(self) -> int:
        return len(self.handles)

    def __getitem__(self, rank: int) -> Any:
        return self.handles[rank]

    def _ranks(self, method: str) -> Ranks:
        ranks = getattr(getattr(self.worker_cls, method, None), "ranks", None)
        if ranks is None:
            raise AttributeError(f"{self.worker_cls.__name__}.{method} does not declare its ranks (@on_ranks)")
        return ranks

    def send(self, method: str, *args) -> list[ray.ObjectRef]:
        """Call ``method`` on the ranks it declares; returns the refs (rank order)."""
        handles = self.handles[:1] if self._ranks(method) == "rank0" else self.handles
        return [getattr(h, method).remote(*args) for h in handles]

    def wait(self, method: str, refs: list[ray.ObjectRef]) -> Any:
        """The answer that counts for ``method``: every rank's (``all``), else rank 0's."""
        try:
            answers = ray.get(refs, timeout=self.timeout_s)
        except (RayActorError, GetTimeoutError) as exc:
            raise LearnerFailure(f"a learner rank was lost or hung in {method}: {exc}") from exc
        except RayTaskError as exc:
            raise application_error("learner", -1, exc) from exc
        return answers if self._ranks(method) == "all" else answers[0]

    def call(self, method: str, *args) -> Any:
        return self.wait(method, self.send(method, *args))

    def call_each(self, method: str, per_rank: Sequence[tuple]) -> Any:
        """Call ``method`` on every rank with that rank's arguments (e.g. its data shard)."""
        if self._ranks(method) == "rank0" or len(per_rank) != len(self.handles):
            raise ValueError(f"{method}: needs one argument tuple per rank ({len(self.handles)})")
        return self.wait(method, [getattr(h, method).remote(*args) for h, args in zip(self.handles, per_rank)])

    def kill(self) -> None:
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
