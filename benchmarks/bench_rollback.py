"""What rollback costs: snapshot and restore times, the extra memory, and the per-step cost of the remedy.

For a model of --layers Linear(width, width) layers (2 tensors each; 50 layers = 100 tensors, 3.29M parameters), with
SGD + momentum and with AdamW (whose state is twice the weights):

* ``Snapshot.take`` and ``Snapshot.restore`` of the weights, the optimizer state and (percentile rule) statistics:
  median milliseconds over --repeats calls, and the bytes a snapshot holds (two are kept);
* the per-step cost of the hook under ``nan_policy="skip"``, ``"halve_lr"`` and ``"rollback"`` (no snapshot due),
  against torch ``clip_grad_norm_`` in the same process, interleaved as in ``bench_hook.py``; and under
  ``rollback`` with the step's loss observed (``on_before_backward``, as in training), the divergence watch on and
  off (``divergence_margin=None``);
* the snapshot's cost averaged over ``snapshot_every`` steps (the default 50, and 10).

Usage::

    python benchmarks/bench_rollback.py                 # CPU
    python benchmarks/bench_rollback.py --device cuda   # on a GPU (pinned host copies; synchronizes around timings)
    python benchmarks/bench_rollback.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hook import Deep, attach, timed

from lightning_clip import GradientClipping
from lightning_clip.rules import PercentileClip
from lightning_clip.snapshot import Snapshot


def snapshot_costs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str, repeats: int) -> dict:
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # the optimizer state exists, as in training
    rule = PercentileClip(history_size=1000)
    rule.norms.on(torch.device(device), torch.float32)

    def statistics_of() -> list:
        return [rule.norms]

    snap = Snapshot()
    snap.take(optimizer, 0, statistics_of)  # allocates its buffers once
    take = [timed(lambda: snap.take(optimizer, 1, statistics_of), 1, device) for _ in range(repeats)]
    restore = [timed(lambda: snap.restore(optimizer, statistics_of), 1, device) for _ in range(repeats)]
    weights = sum(p.numel() * p.element_size() for p in params)
    return {
        "take_ms": statistics.median(take),
        "restore_ms": statistics.median(restore),
        "snapshot_mb": snap.nbytes() / 2**20,
        "weights_mb": weights / 2**20,
    }


def hook_step(
    cb: GradientClipping, trainer: Any, model: torch.nn.Module, losses: Iterator[torch.Tensor] | None
) -> None:
    """One call of the hook, after observing the step's loss when ``losses`` is given (as ``on_before_backward`` does
    in training)."""
    if losses is not None:
        cb.on_before_backward(trainer, model, next(losses))
    cb.on_before_optimizer_step(trainer, model, trainer.optimizers[0])


def whole_steps(layers: int, width: int, steps: int, repeats: int) -> dict[str, float]:
    """Median wall time per optimizer step of real ``steps``-step fits of ``Deep`` (batch 64, SGD) under
    ``nan_policy="rollback"``, the divergence watch on and off, interleaved ``repeats`` times in this process (a
    healthy run: its loss falls, nothing rolls back)."""
    import time

    import pytorch_lightning as pl

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64 * steps, width)), batch_size=64)
    times: dict[str, list[float]] = {"divergence on": [], "divergence off": []}
    for _ in range(repeats):
        for key in times:
            torch.manual_seed(0)
            cb = GradientClipping(nan_policy="rollback", log_norms="none")
            if key == "divergence off":
                cb = GradientClipping(nan_policy="rollback", log_norms="none", divergence_margin=None)
            trainer = pl.Trainer(
                max_steps=steps,
                callbacks=[cb],
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                accelerator="cpu",
                devices=1,
            )
            start = time.perf_counter()
            trainer.fit(Deep(layers, width), data)
            times[key].append((time.perf_counter() - start) / steps * 1e3)
            assert cb.counters["rollbacks"] == 0
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--fit-steps", type=int, default=200, help="steps of each whole-step fit (0: skip that part)")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = args.device

    rows: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "torch": torch.__version__}
    for name, make in (
        ("SGD momentum", lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)),
        ("AdamW", lambda p: torch.optim.AdamW(p, lr=1e-3)),
    ):
        model = Deep(args.layers, args.width).to(device)
        rows[name] = snapshot_costs(model, make(model.parameters()), device, args.repeats)

    # The hook per step: rollback reads one scalar per step, as skip (non-fused) and halve_lr do.
    model = Deep(args.layers, args.width)
    setups = {
        "skip": GradientClipping(nan_policy="skip", log_norms="none"),
        "halve_lr": GradientClipping(nan_policy="halve_lr", log_norms="none"),
        "rollback": GradientClipping(nan_policy="rollback", log_norms="none"),
        # A healthy step of a real run observes its loss: the divergence watch reads it (issue 21), against the
        # same step with the watch off (the loss then stays on the device).
        "rollback, loss observed, divergence on": GradientClipping(nan_policy="rollback", log_norms="none"),
        "rollback, loss observed, divergence off": GradientClipping(
            nan_policy="rollback", log_norms="none", divergence_margin=None
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainers = {k: attach(model, cb, False, device) for k, cb in setups.items()}
    model.to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    variants: dict[str, Callable[[], None]] = {
        "torch clip_grad_norm_(foreach)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    }
    for key, cb in setups.items():  # the attach() fit's loss is the model's; the synthetic one below starts afresh
        if "loss" in key:
            cb.engine.remedy_of(0).watch.reset()
    losses = itertools.cycle([torch.tensor(2.0 + 0.01 * (i % 7), device=device) for i in range(64)])  # healthy
    for key, cb in setups.items():
        label = f"hook, {key}" if "," in key else f"hook, nan_policy={key}"
        variants[label] = functools.partial(hook_step, cb, trainers[key], model, losses if "loss" in key else None)
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            samples[k].append(timed(fn, args.iters, device))
    base = statistics.median(samples["torch clip_grad_norm_(foreach)"])
    n = len(params)
    print(
        f"{n} tensors, {sum(p.numel() for p in params) / 1e6:.2f}M parameters, device {rows['device']}, torch "
        f"{torch.__version__}, medians of {args.repeats} (x {args.iters} for the hook rows)"
    )
    print(f"{'snapshot (weights + optimizer state + statistics)':52s} {'take ms':>8s} {'restore ms':>11s} {'MB':>7s}")
    for name in ("SGD momentum", "AdamW"):
        r = rows[name]
        print(f"  {name:50s} {r['take_ms']:8.3f} {r['restore_ms']:11.3f} {r['snapshot_mb']:7.1f}")
        for every in (50, 10):
            print(f"    averaged over snapshot_every={every}: {r['take_ms'] / every:.3f} ms/step")
    print(f"  (weights alone: {rows['SGD momentum']['weights_mb']:.1f} MB; up to three snapshots are kept)")
    print(f"{'per step (no snapshot due)':52s} {'ms/step':>8s} {'ratio':>11s}")
    hook_rows = {}
    for k, values in samples.items():
        ms = statistics.median(values)
        hook_rows[k] = {"ms": ms, "ratio": ms / base}
        print(f"  {k:50s} {ms:8.3f} {ms / base:11.2f}")
    rows["hook"] = hook_rows
    if args.fit_steps and device == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits = whole_steps(args.layers, args.width, args.fit_steps, 5)
        off = fits["divergence off"]
        print(f"whole step, real fits of {args.fit_steps} steps (batch 64; medians of 5, interleaved)")
        for key, ms in fits.items():
            print(f"  {'rollback, ' + key:50s} {ms:8.3f} {ms / off:11.3f}")
        rows["whole_step"] = fits
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
