"""SDPO-style self-distillation from feedback.

The teacher is the (EMA) student prompted with the query, the environment's feedback on the
student's own attempt (from a user function ``algorithm.feedback_fn = "module:function"``,
called as ``fn(context, response_text) -> str | None``; None means the attempt passed) and,
when the row has one, a correct solution (its demonstration).
"""

from __future__ import annotations

import importlib

import numpy as np

from sdft_ray.data import Example, Message
from sdft_ray.variants.base import Variant

SOLUTION = "\nHere is a correct solution:\n\n{solution}\n"
FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}\n"
TEMPLATE = "{prompt}\n{demonstration}\n\nCorrectly solve the original question."


def load_function(spec: str):
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"algorithm.feedback_fn must be 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"algorithm.feedback_fn: cannot load {spec!r}: {exc}") from exc


class SDPO(Variant):
    name = "sdpo"
    requires_demonstration = False
    needs_context = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.algorithm.feedback_fn:
            raise ValueError("algorithm.variant 'sdpo' needs algorithm.feedback_fn ('module:function')")
        load_function(cfg.algorithm.feedback_fn)  # fail in the driver, not in an actor
        self._feedback = None
        self._builder = None

    def tokenize(self, builder, examples):
        return self.student_prompt_only(builder, examples)

    def teacher_context(self, context: dict, response: str) -> str:
        """The privileged context: a solution if the row has one, plus feedback on this attempt."""
        if self._feedback is None:
            self._feedback = load_function(self.cfg.algorithm.feedback_fn)
        feedback = self._feedback(context, response)
        parts = []
        if context.get("demonstration"):
            parts.append(SOLUTION.format(solution=context["demonstration"]))
        if feedback:
            parts.append(FEEDBACK.format(feedback=feedback))
        return "".join(parts)

    def teacher_prompts(self, traj, tokenizer):
        """The teacher's prompt per response: the student's chat (system turn included, once) with
        the last user turn filled into the SDPO template, within prompts.max_teacher_prompt_tokens."""
        from sdft_ray.runner import prompt_builder

        if self._builder is None or self._builder.tokenizer is not tokenizer:
            self._builder = prompt_builder(self.cfg, tokenizer, teacher_template=TEMPLATE)
        prompts = []
        for ctx, response in zip(traj.contexts, traj.response_ids):
            text = tokenizer.decode(response, skip_special_tokens=True)
            prompt = ctx["prompt"] if isinstance(ctx["prompt"], str) else tuple(Message(*m) for m in ctx["prompt"])
            example = Example(index=int(ctx.get("row", -1)), prompt=prompt, source=str(ctx.get("where", "sdpo")),
                              demonstration=self.teacher_context(ctx, text))
            prompts.append(np.asarray(self._builder.fitted_teacher_ids(example), dtype=np.int64))
        return prompts


def answer_feedback(context: dict, response: str) -> str | None:
    """An example checker: passes when the row's ``answer`` appears in the response."""
    answer = str(context.get("answer", "")).strip()
    if answer and answer.lower() in response.lower():
        return None
    return "Your answer is not correct: it does not contain the expected answer."
