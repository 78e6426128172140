"""Weight sync: learner rank 0 publishes weights, a role group's members load them.

``make_weight_sync(cfg, learners)`` returns the configured strategy; the controller calls
``push(group, kind, version)`` every ``sync_every`` steps and each role group calls
``deliver(group, member)`` to re-sync one member it brought back (:meth:`RoleGroup.recover`).

* :class:`ObjectStoreSync`: learner rank 0 puts bucketed weights in the Ray object store; every
  member's ``update_weights`` is queued behind its earlier calls (nobody waits for it: a later
  work call runs after it, and a failed update surfaces when that call is waited for).
* :class:`InProcessSync` (``placement.mode: colocated``): the roles share the learner's process;
  a push only names the version each member now holds.
* :class:`CollectiveSync`: a bucketed broadcast from learner rank 0 over one process group per
  role (:mod:`sdft_ray.collective`). A broadcast needs the sender and every receiver at once, so
  it runs synchronously: (1) every member's group membership is checked (an actor that Ray
  restarted, even while idle, has none; the group is rebuilt rather than wait for it until the
  time-out); (2) rank 0 packs the weights; (3) rank 0 sends while every member receives; (4) a
  member that missed the broadcast (lost, hung or its end failed) gets the same weights through
  the object store and the group is rebuilt before the next broadcast.
"""

from __future__ import annotations

import logging

from ray.exceptions import RayTaskError

from sdft_ray.config import RunConfig
from sdft_ray.roles import CALL_FAILURES, LearnerGroup, Member, RoleGroup, classify
from sdft_ray.weights import IN_PROCESS, WeightHandle

log = logging.getLogger("sdft_ray")


class WeightSync:
    def __init__(self, cfg: RunConfig, learners: LearnerGroup):
        self.cfg = cfg
        self.learners = learners

    def attach(self, group: RoleGroup) -> None:
        """Make this sync the one that re-delivers weights to ``group``'s recovered members."""
        group.deliver = self.deliver

    def push(self, group: RoleGroup, kind: str, version: int) -> None:
        """Publish the learner's ``kind`` weights (student or teacher) as ``version`` to ``group``."""
        raise NotImplementedError

    def deliver(self, group: RoleGroup, member: Member) -> None:
        """Make one (recovered) member hold ``group.weights``."""
        raise NotImplementedError


class ObjectStoreSync(WeightSync):
    def push(self, group, kind, version):
        group.push(self.learners.call("publish", kind, version, None))

    def deliver(self, group, member):
        group.send(member.index, "update_weights", group.weights)
        member.holds = group.version


class CollectiveSync(WeightSync):
    def attach(self, group):
        super().attach(group)
        self.join(group)

    def join(self, group: RoleGroup) -> None:
        """(Re)build the sync group of ``group``: learner rank 0 (the sender) + every member."""
        addr, port = self.learners.wait("address", self.learners.send("address"))
        # Collectives give up after half the call time-out, so that a broadcast stuck on a lost
        # member fails (and is finished another way) before the controller's own wait does.
        options = (len(group) + 1, self.cfg.weight_sync.backend, self.cfg.fault_tolerance.call_timeout_s / 2)
        sender = self.learners.send("join_sync_group", group.role, addr, port, 0, *options)
        joins = [group.send(m.index, "join_sync_group", group.role, addr, port, m.index + 1, *options)[0]
                 for m in group.members]
        self.learners.wait("join_sync_group", sender)
        for member, ref in zip(group.members, joins):
            member.sync_token = group.wait(member.index, ref)["token"]
        group.sync_group_stale = False

    def _check_members(self, group: RoleGroup) -> None:
        """Every member must still be the one that joined (an actor Ray restarted has no membership)."""
        for member in group.members:
            token_ref = group.send(member.index, "sync_group_token", group.role)[0]
            try:
                token = group.wait(member.index, token_ref)
            except CALL_FAILURES as exc:
                group.recover(member.index, exc)
                token = None
            if token is None or token != member.sync_token:
                group.check(member.index)  # counts a restart once, re-delivers the weights
                group.sync_group_stale = True
        if group.sync_group_stale:
            self.join(group)

    def push(self, group, kind, version):
        self._check_members(group)
        handle = self.learners.call("publish", kind, version, group.role)
        group.weights = handle
        sending = self.learners.send("send_weights", group.role)
        updates = [group.send(m.index, "update_weights", handle)[0] for m in group.members]
        missed = False
        for member, ref in zip(group.members, updates):
            try:
                group.wait(member.index, ref)
                member.holds = version
            except CALL_FAILURES as exc:
                missed = True
                if classify(exc) == "application":  # alive, but its end of the broadcast failed
                    log.warning("%s actor %d missed the weight broadcast (%s); sending through the object store",
                                group.role, member.index, str(exc).strip().splitlines()[-1][:300])
                    member.holds = None
                    self.deliver(group, member)
                else:
                    group.recover(member.index, exc)  # restarts it and delivers the weights
        try:
            self.learners.wait("send_weights", sending)
        except Exception as exc:
            if not (missed and isinstance(exc.__cause__, RayTaskError)):
                raise  # the sender failed on its own: a learner problem, not a lost receiver
        if missed:
            group.sync_group_stale = True

    def deliver(self, group, member):
        """The sync group's last weights to one member through the object store; the sync group
        is rebuilt before the next broadcast."""
        handle = self.learners.call("republish", group.role)
        group.send(member.index, "update_weights", handle)
        member.holds = handle.version
        group.sync_group_stale = True


class InProcessSync(ObjectStoreSync):
    """``placement.mode: colocated``: every role lives in a learner rank's process, so nothing is
    sent. A push hands each member a :data:`IN_PROCESS` handle naming the version of the learner's
    weights it now holds (the rollout role samples with the live student; the teacher role loads
    the EMA into its module unless that module's parameters are the EMA's own tensors); it runs
    in call order, after the training step that made that version."""

    def push(self, group, kind, version):
        group.push(WeightHandle(version, kind, IN_PROCESS))


def make_weight_sync(cfg: RunConfig, learners: LearnerGroup) -> WeightSync:
    if cfg.placement.mode == "colocated":
        return InProcessSync(cfg, learners)
    if cfg.weight_sync.transport == "collective":
        return CollectiveSync(cfg, learners)
    return ObjectStoreSync(cfg, learners)
