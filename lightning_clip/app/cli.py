"""The ``lightning-clip`` console command.

::

    lightning-clip demo [--steps N] [--logdir DIR] [--max-norm X] [--seed S] [--scenario {all,exploding,vanishing}]
    lightning-clip report LOGDIR [--plot FILE.png]

``demo`` tells the story of both failures of the chain rule, on CPU, each as two runs with a side-by-side
table, and writes TensorBoard logs:

1. exploding: the deep tanh MLP (:class:`~lightning_clip.app.models.DeepMLP`) trained plain, with
   ``GradientClipping(mode="none", nan_policy="ignore")`` attached only to log the norms, and with
   ``GradientClipping(mode="norm")``;
2. vanishing: a 20-layer sigmoid MLP (:class:`~lightning_clip.app.models.DeepSigmoidMLP`) trained plain --
   the callback's ``vanishing_ratio`` names its first layers and the loss stays put -- and the same depth with
   residual connections and LayerNorm, which trains without a warning.

``report`` summarizes (and plots) the gradient norms in existing logs.

Example::

    $ lightning-clip demo --steps 300
    $ lightning-clip demo --scenario vanishing
    $ lightning-clip report lightning_logs --plot grad_norms.png
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import math
import os
import re
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for real inside the commands: `lightning-clip --help` stays fast
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_clip import GradientClipping
    from lightning_clip.health import VanishingEvent

PROG = "lightning-clip"
SCENARIOS = ("all", "exploding", "vanishing")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``, with a message that names the bad value."""

    def parse(text: str) -> int:
        value: int | None
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``lightning-clip`` and its ``demo`` and ``report`` sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Gradient clipping, gradient-norm logging and NaN/Inf remedies for PyTorch Lightning.",
        epilog=(
            "examples:\n"
            f"  {PROG} demo                      # exploding and vanishing gradients, and their fixes\n"
            f"  {PROG} report lightning_logs --plot grad_norms.png\n"
            "  tensorboard --logdir lightning_logs"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="exploding and vanishing gradients on CPU, without and with the fix; print comparisons",
        description=(
            "Two scenarios on synthetic data, each trained twice, with a side-by-side table:\n"
            "1. exploding: a 16-layer tanh MLP (no normalization, SGD lr=0.1, momentum 0.9), plain Lightning\n"
            "   with GradientClipping(mode='none', nan_policy='ignore') attached only to log the gradient norms,\n"
            "   and with GradientClipping(mode='norm', max_norm=...);\n"
            "2. vanishing: a 20-layer sigmoid MLP (Adam lr=3e-3), plain -- GradientClipping's vanishing_ratio\n"
            "   names its first layers -- and with residual connections + LayerNorm, under GradientClipping().\n"
            "TensorBoard logs go to LOGDIR/demo/version_<n>/{plain,clipped,sigmoid_plain,sigmoid_residual}."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--steps", type=_int_at_least(1), default=500, help="optimizer steps per run (default: 500)")
    demo.add_argument(
        "--logdir", default="lightning_logs", help="TensorBoard log directory (default: ./lightning_logs)"
    )
    demo.add_argument(
        "--max-norm", type=_positive_float, default=1.0, help="max_norm of the clipped run (default: 1.0)"
    )
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="seed for data, weights and order (default: 0)")
    demo.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="all",
        help="which story to run: exploding gradients, vanishing gradients, or both in turn (default: all)",
    )
    demo.set_defaults(func=_cmd_demo)

    _add_report_parser(sub)
    return parser


def _add_report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``report`` sub-command's parser."""
    report = sub.add_parser(
        "report",
        help="summarize the gradient norms in TensorBoard logs written by GradientClipping",
        description=(
            "Read the TensorBoard event files under LOGDIR (every directory with event files is a run)\n"
            "and print, per run: optimizer steps, logged points, median/p99/max of grad_norm/total,\n"
            "non-finite steps, fraction of steps clipped, skipped steps (not applied: non-finite, spikes\n"
            "and the steps of a data window a remedy asked to skip), rollbacks with the steps they undid\n"
            "(nan_policy='rollback', from the skipped-windows JSON beside the logs) and the last logged\n"
            "LR scale."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log directory (one or many runs)")
    report.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also write a PNG of the norms over steps, and FILE_depth.png: per-layer norms and ratios against "
        "depth, when logged (needs matplotlib: pip install 'lightning-clip[report]')",
    )
    report.set_defaults(func=_cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-clip`` console command; returns the exit status.

    Example::

        >>> main(["report", "/no/such/dir"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:
        # `lightning-clip report ... | head`: the reader left; stop quietly (and let Python's
        # exit-time flush of stdout go nowhere).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _error(command: str, message: str) -> None:
    # One line, no traceback: these are the user's inputs, not our bugs.
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- report
def _cmd_report(args: argparse.Namespace) -> int:
    from lightning_clip.app.report import ReportError, check_matplotlib, depth_path, format_table, load_runs, plot

    if not Path(args.logdir).is_dir():
        problem = "log directory not found" if not Path(args.logdir).exists() else "not a directory"
        _error("report", f"{problem}: {args.logdir}")
        return 2
    try:
        if args.plot:  # before the reading: say at once what --plot needs
            check_matplotlib()
        runs = load_runs(args.logdir)
    except ReportError as err:
        _error("report", str(err))
        return 1
    print(format_table(runs, args.logdir))
    if args.plot:
        try:
            written = plot(runs, args.plot)
        except (OSError, ValueError) as err:
            _error("report", f"cannot write the plot to {args.plot}: {err}")
            return 1
        print(f"\nPlot written to {written}")
        if any(r.layers for r in runs):
            print(f"Depth plot written to {depth_path(written)}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
@dataclass
class DemoRun:
    """What the demo tables show for one run."""

    label: str
    log_dir: Path
    seconds: float
    final_loss: float
    val_mse: float
    steps: int
    nonfinite_steps: int
    skipped_steps: int
    clipped_steps: int
    lr_scale: float
    first_nonfinite_step: int | None
    median_norm: float
    max_norm_seen: float
    # the callback's vanishing-gradient warnings, as the records it keeps (callback.engine.vanishing_events()),
    # and the layers they named, in depth order
    vanishing_events: list[VanishingEvent] = field(default_factory=list)
    vanishing_named: list[str] = field(default_factory=list)
    # the model's layers (parameter names without the last component) in depth order
    layers: list[str] = field(default_factory=list)
    # ||grad W|| / ||W|| per layer at the last logging step whose values are finite, as `report` reads it
    grad_ratios: dict[str, float] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.nonfinite_steps > 0 or not math.isfinite(self.final_loss)

    @property
    def first_vanishing_step(self) -> int | None:
        """The global step of the first vanishing warning (None: no warning)."""
        return self.vanishing_events[0].global_step if self.vanishing_events else None


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up banner and the small-data warnings: the demo prints its own summary."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # Lightning's own use of a torch API deprecated in torch 2.x: not the user's concern here.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextmanager
def _vanishing_warnings_hidden() -> Iterator[None]:
    """Hide the callback's vanishing-gradient warnings: the demo tells them from the events the callback keeps
    (``callback.engine.vanishing_events()``), in its own words. Every other warning reaches stderr as before."""
    from lightning_clip.health import VANISHING_PREFIX

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(VANISHING_PREFIX), category=RuntimeWarning)
        yield


def _train_once(
    label: str,
    make_model: Callable[[], pl.LightningModule],
    callback: GradientClipping,
    steps: int,
    seed: int,
    logger: TensorBoardLogger,
    progress: bool,
) -> DemoRun:
    import pytorch_lightning as pl

    from lightning_clip.app.models import SyntheticRegressionData, mean_squared_error
    from lightning_clip.app.report import load_runs
    from lightning_clip.health import layer_of

    pl.seed_everything(seed, verbose=False)
    data = SyntheticRegressionData(seed=seed)
    model = make_model()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    with _vanishing_warnings_hidden():
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
    loss = trainer.callback_metrics.get("train/loss")
    counters = callback.counters
    log_dir = Path(logger.log_dir)
    # The logger was closed by fit(): read back what it wrote, as `lightning-clip report` would.
    logged = load_runs(log_dir)[0]
    # Depth order: the order of named_parameters(), the order the callback lists layers in.
    layers = list(dict.fromkeys(layer_of(name) for name, p in model.named_parameters() if p.requires_grad))
    events = callback.engine.vanishing_events()
    named = {name for event in events for name, _ in event.layers}
    return DemoRun(
        label=label,
        log_dir=log_dir,
        seconds=seconds,
        final_loss=float(loss) if loss is not None else math.nan,
        val_mse=mean_squared_error(model, data.val_dataloader()),
        steps=counters["steps"],
        nonfinite_steps=counters["nonfinite_steps"],
        skipped_steps=counters["skipped_steps"],
        clipped_steps=counters["clipped_steps"],
        lr_scale=callback.lr_scales[0] if callback.lr_scales else 1.0,
        first_nonfinite_step=logged.first_nonfinite_step,
        median_norm=logged.median,
        max_norm_seen=logged.max,
        vanishing_events=events,
        vanishing_named=[layer for layer in layers if layer in named],
        layers=layers,
        grad_ratios={h.name: h.grad_ratio for h in logged.layers if h.grad_ratio is not None},
    )


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _side_by_side(rows: Sequence[tuple[str, ...]]) -> str:
    """Rows of (label, left, right), the first a header, as the report's aligned columns."""
    from lightning_clip.app.report_table import format_rows

    return format_rows(rows[0], rows[1:])


def _warnings_cell(run: DemoRun) -> str:
    step = run.first_vanishing_step
    count = len(run.vanishing_events)
    return str(count) if not count or step is None else f"{count} (first at step {step})"


def _named_cell(run: DemoRun, shown: int = 3) -> str:
    named = run.vanishing_named
    if not named:
        return "none"
    listed = ", ".join(named[:shown]) + (", ..." if len(named) > shown else "")
    return f"{len(named)} of {len(run.layers)}: {listed}"


def demo_table(plain: DemoRun, clipped: DemoRun) -> str:
    """The side-by-side comparison the demo prints for the exploding scenario."""
    return _side_by_side(
        [
            ("", plain.label, clipped.label),
            ("final train loss (last step)", _num(plain.final_loss), _num(clipped.final_loss)),
            ("final val MSE (torchmetrics)", _num(plain.val_mse), _num(clipped.val_mse)),
            (
                "first non-finite step",
                *("-" if r.first_nonfinite_step is None else str(r.first_nonfinite_step) for r in (plain, clipped)),
            ),
            ("NaN/Inf steps", *(f"{r.nonfinite_steps} / {r.steps}" for r in (plain, clipped))),
            ("skipped steps", str(plain.skipped_steps), str(clipped.skipped_steps)),
            ("clipped fraction", *(f"{100 * r.clipped_steps / max(r.steps, 1):.1f}%" for r in (plain, clipped))),
            ("final LR scale", f"{plain.lr_scale:g}", f"{clipped.lr_scale:g}"),
            ("median grad norm (finite)", _num(plain.median_norm), _num(clipped.median_norm)),
            ("max grad norm (finite)", _num(plain.max_norm_seen), _num(clipped.max_norm_seen)),
            ("vanishing-layer warnings", _warnings_cell(plain), _warnings_cell(clipped)),
            ("training time", f"{plain.seconds:.1f} s", f"{clipped.seconds:.1f} s"),
        ]
    )


def vanishing_table(plain: DemoRun, residual: DemoRun) -> str:
    """The side-by-side comparison the demo prints for the vanishing scenario."""
    first, last = plain.layers[0], plain.layers[-1]
    return _side_by_side(
        [
            ("", plain.label, residual.label),
            ("final train loss (last step)", _num(plain.final_loss), _num(residual.final_loss)),
            ("final val MSE (torchmetrics)", _num(plain.val_mse), _num(residual.val_mse)),
            ("vanishing-layer warnings", _warnings_cell(plain), _warnings_cell(residual)),
            ("layers named vanishing", _named_cell(plain), _named_cell(residual)),
            (
                f"||grad W|| / ||W||, {first} (first)",
                *(_ratio(r.grad_ratios.get(first)) for r in (plain, residual)),
            ),
            (f"||grad W|| / ||W||, {last} (last)", *(_ratio(r.grad_ratios.get(last)) for r in (plain, residual))),
            ("training time", f"{plain.seconds:.1f} s", f"{residual.seconds:.1f} s"),
        ]
    )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def _headline(event: VanishingEvent, shown: int = 3, width: int = 100, indent: str = "      ") -> str:
    """The first line of a vanishing warning, its list of layers cut to the first ``shown``, wrapped, indented."""
    return (
        textwrap.fill(
            event.headline(shown),
            width=width,
            initial_indent=indent + '"',
            subsequent_indent=indent + " ",
            break_on_hyphens=False,
        )
        + '"'
    )


def _print_run(i: int, total: int, label: str, detail: str) -> None:
    print(f"[{i}/{total}] {label} ({detail}) ...", flush=True)


def _print_done(run: DemoRun) -> None:
    state = "diverged (NaN/Inf)" if run.diverged else "finite"
    warned = (
        f", {len(run.vanishing_events)} vanishing-layer warning{'s' if len(run.vanishing_events) > 1 else ''}"
        if run.vanishing_events
        else ""
    )
    print(f"      done in {run.seconds:.1f} s: final loss {_num(run.final_loss)}, {state}{warned}", flush=True)


def _exploding(
    args: argparse.Namespace,
    loggers: Callable[[str], TensorBoardLogger],
    count: Iterator[int],
    total: int,
    progress: bool,
) -> list[DemoRun]:
    """The exploding story: the deep tanh MLP, plain (NaN/Inf) and with norm clipping; its table."""
    from lightning_clip import GradientClipping
    from lightning_clip.app.models import DeepMLP

    print(
        f"Exploding-gradient demo: a 16-layer tanh MLP without normalization, SGD lr=0.1 momentum=0.9, "
        f"{args.steps} steps on CPU, seed {args.seed}.",
        flush=True,
    )
    specs = [
        (
            "plain Lightning",
            "no clipping; GradientClipping(mode='none') only logs norms",
            GradientClipping(mode="none", nan_policy="ignore"),
            "plain",
        ),
        (
            "GradientClipping",
            f"mode='norm', max_norm={args.max_norm:g}, nan_policy='skip'",
            GradientClipping(mode="norm", max_norm=args.max_norm, nan_policy="skip"),
            "clipped",
        ),
    ]
    runs = []
    for label, detail, callback, sub_dir in specs:
        _print_run(next(count), total, label, detail)
        run = _train_once(label, DeepMLP, callback, args.steps, args.seed, loggers(sub_dir), progress)
        _print_done(run)
        runs.append(run)
    plain, clipped = runs
    print()
    print(demo_table(plain, clipped))
    print()
    if plain.diverged and not clipped.diverged:
        at = f" at step {plain.first_nonfinite_step}" if plain.first_nonfinite_step is not None else ""
        print(
            f"Without clipping the gradients went NaN/Inf{at}; with GradientClipping the loss stayed finite "
            f"and reached {_num(clipped.final_loss)}."
        )
    elif not plain.diverged:
        print(
            f"The plain run stayed finite for {args.steps} steps; it usually diverges after ~30 steps "
            f"(try more --steps or another --seed)."
        )
    else:
        print("Both runs hit NaN/Inf: try a smaller --max-norm.")
    if plain.vanishing_events:
        print(
            f"On its way there the growing weights saturated the tanh units, whose derivative is then 0: the "
            f"callback named {len(plain.vanishing_named)} layers as vanishing from step {plain.first_vanishing_step}."
        )
    return runs


def _vanishing(
    args: argparse.Namespace,
    loggers: Callable[[str], TensorBoardLogger],
    count: Iterator[int],
    total: int,
    progress: bool,
) -> list[DemoRun]:
    """The vanishing story: the deep sigmoid MLP, plain (its first layers named) and residual +
    LayerNorm (trains, no warning); its table, the warning's first line and its remedies."""
    from lightning_clip import GradientClipping
    from lightning_clip.app.models import DeepSigmoidMLP

    defaults = DeepSigmoidMLP().hparams  # the demo trains the defaults
    depth, width, lr = (defaults[k] for k in ("depth", "width", "lr"))
    print(
        f"Vanishing-gradient demo: a {depth}-layer sigmoid MLP (width {width}, PyTorch's default init), "
        f"Adam lr={lr:g}, {args.steps} steps on CPU, seed {args.seed}; GradientClipping() with its defaults "
        "(vanishing_ratio=1e-8, vanishing_patience=3) on both runs.",
        flush=True,
    )
    specs = [
        ("plain deep sigmoid", "x = sigmoid(W x) in every layer", False, "sigmoid_plain"),
        ("residual + LayerNorm", "x = x + sigmoid(W LayerNorm(x)), same depth", True, "sigmoid_residual"),
    ]
    runs = []
    for label, detail, with_residual, sub_dir in specs:
        _print_run(next(count), total, label, detail)
        run = _train_once(
            label,
            functools.partial(DeepSigmoidMLP, residual=with_residual),
            GradientClipping(),
            args.steps,
            args.seed,
            loggers(sub_dir),
            progress,
        )
        _print_done(run)
        if run.vanishing_events:
            print("      the callback's first warning, first line:")
            print(_headline(run.vanishing_events[0]))
        runs.append(run)
    plain, residual = runs
    print()
    print(vanishing_table(plain, residual))
    print()
    _vanishing_verdict(plain, residual)
    return runs


def _vanishing_verdict(plain: DemoRun, residual: DemoRun) -> None:
    """What the vanishing story showed: the plain net's named layers and the remedies, or why it did not show."""
    from lightning_clip.health import VANISHING_REMEDIES

    if plain.vanishing_events and not residual.vanishing_events and residual.val_mse < plain.val_mse:
        print(
            f"The plain sigmoid net's first layers got (almost) no gradient: the callback named "
            f"{len(plain.vanishing_named)} of its {len(plain.layers)} layers, {plain.vanishing_named[0]} first, and "
            f"its val MSE stayed at {_num(plain.val_mse)} (the targets have variance 1: it predicts their mean). "
            f"With residual connections and LayerNorm the same depth got no warning and reached "
            f"{_num(residual.val_mse)}."
        )
        print("The remedies the warning lists:")
        for line in VANISHING_REMEDIES:
            print(f"  - {line}")
    elif not plain.vanishing_events:
        print("The plain sigmoid net got no vanishing-layer warning: try more --steps or another --seed.")
    else:
        print(
            f"The residual net did not clearly do better here (val MSE {_num(residual.val_mse)} vs "
            f"{_num(plain.val_mse)}): try more --steps."
        )


def _cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    if "OMP_NUM_THREADS" not in os.environ:
        # A tiny model: extra threads only add synchronization, and on a busy CPU they make it ~10x slower.
        torch.set_num_threads(1)
    logdir = Path(args.logdir)
    progress = sys.stdout.isatty()
    # Every run of one demo shares a version, so they sit side by side in TensorBoard.
    version = TensorBoardLogger(save_dir=str(logdir), name="demo").version

    def loggers(sub_dir: str) -> TensorBoardLogger:
        return TensorBoardLogger(
            save_dir=str(logdir), name="demo", version=version, sub_dir=sub_dir, default_hp_metric=False
        )

    stories = [
        story
        for name, story in (("exploding", _exploding), ("vanishing", _vanishing))
        if args.scenario in ("all", name)
    ]
    count = itertools.count(1)
    runs: list[DemoRun] = []
    with _quiet_lightning():
        for i, story in enumerate(stories):
            if i:
                print()
            runs += story(args, loggers, count, 2 * len(stories), progress)
    print()
    parent = runs[0].log_dir.parent
    print(f"TensorBoard logs in {parent}: {', '.join(r.log_dir.name for r in runs)}")
    print(f"  view them:      tensorboard --logdir {logdir}")
    print(f"  summarize them: {PROG} report {logdir} --plot grad_norms.png")
    print(f"Wall time: {time.perf_counter() - started:.1f} s for {len(runs)} runs.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
