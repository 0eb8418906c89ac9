"""A TensorBoard *Custom Scalars* layout for the tags a :class:`~lightning_clip.GradientClipping` logs.

At fit start the callback gives every ``TensorBoardLogger`` of the Trainer a layout (:func:`add_layout`): one
category per optimizer and callback ``name``, titled like the tags' suffix (``lightning_clip``,
``lightning_clip_opt1``, ``lightning_clip/monitor``, ...), with three multiline charts:

* ``gradient norm``: ``grad_norm/total``, ``grad_norm/total_clipped`` and ``grad_clip/threshold`` (the latter
  only for a rule with a threshold: not ``mode="none"``);
* ``counters``: the cumulative counters the callback logs (:data:`~lightning_clip.metrics.COUNTER_TAGS` but
  ``steps``: ``clipped_steps``, ``nonfinite_steps``, ``skipped_steps``, ..., ``rollbacks`` under
  ``nan_policy="rollback"``);
* ``LR scale``: ``grad_clip/lr_scale``;
* under ``nan_policy="rollback"``, ``rollbacks (marker: ...)``: ``grad_clip/rollback``, a point at each rollback's
  step with the LR scale it left, beside ``grad_clip/lr_scale``.

Each chart lists one anchored, escaped regular expression per tag (``^grad_norm/total_opt1/monitor$``), so two
optimizers or two named callbacks never share a chart. The dictionary is what ``SummaryWriter.add_custom_scalars``
takes (torch's and tensorboardX's).

TensorBoard's custom-scalars plugin reads one layout per run (the last one written: its ``layout`` route reads
the newest point of the ``custom_scalars__config__`` tag) and merges those of different runs by category title.
So two callbacks writing to one logger must not each write their own: every call of :func:`add_layout` writes the
layout of every callback that wrote to that ``SummaryWriter`` so far, the newest version of each.

Example::

    >>> charts = layout(2, name="monitor", threshold=False, counters=["steps", "clipped_steps", "rollbacks"])
    >>> list(charts)
    ['lightning_clip/monitor', 'lightning_clip_opt1/monitor']
    >>> charts["lightning_clip_opt1/monitor"]  # doctest: +NORMALIZE_WHITESPACE
    {'gradient norm': ['Multiline', ['^grad_norm/total_opt1/monitor$', '^grad_norm/total_clipped_opt1/monitor$']],
     'counters': ['Multiline', ['^grad_clip/clipped_steps_opt1/monitor$', '^grad_clip/rollbacks_opt1/monitor$']],
     'LR scale': ['Multiline', ['^grad_clip/lr_scale_opt1/monitor$']],
     'rollbacks (marker: the LR scale each one left)': ['Multiline', ['^grad_clip/rollback_opt1/monitor$',
                                                                     '^grad_clip/lr_scale_opt1/monitor$']]}
    >>> layout(1)["lightning_clip"]["gradient norm"][1]
    ['^grad_norm/total$', '^grad_norm/total_clipped$', '^grad_clip/threshold$']
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_clip import metrics as M
from lightning_clip.counters import COUNTERS

if TYPE_CHECKING:
    from lightning_clip.engine import ClipEngine

__all__ = [
    "CATEGORY",
    "CONFIG_TAG",
    "add_layout",
    "engine_layout",
    "layout",
    "tag_regex",
    "tensorboard_loggers",
    "write_scalars",
]

CATEGORY = "lightning_clip"  # the title of the categories, before the tag suffix
CONFIG_TAG = "custom_scalars__config__"  # the tag the layout is stored under (plugin ``custom_scalars``)
NORM_CHART, COUNTERS_CHART, LR_CHART = "gradient norm", "counters", "LR scale"
ROLLBACK_CHART = "rollbacks (marker: the LR scale each one left)"

# What the engine's counters always report (``steps`` and the device counters, plus ``skipped_steps``).
ENGINE_COUNTERS = ("steps", *COUNTERS, "skipped_steps")

Layout = dict[str, dict[str, list[Any]]]  # {category: {chart: ["Multiline", [tag regexes]]}}

# SummaryWriter -> {callback name: its layout}: what every callback wrote to that writer so far.
_WRITTEN: weakref.WeakKeyDictionary[Any, dict[str | None, Layout]] = weakref.WeakKeyDictionary()


def tag_regex(name: str, optimizer_idx: int = 0, instance: str | None = None) -> str:
    """The regex matching exactly the tag ``name`` of optimizer ``optimizer_idx`` of the callback ``instance``.

    >>> tag_regex(M.TOTAL, 1, "a.b")
    '^grad_norm/total_opt1/a\\\\.b$'
    """
    return f"^{re.escape(M.tag(name, optimizer_idx, instance))}$"


def layout(
    optimizers: int,
    name: str | None = None,
    threshold: bool = True,
    counters: Iterable[str] = ENGINE_COUNTERS,
) -> Layout:
    """The custom-scalars layout of one callback: a category per optimizer (``optimizers`` of them).

    Args:
        optimizers: how many optimizers the callback logs (optimizer ``i > 0`` has the suffix ``_opt<i>``).
        name: the callback's ``name`` (every tag ends in ``/<name>``), or None.
        threshold: whether ``grad_clip/threshold`` is logged (False for ``mode="none"``).
        counters: the counter names logged (keys of :data:`~lightning_clip.metrics.COUNTER_TAGS`); ``steps`` is
            left out of the chart, in which it would dwarf the others.
    """
    present = set(counters)
    counter_names = [M.COUNTER_TAGS[k] for k in M.COUNTER_TAGS if k in present and k != "steps"]
    norm_names = [M.TOTAL, M.TOTAL_CLIPPED] + ([M.THRESHOLD] if threshold else [])
    out: Layout = {}
    for i in range(optimizers):
        out[CATEGORY + M.suffix(i, name)] = {
            NORM_CHART: ["Multiline", [tag_regex(t, i, name) for t in norm_names]],
            COUNTERS_CHART: ["Multiline", [tag_regex(t, i, name) for t in counter_names]],
            LR_CHART: ["Multiline", [tag_regex(M.LR_SCALE, i, name)]],
        }
        if "rollbacks" in present:
            out[CATEGORY + M.suffix(i, name)][ROLLBACK_CHART] = [
                "Multiline",
                [tag_regex(M.ROLLBACK, i, name), tag_regex(M.LR_SCALE, i, name)],
            ]
    return out


def engine_layout(engine: ClipEngine, optimizers: int) -> Layout:
    """:func:`layout` of what ``engine`` logs for ``optimizers`` optimizers (empty when it logs nothing)."""
    if engine.log_norms == "none" or optimizers < 1:
        return {}
    counters = [*ENGINE_COUNTERS, *(["rollbacks"] if engine.remedy.keeps_snapshots else [])]
    return layout(optimizers, engine.name, threshold=engine.rule.mode != "none", counters=counters)


def _tensorboard_logger_classes() -> list[type[Any]]:
    """``TensorBoardLogger`` of ``pytorch_lightning`` and, once that package is loaded, of ``lightning.pytorch``."""
    from pytorch_lightning.loggers import TensorBoardLogger

    kinds: list[type[Any]] = [TensorBoardLogger]
    if "lightning.pytorch" in sys.modules:  # a lightning.pytorch logger exists only once that package is loaded
        from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

        kinds.append(LightningTensorBoardLogger)
    return kinds


def tensorboard_loggers(loggers: Sequence[Any]) -> list[Any]:
    """The ``TensorBoardLogger`` instances among ``loggers``, of ``pytorch_lightning`` or ``lightning.pytorch``."""
    return [logger for logger in loggers if isinstance(logger, tuple(_tensorboard_logger_classes()))]


def add_layout(trainer: Any, engine: ClipEngine) -> int:
    """Write the layout of ``engine`` (with those of the callbacks that wrote before it) to every
    ``TensorBoardLogger`` of ``trainer``, on global rank zero; returns how many loggers got one."""
    if not trainer.is_global_zero:  # the loggers' experiment is a no-op stand-in on the other ranks
        return 0
    mine = engine_layout(engine, len(trainer.optimizers))
    if not mine:
        return 0
    written = 0
    for logger in tensorboard_loggers(trainer.loggers):
        writer = logger.experiment
        owners = _WRITTEN.setdefault(writer, {})
        owners[engine.name] = mine  # names are unique among the callbacks that log (checked in ``setup``)
        writer.add_custom_scalars({category: charts for each in owners.values() for category, charts in each.items()})
        written += 1
    return written


def write_scalars(logger: Any, metrics: Mapping[str, float], step: int, is_global_zero: bool = True) -> bool:
    """Write ``metrics`` to a ``TensorBoardLogger`` as **one** event: one ``Summary`` with a value per tag.

    What ``logger.log_metrics(metrics, step)`` writes, tag for tag and value for value (the logger's ``prefix``
    included; ``simple_value`` scalars, as ``SummaryWriter.add_scalar`` writes them), in one event instead of one
    per tag: the writer's queue holds 10 events and blocks the training loop until its thread has written them,
    which made the per-tag events the largest cost of a logging step. Readers (TensorBoard, ``EventAccumulator``,
    ``lightning-clip report``) take every value of an event.

    Returns False, having written nothing, when ``logger`` is not a ``TensorBoardLogger``, is a subclass with its
    own ``log_metrics`` (which must still see every call), or writes through another writer than torch's
    ``SummaryWriter`` (tensorboardX's): call its ``log_metrics`` then. On a rank other than global zero there is
    nothing to write (``log_metrics`` is rank-zero only): True.
    """
    kinds = [kind for kind in _tensorboard_logger_classes() if isinstance(logger, kind)]
    own = type(logger).log_metrics is not kinds[0].log_metrics if kinds else True
    if own or "log_metrics" in vars(logger):  # its own log_metrics, on the class or patched on the instance
        return False
    if not is_global_zero:
        return True
    from torch.utils.tensorboard import SummaryWriter

    writer = logger.experiment
    if not isinstance(writer, SummaryWriter):
        return False
    from tensorboard.compat.proto.summary_pb2 import Summary

    prefix = getattr(logger, "_prefix", "")
    start = f"{prefix}{logger.LOGGER_JOIN_CHAR}" if prefix else ""
    values = [Summary.Value(tag=start + tag, simple_value=float(value)) for tag, value in metrics.items()]
    writer._get_file_writer().add_summary(Summary(value=values), step)
    return True
