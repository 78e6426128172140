"""SDPO-style self-distillation from feedback.

The teacher is the (EMA) student prompted with the query, the environment's feedback on the
student's own attempt (from a user function ``algorithm.feedback_fn = "module:function"``,
called as ``fn(context, response_text) -> str | None``; None means the attempt passed) and,
when the row has one, a correct solution (its demonstration).
"""

from __future__ import annotations

import importlib

import numpy as np

from sdft_ray.prompts import fill_template
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
        prompts = []
        p = self.cfg.prompts
        for ctx, response in zip(traj.contexts, traj.response_ids):
            text = tokenizer.decode(response, skip_special_tokens=True)
            query = ctx["prompt"] if isinstance(ctx["prompt"], str) else ctx["prompt"][-1][1]
            user = fill_template(TEMPLATE, query, self.teacher_context(ctx, text))
            messages = ([{"role": "system", "content": p.system_prompt}] if p.system_prompt else [])
            if not isinstance(ctx["prompt"], str):
                messages += [{"role": r, "content": c} for r, c in ctx["prompt"][:-1]]
            messages.append({"role": "user", "content": user})
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
                if p.use_chat_template and tokenizer.chat_template else "\n\n".join(m["content"] for m in messages)
            prompts.append(np.asarray(tokenizer(rendered, add_special_tokens=False)["input_ids"], dtype=np.int64))
        return prompts


def answer_feedback(context: dict, response: str) -> str | None:
    """An example checker: passes when the row's ``answer`` appears in the response."""
    answer = str(context.get("answer", "")).strip()
    if answer and answer.lower() in response.lower():
        return None
    return "Your answer is not correct: it does not contain the expected answer."
