"""The ``lightning-clip`` console command.

::

    lightning-clip demo [--steps N] [--logdir DIR] [--max-norm X] [--seed S]
    lightning-clip report LOGDIR [--plot FILE.png]

``demo`` trains the exploding example (:class:`~lightning_clip.app.models.DeepMLP`) on CPU twice --
plain Lightning, with ``GradientClipping(mode="none", nan_policy="ignore")`` attached only to log
the norms, and with ``GradientClipping(mode="norm")`` -- prints a side-by-side table and writes
TensorBoard logs. ``report`` summarizes (and plots) the gradient norms in existing logs.

Example::

    $ lightning-clip demo --steps 300
    $ lightning-clip report lightning_logs --plot grad_norms.png
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for real inside the commands: `lightning-clip --help` stays fast
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_clip import GradientClipping

PROG = "lightning-clip"


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
            f"  {PROG} demo                      # plain vs clipped training of an exploding deep MLP\n"
            f"  {PROG} report lightning_logs --plot grad_norms.png\n"
            "  tensorboard --logdir lightning_logs"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train an exploding deep MLP on CPU without and with GradientClipping; print a comparison",
        description=(
            "Train a 16-layer tanh MLP (no normalization, SGD lr=0.1, momentum 0.9) on synthetic data twice:\n"
            "plain Lightning, with GradientClipping(mode='none', nan_policy='ignore') attached only to log\n"
            "the gradient norms, and with GradientClipping(mode='norm', max_norm=...). Prints a side-by-side\n"
            "table and writes TensorBoard logs to LOGDIR/demo/version_<n>/{plain,clipped}."
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
    demo.set_defaults(func=_cmd_demo)

    report = sub.add_parser(
        "report",
        help="summarize the gradient norms in TensorBoard logs written by GradientClipping",
        description=(
            "Read the TensorBoard event files under LOGDIR (every directory with event files is a run)\n"
            "and print, per run: optimizer steps, logged points, median/p99/max of grad_norm/total,\n"
            "non-finite steps, fraction of steps clipped, skipped steps and the final LR scale."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log directory (one or many runs)")
    report.add_argument("--plot", metavar="FILE.png", help="also write a PNG of the norms over steps")
    report.set_defaults(func=_cmd_report)
    return parser


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
    from lightning_clip.app.report import ReportError, format_table, load_runs, plot

    if not Path(args.logdir).is_dir():
        problem = "log directory not found" if not Path(args.logdir).exists() else "not a directory"
        _error("report", f"{problem}: {args.logdir}")
        return 2
    try:
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
    return 0


# ---------------------------------------------------------------------------------------------- demo
@dataclass
class DemoRun:
    """What the demo table shows for one run."""

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

    @property
    def diverged(self) -> bool:
        return self.nonfinite_steps > 0 or not math.isfinite(self.final_loss)


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


def _train_once(
    label: str, callback: GradientClipping, steps: int, seed: int, logger: TensorBoardLogger, progress: bool
) -> DemoRun:
    import pytorch_lightning as pl

    from lightning_clip.app.models import DeepMLP, SyntheticRegressionData, mean_squared_error
    from lightning_clip.app.report import load_runs

    pl.seed_everything(seed, verbose=False)
    data = SyntheticRegressionData(seed=seed)
    model = DeepMLP()
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
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    loss = trainer.callback_metrics.get("train/loss")
    counters = callback.counters
    log_dir = Path(logger.log_dir)
    # The logger was closed by fit(): read back what it wrote, as `lightning-clip report` would.
    logged = load_runs(log_dir)[0]
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
    )


def _num(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def demo_table(plain: DemoRun, clipped: DemoRun) -> str:
    """The side-by-side comparison the demo prints."""
    rows = [
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
        ("training time", f"{plain.seconds:.1f} s", f"{clipped.seconds:.1f} s"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = [f"{a.ljust(w0)}  {b.rjust(w1)}  {c.rjust(w2)}" for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * w2}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_clip import GradientClipping

    if "OMP_NUM_THREADS" not in os.environ:
        # A tiny model: extra threads only add synchronization, and on a busy CPU they make it ~10x slower.
        torch.set_num_threads(1)
    logdir = Path(args.logdir)
    progress = sys.stdout.isatty()
    plain_logger = TensorBoardLogger(save_dir=str(logdir), name="demo", sub_dir="plain", default_hp_metric=False)
    # The clipped run shares the plain run's version, so the pair sits side by side in TensorBoard.
    clipped_logger = TensorBoardLogger(
        save_dir=str(logdir), name="demo", version=plain_logger.version, sub_dir="clipped", default_hp_metric=False
    )
    print(
        f"Exploding-gradient demo: a 16-layer tanh MLP without normalization, SGD lr=0.1 momentum=0.9, "
        f"{args.steps} steps on CPU, seed {args.seed}.",
        flush=True,
    )
    runs = []
    specs = [
        (
            "plain Lightning",
            "no clipping; GradientClipping(mode='none') only logs norms",
            GradientClipping(mode="none", nan_policy="ignore"),
            plain_logger,
        ),
        (
            "GradientClipping",
            f"mode='norm', max_norm={args.max_norm:g}, nan_policy='skip'",
            GradientClipping(mode="norm", max_norm=args.max_norm, nan_policy="skip"),
            clipped_logger,
        ),
    ]
    with _quiet_lightning():
        for i, (label, detail, callback, logger) in enumerate(specs, 1):
            print(f"[{i}/{len(specs)}] {label} ({detail}) ...", flush=True)
            run = _train_once(label, callback, args.steps, args.seed, logger, progress)
            state = "diverged (NaN/Inf)" if run.diverged else "finite"
            print(f"      done in {run.seconds:.1f} s: final loss {_num(run.final_loss)}, {state}", flush=True)
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
    print(f"TensorBoard logs: {plain.log_dir} and {clipped.log_dir}")
    print(f"  view them:      tensorboard --logdir {logdir}")
    print(f"  summarize them: {PROG} report {logdir} --plot grad_norms.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
