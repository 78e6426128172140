"""Continual-learning evaluation: metrics, task definitions and a checkpoint evaluator.

``metrics`` holds pure scoring functions (``score(response, reference) -> [0, 1]``) and
pass@k; ``tasks`` defines :class:`EvalTask` and loads them from YAML (``configs/eval/``);
``runner`` generates with a rollout engine, scores and writes JSONL/CSV results.
"""

from sdft_ray.evaluation.metrics import METRICS, get_metric, pass_at_k
from sdft_ray.evaluation.tasks import EvalTask, load_tasks

__all__ = ["METRICS", "EvalTask", "evaluate_checkpoint", "evaluate_with_actors", "get_metric", "load_tasks", "pass_at_k",
           "write_results"]


def __getattr__(name: str):
    # The runner imports torch and transformers: load it only when asked for.
    if name in ("evaluate_checkpoint", "evaluate_with_actors", "write_results"):
        from sdft_ray.evaluation import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
