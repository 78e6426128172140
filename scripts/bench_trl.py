"""sdft-ray vs TRL's ``SDFTTrainer`` (``trl.experimental.sdft``): training tokens/s and peak memory.

Same model, data rows in the same order (no shuffling), batch, generation length and loss in
one run on one machine:

* on-policy samples, 1 per prompt, ``--prompts`` prompts per optimizer step, one micro-batch
  (TRL: ``per_device_train_batch_size = prompts``, ``gradient_accumulation_steps = 1``,
  ``num_generations = 1``), temperature 1, top-p 1, no top-k, ``--max-new-tokens``;
* full-vocabulary forward KL (sdft-ray ``loss.alpha: 0, estimator: full``; TRL
  ``distillation_mode="full_logits", distillation_alpha=0.0``), first 3 response tokens
  masked, per-sequence token mean then batch mean, no importance-ratio clipping;
* EMA teacher, rate 0.05 after every optimizer step, prompted with the sdft-ray teacher
  template (TRL ``teacher_prompt_template`` with ``{privileged_context}``), chat template for
  both roles;
* fp32 weights and compute, AdamW (0.9, 0.999), lr 5e-5 constant, weight decay 0, gradient
  clipping 1.0, no gradient checkpointing (TRL's default is on: turned off here).

TRL runs in a child process with ``torch.set_num_threads(--threads)``; its peak memory is the
child's peak RSS (``ru_maxrss``) and the sampled peak RSS/PSS. sdft-ray's is the sampled peak of
the sum of RSS over the Ray worker processes (the actors), and the sampled peak PSS of the
whole process tree (driver, Ray daemons, workers). Tokens/s counts the response tokens that
are trained on, after the first (warm-up) step. sdft-ray runs with ``max_staleness`` 0 (the
same synchronous algorithm as TRL, ``--threads`` per role like TRL's process), colocated
(``placement.mode: colocated``: one actor with ``--threads`` holds every role, as TRL's one
process does; ``--no-colocated`` skips it) and, unless ``--staleness 0``, pipelined 1
(``--pipe-threads`` per role, 1 on 2 cores).

    .venv/bin/python scripts/bench_trl.py                        # SmolLM2-135M
    .venv/bin/python scripts/bench_trl.py --tiny --steps 3       # smoke run
    # every row of issue 13: + vLLM rollout (colocated, sync, pipelined) and LoRA, TRL from .venv
    .venv-vllm/bin/python scripts/bench_trl.py --steps 4 --vllm --lora 16 --trl-python .venv/bin/python

Needs ``trl`` (tested with 1.16.0): ``.venv/bin/pip install --no-deps trl==1.16.0``; if TRL
cannot be imported or fails, the script says why and still measures sdft-ray.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

from sdft_ray.prompts import resolve_template  # noqa: E402

EMA_RATE = 0.05
LR = 5e-5
SKIP_FIRST = 3


# ---- TRL, in a child process ----------------------------------------------------------------------


def trl_child(spec_path: str) -> int:
    """Train with TRL's SDFTTrainer as ``spec`` says; write step stamps, tokens and memory to spec['out']."""
    spec = json.loads(Path(spec_path).read_text())
    out: dict = {"ok": False}
    try:
        import resource

        import torch

        torch.set_num_threads(spec["threads"])
        import trl
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        out.update(trl_version=trl.__version__, torch_threads=torch.get_num_threads())
        rows = [json.loads(line) for line in open(spec["data"], encoding="utf-8") if line.strip()]
        rows = rows[: spec["steps"] * spec["prompts"]]
        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "privileged_context": r["demonstration"]} for r in rows])
        tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left", truncation_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        def cpu_s() -> float:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            return ru.ru_utime + ru.ru_stime

        stamps: list[float] = []
        cpu: list[float] = []
        tokens: list[int] = []
        # per step: seconds generating (sample_rollouts) and in the teacher's forward passes
        rollout_s: list[float] = []
        teacher_s: list[float] = [0.0]

        class Counting(SDFTTrainer):
            def sample_rollouts(self, inputs):
                t = time.perf_counter()
                batch = super().sample_rollouts(inputs)
                rollout_s.append(time.perf_counter() - t)
                tokens.append(int(batch["raw_completion_lengths"].sum()))
                return batch

        class StepTimer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                stamps.append(time.time())
                cpu.append(cpu_s())
                teacher_s.append(0.0)

        def time_teacher(module) -> None:
            """Add the teacher module's forward passes to the current step's teacher seconds."""
            started: list[float] = []
            module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

            def done(*_):
                teacher_s[-1] += time.perf_counter() - started.pop()
            module.register_forward_hook(done)

        config = SDFTConfig(
            output_dir=spec["output_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["prompts"],
            gradient_accumulation_steps=1, num_generations=1, max_completion_length=spec["max_new_tokens"],
            max_prompt_length=spec["max_prompt_tokens"], temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
            adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch", gradient_checkpointing=False,
            teacher_model_kind="ema", teacher_update_rate=EMA_RATE, teacher_sync_steps=1,
            distillation_mode="full_logits", distillation_alpha=0.0, distillation_is_clip=None,
            num_loss_tokens_to_skip=SKIP_FIRST, teacher_prompt_template=spec["teacher_template"],
            use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, shuffle_dataset=False, seed=spec["seed"], dataloader_num_workers=0,
            dataloader_pin_memory=False, model_init_kwargs={"dtype": spec["dtype"]}, remove_unused_columns=False,
        )
        peft_config = None
        if spec.get("lora"):  # the same adapters as sdft-ray's model.lora rows
            from peft import LoraConfig

            peft_config = LoraConfig(task_type="CAUSAL_LM", bias="none", **spec["lora"])
        t0 = time.perf_counter()
        trainer = Counting(model=spec["model"], args=config, train_dataset=dataset, processing_class=tokenizer,
                           peft_config=peft_config)
        trainer.add_callback(StepTimer())  # after the EMA callback: a step ends after the teacher update
        if trainer.teacher_model is not trainer.model:  # LoRA: the student with its EMA adapter, not timed apart
            time_teacher(trainer.teacher_model)
        out["startup_s"] = time.perf_counter() - t0
        trainer.train()
        out.update(ok=True, end_times=stamps, cpu_at_ends=cpu, tokens=tokens, rollout_s=rollout_s,
                   teacher_s=teacher_s[:len(stamps)] if trainer.teacher_model is not trainer.model else None,
                   ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   teacher_is_separate_model=trainer.teacher_model is not trainer.model,
                   losses=[h.get("loss") for h in trainer.state.log_history if "loss" in h])
    except Exception as exc:  # report why TRL could not run
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    Path(spec["out"]).write_text(json.dumps(out), encoding="utf-8")
    return 0 if out["ok"] else 1


def lora_settings(r: int) -> dict:
    """The adapters of the LoRA rows (TRL's ``LoraConfig`` and sdft-ray's ``model.lora`` alike)."""
    return {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def synced_mb(r: bc.Result) -> float | None:
    """Mean MB of weights published per timed step (student to rollout + teacher weights)."""
    value = r.extra.get("sync_bytes_per_step")
    return None if value is None else value / 2**20


def vllm_settings() -> dict:
    """``rollout.vllm`` of ``configs/quickstart_vllm.yaml`` (in-process engine, eager, a 512 MiB KV cache)."""
    import yaml

    tree = yaml.safe_load((bc.REPO / "configs" / "quickstart_vllm.yaml").read_text(encoding="utf-8"))
    return dict(tree["rollout"]["vllm"])


def trl_phase_means(end_times: list[float], rollout_s: list[float], teacher_s: list[float] | None) -> dict:
    """TRL's step split as sdft-ray's ``time/*`` metrics, over the timed steps (after the first):
    generation, the teacher's forward passes (when the teacher is a module of its own) and the
    rest of the step (the student's forward and backward, the optimizer, the EMA) as learner."""
    steps = [b - a for a, b in zip(end_times, end_times[1:])]
    if not steps or len(rollout_s) < len(end_times):
        return {}
    timed = range(1, len(end_times))
    out = {"time/step": statistics.fmean(steps), "time/rollout_busy": statistics.fmean(rollout_s[i] for i in timed)}
    if teacher_s is not None and len(teacher_s) >= len(end_times):
        out["time/teacher_busy"] = statistics.fmean(teacher_s[i] for i in timed)
    out["time/learner_busy"] = out["time/step"] - out["time/rollout_busy"] - out.get("time/teacher_busy", 0.0)
    return out


def run_trl(args: argparse.Namespace, model_folder: Path, teacher_template: str, max_prompt_tokens: int,
            workdir: Path, lora: int = 0) -> bc.Result:
    result = bc.Result(name="trl SDFTTrainer" + (f" LoRA r={lora}" if lora else ""), loadavg_start=bc.loadavg(),
                       settings={"threads": args.threads, "prompts_per_step": args.prompts,
                                 "max_new_tokens": args.max_new_tokens, "dtype": args.dtype})
    python = args.trl_python or sys.executable
    try:
        check = subprocess.run([python, "-c", "from trl.experimental.sdft import SDFTTrainer"], capture_output=True,
                               text=True)
        why = None if check.returncode == 0 else (check.stderr.strip().splitlines() or ["no output"])[-1]
    except OSError as exc:  # --trl-python is not an interpreter
        why = f"{type(exc).__name__}: {exc}"
    if why is not None:
        result.error = f"TRL cannot be imported by {python} ({why}); pip install --no-deps trl==1.16.0"
        result.loadavg_end = bc.loadavg()
        return result
    spec = {"model": str(model_folder), "data": str(args.data), "steps": args.steps, "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "threads": args.threads,
            "seed": args.seed, "dtype": args.dtype, "output_dir": str(workdir / "trl_out"),
            "teacher_template": teacher_template.replace("{demonstration}", "{privileged_context}"),
            "out": str(workdir / "trl_result.json"), "lora": lora_settings(lora) if lora else None}
    spec_path = workdir / "trl_spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--_trl-child", str(spec_path)], env=env)
    sampler = bc.TreeSampler(proc.pid, interval=args.sample_interval, pss_interval=args.pss_interval)
    sampler.start()
    rc = proc.wait()
    sampler.stop()
    result.loadavg_end = bc.loadavg()
    try:
        out = json.loads(Path(spec["out"]).read_text())
    except (OSError, ValueError):
        out = {"ok": False, "error": f"TRL child exited with {rc} without a result"}
    if not out.get("ok"):
        result.error = out.get("error", f"exit code {rc}")
        print(out.get("traceback", ""), file=sys.stderr, flush=True)
        return result
    result.startup_s = out["startup_s"]
    bc.steady_state(result, out["end_times"], out["tokens"], sampler)
    ends, cpu = out["end_times"], out["cpu_at_ends"]
    if len(ends) >= 2 and ends[-1] > ends[0]:
        result.cores_busy = (cpu[-1] - cpu[0]) / (ends[-1] - ends[0])  # the child's own CPU seconds (exact)
    result.peak_rss_workers_mb = out["ru_maxrss_mb"]  # one process: its peak RSS
    result.phase_means = trl_phase_means(ends, out.get("rollout_s") or [], out.get("teacher_s"))
    result.extra.update(trl_version=out.get("trl_version"), torch_threads=out.get("torch_threads"),
                        teacher_is_separate_model=out.get("teacher_is_separate_model"), loss=out.get("losses"),
                        sampled_peak_rss_mb=sampler.peak_rss_total / 2**20)
    print(f"[bench] {result.name}: mean step {result.mean_step_s:.2f} s, {result.tokens_per_s:.1f} tok/s, "
          f"start-up {result.startup_s:.1f} s, peak RSS {result.peak_rss_workers_mb:.0f} MB, cores busy "
          f"{bc.fmt(result.cores_busy)}, other processes {bc.fmt(result.other_cores)} cores | load average "
          f"{result.loadavg_start} -> {result.loadavg_end}", flush=True)
    return result


# ---- parity check -------------------------------------------------------------------------------


def prompt_parity(cfg, n: int) -> str:
    """Do TRL's prompt tokenization and sdft-ray's produce the same ids for the first n rows?"""
    from sdft_ray.models import load_tokenizer
    from sdft_ray.runner import prepare

    prepared = prepare(cfg)
    tok = load_tokenizer(prepared.model_folder)
    rows = [json.loads(line) for line in open(cfg.data.path, encoding="utf-8") if line.strip()][:n]
    template = resolve_template(cfg.prompts.teacher_template).replace("{demonstration}", "{privileged_context}")
    same_student = same_teacher = 0
    by_index = {e.index: e for e in prepared.examples}
    for i, row in enumerate(rows):
        student = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
        teacher_text = template.format(prompt=row["prompt"], privileged_context=row["demonstration"])
        teacher = tok.apply_chat_template([{"role": "user", "content": teacher_text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
        ex = by_index.get(i)
        same_student += ex is not None and list(ex.prompt_ids) == list(student)
        same_teacher += ex is not None and list(ex.teacher_prompt_ids) == list(teacher)
    return f"prompt token ids identical in TRL and sdft-ray: student {same_student}/{len(rows)}, teacher {same_teacher}/{len(rows)}"


# ---- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = bc.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--staleness", default="0,1", help="sdft-ray max_staleness values to measure")
    ap.add_argument("--skip-trl", action="store_true", help="measure sdft-ray only")
    ap.add_argument("--no-colocated", action="store_true", help="skip the placement.mode colocated row")
    ap.add_argument("--vllm", action="store_true",
                    help="also rows with vLLM rollout (colocated, synchronous and each --staleness > 0); run "
                         "the script with the vLLM environment's Python and --trl-python .venv/bin/python")
    ap.add_argument("--trl-python", default=None, metavar="PYTHON",
                    help="interpreter of the TRL child process (default: this one), e.g. .venv/bin/python when "
                         "the script runs in .venv-vllm, which has no TRL")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="also LoRA rows (rank R on the attention projections): TRL and sdft-ray colocated")
    args = ap.parse_args(argv)
    model, info, root = bc.begin(args, "sdft-ray vs TRL SDFTTrainer: training tokens/s and peak memory")
    shared = {"data.shuffle": False, "teacher.ema_rate": EMA_RATE, "learner.lr": LR,
              "loss.skip_first_tokens": SKIP_FIRST, "loss.is_clip": None, "loss.aggregation": "sequence_mean",
              "learner.gradient_checkpointing": False}
    probe = bc.make_config(args, model, root / "probe", shared)
    parity = prompt_parity(probe, args.steps * args.prompts)
    print(parity, flush=True)

    results = []
    if args.skip_trl:
        trl_result = bc.Result(name="trl SDFTTrainer", error="skipped (--skip-trl)")
    else:  # TRL first, before Ray starts, so that no Ray daemon runs beside it
        def trl_once() -> bc.Result:
            workdir = Path(tempfile.mkdtemp(prefix="bench_trl_", dir=root))
            return run_trl(args, model, resolve_template(probe.prompts.teacher_template), probe.prompts.max_prompt_tokens,
                           workdir)

        trl_result = bc.with_retries(args, trl_once)
    if not trl_result.ok:
        print(f"TRL could not run: {trl_result.error}", flush=True)
    results.append(trl_result)
    if args.lora and not args.skip_trl:
        results.append(bc.with_retries(args, lambda: run_trl(
            args, model, resolve_template(probe.prompts.teacher_template), probe.prompts.max_prompt_tokens,
            Path(tempfile.mkdtemp(prefix="bench_trl_lora_", dir=root)), lora=args.lora)))
    stale = [int(k) for k in args.staleness.split(",") if k.strip()]
    configs = [(f"sdft-ray stale{k}" if k else "sdft-ray sync", {**shared, "schedule.max_staleness": k}) for k in stale]
    colocated = {**shared, "schedule.max_staleness": 0, "placement.mode": "colocated"}
    if not args.no_colocated:  # one actor holding every role, the synchronous algorithm
        configs.insert(0, ("sdft-ray colocated", colocated))
    if args.vllm:  # the rollout engine of configs/quickstart_vllm.yaml, the roles as in the rows above
        engine = vllm_settings()
        engine["max_model_len"] = max(engine["max_model_len"], probe.prompts.max_prompt_tokens + args.max_new_tokens)
        vllm = {"rollout.engine": "vllm", "rollout.vllm": engine}
        configs += [(f"{name} vLLM rollout", {**overrides, **vllm}) for name, overrides in list(configs)]
    if args.lora:
        adapters = {k.removeprefix("lora_"): v for k, v in lora_settings(args.lora).items()}
        configs.append((f"sdft-ray colocated LoRA r={args.lora}", {**colocated, "model.lora": adapters}))
    ray_results, runs = bc.run_configs(args, model, root, configs)
    bc.shutdown_ray()
    results += ray_results

    trl_lora = next((r for r in results if r.name.startswith("trl") and "LoRA" in r.name), None)

    def comparator(r: bc.Result) -> bc.Result:
        """LoRA rows compare with TRL's LoRA row, the others with TRL's full fine-tuning."""
        return trl_lora if "LoRA" in r.name and trl_lora is not None else trl_result

    con = bc.console()
    from rich.table import Table

    table = Table(title=f"sdft-ray vs TRL SDFTTrainer ({'tiny model' if args.tiny else args.model}, "
                        f"{args.prompts} prompts/step, {args.max_new_tokens} new tokens, fp32; first step excluded)")
    for col in ("trainer", "torch threads", "timed steps", "mean step s", "trained tokens/step", "tokens/s",
                "tokens/s vs TRL", "cores busy", "other procs cores", "load avg (timed)",
                "peak RSS MB (TRL: the process; sdft-ray: sum over actors)", "peak PSS tree MB",
                "weights synced MB/step (between processes)", "start-up s"):
        table.add_column(col, justify="left" if col == "trainer" else "right")
    for r in results:
        if not r.ok:
            table.add_row(r.name, "-", "-", f"[red]{r.error}", *["-"] * 10)
            continue
        base = comparator(r)
        rel = r.tokens_per_s / base.tokens_per_s if base.ok and r is not base else None
        table.add_row(r.name, bc.threads_label(r), str(len(r.step_wall_s)), bc.fmt(r.mean_step_s), bc.fmt(r.mean_tokens_per_step, ".1f"),
                      bc.fmt(r.tokens_per_s, ".1f"), bc.fmt(rel) + ("x" if rel is not None else ""),
                      bc.fmt(r.cores_busy), bc.fmt(r.other_cores), bc.fmt(r.load_mean, ".1f"),
                      bc.fmt(r.peak_rss_workers_mb, ".0f"), bc.fmt(r.peak_pss_total_mb, ".0f"),
                      "0 (one process)" if r.name.startswith("trl") else bc.fmt(synced_mb(r), ".1f"),
                      bc.fmt(r.startup_s, ".1f"))
    con.print(table)
    con.print(bc.phase_table("mean seconds per timed step, by phase (sdft-ray: controller metrics; TRL: generation, "
                             "the teacher module's forward passes, the rest as learner_busy)", results))
    for r in ray_results:
        if r.ok and r.peak_rss_by_actor_mb:
            print(f"  {r.name}: peak RSS by Ray process kind (MB) "
                  + ", ".join(f"{k} {v:.0f}" for k, v in r.peak_rss_by_actor_mb.items())
                  + f"; whole tree RSS {r.peak_rss_total_mb:.0f}", flush=True)
    ratios = {}
    for r in ray_results:
        ratios[f"{r.name}_over_trl_tokens_per_s"] = bc.ratio(f"{r.name}/trl tokens per s", r, comparator(r),
                                                             field_name="tokens_per_s", note="> 1 means sdft-ray faster")
        ratios[f"{r.name}_over_trl_peak_memory"] = bc.ratio(
            f"{r.name}/trl peak memory (sum of actor RSS / TRL process RSS)", r, comparator(r),
            field_name="peak_rss_workers_mb")
    print(f"load average at the end: {bc.loadavg()} (start {info['loadavg_start']})", flush=True)
    bc.write_json(args.json, {"info": info, "parity": parity, "results": results, "runs": runs, "ratios": ratios,
                              "loadavg_end": bc.loadavg()})
    return 0 if all(r.ok for r in ray_results) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_trl-child":
        bc.setup()
        sys.exit(trl_child(sys.argv[2]))
    sys.exit(main())
