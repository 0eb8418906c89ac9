"""Per-step cost of the GradientClipping hook under FSDP2 (2 CPU processes, gloo) against torch's clip_grad_norm_.

Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` runs one step of a model with
--layers Linear layers, each ``fully_shard``-ed, so the hooks are wired as in training. Then, on the same sharded
model and the same DTensor gradients (``Shard(0)``), interleaved, each the median over --repeats rounds of --iters
calls, on every rank together (every variant makes collectives):

* torch ``clip_grad_norm_(foreach=True)``: handles DTensor gradients itself (DTensor dispatch, a Partial norm
  reduced by an all-reduce) -- the baseline;
* the hook, norm mode, ``nan_policy="ignore"`` (no host read) and ``"skip"`` (one scalar read);
* a logging step: the hook with per-layer norms to an in-memory logger (the one transfer of a logging step).

Usage::

    python benchmarks/bench_sharded.py                 # 2 CPU processes, ~100 gradient tensors
    python benchmarks/bench_sharded.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import Logger
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_clip import GradientClipping
from lightning_clip.host_reads import count_host_reads


class Deep(pl.LightningModule):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class MemoryLogger(Logger):
    """Keeps the last metrics: the logging variant measures the hook, not a file writer."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.last = metrics


def timed(fn: Callable[[], None], iters: int) -> float:
    dist.barrier()  # start together: the variants' collectives would otherwise time the other rank's lag
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3  # ms per call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=50, help="Linear layers (2 gradient tensors each)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None, help="also write the results here (rank 0)")
    args = ap.parse_args()

    model = Deep(args.layers, args.width)
    setups = {
        "norm_ignore": GradientClipping(max_norm=1.0, nan_policy="ignore", log_norms="none", name="ignore"),
        "norm_skip": GradientClipping(max_norm=1.0, nan_policy="skip", log_norms="none", name="skip"),
        "log": GradientClipping(max_norm=1.0, nan_policy="skip", log_norms="layer", name="log"),
    }
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, args.width)), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=1,
        callbacks=list(setups.values()),
        logger=MemoryLogger(),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tempfile.mkdtemp(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)

    params = list(model.parameters())
    torch.manual_seed(1 + trainer.global_rank)
    for p in params:  # DTensor gradients with this rank's shard of random values
        local = torch.randn_like(p._local_tensor) * 1e-2
        p.grad = torch.distributed.tensor.DTensor.from_local(local, p.device_mesh, p.placements, run_check=False)
    optimizer = trainer.optimizers[0]
    placements = sorted({str(p.grad.placements) for p in params})

    def hook(cb: GradientClipping) -> Callable[[], None]:
        return lambda: cb.on_before_optimizer_step(trainer, model, optimizer)

    variants: dict[str, Callable[[], Any]] = {
        "torch clip_grad_norm_(foreach) on DTensors": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
        "hook norm, nan_policy=ignore": hook(setups["norm_ignore"]),
        "hook norm, nan_policy=skip": hook(setups["norm_skip"]),
        "logging step: hook (per-layer norms)": hook(setups["log"]),
    }
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():  # interleaved, so drift hits every variant alike
            samples[name].append(timed(fn, args.iters))
    reads = {}
    for name, fn in variants.items():
        with count_host_reads() as r:
            fn()
        reads[name] = r.count
    medians = {name: statistics.median(s) for name, s in samples.items()}
    every_rank: list[dict[str, float]] = [{} for _ in range(trainer.world_size)]
    dist.all_gather_object(every_rank, medians)
    if trainer.global_rank != 0:
        return

    base = max(r["torch clip_grad_norm_(foreach) on DTensors"] for r in every_rank)
    n_elements = sum(p.numel() for p in params)
    print(
        f"{len(params)} gradient tensors, {n_elements / 1e6:.2f}M elements, FSDP2 over {trainer.world_size} CPU "
        f"processes (gloo), placements {placements}, torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"per process, median of {args.repeats} x {args.iters} calls, the slower rank"
    )
    print(f"{'variant':46s} {'ms/step':>9s} {'ratio':>7s} {'host reads':>11s}")
    rows = []
    for name in variants:
        ms = max(r[name] for r in every_rank)
        rows.append({"variant": name, "ms": ms, "ratio": ms / base, "host_reads": reads[name]})
        print(f"{name:46s} {ms:9.3f} {ms / base:7.2f} {reads[name]:11d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world_size": trainer.world_size, "tensors": len(params), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
