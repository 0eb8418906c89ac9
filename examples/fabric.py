#!/usr/bin/env python
"""``ClipEngine`` in a Lightning Fabric loop: clipping, a NaN step skipped, the LR halved, metrics logged, a resume.

Run from any directory (about 10 s on a CPU); TensorBoard logs go to ``./lightning_logs/fabric`` of the working
directory::

    python examples/fabric.py
    tensorboard --logdir lightning_logs

The loop is the one of ``examples/plain_pytorch.py`` under Fabric: ``fabric.setup`` wraps the model and the
optimizer, and the engine is given the *wrapped* optimizer (it finds the torch optimizer underneath). On
:class:`lightning_clip.app.models.DeepMLP`, which diverges without clipping, it shows:

* ``NormClip(max_norm=1.0)`` keeps the run finite; the metrics go to TensorBoard with ``fabric.log_dict``;
* a NaN in one batch's inputs: ``HalveLR`` skips that step (weights and momentum bit-identical across it) and
  halves the LR of the following updates;
* ``engine.state_dict()``, saved with ``fabric.save``, restores the counters and the LR scale in a fresh engine.

The bad step also prints a ``RuntimeWarning`` (stderr) that diagnoses it. The script exits with status 1 and
a message if anything above did not happen.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

# Import this checkout's package, whether or not (and wherever) lightning-clip is installed.
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "lightning_clip" / "__init__.py").is_file():
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402
from lightning.fabric.loggers import TensorBoardLogger  # noqa: E402

from lightning_clip import ClipEngine  # noqa: E402
from lightning_clip.app.models import DeepMLP, make_regression  # noqa: E402
from lightning_clip.remedies import HalveLR  # noqa: E402
from lightning_clip.rules import NormClip  # noqa: E402

STEPS, NAN_STEP, BATCH, LR = 100, 30, 64, 0.1


def check(ok: bool, message: str) -> None:
    if not ok:
        sys.exit(f"FAILED: {message}")


def make_engine() -> ClipEngine:
    # lr_recovery_steps=200 > STEPS: the halved LR stays in force to the end of this short run.
    return ClipEngine(NormClip(max_norm=1.0), HalveLR(lr_factor=0.5, lr_recovery_steps=200))


def main() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger("lightning_logs", name="fabric"))
    fabric.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # a tiny model: extra threads cost more than they save, on a busy CPU most of all
    model = DeepMLP()  # only its forward is used: Fabric runs any nn.Module
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    x, y = make_regression(2048, seed=0)
    batches = torch.Generator().manual_seed(0)

    engine = make_engine()
    # The wrapped optimizer is fine; name the parameters from the unwrapped module ("hidden.0.weight", not
    # "_forward_module.hidden.0.weight") so the per-layer tags read as under the Lightning callback.
    engine.attach([optimizer], model.module.named_parameters())
    params, metrics, loss = list(model.parameters()), {}, torch.tensor(math.nan)
    for step in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=batches)
        inputs, targets = fabric.to_device((x[idx].clone(), y[idx]))
        if step == NAN_STEP:
            inputs[0, 0] = math.nan  # "dirty data": one NaN reaches the model
            before = [t.clone() for p in params for t in (p.detach(), optimizer.state[p]["momentum_buffer"])]
        engine.observe_batch((inputs, targets), step)  # names the batch in the warning of a bad step
        loss = F.mse_loss(model(inputs), targets)
        engine.observe_loss(loss)  # a NaN/Inf loss marks the step bad
        fabric.backward(loss)
        # Clip and apply the remedy after backward, before the update. Log the bad step and every 10th.
        metrics = engine.step(optimizer, log=step % 10 == 0 or step in (NAN_STEP, STEPS - 1), global_step=step)
        optimizer.step()  # a skipped step has p.grad = None: SGD leaves those weights and buffers alone
        optimizer.zero_grad()
        if metrics:
            fabric.log_dict(metrics, step=step)  # grad_norm/total, grad_norm_layer/<layer>, grad_clip/lr_scale, ...
        if step == NAN_STEP:  # nothing moved, one skip counted, the LR scale halved
            after = [t for p in params for t in (p.detach(), optimizer.state[p]["momentum_buffer"])]
            check(all(map(torch.equal, before, after)), "the NaN step changed weights or momentum buffers")
            check(engine.counters["skipped_steps"] == 1, f"after the NaN step the counters are {engine.counters}")
            check(engine.lr_scales == [0.5], f"after the NaN step lr_scales are {engine.lr_scales}")
            check(optimizer.param_groups[0]["lr"] == LR, "param_groups shows a scaled LR")
    # After the last step: one read of the counters, to report what the sync-free path has not read yet (skips a
    # fused optimizer made on the device: a warning, or NonFiniteGradientError if the run ended on a bad streak).
    engine.finish(global_step=STEPS - 1)
    fabric.logger.finalize("success")

    check(all(torch.isfinite(p).all() for p in params), "the weights are not finite")
    check(math.isfinite(loss.item()), f"the last loss is {loss.item()}")
    counters, scale = engine.counters, engine.lr_scales[0]
    fabric.print(
        f"steps: {counters['steps']}  (NaN injected at step {NAN_STEP})\n"
        f"skipped steps: {counters['skipped_steps']}  (weights and momentum unchanged across step {NAN_STEP})\n"
        f"lr scale: {scale}  (lr applied {LR * scale:g}, param_groups lr {optimizer.param_groups[0]['lr']:g})\n"
        f"clipped steps: {counters['clipped_steps']} of {counters['steps']}\n"
        f"last loss: {loss.item():.4f}\n"
        f"final grad norm: {metrics['grad_norm/total']:.4f}  "
        f"(after clipping {metrics['grad_norm/total_clipped']:.4f})\n"
        f"metrics logged to: {fabric.logger.log_dir}"
    )
    engine.detach()  # training is over: remove the LR hooks

    # Resume: fabric.save/load keep the engine's state in the checkpoint next to the model and optimizer.
    with tempfile.TemporaryDirectory() as tmp:
        fabric.save(Path(tmp) / "ckpt.pt", {"model": model, "optimizer": optimizer, "clip": engine.state_dict()})
        resumed = make_engine()
        resumed.load_state_dict(fabric.load(Path(tmp) / "ckpt.pt")["clip"])
    check(resumed.counters == counters, f"resumed counters {resumed.counters} != {counters}")
    check(resumed.lr_scales == [0.5], f"resumed lr_scales are {resumed.lr_scales}")
    fabric.print(f"resumed engine: skipped steps {resumed.counters['skipped_steps']}, lr scale {resumed.lr_scales[0]}")


if __name__ == "__main__":
    main()
