"""Checks on a running training run's step metrics that warn the user (no effect on training)."""

from __future__ import annotations

#: Warn when rollout/finished_fraction is below this ...
MIN_FINISHED_FRACTION = 0.5
#: ... for this many consecutive steps (fewer when the run has fewer steps).
TRUNCATION_WINDOW = 3


class TruncationWatch:
    """Warns once per run when most rollouts are cut off at ``rollout.max_new_tokens``.

    ``observe(step, finished_fraction)`` counts consecutive steps whose ``rollout/finished_fraction``
    is below ``threshold``; a step at or above it resets the count. When the count reaches
    ``window`` it returns the warning (naming the key, its value and a suggested value: twice the
    current limit); after that it returns None for the rest of the run, even if the fraction
    recovers and drops again. A new watch (a new ``Controller.run``, e.g. after a resume) starts
    from zero. Give ``window = min(TRUNCATION_WINDOW, total steps)`` so that a short run still warns.
    """

    def __init__(self, max_new_tokens: int, *, threshold: float = MIN_FINISHED_FRACTION,
                 window: int = TRUNCATION_WINDOW):
        if window < 1:
            raise ValueError(f"TruncationWatch: window must be >= 1, got {window}")
        self.max_new_tokens = max_new_tokens
        self.threshold = threshold
        self.window = window
        self.below = 0  # consecutive steps below the threshold
        self.warned = False

    def observe(self, step: int, finished_fraction: float) -> str | None:
        """The warning text the first time ``window`` consecutive steps are below the threshold, else None."""
        self.below = self.below + 1 if finished_fraction < self.threshold else 0
        if self.warned or self.below < self.window:
            return None
        self.warned = True
        return (f"step {step}: rollout/finished_fraction has been below {self.threshold:g} for {self.below} "
                f"step(s) (now {finished_fraction:.2f}): most responses are cut off at rollout.max_new_tokens = "
                f"{self.max_new_tokens}, so the stop token is rarely in the loss. Raise rollout.max_new_tokens "
                f"(e.g. to {2 * self.max_new_tokens}), or measure answer lengths first with `sdft-ray probe CONFIG`.")
