"""``scripts/submit_job.sh`` against a real Ray head on loopback with token authentication.

The head is a separate ``ray start --head --block`` process tree with its own temp dir, ports
and auth token, so it neither touches nor is reached by a Ray that other tests (or other
processes on the machine) run. It is stopped by killing exactly the processes it started:
``ray stop`` would kill every Ray process on the machine, including other sessions' clusters.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address/auth settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER", "RAY_JOB"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `ray` and `python` from this venv
    env.update(extra)
    return env


class LocalHead:
    """``ray start --head --block`` on 127.0.0.1 with its own temp dir and token."""

    def __init__(self, num_cpus: int = 4):
        # Short path: Ray puts unix sockets under it (108-byte limit).
        self.tmp = Path(tempfile.mkdtemp(prefix="sdft-rj-", dir="/tmp"))
        self.token_path = self.tmp / "auth_token"
        self.token_path.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.token_path.chmod(0o600)
        (gcs, self.dashboard_port, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager,
         client) = free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--ray-client-server-port={client}", "--min-worker-port=0", "--max-worker-port=0",
               f"--num-cpus={num_cpus}", f"--temp-dir={self.tmp}", "--disable-usage-stats"]
        self.log = open(self.tmp / "ray_start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.tmp)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.proc.returncode}):\n{self.start_log()}")
            try:
                self.api("/api/jobs/")
                return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the Ray head did not answer at {self.address}:\n{self.start_log()}")

    def api(self, path: str, token: bool = True):
        """GET a job API path (JSON), sending the token like ``RAY_AUTH_MODE=token`` clients do."""
        request = urllib.request.Request(self.address + path)
        if token:
            request.add_header("Authorization", "Bearer " + self.token_path.read_text().strip())
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def start_log(self) -> str:
        return (self.tmp / "ray_start.log").read_text(errors="replace")[-4000:]

    def job_cli(self, command: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        """``ray job COMMAND --address <this head> ARGS`` in ``env``."""
        return subprocess.run([RAY, "job", command, "--address", self.address, *args], env=env,
                              capture_output=True, text=True, timeout=60)

    def listening_hosts(self, port: int) -> set[str]:
        pids = {p.pid for p in self.processes()}
        return {c.laddr.ip for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid in pids}

    def processes(self) -> list[psutil.Process]:
        """Every live process this head started: its process tree, plus any process naming its temp dir."""
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.proc.pid)
            found[root.pid] = root
            found.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
        marker = str(self.tmp)
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid not in found and marker in " ".join(p.info["cmdline"] or []):
                    found[p.pid] = p
            except psutil.Error:
                pass
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=8)
        for p in alive + [q for q in self.processes() if q.is_running()]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(self.processes(), timeout=10)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# configs/tiny_job.yaml runs 2 steps of ~0.1 s on the tiny model: 30 give the log poller seconds to
# see a step line while the job still runs.
STEPS = 30
STEP_LINE = re.compile(r"^step=(?P<step>\d+)/(?P<total>\d+) loss=(?P<loss>\S+) ")


def poll_for_step_line(head: LocalHead, submission_id: str, submitter: subprocess.Popen,
                       deadline: float) -> re.Match | None:
    """The first step line found in the job's logs while the job was RUNNING (None if it ended first)."""
    while time.monotonic() < deadline and submitter.poll() is None:
        try:
            logs = head.api(f"/api/jobs/{submission_id}/logs")["logs"]
            status = head.api(f"/api/jobs/{submission_id}")["status"]
        except (urllib.error.HTTPError, OSError):  # not submitted yet
            time.sleep(0.25)
            continue
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return None
        match = next((m for m in map(STEP_LINE.match, logs.splitlines()) if m), None)
        if status == "RUNNING" and match:
            return match
        time.sleep(0.25)
    return None


@pytest.fixture
def ray_head():
    t0 = time.monotonic()
    head = LocalHead(num_cpus=4)
    try:
        head.wait_ready()
        print(f"ray head up in {time.monotonic() - t0:.1f}s")
        yield head
    finally:
        t1 = time.monotonic()
        head.stop()
        print(f"ray head stopped in {time.monotonic() - t1:.1f}s")


def test_submit_job_runs_training_on_loopback_head_with_token(ray_head, tiny_model_dir, tiny_data, tmp_path):
    head = ray_head
    # The job API listens on loopback only, and refuses a client that does not send the token.
    assert head.listening_hosts(head.dashboard_port) == {"127.0.0.1"}
    no_token = clean_env(HOME=str(tmp_path))  # no RAY_AUTH_MODE, no token file anywhere
    refused = head.job_cli("list", env=no_token)
    assert refused.returncode != 0, refused.stdout
    # The token alone is not enough: without RAY_AUTH_MODE=token the client does not send it.
    token_but_no_mode = clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN_PATH=str(head.token_path))
    refused = head.job_cli("list", env=token_but_no_mode)
    assert refused.returncode != 0, refused.stdout
    assert "auth" in (refused.stdout + refused.stderr).lower()
    with pytest.raises(urllib.error.HTTPError) as http_refused:
        head.api("/api/jobs/", token=False)
    assert http_refused.value.code in (401, 403)

    out = tmp_path / "run"
    submission_id = f"sdft-test-{uuid.uuid4().hex[:8]}"
    env = clean_env(RAY_ADDRESS=head.address, RAY_AUTH_TOKEN_PATH=str(head.token_path),
                    JOB_PYTHON=sys.executable, RAY=RAY)
    started = time.monotonic()
    follow_log = tmp_path / "submit_job.out"
    with open(follow_log, "w") as follow:  # a file, not a pipe: nobody reads a pipe while we poll
        submitted = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "submit_job.sh"), "--submission-id", submission_id,
             "configs/tiny_job.yaml", "--set", f"model.path={tiny_model_dir}", "--set", f"data.path={tiny_data}",
             "--set", f"output.dir={out}", "--set", f"schedule.max_steps={STEPS}"],
            cwd=tmp_path, env=env, stdout=follow, stderr=subprocess.STDOUT, text=True)  # the script cds to the repo
        try:
            # The job's logs show step lines while it runs (read the logs, then see it still RUNNING).
            seen_running = poll_for_step_line(head, submission_id, submitted, deadline=started + 360)
            submitted.wait(timeout=max(1.0, started + 360 - time.monotonic()))
        finally:
            if submitted.poll() is None:
                submitted.kill()
    followed = follow_log.read_text()
    assert submitted.returncode == 0, followed[-6000:]
    assert seen_running is not None, f"no step line in the job's logs while it ran:\n{followed[-6000:]}"
    # A step before the last, read while the job ran: the lines stream, they do not come at the end.
    assert int(seen_running.group("step")) < STEPS and seen_running.group("total") == str(STEPS), seen_running.string
    for label in ("loss", "divergence", "tokens_per_s", "response_len", "finished", "staleness", "rollout_wait",
                  "teacher_wait", "learner", "sync", "step_time"):
        assert f" {label}=" in seen_running.string, seen_running.string
    elapsed = time.monotonic() - started

    job = head.api(f"/api/jobs/{submission_id}")
    assert job["status"] == "SUCCEEDED", job
    assert job["entrypoint"].startswith(f"{sys.executable} -m sdft_ray.cli train configs/tiny_job.yaml"), job
    logs = head.api(f"/api/jobs/{submission_id}/logs")["logs"]
    # The script followed the job's logs: the CLI's final JSON line is in both.
    finals = [json.loads(line) for line in logs.splitlines() if line.startswith("{") and '"final_loss"' in line]
    assert len(finals) == 1, logs[-4000:]
    final = finals[0]
    assert '"final_loss"' in followed
    assert final["steps"] == STEPS and math.isfinite(final["final_loss"])
    assert Path(final["checkpoint"]).name == f"step-{STEPS:08d}"
    assert (Path(final["checkpoint"]) / "student" / "config.json").is_file()
    assert Path(final["checkpoint"]).parent == out / "checkpoints"

    # The uploaded working directory is the repository without .venv, .git, runs/ and caches
    # (__pycache__ is not checked here: the job's own imports may write it after the upload).
    packages = [d for d in head.tmp.glob("session_*/runtime_resources/working_dir_files/*") if d.is_dir()]
    assert packages, sorted(str(p) for p in head.tmp.glob("session_*/runtime_resources/*"))
    for package in packages:
        names = {p.name for p in package.rglob("*")}
        assert "sdft_ray" in names and "tiny_job.yaml" in names
        assert not names & {".venv", ".venv-vllm", ".git", "runs", "results", ".hypothesis"}, sorted(names)
        size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
        assert size < 5 * 2**20, f"{package}: {size} bytes uploaded"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    # One line per step in the job's logs, its loss (4 significant digits) that of metrics.jsonl.
    lines = [m for m in map(STEP_LINE.match, logs.splitlines()) if m]
    assert [int(m.group("step")) for m in lines] == list(range(1, STEPS + 1)), logs[-4000:]
    for m, record in zip(lines, records):
        assert float(m.group("loss")) == pytest.approx(record["loss"], rel=5e-4), (m.string, record["loss"])
    print(f"job {submission_id}: submitted and finished in {elapsed:.1f}s; step line {seen_running.group('step')}/"
          f"{STEPS} seen in its logs while it ran")
