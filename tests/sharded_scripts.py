"""Multi-process workers for tests/test_sharded.py (CPU, gloo). Not a test module.

Each command runs real ranks and has every rank write what it saw to ``OUT/<command>_rank<r>.json``; the test
module asserts on those files. Several checks share one launch, because starting the processes is what costs.

* ``lightning_fsdp2 OUT``: Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``,
  ``fully_shard`` per Linear (2 ranks). Four fits in the same processes:

  - ``A``: AdamW (foreach), ``halve_lr``, max_norm 0.5, a NaN loss on rank 1 at step 2, a logger at every step,
    then ``trainer.save_checkpoint(dir)`` (a sharded, distributed checkpoint directory);
  - ``B``: a new Trainer, model and callback resumed with ``ckpt_path=dir``, a NaN loss on rank 0 at step 6;
  - ``C``: ``bf16-mixed``, AdamW(fused=True), ``skip``, ``accumulate_grad_batches=2``, a NaN loss in the second
    micro-batch of step 2 on rank 0 only (the fused optimizer skips on the device through ``found_inf``);
  - ``D``: manual optimization, SGD with momentum, ``nan_policy="ignore"``, logging every 3rd step; the hook runs
    under :func:`lightning_clip.host_reads.count_host_reads`.

  Probes registered before and after GradientClipping gather the full gradient (``DTensor.full_tensor()``, in
  float64), the full weights and the optimizer state at every optimizer step.
* ``plain OUT``: a plain loop over ``torch.distributed`` (2 ranks), all through :class:`ClipEngine`: tensor
  parallelism (``parallelize_module``, Colwise then Rowwise, a replicated bias) for p = 1, 2, inf, clipping, a NaN
  loss on one rank, a NaN in one rank's shard under the inf-norm, the value rule on shards, a Partial gradient and
  a ``_StridedShard`` one; FSDP1 (``FullyShardedDataParallel`` on CPU, ``use_orig_params=True/False``, ``NO_SHARD``)
  against an unsharded copy; and the collectives each rank issues when one FSDP1 rank has no gradient (recorded,
  not run: a mismatch would hang).
* ``plain2d OUT``: 4 ranks. dp=2 x tp=2: tensor parallel Linears on the ``tp`` mesh dim, ``fully_shard`` over
  ``dp``, and a head sharded over ``dp`` only (a gradient on another mesh); then hybrid sharding, 2 replicas x 2
  shards, with FSDP2 (``fully_shard`` on a 2-D mesh) and FSDP1 ``HYBRID_SHARD``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

INF = float("inf")


def _flat64(tensors: list[torch.Tensor]) -> torch.Tensor:
    return (
        torch.cat([t.detach().double().flatten() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective), as it is for a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _norm(t: torch.Tensor, p: float = 2.0) -> float:
    return float(torch.linalg.vector_norm(t, p)) if t.numel() else 0.0


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _write(out: str, name: str, rank: int, result: dict[str, Any]) -> None:
    Path(out, f"{name}_rank{rank}.json").write_text(json.dumps(result))


# ============================================================================ Lightning, FSDP2 (ModelParallelStrategy)
def lightning_fsdp2(out: str) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import Logger
    from pytorch_lightning.plugins import MixedPrecision
    from pytorch_lightning.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_clip import GradientClipping
    from lightning_clip.host_reads import count_host_reads

    class Recorder(Logger):
        """Keeps every ``log_metrics`` call (on every rank: the callback logs on each)."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict[str, float]] = []

        @property
        def name(self) -> str:
            return "recorder"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.rows.append({k: float(v) for k, v in metrics.items() if k.startswith("grad_")})

    class Net(pl.LightningModule):
        def __init__(
            self,
            optimizer: str = "adamw",
            nan_at: tuple[tuple[int, int, int], ...] = (),
            manual: bool = False,
            shard: bool = True,
            drift: tuple[int, int, int] | None = None,
        ) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.Tanh(), torch.nn.Linear(33, 1))
            self.optimizer_name = optimizer
            self.nan_at = set(nan_at)  # (global step, rank, micro-batch index within the accumulation window)
            self.automatic_optimization = not manual
            self.shard = shard
            self.drift = drift  # (from, to global step, on rank): that rank's loss grows x3 a step, finite

        def configure_model(self) -> None:
            if not self.shard:  # DDP
                return
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y) * 100  # large gradients: clipping is active
            accumulate = self.trainer.accumulate_grad_batches
            if (self.global_step, self.global_rank, batch_idx % accumulate) in self.nan_at:
                loss = loss * float("nan")
            first, last, rank = self.drift or (0, -1, -1)
            if self.global_rank == rank and first <= self.global_step <= last:
                loss = loss * 3.0 ** (self.global_step - first + 1)
            return loss

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
            if self.automatic_optimization:
                return self.loss(batch, batch_idx)
            opt = self.optimizers()
            self.manual_backward(self.loss(batch, batch_idx))
            opt.step()
            opt.zero_grad()
            return None

        def configure_optimizers(self):
            if self.optimizer_name == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=0.01, foreach=True)
            if self.optimizer_name == "adamw_fused":
                return torch.optim.AdamW(self.parameters(), lr=0.01, fused=True)
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, foreach=True)

    class Probe(pl.Callback):
        """Gathers the whole gradient (``full_tensor``, a collective every rank joins) at each optimizer step."""

        def __init__(self, logger: Recorder | None, before: bool) -> None:
            self.logger, self.before, self.rows = logger, before, []
            self.logged_at = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = {"counters": None, "weights": self._weights(pl_module)}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
            full = {n: _full(p.grad).double() for n, p in named}  # the whole gradient, float64
            row: dict[str, Any] = {"step": trainer.global_step, "has_grads": bool(named)}
            row["total"] = _norm(_flat64(list(full.values())))
            layers: dict[str, list[torch.Tensor]] = {}
            for n, g in full.items():
                layers.setdefault(_layer(n), []).append(g)
            row["layers"] = {k: _norm(_flat64(v)) for k, v in layers.items()}
            if self.before:
                row["weights"] = self._weights(pl_module)
                state = [_local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
                row["state"] = _flat64(state).tolist()
                self.logged_at = len(self.logger.rows) if self.logger else 0
            elif self.logger is not None:
                new = self.logger.rows[self.before_probe.logged_at :]
                row["logged"] = new[0] if new else None
            self.rows.append(row)

        @staticmethod
        def _weights(pl_module) -> list[float]:
            return _flat64([_full(p) for p in pl_module.parameters()]).tolist()

    class CountingClipping(GradientClipping):
        """GradientClipping whose hook runs under ``count_host_reads`` (collectives are not host reads)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.reads: list[dict[str, Any]] = []
            self.at_train_start: dict[str, Any] = {}

        def on_train_start(self, trainer, pl_module) -> None:
            self.at_train_start = {"counters": self.counters, "lr_scales": self.lr_scales}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            logs = bool(trainer.loggers) and trainer._logger_connector.should_update_logs
            with count_host_reads() as reads:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.reads.append({"step": trainer.global_step, "logs": logs, "reads": reads.calls})

    torch.manual_seed(1)
    data = TensorDataset(torch.randn(96, 8), torch.randn(96, 1))

    def fit(
        name: str,
        model: Net,
        cb: CountingClipping,
        max_steps: int,
        log_every: int = 1,
        ckpt_path: str | None = None,
        strategy: Any = None,
        blocks: list[int] | None = None,
        **trainer_kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        logger = Recorder()
        before = Probe(logger, before=True)
        after = Probe(logger, before=False)
        after.before_probe = before
        loader = DataLoader(data, batch_size=8)
        if blocks is not None:  # each rank reads its own half of each block of 16 rows, in order: no sampler
            rank = int(os.environ.get("LOCAL_RANK", "0"))
            rows = [16 * b + 8 * rank + j for b in blocks for j in range(8)]
            loader = DataLoader(TensorDataset(*(t[rows] for t in data.tensors)), batch_size=8)
            trainer_kwargs["use_distributed_sampler"] = False
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy or ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            max_steps=max_steps,
            callbacks=[before, cb, after],
            logger=logger,
            log_every_n_steps=log_every,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
            **trainer_kwargs,
        )
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        final_state = [
            _local(v) for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v)
        ]
        result = {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "counters": cb.counters,
            "lr_scales": cb.lr_scales,
            "at_train_start": cb.at_train_start,
            "start_weights": before.start["weights"],
            "final_weights": Probe._weights(model),
            "final_state_finite": bool(torch.isfinite(_flat64(final_state)).all()),
            "before": before.rows,
            "after": after.rows,
            "reads": cb.reads,
            "windows": cb.engine.skipped_windows(),
            "final_state": _flat64(final_state).tolist(),
        }
        return trainer, {name: result}

    results: dict[str, Any] = {}
    ckpt = os.path.join(out, "fsdp2_ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"max_norm": 0.5, "nan_policy": "halve_lr", "log_norms": "layer"}
        trainer, r = fit("A", Net(nan_at=((2, 1, 0),)), CountingClipping(**kwargs), max_steps=5)
        results.update(r)
        trainer.save_checkpoint(ckpt)
        results["ckpt_files"] = sorted(os.listdir(ckpt)) if trainer.global_rank == 0 else []
        _, r = fit("B", Net(nan_at=((6, 0, 0),)), CountingClipping(**kwargs), max_steps=8, ckpt_path=ckpt)
        results.update(r)
        cb = CountingClipping(max_norm=0.5, nan_policy="skip", log_norms="layer")
        _, r = fit(
            "C",
            Net("adamw_fused", nan_at=((2, 0, 1),)),
            cb,
            max_steps=5,
            precision="bf16-mixed",
            accumulate_grad_batches=2,
        )
        results.update(r)
        cb = CountingClipping(max_norm=0.5, nan_policy="ignore", log_norms="layer")
        _, r = fit("D", Net("sgd_momentum", manual=True), cb, max_steps=7, log_every=3)
        results.update(r)
        # DDP (every rank holds the whole, all-reduced gradient): the cells the single-process tests leave open
        cb = CountingClipping(max_norm=0.5, nan_policy="skip", log_norms="layer")
        _, r = fit(
            "E",
            Net("adamw_fused", nan_at=((2, 1, 0),), shard=False),
            cb,
            max_steps=5,
            strategy="ddp",
            precision="bf16-mixed",
            accumulate_grad_batches=2,
        )
        results.update(r)
        cb = CountingClipping(max_norm=0.5, nan_policy="halve_lr", log_norms="layer")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        _, r = fit(
            "F",
            Net("sgd_momentum", nan_at=((1, 0, 0),), manual=True, shard=False),
            cb,
            max_steps=4,
            strategy="ddp",
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        )
        results.update(r)
        # G: rollback with a NaN on rank 1 at step 3; H: a run that never saw the rolled-back window. Step b reads
        # block b (rows 16b..16b+15, half on each rank), so H trains on the blocks of the steps G kept, read from G's
        # own record of what it restored and skipped.
        rollback = {"max_norm": 0.5, "nan_policy": "rollback", "snapshot_every": 2, "rollback_skip_steps": 1}
        rollback["rollback_lr_factor"] = 1.0  # H has no rollback: the same LR
        trainer, r = fit("G", Net(nan_at=((3, 1, 0),)), CountingClipping(**rollback), max_steps=6, blocks=[*range(6)])
        results.update(r)
        (window,) = r["G"]["windows"]
        kept = [*range(window["snapshot_step"]), *range(window["skipped"][1] + 1, 6)]
        _, r = fit("H", Net(), CountingClipping(**rollback), max_steps=len(kept), blocks=kept)
        results.update(r)
        results["H"]["kept"] = kept
        # I: DDP, a loss that diverges on rank 1 only (finite, steps 6-16): the ranks average the loss before the
        # divergence watch reads it, so both roll back at the same step and the replicas stay equal.
        cb = CountingClipping(max_norm=0.5, nan_policy="rollback", snapshot_every=2)
        _, r = fit("I", Net("sgd_momentum", drift=(6, 16, 1), shard=False), cb, max_steps=24, strategy="ddp")
        results.update(r)
    _write(out, "lightning_fsdp2", trainer.global_rank, results)


# ============================================================================ plain loops over torch.distributed
def _init(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )


def _tp_mlp(mesh: Any) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _engine(rule: Any, remedy: Any = None, **kwargs: Any):
    from lightning_clip.engine import ClipEngine
    from lightning_clip.remedies import Skip

    return ClipEngine(rule, remedy if remedy is not None else Skip(), **kwargs)


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.full_tensor().double() for n, p in model.named_parameters() if p.grad is not None}


def _norms_of(full: dict[str, torch.Tensor], p: float) -> dict[str, Any]:
    layers: dict[str, list[torch.Tensor]] = {}
    for n, g in full.items():
        layers.setdefault(_layer(n), []).append(g)
    return {
        "total": _norm(_flat64(list(full.values())), p),
        "layers": {k: _norm(_flat64(v), p) for k, v in layers.items()},
    }


def tensor_parallel_checks(rank: int) -> dict[str, Any]:
    """1-D tensor parallelism: Colwise (weight and bias Shard(0)) then Rowwise (weight Shard(1), bias Replicate)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    from lightning_clip.remedies import Skip
    from lightning_clip.rules import NoClip, NormClip, ValueClip

    mesh = init_device_mesh("cpu", (2,))
    model = _tp_mlp(mesh)
    torch.manual_seed(1)
    x = torch.randn(16, 8)  # tensor parallel: every rank sees the same batch

    def backward(scale: float = 1.0) -> None:
        model.zero_grad(set_to_none=True)
        (model(x).pow(2).mean() * scale).backward()

    out: dict[str, Any] = {"placements": {}}
    backward()
    for n, p in model.named_parameters():
        out["placements"][n] = [str(pl) for pl in p.grad.placements]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)

    # measured: every p, before any clipping (NoClip), against the gathered full gradient in float64
    full = _full_grads(model)
    out["reference"] = {str(p): _norms_of(full, p) for p in (1.0, 2.0, INF)}
    # what a reduction over every rank would give: the replicated bias counted once per rank
    bias = full["2.bias"]
    out["bias_counted_twice"] = math.sqrt(out["reference"]["2.0"]["total"] ** 2 + _norm(bias) ** 2)
    out["measured"] = {}
    for p in (1.0, 2.0, INF):
        engine = _engine(NoClip(), Skip(), norm_type=p)
        engine.attach([opt], model.named_parameters())
        metrics = engine.step(opt, log=True, distributed=True)
        out["measured"][str(p)] = {
            "total": metrics["grad_norm/total"],
            "layers": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("grad_norm_layer/")},
        }
        engine.detach()
    out["unchanged_by_measuring"] = all(torch.equal(full[n], g) for n, g in _full_grads(model).items())

    # clipped: the whole gradient ends at max_norm, for p = 2 and inf
    out["clipped"] = {}
    for p, max_norm in ((2.0, 0.05), (INF, 0.02)):
        backward()
        engine = _engine(NormClip(max_norm=max_norm), Skip(), norm_type=p)
        engine.attach([opt], model.named_parameters())
        engine.step(opt, distributed=True)
        after = _flat64(list(_full_grads(model).values()))
        out["clipped"][str(p)] = {"max_norm": max_norm, "after": _norm(after, p), "clipped": engine.counters}
        engine.detach()

    # one rank's NaN loss: both ranks skip (grad None) and count it
    engine = _engine(NormClip(max_norm=0.05), Skip())
    engine.attach([opt], model.named_parameters())
    model.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean() * (float("nan") if rank == 1 else 1.0)
    engine.observe_loss(loss)
    loss.backward()
    before = _flat64([p.full_tensor() for p in model.parameters()])
    engine.step(opt, distributed=True)
    opt.step()
    out["nan_on_rank1"] = {
        "counters": engine.counters,
        "weights_unchanged": torch.equal(before, _flat64([p.full_tensor() for p in model.parameters()])),
    }
    engine.detach()

    # value rule on shards: only rank 0's shard holds an element beyond the bound; both ranks count the step
    backward()
    big = model[0].weight.grad
    local = torch.full_like(big._local_tensor, 0.01)
    if rank == 0:
        local[0, 0] = 5.0
    model[0].weight.grad = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    engine = _engine(ValueClip(clip_value=1.0), Skip())
    engine.attach([opt], model.named_parameters())
    metrics = engine.step(opt, log=True, distributed=True)
    out["value_clip"] = {
        "counters": engine.counters,
        "max_abs": float(model[0].weight.grad.full_tensor().abs().max()),
        "logged_total_clipped": metrics["grad_norm/total_clipped"],
        "gathered_total_clipped": _norm(_flat64(list(_full_grads(model).values()))),
    }
    engine.detach()

    # inf-norm: a NaN in one rank's shard only (an element whose sum turned NaN after the reduce-scatter) must make
    # the step bad on every rank; the local maxima are combined with an all-reduce MAX
    out["inf_norm_nan_in_one_shard"] = {}
    for nan_rank in (0, 1):
        backward()
        if rank == nan_rank:
            model[0].weight.grad._local_tensor[0, 0] = float("nan")
        engine = _engine(NormClip(max_norm=0.05), Skip(), norm_type=INF)
        engine.attach([opt], model.named_parameters())
        metrics = engine.step(opt, log=True, distributed=True)
        out["inf_norm_nan_in_one_shard"][str(nan_rank)] = {
            "counters": engine.counters,
            "total": metrics["grad_norm/total"],
        }
        engine.detach()

    # a Partial gradient (a pending sum) is refused, naming the parameter, on every rank before any collective
    backward()
    model[2].bias.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()], run_check=False)
    engine = _engine(NormClip(max_norm=1.0), Skip())
    engine.attach([opt], model.named_parameters())
    try:
        engine.step(opt, distributed=True)
        out["partial_error"] = None
    except ValueError as err:
        out["partial_error"] = str(err)
    dist.barrier()  # both ranks are still in step: nothing hung
    out["strided_shard"] = strided_shard_check(rank, mesh)
    return out


def strided_shard_check(rank: int, mesh: Any) -> dict[str, Any]:
    """A gradient placed ``_StridedShard`` (what ``fully_shard`` over dp gives a tensor-parallel ``Shard(0)`` weight:
    FSDP2 + TP) is sharded too: its norm needs the reduction over that mesh dim."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from lightning_clip.remedies import Skip
    from lightning_clip.rules import NoClip

    placement = [_StridedShard(0, split_factor=2)]
    param = torch.nn.Parameter(DTensor.from_local(torch.zeros(4), mesh, placement, run_check=False))
    param.grad = DTensor.from_local(torch.arange(1.0, 5.0) + 4 * rank, mesh, placement, run_check=False)
    opt = torch.optim.SGD([param], lr=0.1)
    engine = _engine(NoClip(), Skip())
    engine.attach([opt], [("strided.weight", param)])
    metrics = engine.step(opt, log=True, distributed=True)
    return {
        "placement": str(placement[0]),
        "is_shard": placement[0].is_shard(),
        "reference": _norm(param.grad.full_tensor().double()),
        "measured": metrics["grad_norm/total"],
    }


def fsdp1_checks(rank: int) -> dict[str, Any]:
    """FSDP1 flat shards on CPU: the engine detects them (``sharded=None``) and all-reduces the norm."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from lightning_clip.remedies import Skip
    from lightning_clip.rules import NoClip, NormClip

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.Tanh(), torch.nn.Linear(33, 1))

    torch.manual_seed(2)
    X, Y = torch.randn(16, 8), torch.randn(16, 1)
    x, y = X[rank * 8 : rank * 8 + 8], Y[rank * 8 : rank * 8 + 8]
    reference = mlp()  # unsharded, on the whole batch (the mean of both ranks' equal-size losses)
    torch.nn.functional.mse_loss(reference(X), Y).backward()
    ref_grads = {n: p.grad.double() for n, p in reference.named_parameters()}
    ref_total = _norm(_flat64(list(ref_grads.values())))
    out: dict[str, Any] = {"reference_total": ref_total}
    out["reference_layers"] = _norms_of(ref_grads, 2.0)["layers"]

    def local_total(model: torch.nn.Module) -> float:
        # the norm of the whole gradient from the local flat shards, reduced here independently of the engine
        local = _flat64([p.grad for p in model.parameters() if p.grad is not None])
        sq = local.pow(2).sum()
        dist.all_reduce(sq)
        return float(sq.sqrt())

    for use_orig in (True, False):
        key = "orig_params" if use_orig else "flat_param"
        model = FSDP(mlp(), use_orig_params=use_orig, device_id=torch.device("cpu"))
        # orig_params: AdamW foreach (skips by grad=None); flat_param: AdamW fused (skips on the device, found_inf)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, foreach=use_orig, fused=not use_orig)
        res: dict[str, Any] = {"grad_shapes": {}}
        torch.nn.functional.mse_loss(model(x), y).backward()
        for n, p in model.named_parameters():
            res["grad_shapes"][n] = None if p.grad is None else list(p.grad.shape)
            res.setdefault("flattened", []).append(bool(getattr(p, "_fsdp_flattened", False)))
        engine = _engine(NoClip(), Skip())
        engine.attach([opt], model.named_parameters())
        metrics = engine.step(opt, log=True, distributed=True)  # sharded=None: detected
        res["measured"] = metrics["grad_norm/total"]
        res["logged_layers"] = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("grad_norm_layer/")}
        local: dict[str, list[torch.Tensor]] = {}
        for n, p in model.named_parameters():
            if p.grad is not None:
                local.setdefault(_layer(n), []).append(p.grad)
        res["local_layers"] = {k: _norm(_flat64(v)) for k, v in local.items()}
        engine.detach()
        engine = _engine(NormClip(max_norm=0.5), Skip())
        engine.attach([opt], model.named_parameters())
        engine.step(opt, distributed=True)
        res["after_clip"] = local_total(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # a NaN loss on rank 1 only: both ranks skip; the local flat shards stay bit-identical
        loss = torch.nn.functional.mse_loss(model(x), y) * (float("nan") if rank == 1 else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        before = _flat64([p.detach() for p in model.parameters()])
        engine.step(opt, distributed=True)
        opt.step()
        res["nan_on_rank1"] = {
            "counters": engine.counters,
            "weights_unchanged": torch.equal(before, _flat64([p.detach() for p in model.parameters()])),
            "finite": bool(torch.isfinite(before).all()),
        }
        engine.detach()
        out[key] = res

    # NO_SHARD: every rank holds the whole (all-reduced) gradient, though the parameters are marked flattened
    model = FSDP(
        mlp(), use_orig_params=True, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.NO_SHARD
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.nn.functional.mse_loss(model(x), y).backward()
    engine = _engine(NoClip(), Skip())
    metrics = engine.step(opt, log=True, distributed=True)
    out["no_shard"] = {"measured": metrics["grad_norm/total"], "explicit_false": None}
    engine = _engine(NoClip(), Skip())
    metrics = engine.step(opt, log=True, distributed=True, sharded=False)
    out["no_shard"]["explicit_false"] = metrics["grad_norm/total"]
    return out


def collective_sequence_with_a_rank_without_gradients(rank: int) -> dict[str, Any]:
    """FSDP1 ``use_orig_params=True`` with the first layer frozen: rank 0's flat shard holds only frozen elements,
    so it has no gradient at all. Every rank must still issue the same collectives in ``engine.step``, or the
    job hangs. The collectives are recorded, not run (a mismatch would hang this worker)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lightning_clip.remedies import Skip
    from lightning_clip.rules import NormClip

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.Tanh(), torch.nn.Linear(33, 1))
    model[0].requires_grad_(False)
    model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(3)
    torch.nn.functional.mse_loss(model(torch.randn(8, 8)), torch.randn(8, 1)).backward()
    with_grad = sum(p.grad is not None and p.grad.numel() > 0 for p in model.parameters())
    calls: dict[str, list[str]] = {"auto": [], "sharded": []}
    real = dist.all_reduce
    for hint, sharded in (("auto", None), ("sharded", True)):

        def record(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False, _calls=calls[hint]):
            _calls.append(f"all_reduce({tensor.dtype}, {tuple(tensor.shape)}, {op})")

        dist.all_reduce = record
        try:
            _engine(NormClip(max_norm=0.5), Skip()).step(opt, distributed=True, sharded=sharded)
        finally:
            dist.all_reduce = real
    return {"params_with_grad": with_grad, "collectives": calls}


def plain(out: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_plain_worker, args=(2, out), nprocs=2, join=True)


def _plain_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    _init(rank, world, os.path.join(out, "plain_store"))
    result = {
        "world_size": dist.get_world_size(),
        "tp": tensor_parallel_checks(rank),
        "fsdp1": fsdp1_checks(rank),
        "fsdp1_frozen_rank": collective_sequence_with_a_rank_without_gradients(rank),
    }
    _write(out, "plain", rank, result)
    dist.destroy_process_group()


# ============================================================================ dp x tp (4 ranks)
def plain2d(out: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_plain2d_worker, args=(4, out), nprocs=4, join=True)


def _plain2d_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lightning_clip.remedies import Skip
    from lightning_clip.rules import NoClip, NormClip

    _init(rank, world, os.path.join(out, "plain2d_store"))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for i in (0, 2, 4):  # 0 and 2: (dp, tp) placements on the 2-D mesh; 4: sharded over dp only, a 1-D mesh
        fully_shard(model[i], mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    dp_rank = mesh["dp"].get_local_rank()
    torch.manual_seed(1)
    X, Y = torch.randn(16, 8), torch.randn(16, 1)
    x, y = X[dp_rank * 8 : dp_rank * 8 + 8], Y[dp_rank * 8 : dp_rank * 8 + 8]

    def backward(scale: float = 1.0) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y) * scale
        loss.backward()
        return loss

    result: dict[str, Any] = {"placements": {}, "meshes": {}}
    backward(10.0)
    for n, p in model.named_parameters():
        result["placements"][n] = [str(pl) for pl in p.grad.placements]
        result["meshes"][n] = list(p.grad.device_mesh.mesh.shape)
    full = _full_grads(model)
    result["reference"] = {str(p): _norms_of(full, p) for p in (2.0, INF)}
    result["measured"] = {}
    for p in (2.0, INF):
        engine = _engine(NoClip(), Skip(), norm_type=p)
        engine.attach([opt], model.named_parameters())
        metrics = engine.step(opt, log=True, distributed=True)
        result["measured"][str(p)] = {
            "total": metrics["grad_norm/total"],
            "layers": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("grad_norm_layer/")},
        }
        engine.detach()
    engine = _engine(NormClip(max_norm=0.1), Skip())
    engine.attach([opt], model.named_parameters())
    engine.step(opt, distributed=True)
    result["after_clip"] = _norm(_flat64(list(_full_grads(model).values())))
    # a NaN loss on one rank of the four: every rank skips
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y) * (float("nan") if rank == 3 else 1.0)
    engine.observe_loss(loss)
    loss.backward()
    before = _flat64([p.full_tensor() for p in model.parameters()])
    engine.step(opt, distributed=True)
    opt.step()
    result["nan_on_rank3"] = {
        "counters": engine.counters,
        "weights_unchanged": torch.equal(before, _flat64([p.full_tensor() for p in model.parameters()])),
    }
    result["hsdp"] = hsdp_checks(rank)
    _write(out, "plain2d", rank, result)
    dist.destroy_process_group()


def hsdp_checks(rank: int) -> dict[str, Any]:
    """Hybrid sharding on 4 ranks (2 replicas x 2 shards): shards hold parts, replicas hold the same parts.

    FSDP2 (``fully_shard`` on a 2-D mesh) gives ``(Replicate(), Shard(0))`` gradients; FSDP1 ``HYBRID_SHARD`` gives
    flat shards replicated across the replica groups. The norm must count each element once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy, fully_shard

    from lightning_clip.remedies import Skip
    from lightning_clip.rules import NoClip

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.Tanh(), torch.nn.Linear(33, 1))

    torch.manual_seed(4)
    X, Y = torch.randn(32, 8), torch.randn(32, 1)
    x, y = X[rank * 8 : rank * 8 + 8], Y[rank * 8 : rank * 8 + 8]  # 4 data-parallel ranks
    reference = mlp()
    torch.nn.functional.mse_loss(reference(X), Y).backward()
    out: dict[str, Any] = {"reference": _norm(_flat64([p.grad for p in reference.parameters()]))}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))

    model = fully_shard(mlp(), mesh=mesh)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = _engine(NoClip(), Skip()).step(opt, log=True, distributed=True)
    out["fsdp2"] = {
        "placements": [str(pl) for pl in next(model.parameters()).grad.placements],
        "gathered": _norm(_flat64([p.grad.full_tensor() for p in model.parameters()])),
        "measured": metrics["grad_norm/total"],
    }

    model = FSDP(
        mlp(),
        use_orig_params=True,
        device_id=torch.device("cpu"),
        sharding_strategy=ShardingStrategy.HYBRID_SHARD,
        device_mesh=mesh,
    )
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = _engine(NoClip(), Skip()).step(opt, log=True, distributed=True)
    with FSDP.summon_full_params(model, with_grads=True):
        gathered = _norm(_flat64([p.grad for p in model.parameters() if p.grad is not None]))
    out["fsdp1_hybrid"] = {"gathered": gathered, "measured": metrics["grad_norm/total"]}
    return out


COMMANDS = {"lightning_fsdp2": lightning_fsdp2, "plain": plain, "plain2d": plain2d}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](sys.argv[2])
