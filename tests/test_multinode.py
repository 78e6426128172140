"""Roles pinned to nodes by custom resources: a 3-node Ray cluster on this machine.

``ray.cluster_utils.Cluster`` starts a head and two more raylets here, each with one CPU and
one custom resource (``node_rollout``, ``node_teacher``, ``node_learner``), the way
``configs/gpu_2node.yaml`` and ``deploy/kuberay/rayjob.yaml`` pin roles to GPU node groups.
``placement.node_resources`` adds those resources to each role's placement-group bundle, so
each role must land on its own node; the test checks where the actors run and that a 2-step
training finishes there.

The session-wide local Ray (``ray_local`` in conftest.py) lives in this same process. The
module fixture shuts it down, runs the cluster, and afterwards starts it again with the same
arguments if it had been running, so later tests that use ``ray_local`` keep working.
"""

from __future__ import annotations

import math

import psutil
import pytest
import ray

from conftest import tiny_config
from sdft_ray.runner import REPO_ROOT

pytestmark = pytest.mark.slow

ROLE_RESOURCE = {"rollout": "node_rollout", "teacher": "node_teacher", "learner": "node_learner"}
ROLE_CLASS = {"rollout": "RolloutWorker", "teacher": "TeacherScorer", "learner": "LearnerWorker"}
WORKER_ENV = {"env_vars": {"PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}}


def start_session_ray() -> None:
    """The same call as tests/conftest.py::ray_local (keep the two in step)."""
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env=WORKER_ENV)


@pytest.fixture(scope="module")
def three_nodes():
    from ray.cluster_utils import Cluster

    had_session_ray = ray.is_initialized()
    if had_session_ray:
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        # Cluster records its address in /tmp/ray/ray_current_cluster (where a plain ray.init()
        # in *any* process on this machine would then connect) and deletes that file on shutdown,
        # even when another cluster wrote it. Keep this test cluster out of that shared file.
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        node_args = dict(num_cpus=1, include_dashboard=False, object_store_memory=100 * 2**20)
        cluster = Cluster(initialize_head=True,
                          head_node_args={**node_args, "resources": {ROLE_RESOURCE["rollout"]: 1}})
        try:
            nodes = {"rollout": cluster.head_node}
            for role in ("teacher", "learner"):
                nodes[role] = cluster.add_node(**node_args, resources={ROLE_RESOURCE[role]: 1})
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, runtime_env=WORKER_ENV)
            yield cluster, nodes
        finally:
            ray.shutdown()
            cluster.shutdown()
    if had_session_ray:
        start_session_ray()


def role_node_from_process(cls_name: str, nodes: dict) -> str:
    """The node whose raylet spawned the one live ``ray::<cls_name>`` actor process."""
    raylets = {node.all_processes["raylet"][0].process.pid: node.node_id for node in nodes.values()}
    found = []
    for raylet_pid, node_id in raylets.items():
        for child in psutil.Process(raylet_pid).children(recursive=True):
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if title.startswith(f"ray::{cls_name}"):
                found.append(node_id)
    assert len(found) == 1, (cls_name, found)
    return found[0]


def test_roles_run_on_their_pinned_nodes(three_nodes, tiny_model_dir, tiny_data, tmp_path):
    from sdft_ray.controller import Controller
    from sdft_ray.runner import prepare

    cluster, nodes = three_nodes
    node_ids = {role: node.node_id for role, node in nodes.items()}
    assert len(set(node_ids.values())) == 3
    assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == set(node_ids.values())

    cfg = tiny_config(
        tiny_model_dir, tiny_data, tmp_path / "run",
        placement={"strategy": "PACK",
                   "node_resources": {role: {res: 0.01} for role, res in ROLE_RESOURCE.items()},
                   **{role: {"num_cpus": 0.5, "torch_threads": 1} for role in ROLE_RESOURCE}},
        schedule={"max_steps": 2})
    prepared = prepare(cfg)
    ctl = Controller(cfg, prepared.model_folder, prepared.examples, cfg.output.dir)
    try:
        ctl.start()
        # Bundles: rollout workers first, then teachers, then learners (Controller.start).
        bundle_nodes = ray.util.placement_group_table(ctl.groups.placement.group)["bundles_to_node_id"]
        placed = {"rollout": bundle_nodes[0], "teacher": bundle_nodes[1], "learner": bundle_nodes[2]}
        assert placed == node_ids, (placed, node_ids)
        assert ray.get(ctl.rollout[0].ready.remote(), timeout=120)["pid"]
        assert ray.get(ctl.learners[0].ping.remote(), timeout=120) == 0
        # Independently of Ray's bookkeeping: each actor process is a child of its node's raylet.
        for role, cls_name in ROLE_CLASS.items():
            assert role_node_from_process(cls_name, nodes) == node_ids[role], role

        summary = ctl.run()
    finally:
        ctl.shutdown()
    assert summary["steps"] == 2
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "student").is_dir()
