"""Shared helpers for the benchmark scripts (``scripts/bench_*.py``).

Every script measures several configurations one after the other in ONE process, on the
same machine, model, data and batch, and prints their ratios. The helpers here:

* ``add_common_args`` / ``setup`` - the shared command line (``--model``, ``--tiny``,
  ``--steps``, ``--prompts``, ``--max-new-tokens``, ``--threads``, ``--json``) and the
  environment (CPU DeepSpeed, offline hub, repo on ``sys.path``);
* ``make_config`` - one ``RunConfig`` for this machine, with dotted overrides;
* ``run_sdft_ray`` - start the actors (timed separately as start-up), train, shut down, and
  return per-step wall-clock times taken from ``metrics.jsonl`` step stamps, the controller's
  own ``time/*`` metrics, the utilisation summary, peak memory and CPU use of the process
  tree (``TreeSampler``);
* ``steady_state`` - the numbers after the first (warm-up) step;
* table / ratio printing (``rich``; ratio lines are plain ``ratio <name>: <x>`` lines so that
  they can be grepped).

Timings exclude start-up (model loading, DeepSpeed init, actor start) and the first step:
``mean step s`` is ``(t_end[N] - t_end[1]) / (N - 1)`` where ``t_end[i]`` is the wall-clock
time at which step ``i`` was logged, so it covers everything the loop does per step
(rollout, scoring, training, weight sync, launching the next batches, logging).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
DEFAULT_DATA = REPO / "data" / "fictional_facts" / "train.jsonl"


# ---- command line and environment -----------------------------------------------------------


def add_common_args(ap: argparse.ArgumentParser, *, steps: int = 5, prompts: int = 8,
                    max_new_tokens: int = 32) -> argparse.ArgumentParser:
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="HF model folder or embedded:<name> (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tiny", action="store_true",
                    help="use a tiny random Llama (hidden 64, 2 layers) with the test tokenizer: a fast smoke run")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL with prompt/demonstration columns")
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps per configuration (>= 2; step 1 is warm-up)")
    ap.add_argument("--prompts", type=int, default=prompts, help="prompts per step (schedule.prompts_per_step)")
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="rollout.max_new_tokens")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per role actor (default: os.cpu_count())")
    ap.add_argument("--pipe-threads", type=int, default=None,
                    help="torch threads per role in pipelined configurations (max_staleness > 0), where the three "
                         "roles compute at the same time (default: max(1, os.cpu_count() // 3), i.e. 1 on 2 cores: "
                         "more threads than cores make every OpenMP barrier wait for a descheduled thread)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model.dtype (default fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-interval", type=float, default=0.5, help="seconds between RSS/CPU samples (cheap)")
    ap.add_argument("--pss-interval", type=float, default=0.0,
                    help="also sample PSS (shared pages split between processes) every this many seconds; 0 = off. "
                         "Reading PSS walks the page tables of every process (~0.2 s for a 3 GB learner on a busy "
                         "2-core machine) and takes its mmap lock: it slows the run down, so keep it off for timings")
    ap.add_argument("--max-load", type=float, default=None,
                    help="before each configuration wait until the 1-minute load average is below this "
                         "(a shared machine); at most --max-wait seconds, then run anyway and say so")
    ap.add_argument("--min-free-gb", type=float, default=None,
                    help="before each configuration also wait until this much memory is available (psutil)")
    ap.add_argument("--max-wait", type=float, default=900.0)
    ap.add_argument("--retries", type=int, default=0,
                    help="run a configuration again (after waiting for a quieter machine) when other processes used "
                         "more than --max-other-cores cores during its timed steps; the quietest attempt is kept")
    ap.add_argument("--max-other-cores", type=float, default=0.5,
                    help="see --retries (CPU seconds per second used by processes outside this benchmark)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the configurations this many times, interleaved (A B C A B C), and pool their timed "
                         "steps: helps on a shared machine whose load drifts")
    ap.add_argument("--json", help="also write every measured number to this JSON file")
    ap.add_argument("--keep-output", help="write run folders here instead of a temporary folder")
    return ap


def setup(args: argparse.Namespace | None = None) -> None:
    """Environment shared by the driver and (through Ray's runtime_env) every actor."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for path in (str(REPO), str(REPO / "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)
    if args is not None:
        if args.steps < 2:
            raise SystemExit("--steps must be >= 2: the first step is a warm-up and is not timed")
        if args.threads is None:
            args.threads = os.cpu_count() or 1
        if getattr(args, "pipe_threads", "absent") is None:
            args.pipe_threads = max(1, (os.cpu_count() or 1) // 3)


def loadavg() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())


def machine_line() -> str:
    import platform

    import torch

    return (f"machine: {platform.node()} | os.cpu_count()={os.cpu_count()} | torch {torch.__version__} "
            f"(intra-op threads default {torch.get_num_threads()}) | load average now {loadavg()}")


def wait_for_load(args: argparse.Namespace) -> float:
    """Sleep until the 1-minute load average is below ``--max-load`` and ``--min-free-gb`` GB of memory are
    available (each if given), at most ``--max-wait`` seconds; returns the seconds waited."""
    import psutil

    limit, free_gb = getattr(args, "max_load", None), getattr(args, "min_free_gb", None)
    if limit is None and free_gb is None:
        return 0.0

    def busy() -> bool:
        return ((limit is not None and os.getloadavg()[0] >= limit)
                or (free_gb is not None and psutil.virtual_memory().available < free_gb * 2**30))

    t0 = time.monotonic()
    while busy() and time.monotonic() - t0 < args.max_wait:
        time.sleep(5.0)
    waited = time.monotonic() - t0
    state = f"load average {loadavg()}, {psutil.virtual_memory().available / 2**30:.1f} GB available"
    if busy():
        print(f"[bench] still busy after {waited:.0f} s ({state}; limits: load {limit}, {free_gb} GB): running anyway",
              flush=True)
    elif waited > 1:
        print(f"[bench] waited {waited:.0f} s for a quieter machine: {state}", flush=True)
    return waited


def resolve_model(args: argparse.Namespace) -> Path:
    """The model folder: the tiny random Llama (``--tiny``) or ``--model`` resolved like the trainer does."""
    if args.tiny:
        from conftest_tokenizer import make_test_tokenizer

        from sdft_ray.models import build_random_model

        folder = Path(tempfile.mkdtemp(prefix="bench_tiny_model_"))
        return build_random_model(folder, make_test_tokenizer(), hidden_size=64, heads=2, initializer_range=0.3)
    from sdft_ray.models import resolve_model_path

    return resolve_model_path(args.model)


def output_root(args: argparse.Namespace) -> Path:
    if args.keep_output:
        root = Path(args.keep_output)
        root.mkdir(parents=True, exist_ok=True)
        return root
    return Path(tempfile.mkdtemp(prefix="bench_runs_"))


# ---- configs ------------------------------------------------------------------------------------


def base_tree(args: argparse.Namespace, model_folder: Path, out_dir: Path) -> dict[str, Any]:
    """The shared settings: one micro-batch per step in every role, fp32, full-vocabulary forward KL, EMA teacher."""
    threads = args.threads
    long_prompts = args.tiny  # the tiny tokenizer (vocab 500) needs more tokens for the same text
    return {
        "model": {"path": str(model_folder), "dtype": args.dtype},
        "data": {"path": str(args.data)},
        "prompts": {"max_prompt_tokens": 512 if long_prompts else 128,
                    "max_teacher_prompt_tokens": 1024 if long_prompts else 256},
        "rollout": {"engine": "hf", "num_workers": 1, "max_new_tokens": args.max_new_tokens,
                    "temperature": 1.0, "top_p": 1.0, "batch_size": args.prompts},
        "teacher": {"kind": "ema", "ema_rate": 0.05, "num_workers": 1, "micro_batch_size": args.prompts},
        "loss": {"alpha": 0.0, "estimator": "full", "skip_first_tokens": 3},
        "learner": {"num_workers": 1, "zero_stage": 0, "lr": 5e-5, "micro_batch_size": args.prompts,
                    "warmup_ratio": 0.0, "lr_schedule": "constant"},
        "schedule": {"prompts_per_step": args.prompts, "max_steps": args.steps, "seed": args.seed,
                     "max_staleness": 0},
        "placement": {role: {"num_cpus": 1, "torch_threads": threads} for role in ("rollout", "teacher", "learner")},
        "fault_tolerance": {"call_timeout_s": 1800},
        "output": {"dir": str(out_dir), "loggers": ["jsonl"], "progress": "off", "save_final": False,
                   "checkpoint_every": 0},
    }


def make_config(args: argparse.Namespace, model_folder: Path, out_dir: Path, overrides: dict[str, Any] | None = None):
    """A validated RunConfig: ``base_tree`` plus ``{"a.b": value}`` overrides."""
    from sdft_ray.config import _set_dotted, config_from_dict

    tree = base_tree(args, model_folder, out_dir)
    overrides = dict(overrides or {})
    pipe_threads = getattr(args, "pipe_threads", None)
    if pipe_threads and overrides.get("schedule.max_staleness", 0) > 0:
        for role in ("rollout", "teacher", "learner"):
            overrides.setdefault(f"placement.{role}.torch_threads", pipe_threads)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree, "bench")


def cpus_needed(cfg) -> int:
    """Logical CPUs of the placement group of ``cfg`` (one bundle per actor)."""
    pc = cfg.placement
    total = (cfg.rollout.num_workers * pc.rollout.num_cpus + cfg.teacher.num_workers * pc.teacher.num_cpus
             + cfg.learner.num_workers * pc.learner.num_cpus)
    return int(total + 0.999)


def start_ray(num_cpus: int) -> None:
    """One local Ray for the whole script; logical CPUs are scheduling tokens (roles share the real cores)."""
    import ray

    if ray.is_initialized():
        return
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=max(num_cpus, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})


# ---- memory and CPU of a process tree ----------------------------------------------------------


# Ray processes titled ray::... that are not this run's actors (idle pooled workers, per-node agents).
RAY_NON_ACTOR = {"ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobSupervisor"}


class TreeSampler(threading.Thread):
    """Samples RSS (and PSS) of a process and all its descendants in a background thread.

    ``peak_rss_total``: the largest sum of RSS over the whole tree at one instant;
    ``peak_rss_workers``: the same over the Ray actor processes only (process title
    ``ray::<ActorClass>``: rollout, teacher and learner actors; the driver, the Ray daemons,
    idle pooled workers and agents excluded - ``peak_by_name`` has every kind separately);
    ``peak_pss_total`` (only with ``pss_interval > 0``, sampled that rarely): the sum of PSS
    (shared pages split between the processes that map them: a sum of RSS counts shared
    libraries and object-store pages once per process that maps them).
    Every sample also records the CPU seconds used so far by the tree (for "cores busy").
    """

    def __init__(self, root_pid: int | None = None, interval: float = 0.25, pss_interval: float = 0.0):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid or os.getpid())
        self.interval = interval
        self.pss = pss_interval > 0
        self.pss_interval = pss_interval
        self._last_pss = -1e18
        self.samples: list[dict[str, float]] = []
        self.peak_rss_total = self.peak_rss_workers = self.peak_pss_total = 0
        self.peak_by_name: dict[str, int] = {}
        self._stop_event = threading.Event()
        self._dead_cpu = 0.0
        self._cpu_seen: dict[int, float] = {}

    def _procs(self):
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:
            return []

    def sample(self) -> dict[str, float]:
        rss_total = rss_workers = pss_total = 0
        want_pss = self.pss and time.monotonic() - self._last_pss >= self.pss_interval
        if want_pss:
            self._last_pss = time.monotonic()
        cpu_now: dict[int, float] = {}
        by_name: dict[str, int] = {}
        for proc in self._procs():
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    cmd = proc.cmdline()
                    name = cmd[0] if cmd and cmd[0].startswith("ray::") else proc.name()
                pss = proc.memory_full_info().pss if want_pss else 0
            except (self.psutil.Error, OSError):
                continue
            cpu_now[proc.pid] = times.user + times.system
            rss_total += rss
            pss_total += pss
            if name.startswith("ray::"):
                label = name.split()[0].split(".")[0].split("(")[0]  # ray::Class[.method()] -> ray::Class
                by_name[label] = by_name.get(label, 0) + rss
                if label not in RAY_NON_ACTOR:
                    rss_workers += rss
        # CPU seconds of processes that ended since the last sample stay counted.
        for pid, secs in self._cpu_seen.items():
            if pid not in cpu_now:
                self._dead_cpu += secs
        self._cpu_seen = cpu_now
        machine = self.psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0) - getattr(machine, "steal", 0.0)
        record = {"t": time.time(), "rss_total": rss_total, "rss_workers": rss_workers, "pss_total": pss_total,
                  "cpu_s": self._dead_cpu + sum(cpu_now.values()), "machine_cpu_s": busy,
                  "load1": os.getloadavg()[0]}
        self.samples.append(record)
        self.peak_rss_total = max(self.peak_rss_total, rss_total)
        self.peak_rss_workers = max(self.peak_rss_workers, rss_workers)
        if want_pss:
            self.peak_pss_total = max(self.peak_pss_total, pss_total)
        for label, value in by_name.items():
            self.peak_by_name[label] = max(self.peak_by_name.get(label, 0), value)
        return record

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> "TreeSampler":
        self._stop_event.set()
        self.join(timeout=10)
        self.sample()
        return self

    def cpu_seconds_at(self, t: float, key: str = "cpu_s") -> float | None:
        """CPU seconds of the tree (``key="machine_cpu_s"``: of the whole machine) at wall time ``t``
        (linear interpolation between samples)."""
        s = self.samples
        if not s or t < s[0]["t"] or t > s[-1]["t"]:
            return None
        for a, b in zip(s, s[1:]):
            if a["t"] <= t <= b["t"]:
                w = 0.0 if b["t"] == a["t"] else (t - a["t"]) / (b["t"] - a["t"])
                return a[key] + w * (b[key] - a[key])
        return s[-1][key]

    def window_stats(self, t0: float, t1: float) -> dict[str, float | None]:
        """Over wall times [t0, t1]: cores used by the tree, cores used by every other process on the
        machine, and the mean 1-minute load average."""
        out: dict[str, float | None] = {"cores_busy": None, "other_cores": None, "load_mean": None}
        if t1 <= t0:
            return out
        a, b = self.cpu_seconds_at(t0), self.cpu_seconds_at(t1)
        ma, mb = self.cpu_seconds_at(t0, "machine_cpu_s"), self.cpu_seconds_at(t1, "machine_cpu_s")
        if a is not None and b is not None:
            out["cores_busy"] = (b - a) / (t1 - t0)
            if ma is not None and mb is not None:
                out["other_cores"] = max(0.0, (mb - ma - (b - a)) / (t1 - t0))
        loads = [s["load1"] for s in self.samples if t0 <= s["t"] <= t1]
        out["load_mean"] = statistics.fmean(loads) if loads else None
        return out


# ---- results ------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    steps: int = 0
    startup_s: float = 0.0
    step_wall_s: list[float] = field(default_factory=list)  # per step after the warm-up step
    step_tokens: list[int] = field(default_factory=list)  # trained response tokens per timed step
    mean_step_s: float = float("nan")
    median_step_s: float = float("nan")
    tokens_per_s: float = float("nan")
    mean_tokens_per_step: float = float("nan")
    cores_busy: float | None = None  # CPU seconds of the process tree per wall second, over the timed steps
    other_cores: float | None = None  # CPU seconds of every OTHER process on the machine per wall second (noise)
    load_mean: float | None = None  # mean 1-minute load average over the timed steps (ours included)
    peak_rss_workers_mb: float | None = None
    peak_rss_total_mb: float | None = None
    peak_pss_total_mb: float | None = None
    peak_rss_by_actor_mb: dict[str, float] = field(default_factory=dict)
    phase_means: dict[str, float] = field(default_factory=dict)  # controller's time/* metrics, timed steps
    utilisation: dict[str, dict[str, float]] = field(default_factory=dict)
    loadavg_start: tuple = ()
    loadavg_end: tuple = ()
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.step_wall_s != []


def steady_state(result: Result, end_times: list[float], tokens: list[int],
                 sampler: TreeSampler | None = None) -> Result:
    """Fill timing fields from the wall-clock end time of every step; step 1 is the warm-up."""
    result.steps = len(end_times)
    if len(end_times) < 2:
        result.error = result.error or f"only {len(end_times)} step(s) finished: nothing to time after the warm-up"
        return result
    result.step_wall_s = [b - a for a, b in zip(end_times, end_times[1:])]
    result.step_tokens = list(tokens[1:])
    window = end_times[-1] - end_times[0]
    result.mean_step_s = window / len(result.step_wall_s)
    result.median_step_s = statistics.median(result.step_wall_s)
    result.tokens_per_s = sum(result.step_tokens) / window if window > 0 else float("nan")
    result.mean_tokens_per_step = sum(result.step_tokens) / len(result.step_tokens)
    if sampler is not None:
        stats = sampler.window_stats(end_times[0], end_times[-1])
        result.cores_busy = stats["cores_busy"]
        result.other_cores = stats["other_cores"]
        result.load_mean = stats["load_mean"]
        result.peak_rss_total_mb = sampler.peak_rss_total / 2**20
        result.peak_rss_workers_mb = sampler.peak_rss_workers / 2**20
        result.peak_pss_total_mb = sampler.peak_pss_total / 2**20 if sampler.pss else None
        result.peak_rss_by_actor_mb = {k: v / 2**20 for k, v in sorted(sampler.peak_by_name.items())}
    return result


def describe(cfg) -> dict[str, Any]:
    pc = cfg.placement
    return {
        "variant": cfg.algorithm.variant, "max_staleness": cfg.schedule.max_staleness,
        "rollout_workers": cfg.rollout.num_workers, "teacher_workers": cfg.teacher.num_workers,
        "learners": cfg.learner.num_workers, "prompts_per_step": cfg.schedule.prompts_per_step,
        "max_new_tokens": cfg.rollout.max_new_tokens, "dtype": cfg.model.dtype,
        "threads": {"rollout": pc.rollout.torch_threads, "teacher": pc.teacher.torch_threads,
                    "learner": pc.learner.torch_threads},
    }


PHASES = ("time/step", "time/rollout_wait", "time/teacher_wait", "time/learner", "time/sync",
          "time/rollout_busy", "time/teacher_busy", "time/learner_busy", "time/ema")


def run_sdft_ray(name: str, cfg, *, sample_interval: float = 0.25, pss_interval: float = 0.0) -> Result:
    """Start the actors (timed as start-up), run ``schedule.max_steps`` steps, shut down; never raises."""
    import traceback

    from sdft_ray.metrics import read_metrics
    from sdft_ray.runner import prepare

    import ray

    result = Result(name=name, settings=describe(cfg), loadavg_start=loadavg())
    needed = cpus_needed(cfg)
    start_ray(needed)
    have = ray.cluster_resources().get("CPU", 0)
    if have < needed:  # the placement group would wait for call_timeout_s
        result.error = (f"Ray was started with {have:g} logical CPUs, this configuration needs {needed}: "
                        "start_ray(max over all configurations) first")
        result.loadavg_end = loadavg()
        print(f"[bench] {name}: FAILED {result.error}", flush=True)
        return result
    sampler = TreeSampler(interval=sample_interval, pss_interval=pss_interval)
    driver_cpu0 = sum(os.times()[:2])
    sampler.start()
    controller = None
    try:
        prepared = prepare(cfg)
        t0 = time.perf_counter()
        controller = prepared.controller(cfg.output.dir)
        controller.start()
        result.startup_s = time.perf_counter() - t0
        summary = controller.run()
        history = summary["history"]
        logged = read_metrics(Path(cfg.output.dir) / "metrics.jsonl")
        end_times = [r["time"] for r in logged]
        tokens = [int(h["response_tokens"]) for h in history]
        sampler.stop()
        steady_state(result, end_times, tokens, sampler)
        timed = history[1:]
        result.phase_means = {k: statistics.fmean(h.get(k, 0.0) for h in timed) for k in PHASES if timed}
        result.utilisation = summary["utilisation"]
        if len(end_times) >= 2:  # the same definitions over the timed steps only (warm-up step excluded)
            from sdft_ray.step_metrics import utilisation_summary

            result.extra["timed_utilisation"] = utilisation_summary(timed, end_times[-1] - end_times[0])
        result.extra["staleness"] = [h.get("staleness") for h in history]
        result.extra["sync_bytes_per_step"] = statistics.fmean(h.get("sync/bytes", 0) for h in timed) if timed else None
        result.extra["loss"] = [h.get("loss") for h in history]
        result.extra["run_seconds"] = summary["seconds"]
    except Exception as exc:  # a failed configuration is reported, the others still run
        result.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        if sampler.is_alive():
            sampler.stop()
        if controller is not None:
            try:
                controller.shutdown()
            except Exception:  # noqa: BLE001
                pass
        result.loadavg_end = loadavg()
        result.extra["driver_cpu_s"] = sum(os.times()[:2]) - driver_cpu0  # this process, sampler thread included
    print(f"[bench] {name}: " + (f"mean step {result.mean_step_s:.2f} s, {result.tokens_per_s:.1f} tok/s, "
                                 f"start-up {result.startup_s:.1f} s, cores busy {fmt(result.cores_busy)}, other "
                                 f"processes {fmt(result.other_cores)} cores, mean load {fmt(result.load_mean, '.1f')}"
                                 if result.ok else f"FAILED {result.error}")
          + f" | load average {result.loadavg_start} -> {result.loadavg_end}", flush=True)
    time.sleep(1.0)  # let killed actors exit before the next configuration starts
    return result


def merge_results(name: str, runs: list[Result]) -> Result:
    """One result per configuration: itself, or the pooled timed steps of several repeats."""
    if len(runs) == 1:
        return runs[0]
    ok = [r for r in runs if r.ok]
    if not ok:
        return runs[0]
    out = Result(name=name, settings=ok[0].settings, loadavg_start=ok[0].loadavg_start, loadavg_end=ok[-1].loadavg_end)
    out.step_wall_s = [s for r in ok for s in r.step_wall_s]
    out.step_tokens = [t for r in ok for t in r.step_tokens]
    out.steps = sum(r.steps for r in ok)
    out.mean_step_s = sum(out.step_wall_s) / len(out.step_wall_s)
    out.median_step_s = sorted(out.step_wall_s)[len(out.step_wall_s) // 2]
    out.tokens_per_s = sum(out.step_tokens) / sum(out.step_wall_s)
    out.mean_tokens_per_step = sum(out.step_tokens) / len(out.step_tokens)
    out.startup_s = sum(r.startup_s for r in ok) / len(ok)
    for attr in ("cores_busy", "other_cores", "load_mean"):
        vals = [getattr(r, attr) for r in ok if getattr(r, attr) is not None]
        setattr(out, attr, sum(vals) / len(vals) if vals else None)
    for attr in ("peak_rss_workers_mb", "peak_rss_total_mb", "peak_pss_total_mb"):
        vals = [getattr(r, attr) for r in ok if getattr(r, attr) is not None]
        setattr(out, attr, max(vals) if vals else None)
    out.phase_means = {k: sum(r.phase_means.get(k, 0.0) for r in ok) / len(ok) for k in ok[0].phase_means}
    out.utilisation = ok[-1].utilisation  # per-role shares: the last repeat's (not pooled)
    out.extra = {**ok[-1].extra, "repeats": len(ok)}
    return out


def with_retries(args: argparse.Namespace, run) -> Result:
    """``run()`` after waiting for a quiet machine; again (``--retries``) while other processes used more than
    ``--max-other-cores`` cores during the timed steps. Returns the attempt with the least outside CPU use."""
    attempts: list[Result] = []
    for attempt in range(getattr(args, "retries", 0) + 1):
        waited = wait_for_load(args)
        result = run()
        result.extra.update(waited_for_quiet_s=waited, attempt=attempt + 1)
        attempts.append(result)
        if not result.ok or result.other_cores is None or result.other_cores <= args.max_other_cores:
            break
        if attempt < args.retries:
            print(f"[bench] {result.name}: other processes used {result.other_cores:.2f} cores during the timed steps "
                  f"(limit {args.max_other_cores}): running it again", flush=True)
    ok = [r for r in attempts if r.ok]
    best = min(ok, key=lambda r: r.other_cores if r.other_cores is not None else 0.0) if ok else attempts[-1]
    best.extra["attempts_other_cores"] = [r.other_cores for r in attempts]
    best.extra["attempts_mean_step_s"] = [r.mean_step_s for r in attempts]
    return best


def run_configs(args: argparse.Namespace, model_folder: Path, root: Path,
                configs: list[tuple[str, dict[str, Any]]]) -> tuple[list[Result], dict[str, list[Result]]]:
    """Run every ``(name, overrides)`` ``args.repeats`` times, interleaved; return the merged and the raw results."""
    runs: dict[str, list[Result]] = {name: [] for name, _ in configs}
    start_ray(max(cpus_needed(make_config(args, model_folder, root / "probe", o)) for _, o in configs))
    for rep in range(args.repeats):
        for name, overrides in configs:
            cfg = make_config(args, model_folder, root / f"{name}-{rep}", overrides)
            label = name if args.repeats == 1 else f"{name}#{rep + 1}"
            runs[name].append(with_retries(args, lambda: run_sdft_ray(
                label, cfg, sample_interval=args.sample_interval, pss_interval=args.pss_interval)))
    return [merge_results(name, rs) for name, rs in runs.items()], runs


# ---- printing -----------------------------------------------------------------------------------


def console():
    from rich.console import Console

    return Console(width=max(170, int(os.environ.get("COLUMNS", 0) or 0)))


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    if value is None:
        return none
    try:
        if value != value:  # NaN
            return none
    except TypeError:
        return str(value)
    return format(value, spec)


def threads_label(r: Result) -> str:
    threads = r.settings.get("threads")
    if isinstance(threads, dict):
        return "/".join(str(threads.get(k)) for k in ("rollout", "teacher", "learner"))
    return str(threads) if threads is not None else "-"


def results_table(title: str, results: list[Result], reference: Result | None = None, ref_label: str = "vs ref"):
    """The standard table: step time, tokens/s, CPU, memory, and the step-time ratio to ``reference``."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("configuration", "threads r/t/l", "timed steps", "mean step s", "median step s", "tokens/step", "tokens/s",
                f"step time {ref_label}", "cores busy", "other procs cores", "load avg (timed)", "peak RSS actors MB",
                "peak PSS tree MB", "start-up s"):
        table.add_column(col, justify="right" if col != "configuration" else "left")
    for r in results:
        if not r.ok:
            table.add_row(r.name, "-", "-", f"[red]failed: {r.error}", *["-"] * 10)
            continue
        ratio = (r.mean_step_s / reference.mean_step_s) if reference is not None and reference.ok else None
        table.add_row(
            r.name, threads_label(r), str(len(r.step_wall_s)), fmt(r.mean_step_s), fmt(r.median_step_s), fmt(r.mean_tokens_per_step, ".1f"),
            fmt(r.tokens_per_s, ".1f"), fmt(ratio, ".2f") + ("x" if ratio is not None else ""), fmt(r.cores_busy),
            fmt(r.other_cores), fmt(r.load_mean, ".1f"), fmt(r.peak_rss_workers_mb, ".0f"),
            fmt(r.peak_pss_total_mb, ".0f"), fmt(r.startup_s, ".1f"))
    return table


def utilisation_table(title: str, results: list[Result], timed: bool = True):
    """Per-role busy seconds and busy share of wall-clock (``summary["utilisation"]``, or the same over the
    timed steps only)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("configuration", "role", "busy s", "idle s", "busy share of wall clock"):
        table.add_column(col, justify="left" if col in ("configuration", "role") else "right")
    for r in results:
        if not r.ok:
            continue
        util = r.extra.get("timed_utilisation") if timed else r.utilisation
        for i, (role, row) in enumerate((util or {}).items()):
            table.add_row(r.name if i == 0 else "", role, fmt(row["busy_s"], ".1f"), fmt(row["idle_s"], ".1f"),
                          f"{100 * row['utilisation']:.0f}%")
        table.add_section()
    return table


def phase_table(title: str, results: list[Result]):
    """Mean per-step seconds of each controller phase (timed steps only)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("configuration")
    for key in PHASES:
        table.add_column(key.replace("time/", ""), justify="right")
    for r in results:
        if r.ok:
            table.add_row(r.name, *[fmt(r.phase_means.get(k)) for k in PHASES])
    return table


def ratio(label: str, numerator: Result, denominator: Result, *, field_name: str = "mean_step_s",
          note: str = "") -> float | None:
    """Print ``ratio <label>: <x>`` (grep-able) and return it; None when either side failed."""
    if not (numerator.ok and denominator.ok):
        print(f"ratio {label}: n/a ({numerator.name if not numerator.ok else denominator.name} failed)", flush=True)
        return None
    value = getattr(numerator, field_name) / getattr(denominator, field_name)
    print(f"ratio {label}: {value:.2f}x" + (f"  ({note})" if note else ""), flush=True)
    return value


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return

    def default(obj):
        if isinstance(obj, Result):
            return asdict(obj)
        if isinstance(obj, Path):
            return str(obj)
        return repr(obj)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=default), encoding="utf-8")
    print(f"[bench] wrote {path}", flush=True)


def header(args: argparse.Namespace, model_folder: Path, what: str) -> dict[str, Any]:
    """Print and return what was measured with what."""
    info = {"what": what, "model": "tiny random Llama" if args.tiny else args.model, "model_folder": str(model_folder),
            "steps": args.steps, "timed_steps": args.steps - 1, "prompts_per_step": args.prompts,
            "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "threads_per_role": args.threads, "pipe_threads_per_role": args.pipe_threads,
            "cpu_count": os.cpu_count(), "loadavg_start": loadavg(), "argv": sys.argv}
    print(f"== {what}", flush=True)
    print(machine_line(), flush=True)
    print(f"model={info['model']} steps={args.steps} (first = warm-up, not timed) prompts/step={args.prompts} "
          f"max_new_tokens={args.max_new_tokens} dtype={args.dtype} torch threads/role={args.threads} "
          f"(pipelined configurations: {args.pipe_threads})", flush=True)
    return info


def begin(args: argparse.Namespace, what: str) -> tuple[Path, dict[str, Any], Path]:
    """Every script's start: environment, model folder, printed header, output root."""
    setup(args)
    model = resolve_model(args)
    info = header(args, model, what)
    return model, info, output_root(args)


def shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001
        pass


def finish(json_path, info: dict, results: list, runs: dict, ratios: dict) -> int:
    """Print the closing load average, write the JSON record, and return the exit code."""
    print(f"load average at the end: {loadavg()} (start {info['loadavg_start']})", flush=True)
    write_json(json_path, {"info": info, "results": results, "runs": runs, "ratios": ratios,
                           "loadavg_end": loadavg()})
    return 0 if all(r.ok for r in results) else 1
