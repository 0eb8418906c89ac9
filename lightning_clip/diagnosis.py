"""Turn a bad (NaN/Inf) step into a message a user can act on, with the article's remedies.

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
    names = list(step.nonfinite_names)
    shown = ", ".join(names[:max_names]) + (f" (+{len(names) - max_names} more)" if len(names) > max_names else "")
    lines = [
        f"Non-finite gradients at global step {step.global_step} (epoch {step.epoch}, batch {step.batch_idx}, "
        f"optimizer {step.optimizer_idx}): {len(names)} of {step.num_params} parameters"
        + (f": {shown}." if names else "."),
        f"Mode of failure: {failure_mode(step)}.",
    ]
    lines += [f"Input check: {p}." for p in step.input_problems]
    lines.append(
        f"Action: {step.action}; {step.consecutive} bad step(s) in a row, {step.skipped_total} skipped in total; "
        f"LR scale now {step.lr_scale:g}."
    )
    lines.append("What to try:")
    lines += [f"  - {r}" for r in REMEDIES]
    return "\n".join(lines)
