"""``mode="agc"``: Adaptive Gradient Clipping, each output unit against the norm of its own weights.

A. Brock, S. De, S. L. Smith, K. Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", ICML 2021 (arXiv:2102.06171), section 4.1. The same math as timm's ``utils/agc.py``
(``adaptive_clip_grad``), here on the engine's step: in place, sync-free, in true units under fp16.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import ClassVar

import torch

from lightning_clip import functional as F
from lightning_clip.rules.base import ClipInput, ClipResult, ClipRule
from lightning_clip.validation import check_positive


class AdaptiveGradClip(ClipRule):
    r"""AGC: for each output unit :math:`i` of each weight :math:`W` with gradient :math:`G`,

    .. math:: G_i \leftarrow \begin{cases} G_i & \|G_i\| < \lambda \max(\|W_i\|, \epsilon) \\
              \lambda \max(\|W_i\|, \epsilon)\, G_i / \|G_i\| & \text{otherwise} \end{cases}

    with :math:`\lambda` = ``clip_factor`` and :math:`\epsilon` = ``eps``. Units are rows along dim 0 (see
    :func:`~lightning_clip.functional.unitwise_norms`); norms are the engine's ``norm_type`` (2 in the paper).
    The clipping itself is :func:`lightning_clip.functional.adaptive_clip_`, which a plain loop can call directly;
    this class adds ``exclude``, the engine's NaN/Inf flag and GradScaler scale, and the metrics.

    Args:
        clip_factor: :math:`\lambda`, the largest gradient-to-weight norm ratio a unit keeps. The paper uses
            0.01 at batch 4096; smaller batches tolerate larger values.
        eps: :math:`\epsilon`, the floor on a weight norm, so zero-initialised weights (biases) can still move.
        exclude: ``fnmatch`` patterns of parameter names left unclipped; the paper excludes the final
            classifier, e.g. ``["head.*"]``. Names are as ``named_parameters()`` gives them (with the
            LightningModule's attribute prefix: use ``"*fc.*"`` to match ``model.fc.weight``).

    A step whose total norm is NaN/Inf is left bit-identical for the NaN policy, where timm would turn an Inf
    element into NaN. The threshold reported (``grad_clip/threshold``) is ``clip_factor``.

    Example::

        >>> import torch
        >>> from lightning_clip.rules import AdaptiveGradClip
        >>> AdaptiveGradClip(clip_factor=0.02, exclude=["head.*"])
        AdaptiveGradClip(agc, clip_factor=0.02, eps=0.001, exclude=['head.*'])
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))   # unit norms 5 and 0.5
        >>> w.grad = torch.tensor([[0.6, 0.8], [0.6, 0.8]])                  # unit norms 1 and 1
        >>> from lightning_clip.engine import ClipEngine
        >>> engine = ClipEngine(AdaptiveGradClip(clip_factor=0.5))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> _ = engine.step(opt)
        >>> w.grad                       # row 0 kept (1 < 0.5 * 5); row 1 cut to norm 0.5 * 0.5
        tensor([[0.6000, 0.8000],
                [0.1500, 0.2000]])
    """

    mode: ClassVar[str] = "agc"

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ()) -> None:
        check_positive("clip_factor", clip_factor)
        check_positive("eps", eps)
        if isinstance(exclude, str):  # one pattern given bare: not its characters
            exclude = [exclude]
        if not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"`exclude` must be a list of parameter-name patterns (strings), got {exclude!r}.")
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.exclude = list(exclude)
        # names -> indices of the clipped tensors; names repeat every step, fnmatch need not.
        self._selection: tuple[tuple[str, ...], list[int]] | None = None

    def _selected(self, names: Sequence[str]) -> list[int]:
        key = tuple(names)
        if self._selection is None or self._selection[0] != key:
            keep = [i for i, n in enumerate(key) if not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)]
            self._selection = (key, keep)
        return self._selection[1]

    def clip_(self, step: ClipInput) -> ClipResult:
        if step.sharded:
            # Unit-wise norms need whole rows of each gradient and weight, which flat (FSDP1) or column (tensor
            # parallel) shards split across ranks; measuring them on shards would clip by partial norms.
            raise ValueError(
                "mode='agc' does not support sharded gradients (FSDP, tensor parallel) yet: its unit-wise norms "
                "need whole rows of every weight. Use mode='norm', 'zscore' or 'percentile', whose norms are reduced "
                "across ranks."
            )
        idx = self._selected(step.names)
        for i in idx:
            if step.grads[i].layout != torch.strided:
                raise ValueError(
                    f"mode='agc' needs dense gradients; parameter `{step.names[i]}` has a sparse one. "
                    "Leave it out with `exclude`, or use mode='norm'."
                )
        if idx:
            grads, params = [step.grads[i] for i in idx], [step.params[i] for i in idx]
            # One implementation: the functional form, here with the engine's finiteness and GradScaler scale.
            clipped = F.adaptive_clip_(
                grads, params, self.clip_factor, self.eps, step.norm_type, step.finite, step.inv_scale
            ).to(step.device)
        else:
            clipped = step.bad & False
        after = None
        if step.log:  # the norm after clipping costs another pass: logging steps only
            after = step.norm_of(step.grads)
            if step.inv_scale is not None:
                after = after * step.inv_scale
        return ClipResult(clipped, after, self.clip_factor)

    def describe(self) -> str:
        excluded = f", exclude={self.exclude}" if self.exclude else ""
        return f"agc, clip_factor={self.clip_factor:g}, eps={self.eps:g}{excluded}"
