"""Turn a bad step (NaN/Inf, or a finite spike) into a message a user can act on, with the article's remedies.

Only called on bad steps, so it may read values back to the host freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

REMEDIES = (
    "lower the learning rate (e.g. nan_policy='halve_lr', or a smaller lr / a warm-up)",
    "add normalization (LayerNorm/BatchNorm) between deep layers",
    "clip gradients: mode='norm' with max_norm near the median of grad_norm/total in TensorBoard",
    "check the input data for NaN/Inf (check_inputs=True names the batch and position)",
    "check the model: log/sqrt/division of values that reach 0, exp() overflow, a loss on un-normalized logits",
)


@dataclass
class BadStep:
    """What is known about one bad step."""

    global_step: int
    epoch: int
    batch_idx: int
    optimizer_idx: int
    nonfinite_names: Sequence[str]
    num_params: int
    loss_nonfinite: bool
    input_problems: Sequence[str] = field(default_factory=list)
    consecutive: int = 1
    skipped_total: int = 0
    lr_scale: float = 1.0
    action: str = "skipped"
    # (what, value, threshold) of the spike tests this step failed: a finite spike, not NaN/Inf, when not empty
    spikes: Sequence[tuple[str, float, float]] = ()

    @property
    def is_spike(self) -> bool:
        """A finite step flagged as an outlier (``skip_spikes``/``loss_spikes``), not a NaN/Inf one."""
        return bool(self.spikes) and not self.nonfinite_names and not self.loss_nonfinite and not self.input_problems


SPIKE_REMEDIES = (
    "lower the learning rate (nan_policy='rollback' restores a snapshot and lowers it), or lengthen the warm-up",
    "a lasting rise in the loss (harder data, a curriculum step) is a new level, not a spike: raise loss_spikes "
    "(more sigmas) or set it to None",
    "look at the batches of these steps: a bad shard spikes the loss without NaN",
)


def failure_mode(step: BadStep) -> str:
    """Name the mode of failure where it can be told apart."""
    if step.input_problems:
        return "the batch itself holds NaN/Inf (dirty data)"
    n = len(step.nonfinite_names)
    if n == 0:
        return "the loss was NaN/Inf but no gradient was"
    if n == step.num_params:
        cause = "the loss itself was NaN/Inf" if step.loss_nonfinite else "the loss was finite"
        return f"every gradient is NaN/Inf ({cause}): the whole backward pass diverged"
    return f"only {n} of {step.num_params} parameters have NaN/Inf gradients: look at those layers first"


def describe(step: BadStep, max_names: int = 5) -> str:
    """The multi-line diagnosis used by the warning and by ``NonFiniteGradientError``."""
    where = (
        f"at global step {step.global_step} (epoch {step.epoch}, batch {step.batch_idx}, optimizer "
        f"{step.optimizer_idx})"
    )
    if step.is_spike:
        lines = [f"Spike {where}: " + "; ".join(describe_spike(*spike) for spike in step.spikes) + "."]
        lines.append("Mode of failure: the loss and the gradients are finite, but far above their recent level.")
        remedies: Sequence[str] = SPIKE_REMEDIES
    else:
        names = list(step.nonfinite_names)
        shown = ", ".join(names[:max_names]) + (f" (+{len(names) - max_names} more)" if len(names) > max_names else "")
        lines = [
            f"Non-finite gradients {where}: {len(names)} of {step.num_params} parameters"
            + (f": {shown}." if names else "."),
            f"Mode of failure: {failure_mode(step)}.",
        ]
        lines += [f"Input check: {p}." for p in step.input_problems]
        remedies = REMEDIES
    lines.append(
        f"Action: {step.action}; {step.consecutive} bad step(s) in a row, {step.skipped_total} skipped in total; "
        f"LR scale now {step.lr_scale:g}."
    )
    lines.append("What to try:")
    lines += [f"  - {r}" for r in remedies]
    return "\n".join(lines)


def describe_spike(what: str, value: float, threshold: float) -> str:
    """``loss spike: 12.3 above the threshold 1.05`` (the threshold is mean + k sigma of recent healthy values)."""
    return f"{what} spike: {value:.4g} above the threshold {threshold:.4g} (mean + k sigma of the recent healthy ones)"
