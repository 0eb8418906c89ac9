"""Stability benchmark: a learning-rate sweep of one exploding model, without and with each clipping mode.

The model is the library's exploding example, :class:`~lightning_clip.app.models.DeepMLP` (16 tanh layers of
width 64, no normalization, LeCun-normal init) trained with SGD + momentum 0.9 on
:class:`~lightning_clip.app.models.SyntheticRegressionData`. For every learning rate and seed, every
configuration starts from the same weights and sees the same batches in the same order:

* plain Lightning (no clipping);
* ``GradientClipping(mode="norm", max_norm=1.0)``;
* ``mode="agc"`` (head excluded, as in the paper, and not), ``mode="zscore"`` (without and with ``max_norm``) and
  ``mode="percentile"``, their options set via ``rule=``;
* ZClip's own Lightning callback (``zclip`` 1.0.0, its defaults), on a ``lightning.pytorch`` Trainer;
* one extra row: ``zscore`` with ``nan_policy="skip"``, the remedy on top of the clip.

The rows of the comparison use ``nan_policy="ignore"``, so only the clip differs. The same LightningModule
code is built for each namespace (``pytorch_lightning`` for ours, ``lightning.pytorch`` for ZClip's callback);
both copies take their layers from a seeded ``DeepMLP``. A run that reaches NaN/Inf weights is stopped there
(the weights would stay NaN) and shown as diverged, as is one whose val MSE overflows float32.

The score is the validation MSE after training (torchmetrics, 512 held-out samples). A run is *stable* when
that is finite and below half the untrained model's MSE (the smallest over the seeds; about 1, as the targets
are standardized).

Usage::

    python benchmarks/stability.py                                   # the documented table (~4 min, 1 thread)
    python benchmarks/stability.py --steps 100 --lrs 0.01 0.3 --configs plain norm
    python benchmarks/stability.py --json benchmarks/results/stability.json --plot docs/images/stability.png
    python benchmarks/stability.py --from-json benchmarks/results/stability.json   # reprint, no training
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_clip import GradientClipping
from lightning_clip.app.models import DeepMLP, SyntheticRegressionData, mean_squared_error
from lightning_clip.rules import AdaptiveGradClip, PercentileClip, ZScoreClip

DEFAULT_LRS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # 1-2-5 steps: a log grid
DEFAULT_STEPS = 300
DEFAULT_SEEDS = (0, 1, 2)
MOMENTUM = 0.9
# A run is stable when its final val MSE is finite and below this fraction of the untrained model's.
STABLE_FRACTION = 0.5
# Train losses averaged for the "final train loss" (one batch alone is noisy).
LAST_STEPS = 10


# ---------------------------------------------------------------------------------------------- model
def _namespace(name: str) -> Any:
    """``pytorch_lightning`` or ``lightning.pytorch``."""
    return importlib.import_module(name)


_MODULE_CLASSES: dict[str, type] = {}


def module_class(namespace: str) -> type:
    """The benchmark's LightningModule for ``namespace``: one body, built on that namespace's base class.

    ``lightning.pytorch.Trainer`` refuses a ``pytorch_lightning.LightningModule`` (and the other way round),
    so the same code is subclassed from each. The layers come from a ``DeepMLP`` built under the caller's
    seed, so both namespaces start from identical weights.
    """
    if namespace in _MODULE_CLASSES:
        return _MODULE_CLASSES[namespace]
    pl = _namespace(namespace)

    class StabilityMLP(pl.LightningModule):
        def __init__(self, lr: float, momentum: float = MOMENTUM) -> None:
            super().__init__()
            base = DeepMLP(lr=lr, momentum=momentum)  # the exploding example's layers and init
            self.hidden, self.head, self.act = base.hidden, base.head, base.act
            self.lr, self.momentum = lr, momentum

        def forward(self, x: Tensor) -> Tensor:
            return DeepMLP.forward(self, x)  # type: ignore[arg-type]  # same body: hidden, act, head

        def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    StabilityMLP.__qualname__ = StabilityMLP.__name__ = f"StabilityMLP_{namespace.replace('.', '_')}"
    _MODULE_CLASSES[namespace] = StabilityMLP
    return StabilityMLP


def _recorder(namespace: str) -> Any:
    """A callback of ``namespace`` that records each step's loss and stops a run whose weights went NaN/Inf."""
    pl = _namespace(namespace)

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.first_nonfinite_step: int | None = None
            self.stopped_at: int | None = None

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            step = len(self.losses)
            self.losses.append(loss)
            if math.isfinite(loss):
                return
            if self.first_nonfinite_step is None:
                self.first_nonfinite_step = step
            if not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()):
                # NaN/Inf weights stay NaN under SGD: nothing left to learn, stop the run here.
                self.stopped_at = step
                trainer.should_stop = True

    return Recorder()


# ---------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One row of the table."""

    key: str
    label: str
    namespace: str
    make_callbacks: Callable[[], list[Any]]
    detail: str


def _ours(rule: Any = None, nan_policy: str = "ignore", **kwargs: Any) -> Callable[[], list[Any]]:
    def make() -> list[Any]:
        # log_norms="none" and no logger: the benchmark compares the clip, not the logging.
        args: dict[str, Any] = dict(nan_policy=nan_policy, log_norms="none", **kwargs)
        if nan_policy == "skip":
            args["max_consecutive_nonfinite"] = None  # keep skipping to the end: the run is scored, not stopped
        if rule is not None:
            args["rule"] = rule()
        return [GradientClipping(**args)]

    return make


def _zclip() -> list[Any]:
    from zclip.zclip_lightning_callback import ZClipLightningCallback

    return [ZClipLightningCallback()]  # its defaults: alpha 0.97, z_thresh 2.5, warmup 25, max_grad_norm 1.0


CONFIGS: tuple[Config, ...] = (
    Config("plain", "plain Lightning", "pytorch_lightning", list, "no clipping"),
    Config(
        "norm",
        "norm",
        "pytorch_lightning",
        _ours(mode="norm", max_norm=1.0),
        'GradientClipping(mode="norm", max_norm=1.0)',
    ),
    Config(
        "agc",
        "agc, head excluded",
        "pytorch_lightning",
        _ours(rule=lambda: AdaptiveGradClip(clip_factor=0.02, exclude=["head.*"])),
        'rule=AdaptiveGradClip(clip_factor=0.02, exclude=["head.*"]): the paper leaves the last layer out',
    ),
    Config(
        "agc_all",
        "agc, all layers",
        "pytorch_lightning",
        _ours(rule=lambda: AdaptiveGradClip(clip_factor=0.02)),
        "rule=AdaptiveGradClip(clip_factor=0.02): the head clipped too",
    ),
    Config(
        "zscore",
        "zscore",
        "pytorch_lightning",
        _ours(rule=lambda: ZScoreClip()),
        "rule=ZScoreClip() (z 2.5, EMA 0.97, warm-up 25, no max_norm)",
    ),
    Config(
        "zscore_cap",
        "zscore + max_norm=1",
        "pytorch_lightning",
        _ours(rule=lambda: ZScoreClip(max_norm=1.0)),
        "rule=ZScoreClip(max_norm=1.0): ZClip's defaults",
    ),
    Config(
        "percentile",
        "percentile",
        "pytorch_lightning",
        _ours(rule=lambda: PercentileClip(percentile=10.0, warmup_steps=10)),
        "rule=PercentileClip(percentile=10, warmup_steps=10)",
    ),
    Config(
        "zclip",
        "ZClip callback",
        "lightning.pytorch",
        _zclip,
        "zclip 1.0.0 ZClipLightningCallback() (defaults), lightning.pytorch.Trainer",
    ),
    Config(
        "zscore_skip",
        "zscore, nan_policy=skip",
        "pytorch_lightning",
        _ours(rule=lambda: ZScoreClip(), nan_policy="skip"),
        'rule=ZScoreClip(), nan_policy="skip" (the remedy on top)',
    ),
)
CONFIG_KEYS = tuple(c.key for c in CONFIGS)


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class Run:
    config: str
    lr: float
    seed: int
    val_mse: float
    final_train_loss: float
    first_nonfinite_step: int | None
    stopped_at: int | None
    steps: int
    clipped_steps: int | None
    skipped_steps: int | None
    seconds: float

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.val_mse)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """No banners, tips or small-data warnings: the benchmark prints its own lines."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _data(seed: int) -> tuple[Any, Any]:
    data = SyntheticRegressionData(seed=seed)
    data.setup("fit")
    return data.train_dataloader(), data.val_dataloader()


def initial_val_mse(seed: int) -> float:
    """The val MSE of the untrained model of ``seed`` (the same for every configuration and LR)."""
    torch.manual_seed(seed)
    model = module_class("pytorch_lightning")(lr=0.1)
    return mean_squared_error(model, _data(seed)[1])


def train_once(config: Config, lr: float, seed: int, steps: int) -> Run:
    """Train ``config`` at ``lr`` for ``steps`` optimizer steps from the weights and batches of ``seed``."""
    pl = _namespace(config.namespace)
    train, val = _data(seed)
    pl.seed_everything(seed, verbose=False)
    model = module_class(config.namespace)(lr=lr)
    recorder = _recorder(config.namespace)
    callbacks = config.make_callbacks()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[*callbacks, recorder],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    last = recorder.losses[-LAST_STEPS:]
    counters = callbacks[0].counters if callbacks and isinstance(callbacks[0], GradientClipping) else None
    return Run(
        config=config.key,
        lr=lr,
        seed=seed,
        val_mse=math.nan if recorder.stopped_at is not None else mean_squared_error(model, val),
        final_train_loss=statistics.fmean(last) if last else math.nan,
        first_nonfinite_step=recorder.first_nonfinite_step,
        stopped_at=recorder.stopped_at,
        steps=len(recorder.losses),
        clipped_steps=None if counters is None else counters["clipped_steps"],
        skipped_steps=None if counters is None else counters["skipped_steps"],
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass
class Result:
    lrs: list[float]
    seeds: list[int]
    steps: int
    initial_val_mse: dict[int, float]
    threshold: float
    configs: list[Config]
    runs: list[Run] = field(default_factory=list)
    seconds: float = 0.0

    def runs_of(self, key: str, lr: float) -> list[Run]:
        return [r for r in self.runs if r.config == key and r.lr == lr]

    def is_stable(self, run: Run) -> bool:
        return math.isfinite(run.val_mse) and run.val_mse < self.threshold

    def stable_count(self, key: str) -> tuple[int, int]:
        mine = [r for r in self.runs if r.config == key]
        return sum(self.is_stable(r) for r in mine), len(mine)

    def best(self, key: str) -> tuple[float, float] | None:
        """``(lr, median val MSE)`` of the LR with the lowest median; None when every LR diverged."""
        finite = [(m, lr) for lr in self.lrs if math.isfinite(m := self.median_mse(key, lr))]
        return None if not finite else (min(finite)[1], min(finite)[0])

    def median_mse(self, key: str, lr: float) -> float:
        """Median over seeds, a diverged run counting as +inf (NaN when more than half diverged)."""
        values = sorted(r.val_mse if math.isfinite(r.val_mse) else math.inf for r in self.runs_of(key, lr))
        if not values:
            return math.nan
        m = statistics.median(values)
        return m if math.isfinite(m) else math.nan


def sweep(
    configs: Sequence[Config],
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    progress: Callable[[str], None] = print,
) -> Result:
    initial = {seed: initial_val_mse(seed) for seed in seeds}
    threshold = STABLE_FRACTION * min(initial.values())
    result = Result(list(lrs), list(seeds), steps, initial, threshold, list(configs))
    total = len(configs) * len(lrs) * len(seeds)
    start = time.perf_counter()
    with quiet_lightning():
        for seed in seeds:
            for lr in lrs:
                for config in configs:
                    run = train_once(config, lr, seed, steps)
                    result.runs.append(run)
                    if run.diverged and run.stopped_at is not None:
                        outcome = f"diverged (NaN/Inf weights at step {run.stopped_at})"
                    elif run.diverged:
                        outcome = "diverged (weights finite, val MSE overflows)"
                    else:
                        outcome = f"val MSE {_num(run.val_mse)}" + ("" if result.is_stable(run) else " (not stable)")
                    progress(
                        f"[{len(result.runs):3d}/{total}] seed {seed} lr {lr:<6g} {config.label:24s} {outcome}"
                        f"  {run.seconds:.1f} s, {time.perf_counter() - start:.0f} s elapsed"
                    )
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------- output
def _num(value: float) -> str:
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.3g}" if value < 1e4 else f"{value:.1e}"


def _cell(result: Result, key: str, lr: float) -> str:
    runs = result.runs_of(key, lr)
    m = result.median_mse(key, lr)
    text = _num(m)
    if math.isfinite(m) and m >= result.threshold:
        text += "!"
    bad = sum(r.diverged for r in runs)
    if 0 < bad < len(runs) and math.isfinite(m):
        text += f" ({bad}/{len(runs)} div)"
    return text


def format_table(result: Result) -> str:
    """Final val MSE per configuration (rows) and LR (columns), and the count of stable runs."""
    header = ["configuration", *(f"lr={lr:g}" for lr in result.lrs), "stable", "best (lr)"]
    rows = [header]
    for c in result.configs:
        ok, n = result.stable_count(c.key)
        best = result.best(c.key)
        best_text = "-" if best is None else f"{_num(best[1])} ({best[0]:g})"
        rows.append([c.label, *(_cell(result, c.key, lr) for lr in result.lrs), f"{ok}/{n}", best_text])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    seeds = ", ".join(str(s) for s in result.seeds)
    initial = ", ".join(f"{v:.3g}" for v in result.initial_val_mse.values())
    notes = [
        "",
        f"Final val MSE (torchmetrics, 512 held-out samples) after {result.steps} SGD steps (momentum {MOMENTUM}), "
        f"median over seed(s) {seeds}.",
        "'diverged': NaN/Inf weights (the run is stopped there), or a val MSE that overflows float32;",
        f"'!': finite but not below the stability threshold {result.threshold:.3g} "
        f"(= {STABLE_FRACTION:g} x the untrained model's val MSE {initial}).",
        "'stable': runs (LR x seed) that end finite and below the threshold; 'best': the lowest median val MSE "
        "over the LRs, and its LR.",
    ]
    return "\n".join(lines + notes)


def format_clipped(result: Result) -> str:
    """Per configuration of ours and LR: the share of steps clipped (and skipped), median over seeds."""
    header = ["configuration", *(f"lr={lr:g}" for lr in result.lrs)]
    rows = [header]
    for c in result.configs:
        cells = []
        for lr in result.lrs:
            runs = [r for r in result.runs_of(c.key, lr) if r.clipped_steps is not None and r.steps > 0]
            if not runs:
                cells.append("-")
                continue
            clipped = statistics.median(100 * r.clipped_steps / r.steps for r in runs)  # type: ignore[operator]
            skipped = statistics.median(100 * (r.skipped_steps or 0) / r.steps for r in runs)
            cells.append(f"{clipped:.0f}%" + (f" +{skipped:.0f}% skip" if skipped else ""))
        if any(cell != "-" for cell in cells):
            rows.append([c.label, *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(["Steps clipped (GradientClipping's clipped_steps / steps run; skipped steps apart):", *lines])


def to_json(result: Result) -> dict[str, Any]:
    return {
        "benchmark": "stability: LR sweep of DeepMLP (16 tanh layers, width 64), SGD momentum 0.9",
        "steps": result.steps,
        "lrs": result.lrs,
        "seeds": result.seeds,
        "momentum": MOMENTUM,
        "initial_val_mse": {str(k): v for k, v in result.initial_val_mse.items()},
        "stable_threshold": result.threshold,
        "stable_definition": f"final val MSE finite and < {STABLE_FRACTION:g} x the untrained model's val MSE",
        "seconds": result.seconds,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "configs": [
            {
                "key": c.key,
                "label": c.label,
                "detail": c.detail,
                "namespace": c.namespace,
                "stable": result.stable_count(c.key)[0],
                "runs": result.stable_count(c.key)[1],
                "median_val_mse": {f"{lr:g}": _json_float(result.median_mse(c.key, lr)) for lr in result.lrs},
            }
            for c in result.configs
        ],
        "runs": [
            {k: _json_float(v) for k, v in asdict(r).items()} | {"stable": result.is_stable(r)} for r in result.runs
        ],
    }


def from_json(data: dict[str, Any]) -> Result:
    """The :class:`Result` a ``--json`` file holds (to reprint the table or redraw the plot without training)."""
    known = {c.key: c for c in CONFIGS}
    configs = [known[c["key"]] for c in data["configs"]]
    fields = {f.name for f in dataclasses.fields(Run)}
    floats = ("val_mse", "final_train_loss")  # null in JSON: NaN
    runs = [
        Run(**{k: math.nan if v is None and k in floats else v for k, v in r.items() if k in fields})
        for r in data["runs"]
    ]
    initial = {int(k): v for k, v in data["initial_val_mse"].items()}
    result = Result(data["lrs"], data["seeds"], data["steps"], initial, data["stable_threshold"], configs, runs)
    result.seconds = data.get("seconds", 0.0)
    return result


def _json_float(value: Any) -> Any:
    # JSON has no NaN: a diverged run's MSE is null.
    return None if isinstance(value, float) and not math.isfinite(value) else value


# The plot's panels: configurations named in neither go to the first.
PANELS = (
    ("clip modes against plain training", ("plain", "norm", "agc", "agc_all", "zscore", "percentile")),
    ("z-score: ours, capped, ZClip's callback, with skip", ("norm", "zscore", "zscore_cap", "zclip", "zscore_skip")),
)
# Above this the val MSE is drawn on the "blown up" line: the interesting range stays readable.
PLOT_CAP = 100.0


def plot(result: Result, path: str) -> None:
    """Final val MSE vs LR, log-log, one line per configuration; blown-up and diverged runs on lines at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [c.key for c in result.configs]
    panels = [(title, [k for k in members if k in keys]) for title, members in PANELS]
    unplaced = [k for k in keys if not any(k in members for _, members in panels)]
    panels[0][1].extend(unplaced)
    panels = [(title, members) for title, members in panels if members]
    labels = {c.key: c.label for c in result.configs}
    colors = {k: f"C{i}" for i, k in enumerate(keys)}
    markers = dict(zip(keys, "osD^v<>phX*"))
    blown, diverged = PLOT_CAP * 3, PLOT_CAP * 12

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.2), sharey=True, squeeze=False)
    for ax, (title, members) in zip(axes[0], panels):
        for k in members:
            ys = [result.median_mse(k, lr) for lr in result.lrs]
            drawn = [diverged if not math.isfinite(y) else blown if y > PLOT_CAP else y for y in ys]
            ok, n = result.stable_count(k)
            ax.plot(
                result.lrs,
                drawn,
                color=colors[k],
                marker=markers.get(k, "o"),
                markersize=5,
                linewidth=1.5,
                linestyle="--" if k == "zscore_skip" else "-",
                label=f"{labels[k]} ({ok}/{n} stable)",
            )
            bad = [lr for lr, y in zip(result.lrs, ys) if not math.isfinite(y)]
            ax.scatter(bad, [diverged] * len(bad), marker="x", s=80, color=colors[k], zorder=3)
        for y, text in (
            (diverged, "diverged (NaN/Inf weights)"),
            (blown, f"blown up (finite, > {PLOT_CAP:g})"),
        ):
            ax.axhline(y, color="grey", linewidth=0.8)
            ax.text(result.lrs[0], y * 1.12, text, fontsize=8, color="dimgrey", va="bottom")
        ax.axhline(result.threshold, color="black", linestyle=":", linewidth=1)
        ax.text(result.lrs[-1], result.threshold * 1.1, "stable below", fontsize=8, ha="right", va="bottom")
        ax.set_xscale("log")
        ax.set_xticks(result.lrs, [f"{lr:g}" for lr in result.lrs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_ylim(0.05, diverged * 2.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("learning rate (SGD, momentum 0.9)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="center left")
    axes[0][0].set_ylabel(f"final val MSE after {result.steps} steps (median of {len(result.seeds)} seeds)")
    fig.suptitle("DeepMLP, 16 tanh layers without normalization: final val MSE vs learning rate", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per run ({DEFAULT_STEPS})")
    ap.add_argument("--lrs", type=_positive, nargs="+", default=list(DEFAULT_LRS), help="learning rates")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="seeds (weights and batches)")
    ap.add_argument("--configs", nargs="+", choices=CONFIG_KEYS, default=list(CONFIG_KEYS), help="configurations (all)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--plot", metavar="FILE.png", help="also plot final val MSE vs LR")
    ap.add_argument("--from-json", metavar="FILE", help="train nothing: print the table (and --plot) of a --json file")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        build_parser().error("--steps must be >= 1")
    if args.from_json:
        with open(args.from_json) as f:
            result = from_json(json.load(f))
        print(format_table(result))
        print()
        print(format_clipped(result))
        if args.plot:
            plot(result, args.plot)
            print(f"Plot written to {args.plot}")
        return 0
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a tiny model: more threads only add synchronization
    configs = [c for c in CONFIGS if c.key in args.configs]
    print(
        f"Stability sweep: {len(configs)} configurations x {len(args.lrs)} LRs x {len(args.seeds)} seed(s), "
        f"{args.steps} steps each, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        flush=True,
    )
    for c in configs:
        print(f"  {c.label:24s} {c.detail}")
    result = sweep(configs, args.lrs, args.seeds, args.steps, progress=lambda line: print(line, flush=True))
    print()
    print(format_table(result))
    print()
    print(format_clipped(result))
    print(f"\nTotal: {len(result.runs)} runs in {result.seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(result), f, indent=1)
            f.write("\n")
        print(f"JSON written to {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"Plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
