#!/usr/bin/env python
"""``ClipEngine`` in a plain PyTorch training loop: clipping, a NaN step skipped, the LR halved, a resume.

Run from any directory (about 5 s on a CPU, nothing is written to disk)::

    python examples/plain_pytorch.py

What it shows, on :class:`lightning_clip.app.models.DeepMLP` (16 tanh layers, SGD + momentum at lr 0.1: without
clipping its loss reaches Inf within ~40 steps):

* ``NormClip(max_norm=1.0)`` keeps the run finite; the engine reports the raw and the clipped gradient norm;
* one batch with a NaN in its inputs makes the loss and the gradients NaN: ``HalveLR`` skips that step
  (weights and momentum buffers are bit-identical across it) and halves the LR of the following updates,
  while ``optimizer.param_groups[0]["lr"]`` keeps the value a scheduler would see;
* ``engine.state_dict()`` saved with ``torch.save`` restores the counters and the LR scale in a fresh engine.

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
    return ClipEngine(NormClip(max_norm=1.0), HalveLR(lr_factor=0.5, lr_recovery_steps=200), log_norms="total")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: extra threads cost more than they save, on a busy CPU most of all
    model = DeepMLP()  # a LightningModule is an nn.Module: only its forward is used here
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    params = list(model.parameters())
    x, y = make_regression(2048, seed=0)
    batches = torch.Generator().manual_seed(0)

    engine = make_engine()
    engine.attach([optimizer], model.named_parameters())  # once: installs the LR-scale hooks
    max_raw_norm, metrics, loss = 0.0, {}, torch.tensor(math.nan)
    for step in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=batches)
        inputs = x[idx].clone()
        if step == NAN_STEP:
            inputs[0, 0] = math.nan  # "dirty data": one NaN reaches the model
            before = [t.clone() for p in params for t in (p.detach(), optimizer.state[p]["momentum_buffer"])]
        engine.observe_batch((inputs, y[idx]), step)  # names the batch in the warning of a bad step
        loss = F.mse_loss(model(inputs), y[idx])
        engine.observe_loss(loss)  # a NaN/Inf loss marks the step bad
        loss.backward()
        # Clip and apply the remedy after backward, before the update. Log the bad step and every 10th.
        metrics = engine.step(optimizer, log=step % 10 == 0 or step in (NAN_STEP, STEPS - 1), global_step=step)
        optimizer.step()  # a skipped step has p.grad = None: SGD leaves those weights and buffers alone
        optimizer.zero_grad()
        if metrics and math.isfinite(metrics["grad_norm/total"]):
            max_raw_norm = max(max_raw_norm, metrics["grad_norm/total"])
        if step == NAN_STEP:  # nothing moved, one skip counted, the LR scale halved
            after = [t for p in params for t in (p.detach(), optimizer.state[p]["momentum_buffer"])]
            check(all(map(torch.equal, before, after)), "the NaN step changed weights or momentum buffers")
            check(engine.counters["skipped_steps"] == 1, f"after the NaN step the counters are {engine.counters}")
            check(engine.lr_scales == [0.5], f"after the NaN step lr_scales are {engine.lr_scales}")
            # The scale is applied inside optimizer.step() only: a scheduler still sees its own LR.
            check(optimizer.param_groups[0]["lr"] == LR, "param_groups shows a scaled LR")
    # After the last step: one read of the counters, to report what the sync-free path has not read yet (skips a
    # fused optimizer made on the device: a warning, or NonFiniteGradientError if the run ended on a bad streak).
    engine.finish(global_step=STEPS - 1)

    check(all(torch.isfinite(p).all() for p in params), "the weights are not finite")
    check(math.isfinite(loss.item()), f"the last loss is {loss.item()}")
    counters, scale = engine.counters, engine.lr_scales[0]
    print(
        f"steps: {counters['steps']}  (NaN injected at step {NAN_STEP})\n"
        f"skipped steps: {counters['skipped_steps']}  (weights and momentum unchanged across step {NAN_STEP})\n"
        f"lr scale: {scale}  (lr applied {LR * scale:g}, param_groups lr {optimizer.param_groups[0]['lr']:g})\n"
        f"clipped steps: {counters['clipped_steps']} of {counters['steps']}  "
        f"(max raw grad norm on logged steps {max_raw_norm:.3g}, max_norm 1.0)\n"
        f"last loss: {loss.item():.4f}\n"
        f"final grad norm: {metrics['grad_norm/total']:.4f}  (after clipping {metrics['grad_norm/total_clipped']:.4f})"
    )
    engine.detach()  # training is over: remove the LR hooks

    # Resume: the engine's state goes into the checkpoint next to the model and optimizer.
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(engine.state_dict(), Path(tmp) / "clip_engine.pt")
        resumed = make_engine()
        resumed.load_state_dict(torch.load(Path(tmp) / "clip_engine.pt"))
    check(resumed.counters == counters, f"resumed counters {resumed.counters} != {counters}")
    check(resumed.lr_scales == [0.5], f"resumed lr_scales are {resumed.lr_scales}")
    print(f"resumed engine: skipped steps {resumed.counters['skipped_steps']}, lr scale {resumed.lr_scales[0]}")


if __name__ == "__main__":
    main()
