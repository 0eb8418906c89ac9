"""Divergence: a loss that drifts up or collapses to a plateau without ever turning NaN.

At a too-high learning rate the usual failure is not NaN: the loss of an RNN climbs from 3 to 346 in 25 finite steps,
and a transformer's falls and then climbs back to the unigram entropy and stays there. A spike rule (mean + k sigma of
the recent losses) misses both: the first hides in its warm-up, the second is slow, and both are learnt as the norm.

:class:`DivergenceWatch` compares the smoothed loss with the *best* smoothed loss of the healthy run so far. A step
is *rising* when both the smoothed loss (an exponential moving average, bias-corrected, so it works from the first
step: there is no warm-up to hide in) and the median of the last ``window`` losses (so one odd batch cannot trigger
it) are above ``best + margin``, where the margin is the larger of

* ``margin`` times ``|best|`` (a relative rise), and
* ``noise_k`` standard deviations of the smoothed loss, from a robust estimate of the batch-to-batch noise (the
  residuals winsorized at 3 sigma, so a divergence cannot widen its own margin by more than a few percent a step).

The run has *diverged* after ``patience`` rising steps in a row (the first decision can come at the second step: no
warm-up). The best only moves while the run is not rising.
It is pure host arithmetic on one float per step (the remedy that uses it already reads its step on the host), and
its whole state is a few floats (:meth:`state_dict`), so a snapshot or a checkpoint keeps it exactly.

Example (a loss that falls, then climbs back)::

    >>> watch = DivergenceWatch(margin=0.05)
    >>> losses = [3.0 - 0.01 * t for t in range(100)] + [2.0 + 0.02 * t for t in range(60)]
    >>> fired = [t for t, loss in enumerate(losses) if watch.update(loss)]
    >>> fired[0]  # 29 steps into the climb: the descent's trend counts as noise (a margin of 0.21 here), then patience
    129
    >>> round(watch.best, 3), round(watch.threshold, 3), watch.rising
    (2.077, 2.289, True)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

__all__ = ["DivergenceWatch"]

NOISE_SMOOTHING = 0.98  # the noise estimate follows the last ~50 steps
WINSOR = 3.0  # residuals beyond 3 sigma count as 3 sigma in the noise estimate
EARLY_NOISE = 0.5  # until the noise at the best is known, the line uses at most |best| / 2
KNOWN = 3  # residuals after which the noise estimate is taken as known


def _ema_spread(smoothing: float, n: int) -> float:
    """The standard deviation of a bias-corrected EMA of ``n`` independent values, in units of theirs:
    sqrt(sum of squared weights) / sum of weights."""
    if n <= 0:
        return 1.0
    weights = (1.0 - smoothing**n) / (1.0 - smoothing)
    squares = (1.0 - smoothing ** (2 * n)) / (1.0 - smoothing * smoothing)
    return math.sqrt(squares) / weights


class DivergenceWatch:
    """Flags a loss that has risen above its best for good (see the module docstring).

    Args:
        margin: the relative rise over the best smoothed loss that counts (0.05: 5 %).
        smoothing: the level's EMA factor (0.9: the last ~10 steps).
        window: the median of this many recent losses is the current loss.
        patience: rising steps in a row before :meth:`update` says the run diverged.
        noise_k: the margin is at least this many standard deviations of that median.
    """

    def __init__(
        self, margin: float = 0.05, smoothing: float = 0.9, window: int = 8, patience: int = 5, noise_k: float = 6.0
    ) -> None:
        self.margin, self.smoothing, self.window = float(margin), float(smoothing), int(window)
        self.patience, self.noise_k = int(patience), float(noise_k)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a fresh run)."""
        self.n = 0  # losses seen
        self.ema = 0.0  # the level: a biased EMA of the winsorized losses (divide by 1 - smoothing**n)
        self.noise_n = 0
        self.noise_ema = 0.0  # a biased EMA of the winsorized absolute residuals
        self.best = math.inf
        self.best_n = 0  # losses in the level when the best was set (its own uncertainty)
        # The noise when the best was set (inf: not known yet), so that a divergence's own chaos cannot widen the line.
        self.best_sigma = math.inf
        self.rising_steps = 0
        self.recent: deque[float] = deque(maxlen=self.window)

    # ------------------------------------------------------------------ the rule
    @property
    def smoothed(self) -> float:
        """The level: the bias-corrected EMA of the losses, each winsorized at 3 sigma (NaN before the first)."""
        return self.ema / (1.0 - self.smoothing**self.n) if self.n else math.nan

    @property
    def current(self) -> float:
        """The median of the last ``window`` losses (NaN before the first)."""
        return statistics.median(self.recent) if self.recent else math.nan

    def sigma(self) -> float:
        """The batch-to-batch standard deviation of the loss (1.25 mean absolute residuals; 0.0 while unknown)."""
        if self.noise_n == 0:
            return 0.0
        return 1.25 * self.noise_ema / (1.0 - NOISE_SMOOTHING**self.noise_n)

    @property
    def threshold(self) -> float:
        """The line above which a step is rising: ``best + max(margin |best|, noise_k * noise)``, where ``noise`` is
        the standard deviation of the difference between the median of the recent losses (about 1.25 sigma /
        sqrt(their number)) and the best level (the EMA's spread when the best was set: wide in the first steps)."""
        if not math.isfinite(self.best):
            return math.inf
        sigma = min(self.sigma(), self.best_sigma)
        if math.isinf(self.best_sigma):  # the noise at the best is not known yet
            sigma = min(sigma, EARLY_NOISE * abs(self.best))
        median = 1.25 * sigma / math.sqrt(max(len(self.recent), 1))
        noise = math.hypot(median, sigma * _ema_spread(self.smoothing, self.best_n))
        return self.best + max(self.margin * abs(self.best), self.noise_k * noise)

    @property
    def rising(self) -> bool:
        return self.rising_steps > 0

    def near_best(self) -> bool:
        """Whether the loss is within half the margin of its best: a state worth a snapshot."""
        return self.n > 0 and not self.rising and self.current <= (self.best + self.threshold) / 2

    def update(self, loss: float) -> bool:
        """One healthy step's loss (finite; the mean over ranks and micro-batches). True: the run has diverged
        (``patience`` rising steps in a row); it stays True while the loss stays above the line."""
        if not math.isfinite(loss):
            raise ValueError(f"DivergenceWatch.update takes finite losses only, got {loss!r}")
        clipped = loss
        if self.n:
            level, line = self.smoothed, self.threshold
            residual = abs(loss - level)
            # Winsorize: one odd batch moves neither the level nor the noise much. A loss above the level counts up to
            # the relative margin at least (so an explosion in the first steps cannot pass for noise), and up to the
            # line when it is above it (a rising loss is evidence more than noise); one below the level counts in full
            # until the noise is known (a falling loss is what healthy noise looks like then).
            known = self.noise_n >= KNOWN
            if loss < level:
                limit = WINSOR * self.sigma() if known else math.inf
            else:
                limit = max(WINSOR * self.sigma(), self.margin * abs(level))
                if loss > line:
                    limit = min(limit, max(line - level, 0.0))
            residual = min(residual, limit)
            clipped = min(max(loss, level - limit), level + limit)
            self.noise_ema = NOISE_SMOOTHING * self.noise_ema + (1.0 - NOISE_SMOOTHING) * residual
            self.noise_n += 1
        self.n += 1
        self.ema = self.smoothing * self.ema + (1.0 - self.smoothing) * clipped
        self.recent.append(loss)
        line = self.threshold
        if self.current > line:
            self.rising_steps += 1
        else:
            self.rising_steps = 0
            if self.smoothed < self.best:
                self.best, self.best_n = self.smoothed, self.n
                self.best_sigma = self.sigma() if self.noise_n >= KNOWN else math.inf
        if math.isinf(self.best_sigma) and self.noise_n >= KNOWN:  # the noise is known now: the best's too
            self.best_sigma = self.sigma()
        return self.rising_steps >= self.patience

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "ema": self.ema,
            "noise_n": self.noise_n,
            "noise_ema": self.noise_ema,
            "best": self.best,
            "best_n": self.best_n,
            "best_sigma": self.best_sigma,
            "rising_steps": self.rising_steps,
            "recent": list(self.recent),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.reset()
            return
        self.n, self.ema = int(state["n"]), float(state["ema"])
        self.noise_n, self.noise_ema = int(state["noise_n"]), float(state["noise_ema"])
        self.best, self.rising_steps = float(state["best"]), int(state["rising_steps"])
        self.best_n = int(state.get("best_n", self.n))
        self.best_sigma = float(state.get("best_sigma", math.inf))
        self.recent = deque((float(x) for x in state["recent"]), maxlen=self.window)
