"""Stability benchmark: learning-rate sweeps of two models that blow up, without and with each clip and remedy.

Two models (``--model``), each trained at every learning rate and seed; every configuration of a sweep starts
from the same weights and sees the same batches in the same order.

``--model mlp`` (the default): the library's exploding example, :class:`~lightning_clip.app.models.DeepMLP`
(16 tanh layers of width 64, no normalization, LeCun-normal init) trained with SGD + momentum 0.9 on
:class:`~lightning_clip.app.models.SyntheticRegressionData`, 300 steps, LRs 0.01 to 2, seeds 0-2:

* plain Lightning (no clipping);
* ``GradientClipping(mode="norm", max_norm=1.0)``;
* ``mode="agc"`` (head excluded, as in the paper, and not), ``mode="zscore"`` (without and with ``max_norm``) and
  ``mode="percentile"``, their options set via ``rule=``;
* ZClip's own Lightning callback (``zclip`` 1.0.0, its defaults), on a ``lightning.pytorch`` Trainer;
* three rows with a remedy on top of the clip: ``zscore`` with ``nan_policy="skip"``; the library's defaults
  ``GradientClipping()`` (norm 1.0, ``nan_policy="skip"``); ``GradientClipping(nan_policy="rollback",
  loss_spikes=3.0, snapshot_every=10)``.

The comparison rows use ``nan_policy="ignore"``, so only the clip differs. The same LightningModule code is built
for each namespace (``pytorch_lightning`` for ours, ``lightning.pytorch`` for ZClip's callback); both copies take
their layers from a seeded ``DeepMLP``. Score: the validation MSE after training (torchmetrics, 512 held-out
samples). A run is *stable* when that is finite and below half the untrained model's MSE (the smallest over the
seeds; about 1, as the targets are standardized).

``--model rnn``: a small language model over 32 tokens, ``nn.Embedding(32, 32)`` + one-layer ``nn.RNN`` (tanh,
hidden 128) + ``nn.Linear(128, 32)``, trained with SGD + momentum 0.9 on windows of 33 tokens (batch 32) of a fixed
random order-2 Markov chain, 400 steps, LRs 0.3, 1, 3, 10, seeds 0-3 (the seed sets the weights and which windows
make up the batches; the chain and its text are fixed). Configurations: plain, ``max_norm=1``, the defaults,
``max_norm=0.25``, ``rollback`` + ``loss_spikes=3.0`` on top of no clip / ``max_norm=1`` / ``max_norm=0.25``, and
``nan_policy="skip"`` + ``loss_spikes=3.0`` without a clip (a spike step is skipped, nothing restored). Score: the
validation cross-entropy (nats per token) on 20,000 held-out tokens of the chain. A run *trains* when that is finite
and below 3.0 nats: the uniform guess scores log 32 = 3.47, the best model that looks at one previous token only
3.34, the entropy rate of the chain is 1.75.

In both, a run that reaches NaN/Inf weights is stopped there (the weights would stay NaN) and shown as diverged,
as is one whose score overflows float32, and one that the library stops with ``NonFiniteGradientError``
(``max_consecutive_nonfinite`` bad steps without a healthy one): that run did not finish, and is not scored.

``--model lm``: a character-level transformer language model (2 pre-LN blocks of width 64, 4 heads, context 64, batch
32) on the Python reference documentation that ships with CPython (``pydoc_data.topics``: 465,000 characters of
English prose and grammar; the last 10 % held out), AdamW (betas 0.9/0.95, weight decay 0.1) with a linear warm-up
over 10 % of the 400 steps and a cosine decay to 10 %, LRs 0.003 to 30 (0.03 is the best), seeds 0-2.
Configurations: plain Lightning, Lightning's ``gradient_clip_val=1.0``, ZClip's callback, our defaults and
``GradientClipping(nan_policy="rollback")`` with its defaults. Score: the val cross-entropy (nats/char); a run
*trains* below the best model without context (the character frequencies, 3.24) minus 0.3. Besides the tables, each
sweep prints the LR sensitivity of Wortsman et al. 2023 and the rollbacks on its healthy cells (the LRs where plain
training trains at every seed): false positives.

Usage::

    python benchmarks/stability.py                                   # the documented MLP table (~3 min, 1 thread)
    python benchmarks/stability.py --model rnn                       # the documented RNN table (~4 min, 1 thread)
    python benchmarks/stability.py --steps 100 --lrs 0.01 0.3 --configs plain norm
    python benchmarks/stability.py --json benchmarks/results/stability.json --plot docs/images/stability.png
    python benchmarks/stability.py --model rnn --json benchmarks/results/stability_rnn.json \\
        --plot docs/images/stability_rnn.png
    python benchmarks/stability.py --model lm --jobs 2 --json benchmarks/results/stability_lm.json \\
        --plot docs/images/stability_lm.png                          # the transformer table (~15 min, 2 processes)
    python benchmarks/stability.py --from-json benchmarks/results/stability.json   # reprint, no training
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import importlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping, NonFiniteGradientError
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
# Every this-many steps' train loss is kept in the JSON (the loss curve, small enough to store for every run).
CURVE_EVERY = 10
# Rollback rows: a snapshot every 10 steps, so a rollback loses at most 10 of the 300-400 steps (3%), as in the
# issue's prototype; the library's default of 50 would be a sixth of a run this short.
SNAPSHOT_EVERY = 10

# The RNN language model and its text.
RNN_LRS = (0.3, 1.0, 3.0, 10.0)
RNN_STEPS = 400
RNN_SEEDS = (0, 1, 2, 3)
RNN_MOMENTUM = 0.9
VOCAB, EMBED, HIDDEN, SEQ_LEN, BATCH = 32, 32, 128, 32, 32
CHAIN_SEED, CHAIN_ALPHA = 1234, 0.1  # each context (a, b) gets a Dirichlet(0.1) next-token distribution
TRAIN_TOKENS, VAL_TOKENS = 100_000, 20_000
TRAINED_CE = 3.0  # nats/token: below the best one-token-context model (3.33), well below uniform (3.47)


# ---------------------------------------------------------------------------------------------- the MLP
def _namespace(name: str) -> Any:
    """``pytorch_lightning`` or ``lightning.pytorch``."""
    return importlib.import_module(name)


_MODULE_CLASSES: dict[tuple[str, str], type] = {}


def module_class(namespace: str, model: str = "mlp") -> type:
    """The benchmark's LightningModule for ``namespace``: one body, built on that namespace's base class.

    ``lightning.pytorch.Trainer`` refuses a ``pytorch_lightning.LightningModule`` (and the other way round),
    so the same code is subclassed from each. The MLP's layers come from a ``DeepMLP`` built under the caller's
    seed, so both namespaces start from identical weights.
    """
    if (namespace, model) in _MODULE_CLASSES:
        return _MODULE_CLASSES[namespace, model]
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

    class StabilityRNN(pl.LightningModule):
        """Embedding -> one tanh RNN layer -> linear head over the vocabulary; PyTorch's default inits."""

        def __init__(self, lr: float, momentum: float = RNN_MOMENTUM) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, EMBED)
            self.rnn = nn.RNN(EMBED, HIDDEN, batch_first=True)
            self.head = nn.Linear(HIDDEN, VOCAB)
            self.lr, self.momentum = lr, momentum

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(self.rnn(self.embed(tokens))[0])

        def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
            return next_token_loss(self, batch[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    class StabilityLM(pl.LightningModule):
        """A small pre-LN transformer over characters: AdamW, linear warm-up then cosine decay (per step)."""

        def __init__(self, lr: float, momentum: float = 0.0) -> None:
            super().__init__()
            self.net = CharTransformer()
            self.lr = lr

        def forward(self, tokens: Tensor) -> Tensor:
            return self.net(tokens)

        def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
            return next_char_loss(self, batch[0])

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.1)
            total = self.trainer.max_steps
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(warmup_cosine, total=total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    cls = {"mlp": StabilityMLP, "rnn": StabilityRNN, "lm": StabilityLM}[model]
    cls.__qualname__ = cls.__name__ = f"{cls.__name__}_{namespace.replace('.', '_')}"
    _MODULE_CLASSES[namespace, model] = cls
    return cls


# ---------------------------------------------------------------------------------------------- the RNN's text
def next_token_loss(model: nn.Module, windows: Tensor) -> Tensor:
    """Mean cross-entropy (nats/token) of predicting each window's tokens 1..n from the tokens before them."""
    logits = model(windows[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))


@functools.lru_cache(maxsize=1)
def markov_text() -> tuple[Tensor, Tensor, Tensor]:
    """``(train tokens, val tokens, P)``: one run of a fixed random order-2 Markov chain, ``P[a, b]`` the law of
    the token after ``a, b``. Fixed (seeded by ``CHAIN_SEED``): the run seeds do not change the text."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CHAIN_SEED)
        probs = torch.distributions.Dirichlet(torch.full((VOCAB,), CHAIN_ALPHA)).sample((VOCAB, VOCAB))
        uniforms = torch.rand(TRAIN_TOKENS + VAL_TOKENS, dtype=torch.float64).tolist()
    cdf = probs.double().cumsum(-1).tolist()
    tokens, a, b = [0, 1], 0, 1
    for u in uniforms[2:]:
        c = min(bisect.bisect_left(cdf[a][b], u), VOCAB - 1)
        tokens.append(c)
        a, b = b, c
    text = torch.tensor(tokens)
    return text[:TRAIN_TOKENS], text[TRAIN_TOKENS:], probs


@functools.lru_cache(maxsize=1)
def text_entropies() -> dict[str, float]:
    """Reference scores (nats/token) of the chain, from its stationary law: uniform guess, the best model without
    context (unigram), with one previous token, and with two (the entropy rate: the best any model can do)."""
    probs = markov_text()[2].double()
    pairs = torch.full((VOCAB, VOCAB), 1.0 / VOCAB**2, dtype=torch.float64)  # law of (a, b)
    for _ in range(2000):
        pairs = torch.einsum("ab,abc->bc", pairs, probs)

    def h(p: Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    joint = torch.einsum("ab,abc->bc", pairs, probs)  # law of (b, c)
    marginal = joint.sum(0)
    rate = float(sum(pairs[a, b] * h(probs[a, b]) for a in range(VOCAB) for b in range(VOCAB)))
    return {
        "uniform": math.log(VOCAB),
        "unigram": h(marginal),
        "one_token_context": h(joint.flatten()) - h(joint.sum(1)),
        "entropy_rate": rate,
    }


def window_batches(text: Tensor, seed: int, steps: int, batch: int, length: int) -> DataLoader:
    """``steps`` batches of ``batch`` random windows of ``length`` tokens of ``text`` (the seed picks them)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - length + 1, (steps * batch,), generator=g)
    return DataLoader(TensorDataset(text[starts[:, None] + torch.arange(length)]), batch_size=batch, shuffle=False)


def held_out_loss(model: nn.Module, windows: Tensor, loss: Callable[[nn.Module, Tensor], Tensor]) -> float:
    """``loss`` over the held-out windows in eval mode (NaN when it is not finite)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = float(loss(model, windows))
    finally:
        model.train(was_training)
    return value if math.isfinite(value) else math.nan


def _rnn_data(seed: int, steps: int) -> tuple[Any, Tensor]:
    """``steps`` batches of random windows of the train text (the seed picks them), and the held-out windows."""
    train, val, _ = markov_text()
    held_out = val[: len(val) // (SEQ_LEN + 1) * (SEQ_LEN + 1)].view(-1, SEQ_LEN + 1)
    return window_batches(train, seed, steps, BATCH, SEQ_LEN + 1), held_out


# ---------------------------------------------------------------------------------------------- the transformer's text
LM_LRS = (0.003, 0.03, 0.3, 1.0, 3.0, 30.0)  # 0.03 is this model's best AdamW LR: from 10x too low to 1000x too high
LM_STEPS = 400
LM_SEEDS = (0, 1, 2)
LM_CONTEXT, LM_BATCH, LM_WIDTH, LM_LAYERS, LM_HEADS = 64, 32, 64, 2, 4
LM_WARMUP = 0.1  # of the steps: linear warm-up, then cosine decay to 10 % of the peak
LM_VAL_WINDOWS = 256
LM_MARGIN = 0.3  # trained: a val CE at least this far (nats/char) below the best model without context


@functools.lru_cache(maxsize=1)
def python_docs_text() -> tuple[Tensor, Tensor, int]:
    """``(train ids, val ids, vocabulary size)``: the characters of the Python reference documentation that ships
    with every CPython (``pydoc_data.topics``, ~465,000 characters of English prose and grammar), in a fixed order;
    the last 10 % is held out."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text])
    cut = int(len(ids) * 0.9)
    return ids[:cut], ids[cut:], len(vocab)


@functools.lru_cache(maxsize=1)
def unigram_cross_entropy() -> float:
    """The val cross-entropy (nats/char) of the best model without context: the train text's character frequencies."""
    train, val, vocab = python_docs_text()
    counts = torch.bincount(train, minlength=vocab).double() + 0.5
    logp = (counts / counts.sum()).log()
    return float(-logp[val].mean())


def warmup_cosine(step: int, total: int) -> float:
    """The LR multiplier of step ``step`` of ``total``: linear warm-up over LM_WARMUP of them, then cosine to 0.1."""
    warm = max(int(total * LM_WARMUP), 1)
    if step < warm:
        return (step + 1) / warm
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class CharTransformer(nn.Module):
    """Embedding + learned positions -> ``LM_LAYERS`` pre-LN causal transformer blocks -> LayerNorm -> head."""

    def __init__(self) -> None:
        super().__init__()
        vocab = python_docs_text()[2]
        self.embed = nn.Embedding(vocab, LM_WIDTH)
        self.position = nn.Parameter(torch.randn(LM_CONTEXT, LM_WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(
            LM_WIDTH, LM_HEADS, 4 * LM_WIDTH, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.blocks = nn.TransformerEncoder(layer, LM_LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(LM_WIDTH)
        self.head = nn.Linear(LM_WIDTH, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(LM_CONTEXT), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        x = self.embed(tokens) + self.position[:n]
        x = self.blocks(x, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(x))


def next_char_loss(model: nn.Module, windows: Tensor) -> Tensor:
    logits = model(windows[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def _lm_data(seed: int, steps: int) -> tuple[Any, Tensor]:
    """``steps`` batches of random windows of the train text (the seed picks them), and fixed held-out windows."""
    train, val, _ = python_docs_text()
    stride = (len(val) - LM_CONTEXT - 1) // LM_VAL_WINDOWS
    held_out = val[torch.arange(LM_VAL_WINDOWS)[:, None] * stride + torch.arange(LM_CONTEXT + 1)]
    return window_batches(train, seed, steps, LM_BATCH, LM_CONTEXT + 1), held_out


# ---------------------------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class ModelSpec:
    """What differs between the two sweeps: data, score, threshold, defaults and the plot."""

    key: str
    summary: str
    score_name: str  # as printed: "val MSE", "val CE"
    good: str  # "stable", "trains"
    lrs: tuple[float, ...]
    steps: int
    seeds: tuple[int, ...]
    momentum: float
    configs: tuple[str, ...]
    panels: tuple[tuple[str, tuple[str, ...]], ...]
    plot_title: str
    log_y: bool
    plot_cap: float  # above this a median is drawn on the "blown up" line
    plot_bottom: float


def _data(seed: int) -> tuple[Any, Any]:
    data = SyntheticRegressionData(seed=seed)
    data.setup("fit")
    return data.train_dataloader(), data.val_dataloader()


def loaders(model: str, seed: int, steps: int) -> tuple[Any, Any]:
    """The train batches and the held-out data of ``model`` for ``seed``."""
    return {"mlp": _data, "rnn": _rnn_data, "lm": _lm_data}[model](*((seed,) if model == "mlp" else (seed, steps)))


def score(model: str, module: nn.Module, val: Any) -> float:
    if model == "mlp":
        return mean_squared_error(module, val)
    return held_out_loss(module, val, next_char_loss if model == "lm" else next_token_loss)


def initial_score(seed: int, model: str = "mlp") -> float:
    """The score of the untrained model of ``seed`` (the same for every configuration and LR)."""
    torch.manual_seed(seed)
    module = module_class("pytorch_lightning", model)(lr=0.1)
    return score(model, module, loaders(model, seed, 1)[1])


def initial_val_mse(seed: int) -> float:
    """The val MSE of the untrained MLP of ``seed``."""
    return initial_score(seed, "mlp")


def threshold_of(model: str, initial: dict[int, float]) -> float:
    if model == "lm":
        return unigram_cross_entropy() - LM_MARGIN
    return STABLE_FRACTION * min(initial.values()) if model == "mlp" else TRAINED_CE


# ---------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One row of the table."""

    key: str
    label: str
    namespace: str
    make_callbacks: Callable[[], list[Any]]
    detail: str
    trainer_kwargs: tuple[tuple[str, Any], ...] = ()  # Trainer arguments of this row (gradient_clip_val)


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


def _literal(**kwargs: Any) -> Callable[[], list[Any]]:
    """``GradientClipping(**kwargs)``, every other argument at its default (max_consecutive_nonfinite=10 too)."""
    return lambda: [GradientClipping(**kwargs)]


def _zclip() -> list[Any]:
    from zclip.zclip_lightning_callback import ZClipLightningCallback

    return [ZClipLightningCallback()]  # its defaults: alpha 0.97, z_thresh 2.5, warmup 25, max_grad_norm 1.0


_ROLLBACK = dict(nan_policy="rollback", loss_spikes=3.0, snapshot_every=SNAPSHOT_EVERY)
_ROLLBACK_TEXT = f'nan_policy="rollback", loss_spikes=3.0, snapshot_every={SNAPSHOT_EVERY}'

CONFIGS: tuple[Config, ...] = (
    Config("plain", "plain Lightning", "pytorch_lightning", list, "no clipping"),
    Config(
        "gclip",
        "gradient_clip_val=1.0",
        "pytorch_lightning",
        list,
        "Lightning's own Trainer(gradient_clip_val=1.0) (norm clipping), no callback",
        (("gradient_clip_val", 1.0),),
    ),
    Config(
        "rollback_defaults",
        "rollback (its defaults)",
        "pytorch_lightning",
        _literal(nan_policy="rollback"),
        'GradientClipping(nan_policy="rollback"): every other argument at its default (norm 1.0, divergence_margin '
        "0.05, snapshot_every 50)",
    ),
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
    Config(
        "defaults",
        "defaults",
        "pytorch_lightning",
        _literal(),
        'GradientClipping(): norm, max_norm=1.0, nan_policy="skip", max_consecutive_nonfinite=10',
    ),
    Config(
        "rollback",
        "rollback + loss_spikes",
        "pytorch_lightning",
        _literal(**_ROLLBACK),
        f"GradientClipping({_ROLLBACK_TEXT}): on top of the default norm clip, max_norm=1.0",
    ),
    Config(
        "norm_0.25",
        "max_norm=0.25",
        "pytorch_lightning",
        _ours(mode="norm", max_norm=0.25),
        'GradientClipping(mode="norm", max_norm=0.25)',
    ),
    Config(
        "rollback_noclip",
        "rollback, no clip",
        "pytorch_lightning",
        _literal(mode="none", **_ROLLBACK),
        f'GradientClipping(mode="none", {_ROLLBACK_TEXT})',
    ),
    Config(
        "rollback_0.25",
        "rollback, max_norm=0.25",
        "pytorch_lightning",
        _literal(max_norm=0.25, **_ROLLBACK),
        f"GradientClipping(max_norm=0.25, {_ROLLBACK_TEXT})",
    ),
    Config(
        "skip_noclip",
        "skip spikes, no clip",
        "pytorch_lightning",
        _literal(mode="none", nan_policy="skip", loss_spikes=3.0),
        'GradientClipping(mode="none", nan_policy="skip", loss_spikes=3.0): a spike step skipped, nothing restored',
    ),
)
CONFIG_KEYS = tuple(c.key for c in CONFIGS)
CONFIG_BY_KEY = {c.key: c for c in CONFIGS}

MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        key="mlp",
        summary="stability: LR sweep of DeepMLP (16 tanh layers, width 64), SGD momentum 0.9",
        score_name="val MSE",
        good="stable",
        lrs=DEFAULT_LRS,
        steps=DEFAULT_STEPS,
        seeds=DEFAULT_SEEDS,
        momentum=MOMENTUM,
        configs=(
            "plain",
            "norm",
            "agc",
            "agc_all",
            "zscore",
            "zscore_cap",
            "percentile",
            "zclip",
            "zscore_skip",
            "defaults",
            "rollback",
            "rollback_defaults",
        ),
        panels=(
            ("clip modes against plain training", ("plain", "norm", "agc", "agc_all", "zscore", "percentile")),
            (
                "z-score: ours, capped, ZClip's callback, with skip",
                ("norm", "zscore", "zscore_cap", "zclip", "zscore_skip"),
            ),
            (
                "the defaults and rollback (on norm, max_norm=1)",
                ("plain", "norm", "defaults", "rollback", "rollback_defaults"),
            ),
        ),
        plot_title="DeepMLP, 16 tanh layers without normalization: final val MSE vs learning rate",
        log_y=True,
        plot_cap=100.0,
        plot_bottom=0.05,
    ),
    "rnn": ModelSpec(
        key="rnn",
        summary=(
            f"stability: LR sweep of a tanh RNN language model (vocab {VOCAB}, embedding {EMBED}, hidden {HIDDEN}, "
            f"windows of {SEQ_LEN} + 1 tokens, batch {BATCH}) on an order-2 Markov chain, SGD momentum 0.9"
        ),
        score_name="val CE",
        good="trains",
        lrs=RNN_LRS,
        steps=RNN_STEPS,
        seeds=RNN_SEEDS,
        momentum=RNN_MOMENTUM,
        configs=(
            "plain",
            "norm",
            "defaults",
            "norm_0.25",
            "rollback_noclip",
            "rollback",
            "rollback_0.25",
            "skip_noclip",
            "rollback_defaults",
        ),
        panels=(
            ("clipping alone", ("plain", "norm", "defaults", "norm_0.25")),
            (
                "rollback + loss_spikes on top of each clip; skipping spikes without restore",
                (
                    "plain",
                    "norm_0.25",
                    "rollback_noclip",
                    "rollback",
                    "rollback_0.25",
                    "skip_noclip",
                    "rollback_defaults",
                ),
            ),
        ),
        plot_title="RNN language model (tanh, SGD + momentum 0.9): final val cross-entropy vs learning rate",
        log_y=False,
        plot_cap=6.0,
        plot_bottom=1.5,
    ),
    "lm": ModelSpec(
        key="lm",
        summary=(
            f"stability: LR sweep of a character transformer ({LM_LAYERS} pre-LN blocks, width {LM_WIDTH}, "
            f"{LM_HEADS} heads, context {LM_CONTEXT}, batch {LM_BATCH}) on the Python reference documentation "
            "(pydoc_data.topics), AdamW with warm-up and cosine decay"
        ),
        score_name="val CE",
        good="trains",
        lrs=LM_LRS,
        steps=LM_STEPS,
        seeds=LM_SEEDS,
        momentum=0.0,
        configs=("plain", "gclip", "zclip", "defaults", "rollback_defaults"),
        panels=(
            (
                "clipping and recovery against plain training",
                ("plain", "gclip", "zclip", "defaults", "rollback_defaults"),
            ),
        ),
        plot_title="Character transformer (AdamW, warm-up + cosine): final val cross-entropy vs learning rate",
        log_y=False,
        plot_cap=4.0,
        plot_bottom=1.0,
    ),
}


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class Run:
    config: str
    lr: float
    seed: int
    score: float  # val MSE (mlp) or val cross-entropy (rnn); NaN: diverged or stopped
    final_train_loss: float
    first_nonfinite_step: int | None
    stopped_at: int | None  # NaN/Inf weights at this step: stopped there
    steps: int
    clipped_steps: int | None
    skipped_steps: int | None
    seconds: float
    raised_at: int | None = None  # NonFiniteGradientError at this step: the library stopped the run
    spike_skips: int | None = None
    rollbacks: int | None = None
    rollback_at: list[list[int]] | None = None  # [global step, step of the snapshot restored], per rollback
    loss_curve: list[float] | None = None  # the train loss of every CURVE_EVERY-th step (0, 10, 20, ...)

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.score)

    @property
    def val_mse(self) -> float:  # the MLP's name for the score
        return self.score


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


def train_once(
    config: Config, lr: float, seed: int, steps: int, model: str = "mlp", momentum: float | None = None
) -> Run:
    """Train ``config`` at ``lr`` for ``steps`` optimizer steps from the weights and batches of ``seed``."""
    pl = _namespace(config.namespace)
    train, val = loaders(model, seed, steps)
    pl.seed_everything(seed, verbose=False)
    module = module_class(config.namespace, model)(
        lr=lr, momentum=MODELS[model].momentum if momentum is None else momentum
    )
    recorder = _recorder(config.namespace)
    callbacks = config.make_callbacks()
    raised_at = None
    # A rollback writes its skipped data windows beside the logs (default_root_dir here): a throwaway folder.
    with tempfile.TemporaryDirectory(prefix="stability_") as root:
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=[*callbacks, recorder],
            default_root_dir=root,
            **dict(config.trainer_kwargs),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        start = time.perf_counter()
        try:
            trainer.fit(module, train)
        except NonFiniteGradientError:
            raised_at = len(recorder.losses)  # the step that raised never reached on_train_batch_end
        seconds = time.perf_counter() - start
    last = recorder.losses[-LAST_STEPS:]
    counters = callbacks[0].counters if callbacks and isinstance(callbacks[0], GradientClipping) else None
    unscored = recorder.stopped_at is not None or raised_at is not None
    return Run(
        config=config.key,
        lr=lr,
        seed=seed,
        score=math.nan if unscored else score(model, module, val),
        final_train_loss=statistics.fmean(last) if last else math.nan,
        first_nonfinite_step=recorder.first_nonfinite_step,
        stopped_at=recorder.stopped_at,
        steps=len(recorder.losses),
        clipped_steps=None if counters is None else counters["clipped_steps"],
        skipped_steps=None if counters is None else counters["skipped_steps"],
        seconds=seconds,
        raised_at=raised_at,
        spike_skips=None if counters is None else counters.get("spike_skips"),
        rollbacks=None if counters is None else counters.get("rollbacks"),
        rollback_at=None if counters is None else _rollback_steps(callbacks[0]),
        loss_curve=[float(f"{x:.4g}") for x in recorder.losses[::CURVE_EVERY]],
    )


def _rollback_steps(callback: GradientClipping) -> list[list[int]] | None:
    windows = callback.engine.skipped_windows()
    return [[w["global_step"], w["snapshot_step"]] for w in windows] if windows else None


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass
class Result:
    lrs: list[float]
    seeds: list[int]
    steps: int
    initial: dict[int, float]  # the untrained model's score, per seed
    threshold: float
    configs: list[Config]
    runs: list[Run] = field(default_factory=list)
    seconds: float = 0.0
    model: str = "mlp"
    momentum: float = MOMENTUM
    threads: int = 1  # torch threads the runs were timed with

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def initial_val_mse(self) -> dict[int, float]:
        return self.initial

    def runs_of(self, key: str, lr: float) -> list[Run]:
        return [r for r in self.runs if r.config == key and r.lr == lr]

    def is_stable(self, run: Run) -> bool:
        return math.isfinite(run.score) and run.score < self.threshold

    def stable_count(self, key: str, lr: float | None = None) -> tuple[int, int]:
        mine = [r for r in self.runs if r.config == key and (lr is None or r.lr == lr)]
        return sum(self.is_stable(r) for r in mine), len(mine)

    def best(self, key: str) -> tuple[float, float] | None:
        """``(lr, median score)`` of the LR with the lowest median; None when every LR diverged."""
        finite = [(m, lr) for lr in self.lrs if math.isfinite(m := self.median_score(key, lr))]
        return None if not finite else (min(finite)[1], min(finite)[0])

    def median_score(self, key: str, lr: float) -> float:
        """Median over seeds, a diverged run counting as +inf (NaN when at least half diverged)."""
        values = sorted(r.score if math.isfinite(r.score) else math.inf for r in self.runs_of(key, lr))
        if not values:
            return math.nan
        m = statistics.median(values)
        return m if math.isfinite(m) else math.nan

    median_mse = median_score


def sweep(
    configs: Sequence[Config],
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    progress: Callable[[str], None] = print,
    model: str = "mlp",
    momentum: float | None = None,
    jobs: int = 1,
) -> Result:
    momentum = MODELS[model].momentum if momentum is None else momentum
    initial = {seed: initial_score(seed, model) for seed in seeds}
    result = Result(
        list(lrs),
        list(seeds),
        steps,
        initial,
        threshold_of(model, initial),
        list(configs),
        model=model,
        momentum=momentum,
        threads=torch.get_num_threads(),
    )
    total = len(configs) * len(lrs) * len(seeds)
    start = time.perf_counter()
    name = result.spec.score_name
    tasks = [(config.key, lr, seed) for seed in seeds for lr in lrs for config in configs]
    for run in _runs(tasks, steps, model, momentum, jobs):
        result.runs.append(run)
        config = next(c for c in configs if c.key == run.config)
        seed, lr = run.seed, run.lr
        if run.raised_at is not None:
            outcome = f"stopped (NonFiniteGradientError at step {run.raised_at})"
        elif run.diverged and run.stopped_at is not None:
            outcome = f"diverged (NaN/Inf weights at step {run.stopped_at})"
        elif run.diverged:
            outcome = f"diverged (weights finite, {name} overflows)"
        else:
            outcome = f"{name} {_num(run.score)}" + (
                "" if result.is_stable(run) else (" (not stable)" if model == "mlp" else " (did not train)")
            )
        if run.rollbacks:
            at = ", ".join(f"{step} (to {snap})" for step, snap in run.rollback_at or [])
            outcome += f", {run.rollbacks} rollback(s)" + (f" at step {at}" if at else "")
        progress(
            f"[{len(result.runs):3d}/{total}] seed {seed} lr {lr:<6g} {config.label:24s} {outcome}"
            f"  {run.seconds:.1f} s, {time.perf_counter() - start:.0f} s elapsed"
        )
    result.seconds = time.perf_counter() - start
    return result


Task = tuple[str, float, int]  # (configuration key, LR, seed): what a worker process is sent (configs hold lambdas)


def _warm_up(keys: Sequence[str], lr: float, seed: int, steps: int, model: str, momentum: float) -> None:
    """Untimed: the first fit of each kind pays one-time costs (imports, first calls)."""
    with quiet_lightning():
        for key in keys:
            train_once(CONFIG_BY_KEY[key], lr, seed, min(steps, 3), model, momentum)


def _task(task: Task, steps: int, model: str, momentum: float) -> Run:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    key, lr, seed = task
    with quiet_lightning():
        return train_once(CONFIG_BY_KEY[key], lr, seed, steps, model, momentum)


def _runs(tasks: list[Task], steps: int, model: str, momentum: float, jobs: int) -> Iterator[Run]:
    """The runs of ``tasks`` in order, trained in ``jobs`` processes (each single-threaded) when ``jobs > 1``."""
    configs = list(dict.fromkeys(t[0] for t in tasks))
    if jobs <= 1:
        _warm_up(configs, tasks[0][1], tasks[0][2], steps, model, momentum)
        for task in tasks:
            yield _task(task, steps, model, momentum)
        return
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch threads
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        list(pool.map(_warm_up, *zip(*[(configs, tasks[0][1], tasks[0][2], steps, model, momentum)] * jobs)))
        yield from pool.map(functools.partial(_task, steps=steps, model=model, momentum=momentum), tasks)


# ---------------------------------------------------------------------------------------------- output
def _num(value: float) -> str:
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.3g}" if value < 1e4 else f"{value:.1e}"


def _cell(result: Result, key: str, lr: float) -> str:
    runs = result.runs_of(key, lr)
    m = result.median_score(key, lr)
    text = _num(m)
    if math.isfinite(m) and m >= result.threshold:
        text += "!"
    if result.model != "mlp":  # the count per LR: "2.61 (4/4)"
        ok, n = result.stable_count(key, lr)
        return f"{text} ({ok}/{n})"
    bad = sum(r.diverged for r in runs)
    if 0 < bad < len(runs) and math.isfinite(m):
        text += f" ({bad}/{len(runs)} div)"
    return text


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_table(result: Result) -> str:
    """Final score per configuration (rows) and LR (columns), and the count of stable (trained) runs."""
    spec = result.spec
    header = ["configuration", *(f"lr={lr:g}" for lr in result.lrs), spec.good, "best (lr)"]
    rows = [header]
    for c in result.configs:
        ok, n = result.stable_count(c.key)
        best = result.best(c.key)
        best_text = "-" if best is None else f"{_num(best[1])} ({best[0]:g})"
        rows.append([c.label, *(_cell(result, c.key, lr) for lr in result.lrs), f"{ok}/{n}", best_text])
    seeds = ", ".join(str(s) for s in result.seeds)
    initial = ", ".join(f"{v:.3g}" for v in result.initial.values())
    if result.model == "mlp":
        notes = [
            "",
            f"Final val MSE (torchmetrics, 512 held-out samples) after {result.steps} SGD steps (momentum "
            f"{result.momentum:g}), median over seed(s) {seeds}.",
            "'diverged': NaN/Inf weights (the run is stopped there), a val MSE that overflows float32, or a run the "
            "library stopped (NonFiniteGradientError);",
            f"'!': finite but not below the stability threshold {result.threshold:.3g} "
            f"(= {STABLE_FRACTION:g} x the untrained model's val MSE {initial}).",
            "'stable': runs (LR x seed) that end finite and below the threshold; 'best': the lowest median val MSE "
            "over the LRs, and its LR.",
        ]
    elif result.model == "lm":
        notes = [
            "",
            f"Final val cross-entropy (nats/char, {LM_VAL_WINDOWS} held-out windows of {LM_CONTEXT} characters) after "
            f"{result.steps} AdamW steps (warm-up {LM_WARMUP:.0%}, cosine to 10 %), median over seed(s) {seeds}; "
            "(k/n): seeds that trained at that LR.",
            "'diverged': NaN/Inf weights (stopped there), or a run the library stopped (NonFiniteGradientError); "
            "counted as +inf in the median.",
            f"'!': finite but not below {result.threshold:.3f} nats = the best model without context (character "
            f"frequencies, {unigram_cross_entropy():.3f}) minus {LM_MARGIN:g}; untrained model {initial}.",
            "'trains': runs (LR x seed) that end finite and below that; 'best': the lowest median over the LRs.",
        ]
    else:
        ref = text_entropies()
        notes = [
            "",
            f"Final val cross-entropy (nats/token, {VAL_TOKENS} held-out tokens) after {result.steps} SGD steps "
            f"(momentum {result.momentum:g}), median over seed(s) {seeds}; (k/n): seeds that trained at that LR.",
            "'diverged': NaN/Inf weights (stopped there), or a run the library stopped (NonFiniteGradientError); "
            "counted as +inf in the median.",
            f"'!': finite but not below {result.threshold:g} nats. References: uniform {ref['uniform']:.3f}, no "
            f"context {ref['unigram']:.3f}, one token of context {ref['one_token_context']:.3f}, two (the "
            f"entropy rate) {ref['entropy_rate']:.3f}; untrained model {initial}.",
            "'trains': runs (LR x seed) that end finite and below the threshold; 'best': the lowest median over the "
            "LRs, and its LR.",
        ]
    return "\n".join(_grid(rows) + notes)


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
    return "\n".join(
        ["Steps clipped (GradientClipping's clipped_steps / steps run; skipped steps apart):", *_grid(rows)]
    )


def _remedy_cell(runs: list[Run]) -> str:
    """Per seed: rollbacks (or skipped steps when the remedy does not roll back); 'x' marks a run that raised."""
    parts = []
    for r in sorted(runs, key=lambda r: r.seed):
        count = r.rollbacks if r.rollbacks is not None else r.skipped_steps
        parts.append(f"{count if count is not None else '-'}{'x' if r.raised_at is not None else ''}")
    return " ".join(parts)


def format_remedies(result: Result) -> str:
    """Per remedy configuration and LR: each seed's rollbacks (or skipped steps), and the runs the library stopped."""
    header = ["configuration", *(f"lr={lr:g}" for lr in result.lrs)]
    rows = [header]
    for c in result.configs:
        runs = [r for r in result.runs if r.config == c.key]
        acts = any(r.rollbacks or r.skipped_steps or r.raised_at is not None for r in runs)
        if runs and acts:
            rows.append([c.label, *(_remedy_cell(result.runs_of(c.key, lr)) for lr in result.lrs)])
    if len(rows) == 1:
        return "Remedies: no rollback, skip or stop in any run."
    seeds = ", ".join(str(s) for s in result.seeds)
    title = (
        f"Remedies, per seed ({seeds}): rollbacks under nan_policy='rollback', skipped steps otherwise; "
        "'x': stopped by NonFiniteGradientError:"
    )
    return "\n".join([title, *_grid(rows)])


def format_cost(result: Result) -> str:
    """Wall time per step (median over the runs, fit start-up included) and its ratio to plain training's."""
    per_step = {}
    for c in result.configs:
        runs = [r for r in result.runs if r.config == c.key and r.steps > 0]
        if runs:
            per_step[c.key] = statistics.median(1000 * r.seconds / r.steps for r in runs)
    plain = per_step.get("plain")
    header = ["configuration", "ms/step", *(["vs plain"] if plain else []), "rollbacks", "runs stopped"]
    rows = [header]
    for c in result.configs:
        if c.key not in per_step:
            continue
        runs = [r for r in result.runs if r.config == c.key]
        rollbacks = sum(r.rollbacks or 0 for r in runs)
        stopped = sum(r.raised_at is not None for r in runs)
        row = [c.label, f"{per_step[c.key]:.2f}"]
        if plain:
            row.append(f"{per_step[c.key] / plain:.2f}")
        rows.append([*row, str(rollbacks) if any(r.rollbacks is not None for r in runs) else "-", str(stopped)])
    title = (
        f"Cost: wall time per step (median over runs, trainer.fit start-up included; {result.threads} "
        "thread(s) when trained), rollbacks and stopped runs in all:"
    )
    return "\n".join([title, *_grid(rows)])


def reference_score(result: Result) -> float:
    """What a model that learns nothing useful scores: the best model without context (rnn, lm), the untrained
    model (mlp). A diverged run counts as this in the LR sensitivity."""
    if result.model == "lm":
        return unigram_cross_entropy()
    if result.model == "rnn":
        return text_entropies()["unigram"]
    return min(result.initial.values())


def lr_sensitivity(result: Result, key: str) -> float:
    """Wortsman et al. 2023: the mean over the LRs of min(score, reference) minus the best score over the LRs
    (median over seeds at each LR; a diverged LR counts as the reference). 0: as good at every LR as at its best."""
    ref = reference_score(result)
    scores = [result.median_score(key, lr) for lr in result.lrs]
    capped = [min(s, ref) if math.isfinite(s) else ref for s in scores]
    return statistics.fmean(capped) - min(capped)


def healthy_lrs(result: Result) -> list[float]:
    """The healthy cells, where a remedy has nothing to do: the LRs at or below the one where plain training does
    best, at which it trains at every seed. (Above it, a cell where plain training still trains can be degraded
    by a too-high LR: a remedy that acts there is judged by the score, not counted as a false alarm.)"""
    best = result.best("plain")
    if best is None:
        return []
    return [lr for lr in result.lrs if lr <= best[0] and (n := result.stable_count("plain", lr))[1] and n[0] == n[1]]


def format_sensitivity(result: Result) -> str:
    """Per configuration: the LR sensitivity, and the rollbacks on the healthy cells (false positives)."""
    healthy = healthy_lrs(result) if any(c.key == "plain" for c in result.configs) else []
    lrs = ", ".join(f"{lr:g}" for lr in healthy)
    header = ["configuration", "LR sensitivity", f"rollbacks at the healthy LRs ({lrs})"]
    rows = [header]
    for c in result.configs:
        runs = [r for r in result.runs if r.config == c.key and r.lr in healthy]
        rolled = "-" if all(r.rollbacks is None for r in runs) else str(sum(r.rollbacks or 0 for r in runs))
        rows.append([c.label, f"{lr_sensitivity(result, c.key):.3f}", rolled])
    title = (
        f"LR sensitivity (Wortsman et al. 2023: mean over LRs of min(score, {reference_score(result):.3f}) minus the "
        "best; lower is better) and rollbacks at the healthy LRs (at or below plain training's best LR, where it "
        "trains at every seed): false alarms:"
    )
    return "\n".join([title, *_grid(rows)])


def report(result: Result) -> str:
    parts = [format_table(result), format_clipped(result), format_remedies(result), format_cost(result)]
    parts.insert(1, format_sensitivity(result))
    return "\n\n".join(parts)


def to_json(result: Result) -> dict[str, Any]:
    spec = result.spec
    out: dict[str, Any] = {
        "benchmark": spec.summary,
        "model": result.model,
        "score": spec.score_name,
        "steps": result.steps,
        "lrs": result.lrs,
        "seeds": result.seeds,
        "momentum": result.momentum,
        "initial_score": {str(k): v for k, v in result.initial.items()},
        "stable_threshold": result.threshold,
        "stable_definition": (
            f"final val MSE finite and < {STABLE_FRACTION:g} x the untrained model's val MSE"
            if result.model == "mlp"
            else f"final val cross-entropy finite and < {TRAINED_CE:g} nats/token"
        ),
        "seconds": result.seconds,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": result.threads,
            "machine": platform.machine(),
        },
    }
    if result.model == "rnn":
        out["text_entropies"] = text_entropies()
        out["snapshot_every"] = SNAPSHOT_EVERY
    if result.model == "lm":
        out["unigram_cross_entropy"] = unigram_cross_entropy()
    out["lr_sensitivity"] = {c.key: lr_sensitivity(result, c.key) for c in result.configs}
    out["healthy_lrs"] = healthy_lrs(result) if any(c.key == "plain" for c in result.configs) else []
    out["configs"] = [
        {
            "key": c.key,
            "label": c.label,
            "detail": c.detail,
            "namespace": c.namespace,
            "stable": result.stable_count(c.key)[0],
            "runs": result.stable_count(c.key)[1],
            "median_score": {f"{lr:g}": _json_float(result.median_score(c.key, lr)) for lr in result.lrs},
        }
        for c in result.configs
    ]
    out["runs"] = [
        {k: _json_float(v) for k, v in asdict(r).items()} | {"stable": result.is_stable(r)} for r in result.runs
    ]
    return out


def from_json(data: dict[str, Any]) -> Result:
    """The :class:`Result` a ``--json`` file holds (to reprint the table or redraw the plot without training)."""
    known = {c.key: c for c in CONFIGS}
    configs = [known[c["key"]] for c in data["configs"]]
    fields = {f.name for f in dataclasses.fields(Run)}
    floats = ("score", "final_train_loss")  # null in JSON: NaN
    runs = []
    for r in data["runs"]:
        r = {("score" if k == "val_mse" else k): v for k, v in r.items()}  # files written before the RNN model
        runs.append(Run(**{k: math.nan if v is None and k in floats else v for k, v in r.items() if k in fields}))
    initial = {int(k): v for k, v in data.get("initial_score", data.get("initial_val_mse", {})).items()}
    model = data.get("model", "mlp")
    result = Result(
        data["lrs"],
        data["seeds"],
        data["steps"],
        initial,
        data["stable_threshold"],
        configs,
        runs,
        model=model,
        momentum=data.get("momentum", MODELS[model].momentum),
        threads=data.get("environment", {}).get("threads", 1),
    )
    result.seconds = data.get("seconds", 0.0)
    return result


def _json_float(value: Any) -> Any:
    # JSON has no NaN: a diverged run's score (or a NaN loss of its curve) is null.
    if isinstance(value, list):
        return [_json_float(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# The MLP plot's cap, kept under its old name.
PLOT_CAP = MODELS["mlp"].plot_cap


def plot(result: Result, path: str) -> None:
    """Final score vs LR, one line per configuration; blown-up and diverged runs on lines at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = result.spec
    keys = [c.key for c in result.configs]
    panels = [(title, [k for k in members if k in keys]) for title, members in spec.panels]
    unplaced = [k for k in keys if not any(k in members for _, members in panels)]
    panels[0][1].extend(unplaced)
    panels = [(title, members) for title, members in panels if members]
    labels = {c.key: c.label for c in result.configs}
    palette = [f"C{i}" for i in range(10)] + ["black", "teal", "darkgoldenrod", "crimson", "navy"]
    colors = {k: palette[i % len(palette)] for i, k in enumerate(keys)}
    markers = dict(zip(keys, "osD^v<>phX*Pd8H"))
    cap = spec.plot_cap
    if spec.log_y:
        blown, diverged, top = cap * 3, cap * 12, cap * 12 * 2.5
    else:
        blown, diverged, top = cap + 0.6, cap + 1.4, cap + 2.0
    dashed = ("zscore_skip", "defaults", "rollback", "rollback_noclip", "rollback_0.25", "skip_noclip")

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.2), sharey=True, squeeze=False)
    for ax, (title, members) in zip(axes[0], panels):
        for k in members:
            ys = [result.median_score(k, lr) for lr in result.lrs]
            drawn = [diverged if not math.isfinite(y) else blown if y > cap else y for y in ys]
            ok, n = result.stable_count(k)
            ax.plot(
                result.lrs,
                drawn,
                color=colors[k],
                marker=markers.get(k, "o"),
                markersize=5,
                linewidth=1.5,
                linestyle="--" if k in dashed else "-",
                label=f"{labels[k]} ({ok}/{n} {spec.good})",
            )
            bad = [lr for lr, y in zip(result.lrs, ys) if not math.isfinite(y)]
            ax.scatter(bad, [diverged] * len(bad), marker="x", s=80, color=colors[k], zorder=3)
        for y, text in (
            (diverged, "diverged or stopped" if result.model != "mlp" else "diverged (NaN/Inf weights)"),
            (blown, f"blown up (finite, > {cap:g})"),
        ):
            ax.axhline(y, color="grey", linewidth=0.8)
            ax.text(result.lrs[0], y * 1.12 if spec.log_y else y + 0.05, text, fontsize=8, color="dimgrey", va="bottom")
        ax.axhline(result.threshold, color="black", linestyle=":", linewidth=1)
        above = result.threshold * 1.1 if spec.log_y else result.threshold + 0.03
        ax.text(result.lrs[-1], above, f"{spec.good} below", fontsize=8, ha="right", va="bottom")
        if result.model in ("rnn", "lm"):
            ref = reference_score(result)
            ax.axhline(ref, color="grey", linestyle="-.", linewidth=0.8)
            ax.text(result.lrs[-1], ref + 0.03, "no context (unigram)", fontsize=8, ha="right", va="bottom")
        ax.set_xscale("log")
        ax.set_xticks(result.lrs, [f"{lr:g}" for lr in result.lrs])
        ax.minorticks_off()
        if spec.log_y:
            ax.set_yscale("log")
        ax.set_ylim(spec.plot_bottom, top)
        ax.set_title(title, fontsize=10)
        optimizer = "AdamW, warm-up + cosine" if result.model == "lm" else f"SGD, momentum {result.momentum:g}"
        ax.set_xlabel(f"learning rate ({optimizer})")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="center left")
    axes[0][0].set_ylabel(f"final {spec.score_name} after {result.steps} steps (median of {len(result.seeds)} seeds)")
    fig.suptitle(spec.plot_title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def _momentum(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"expected a momentum in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="mlp", help="the model swept (mlp)")
    ap.add_argument("--steps", type=int, help=f"optimizer steps per run (mlp {DEFAULT_STEPS}, rnn {RNN_STEPS})")
    ap.add_argument("--lrs", type=_positive, nargs="+", help="learning rates (the model's grid)")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (weights and batches; the model's)")
    ap.add_argument("--configs", nargs="+", choices=CONFIG_KEYS, help="configurations (the model's rows)")
    ap.add_argument("--momentum", type=_momentum, help="SGD momentum (0.9 for both models)")
    ap.add_argument("--jobs", type=int, default=1, help="train in this many processes, one thread each (1)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--plot", metavar="FILE.png", help="also plot the final score vs LR")
    ap.add_argument("--from-json", metavar="FILE", help="train nothing: print the tables (and --plot) of a --json file")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = MODELS[args.model]
    steps = spec.steps if args.steps is None else args.steps
    if steps < 1:
        build_parser().error("--steps must be >= 1")
    if args.from_json:
        with open(args.from_json) as f:
            result = from_json(json.load(f))
        print(report(result))
        if args.plot:
            plot(result, args.plot)
            print(f"Plot written to {args.plot}")
        return 0
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny models: more threads only add synchronization
    keys = args.configs or spec.configs
    configs = [c for c in CONFIGS if c.key in keys]
    lrs = list(spec.lrs) if args.lrs is None else args.lrs
    seeds = list(spec.seeds) if args.seeds is None else args.seeds
    momentum = spec.momentum if args.momentum is None else args.momentum
    print(
        f"Stability sweep ({args.model}): {len(configs)} configurations x {len(lrs)} LRs x {len(seeds)} seed(s), "
        f"{steps} steps each, SGD momentum {momentum:g}, torch {torch.__version__}, {torch.get_num_threads()} "
        "thread(s)",
        flush=True,
    )
    for c in configs:
        print(f"  {c.label:24s} {c.detail}")
    result = sweep(
        configs,
        lrs,
        seeds,
        steps,
        progress=lambda line: print(line, flush=True),
        model=args.model,
        momentum=momentum,
        jobs=args.jobs,
    )
    print()
    print(report(result))
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
