"""Per-step cost of the GradientClipping hook against torch and Lightning, side by side in one process.

Variants run interleaved on the same gradients (of a model with --layers Linear layers: 2 tensors each),
each timed as the median over --repeats rounds of --iters calls:

* torch ``clip_grad_norm_(foreach=True)``  -- the baseline the hook should cost about the same as;
* the hook, norm mode, ``nan_policy="ignore"`` (no host read) and ``"skip"`` (one scalar read);
* torch ``clip_grad_value_(foreach=True)`` vs the hook in value mode;
* a logging step, the hook alone: the hook with per-layer norms to a TensorBoardLogger (the defaults, and
  ``vanishing_ratio=None``), vs Lightning's ``utilities.grad_norm`` + ``clip_grad_norm_`` + ``logger.log_metrics``;
* the adaptive modes ``agc``, ``zscore``, ``percentile`` (``nan_policy="ignore"``, default options), timed after
  --adaptive-warmup steps so their statistics are active; besides the ratio to torch they show the ratio to the
  norm-mode hook (``vs hook norm``).

Then **the whole logging step** (``--whole-rounds``; 0 to leave it out): real ``Trainer.fit`` runs that log every step
(``log_every_n_steps=1``) to a TensorBoardLogger, one Trainer per variant and round, the variants interleaved. Each
step is timed from the start of ``on_before_optimizer_step`` (a timing callback placed first) to the end of the batch
(after the logger connector wrote the step's metrics): the hook, Lightning's clipping, ``optimizer.step()`` and its
post-hooks, the step-interval LR scheduler and every logger write. The variants:

* ``nothing``: no clipping, nothing logged (what any step costs there);
* Lightning: ``self.log_dict(grad_norm(self, norm_type=2))`` in the module's ``on_before_optimizer_step`` (the recipe
  of Lightning's docs) and ``Trainer(gradient_clip_val=1.0)``;
* ``GradientClipping()`` (the defaults), ``GradientClipping(update_ratio_every=1)`` (the update ratio on every logging
  step, as before issue 22) and ``GradientClipping(vanishing_ratio=None)`` (health off). A variant whose arguments
  the installed lightning-clip does not take (an older version) is left out.

It prints each variant's window (the median over rounds of each fit's mean window, so that work done on some logging
steps only counts at its average), what it adds to ``nothing``, and the ratio of what it adds to what Lightning's
path adds (``whole-step ratio``), beside the hook-only ratio.

Usage::

    python benchmarks/bench_hook.py                 # CPU, ~100 tensors
    python benchmarks/bench_hook.py --device cuda   # on a GPU (synchronizes around each timed block)
    python benchmarks/bench_hook.py --json out.json
    python benchmarks/bench_hook.py --layers 96     # 192 tensors (the issue-22 benchmark); --layers 250: 500
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import grad_norm

from lightning_clip import GradientClipping
from lightning_clip.host_reads import count_host_reads
from lightning_clip.rules import PercentileClip, ZScoreClip


class Deep(pl.LightningModule):
    def __init__(self, layers: int, width: int, log_grad_norm: bool = False, scheduler: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        self.log_grad_norm, self.scheduler = log_grad_norm, scheduler

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def on_before_optimizer_step(self, optimizer):
        if self.log_grad_norm:  # Lightning's recipe for gradient norms (docs: "Track and Visualize Experiments")
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1e-3)
        if not self.scheduler:
            return optimizer
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def attach(model: Deep, cb: GradientClipping, logger, device: str) -> pl.Trainer:
    """A real Trainer that ran one step, so the callback is wired as in training."""
    inputs = torch.randn(4, model.net[0].in_features)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=4)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=1,
        callbacks=[cb],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tempfile.mkdtemp(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    return trainer


def timed(fn: Callable[[], None], iters: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3  # ms per call


class StepTimer(pl.Callback):
    """Times each step from the start of ``on_before_optimizer_step`` (be the first callback) to the end of the batch:
    right after the logger connector wrote the step's metrics (``update_train_step_metrics``)."""

    def __init__(self) -> None:
        self.windows: list[float] = []  # ms
        self._start: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        connector = trainer._logger_connector
        write = connector.update_train_step_metrics

        def write_then_stamp() -> None:
            write()
            if self._start is not None:
                self.windows.append((time.perf_counter() - self._start) * 1e3)
                self._start = None

        connector.update_train_step_metrics = write_then_stamp

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._start = time.perf_counter()


# variant -> GradientClipping's arguments (None: no GradientClipping)
WHOLE_VARIANTS: dict[str, dict | None] = {
    "nothing": None,
    "Lightning grad_norm+log_dict+clip": None,
    "GradientClipping() defaults": {},
    "update_ratio_every=1": {"update_ratio_every": 1},
    "vanishing_ratio=None": {"vanishing_ratio": None},
}


def whole_step_round(models: dict, data, log_dir: str, steps: int, warmup: int) -> dict[str, list[float]]:
    """One round: a fit of ``warmup + steps`` steps per variant, every step logging; the windows after warm-up."""
    out = {}
    for name, kwargs in WHOLE_VARIANTS.items():
        timer = StepTimer()
        try:
            callbacks: list = [timer] + ([] if kwargs is None else [GradientClipping(**kwargs)])
        except TypeError:  # an argument this version does not have
            continue
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=warmup + steps,
            callbacks=callbacks,
            logger=TensorBoardLogger(log_dir, name=f"whole_{list(WHOLE_VARIANTS).index(name)}"),
            log_every_n_steps=1,
            gradient_clip_val=1.0 if name.startswith("Lightning") else None,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=log_dir,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(models[name], data)
        out[name] = timer.windows[warmup:]
    return out


def whole_step(args: argparse.Namespace) -> dict[str, float]:
    """The whole logging step of each variant (median ms over rounds x steps), printed with the ratios."""
    torch.manual_seed(0)
    models = {}
    for name in WHOLE_VARIANTS:
        torch.manual_seed(0)  # the same weights in every variant
        models[name] = Deep(args.layers, args.width, log_grad_norm=name.startswith("Lightning"), scheduler=True)
    inputs = torch.randn(4 * (args.whole_steps + args.whole_warmup), args.width)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=4)
    log_dir = tempfile.mkdtemp()
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.whole_rounds):
        for name, windows in whole_step_round(models, data, log_dir, args.whole_steps, args.whole_warmup).items():
            samples[name].append(statistics.fmean(windows))  # the mean of a fit: work done every k-th step counts
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=50, help="Linear layers (2 gradient tensors each)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--adaptive-warmup", type=int, default=30, help="hook calls before timing the adaptive modes (> their warm-up)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--whole-rounds", type=int, default=7, help="rounds of whole-step fits (0: hook-only timings)")
    ap.add_argument("--whole-steps", type=int, default=10, help="timed logging steps per fit")
    ap.add_argument("--whole-warmup", type=int, default=3, help="steps per fit before the timed ones")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = Deep(args.layers, args.width)
    setups = {
        "norm_ignore": GradientClipping(max_norm=1.0, nan_policy="ignore", log_norms="none"),
        "norm_skip": GradientClipping(max_norm=1.0, nan_policy="skip", log_norms="none"),
        "value_ignore": GradientClipping(mode="value", clip_value=1e-3, nan_policy="ignore", log_norms="none"),
        # The adaptive modes with their default options.
        "agc_ignore": GradientClipping(mode="agc", nan_policy="ignore", log_norms="none"),
        "zscore_ignore": GradientClipping(mode="zscore", nan_policy="ignore", log_norms="none"),
        "percentile_ignore": GradientClipping(mode="percentile", nan_policy="ignore", log_norms="none"),
    }
    trainers = {name: attach(model, cb, False, args.device) for name, cb in setups.items()}
    log_dir = tempfile.mkdtemp()
    log_cb = GradientClipping(max_norm=1.0, nan_policy="skip", log_norms="layer")
    log_trainer = attach(model, log_cb, TensorBoardLogger(log_dir, name="ours"), args.device)
    off_cb = GradientClipping(max_norm=1.0, nan_policy="skip", log_norms="layer", vanishing_ratio=None)
    off_trainer = attach(model, off_cb, TensorBoardLogger(log_dir, name="ours_health_off"), args.device)
    pl_logger = TensorBoardLogger(log_dir, name="lightning")

    model.to(args.device)  # Lightning moves the model back to the CPU at the end of fit
    params = list(model.parameters())
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    n_tensors = len(grads)

    def hook(name: str, trainer: pl.Trainer, cb: GradientClipping) -> Callable[[], None]:
        return lambda: cb.on_before_optimizer_step(trainer, model, trainer.optimizers[0])

    step = [0]

    def lightning_logging_step() -> None:
        norms = grad_norm(model, norm_type=2)  # one host sync per parameter (torch.tensor(list))
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        pl_logger.log_metrics(norms, step=step[0])
        step[0] += 1

    variants: dict[str, Callable[[], None]] = {
        "torch clip_grad_norm_(foreach)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
        "hook norm, nan_policy=ignore": hook("norm_ignore", trainers["norm_ignore"], setups["norm_ignore"]),
        "hook norm, nan_policy=skip": hook("norm_skip", trainers["norm_skip"], setups["norm_skip"]),
        "torch clip_grad_value_(foreach)": lambda: torch.nn.utils.clip_grad_value_(params, 1e-3, foreach=True),
        "hook value, nan_policy=ignore": hook("value_ignore", trainers["value_ignore"], setups["value_ignore"]),
        "logging step: Lightning grad_norm+clip+log": lightning_logging_step,
        "logging step: hook (per-layer norms)": hook("log", log_trainer, log_cb),
        "logging step: hook, vanishing_ratio=None": hook("log_off", off_trainer, off_cb),
        "hook agc, nan_policy=ignore": hook("agc_ignore", trainers["agc_ignore"], setups["agc_ignore"]),
        "hook zscore, nan_policy=ignore": hook("zscore_ignore", trainers["zscore_ignore"], setups["zscore_ignore"]),
        "hook percentile, nan_policy=ignore": hook(
            "percentile_ignore", trainers["percentile_ignore"], setups["percentile_ignore"]
        ),
    }
    adaptive = ("hook agc, nan_policy=ignore", "hook zscore, nan_policy=ignore", "hook percentile, nan_policy=ignore")
    # The adaptive rules' statistics warm up first (zscore, percentile: 25 healthy steps by default), so the
    # timed calls are the steady state: the EMA / percentile threshold is computed and applied.
    for name in adaptive:
        for _ in range(args.adaptive_warmup):
            variants[name]()
    for key in ("zscore_ignore", "percentile_ignore"):
        rule = setups[key].engine.rule_of(0)
        state = rule.state_dict()  # host reads: outside the timed calls
        if isinstance(rule, ZScoreClip):
            active = bool(state["initialized"])
        else:
            assert isinstance(rule, PercentileClip)
            active = state["count"] >= rule.warmup_steps
        if not active:
            raise SystemExit(f"{key}: statistics not active after {args.adaptive_warmup} warm-up calls")
    # Logging-step variants: make the hook's trainer log on every call (no loop active -> should_update_logs).
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():  # interleaved, so drift hits every variant alike
            samples[name].append(timed(fn, args.iters, args.device))
    reads = {}
    for name, fn in variants.items():
        with count_host_reads() as r:
            fn()
        reads[name] = r.count

    base_norm = statistics.median(samples["torch clip_grad_norm_(foreach)"])
    base_value = statistics.median(samples["torch clip_grad_value_(foreach)"])
    base_log = statistics.median(samples["logging step: Lightning grad_norm+clip+log"])
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{n_tensors} gradient tensors, {sum(g.numel() for g in grads) / 1e6:.2f}M elements, device {device_name}, "
        f"torch {torch.__version__}, median of {args.repeats} x {args.iters} calls"
    )
    base_hook_norm = statistics.median(samples["hook norm, nan_policy=ignore"])
    print(f"{'variant':46s} {'ms/step':>9s} {'ratio':>7s} {'host reads':>11s}")
    rows = []
    for name in variants:
        ms = statistics.median(samples[name])
        base = base_log if name.startswith("logging") else base_value if "value" in name else base_norm
        row = {"variant": name, "ms": ms, "ratio": ms / base, "host_reads": reads[name]}
        line = f"{name:46s} {ms:9.3f} {ms / base:7.2f} {reads[name]:11d}"
        if name in adaptive:  # the adaptive modes: also against the norm-mode hook
            row["ratio_to_hook_norm"] = ms / base_hook_norm
            line += f"  {ms / base_hook_norm:5.2f} vs hook norm"
        rows.append(row)
        print(line)
    result = {"device": device_name, "tensors": n_tensors, "torch": torch.__version__, "rows": rows}
    if args.whole_rounds and args.device == "cpu":
        whole = whole_step(args)
        nothing, lightning = whole["nothing"], whole["Lightning grad_norm+log_dict+clip"]
        hook_only = {
            "GradientClipping() defaults": ms_of(rows, "logging step: hook (per-layer norms)") / base_log,
            "vanishing_ratio=None": ms_of(rows, "logging step: hook, vanishing_ratio=None") / base_log,
        }
        print(
            f"\nwhole logging step (from on_before_optimizer_step to the end of the batch, log_every_n_steps=1), "
            f"median of {args.whole_rounds} fits' mean of {args.whole_steps} steps"
        )
        print(f"{'variant':36s} {'ms/step':>9s} {'added':>9s} {'whole-step ratio':>17s} {'hook-only ratio':>16s}")
        result["whole_step"] = []
        for name, ms in whole.items():
            added = ms - nothing
            ratio = added / (lightning - nothing) if name != "nothing" else math.nan
            print(f"{name:36s} {ms:9.3f} {added:9.3f} {ratio:17.3f} {hook_only.get(name, math.nan):16.3f}")
            result["whole_step"].append(
                {"variant": name, "ms": ms, "added_ms": added, "ratio": ratio, "hook_only_ratio": hook_only.get(name)}
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def ms_of(rows: list[dict], variant: str) -> float:
    return next(row["ms"] for row in rows if row["variant"] == variant)


if __name__ == "__main__":
    main()
