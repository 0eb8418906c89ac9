"""``GradientClippingCLI`` reports a bad ``GradientClipping`` setting in one ``error:`` line, in both namespaces.

Real ``python cli_script.py NAMESPACE ours fit --config cfg.yaml`` subprocesses (tests/cli_script.py): a
plain ``LightningCLI`` prints ~75 lines of usage for these configs; ours prints one line naming the key and
what is allowed, and exits 2. Every run of this module is started at once and awaited once (2-core CI).
Command-line settings (``--trainer.callbacks+=``, ``--trainer.callbacks.KEY=``) are checked in process.
"""

from __future__ import annotations

import sys
from argparse import ArgumentError
from collections.abc import Iterator

import pytest
import pytorch_lightning
from cli_script import Run, finish, launch, lightning_classes

from lightning_clip import GradientClippingCLI
from lightning_clip.remedies import HalveLR, Rollback

# The callback entry whose init_args each case breaks; "{before}" lets a case put another callback first.
CONFIG = """\
trainer:
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:{before}
    - class_path: lightning_clip.GradientClipping
      init_args:
        {init_args}
model:
  nan_at_step: 2
"""
GOOD = "{mode: norm, max_norm: 1.0, nan_policy: halve_lr}"
ROLLBACK, HALVE_LR = "lightning_clip.remedies.Rollback", "lightning_clip.remedies.HalveLR"
# A remedy object in YAML: roll back to the snapshot after step 2 at the NaN step, skip one more step.
GOOD_REMEDY = f"{{nan_policy: {{class_path: {ROLLBACK}, init_args: {{snapshot_every: 1, rollback_skip_steps: 1}}}}}}"
# The flat arguments, with the divergence watch turned off by YAML's null.
GOOD_FLAT_ROLLBACK = "{nan_policy: rollback, snapshot_every: 1, rollback_skip_steps: 1, divergence_margin: null}"
MODES = ("'norm'", "'value'", "'none'")


def own_check(cls: type, **init_args: object) -> str:
    """What ``cls``'s own constructor check says of ``init_args``, worded as the CLI words it (`name` -> "name")."""
    with pytest.raises(ValueError) as refused:
        cls(**init_args)
    return str(refused.value).replace("`", '"')


POLICIES = ("'skip'", "'halve_lr'", "'raise'", "'ignore'")

# name: (init_args, the argument the error line must name, texts the line must contain)
BAD = {
    "mode": ("{mode: l2}", "mode", ["'l2'", *MODES]),
    "nan_policy": ("{nan_policy: halve}", "nan_policy", ["'halve'", *POLICIES]),
    "max_norm_not_a_number": ("{max_norm: abc}", "max_norm", ["a number", "'abc'"]),
    "misspelled_key": ("{max_nrom: 1.0}", "max_nrom", ['unknown argument "max_nrom"', 'did you mean "max_norm"?']),
    # A class-typed argument: the key path goes through the rule's own init_args.
    "rule_misspelled_key": (
        "{rule: {class_path: lightning_clip.rules.NormClip, init_args: {max_nrom: 3}}}",
        "rule.init_args.max_nrom",
        ['unknown argument "max_nrom" of NormClip', 'did you mean "max_norm"?'],
    ),
    "rule_out_of_range": (
        "{rule: {class_path: lightning_clip.rules.NormClip, init_args: {max_norm: -3}}}",
        "rule.init_args.max_norm",
        ['"max_norm" must be a finite positive number', "-3.0"],
    ),
    # A remedy object (nan_policy: str | Remedy): its own check's words, not the str subtype's "Expected a <class
    # 'str'>". Values as jsonargparse passes them (a float argument gets 0.0).
    "remedy_out_of_range": (
        f"{{nan_policy: {{class_path: {ROLLBACK}, init_args: {{snapshot_every: 0}}}}}}",
        "nan_policy.init_args.snapshot_every",
        [own_check(Rollback, snapshot_every=0)],
    ),
    "remedy_lr_factor_zero": (
        f"{{nan_policy: {{class_path: {ROLLBACK}, init_args: {{rollback_lr_factor: 0}}}}}}",
        "nan_policy.init_args.rollback_lr_factor",
        [own_check(Rollback, rollback_lr_factor=0.0)],
    ),
    "halve_lr_factor_above_one": (
        f"{{nan_policy: {{class_path: {HALVE_LR}, init_args: {{lr_factor: 2}}}}}}",
        "nan_policy.init_args.lr_factor",
        [own_check(HalveLR, lr_factor=2.0)],
    ),
    "divergence_margin_zero": (
        "{nan_policy: rollback, divergence_margin: 0}",
        "divergence_margin",
        [own_check(Rollback, divergence_margin=0.0)],
    ),
    # Two class-typed arguments: the one at fault is named, not the first one.
    "remedy_beside_valid_rule": (
        f"{{rule: {{class_path: lightning_clip.rules.NormClip}}, "
        f"nan_policy: {{class_path: {HALVE_LR}, init_args: {{lr_factor: 2}}}}}}",
        "nan_policy.init_args.lr_factor",
        [own_check(HalveLR, lr_factor=2.0)],
    ),
}
# Every case for pytorch_lightning; two for lightning.pytorch, where the GradientClipping entry comes
# second (after a LambdaCallback), so the index in the key path is checked too.
CASES = [("pytorch_lightning", name) for name in BAD] + [
    ("lightning", "mode"),
    ("lightning", "misspelled_key"),
    ("lightning", "remedy_out_of_range"),
]
NAMESPACES = ("pytorch_lightning", "lightning")


def _config(namespace: str, init_args: str) -> str:
    before = "\n    - class_path: lightning.pytorch.callbacks.LambdaCallback" if namespace == "lightning" else ""
    return CONFIG.format(before=before, init_args=init_args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Run]]:
    """Start every case, the valid config per namespace and one unrelated mistake at once; wait for all."""
    configs = {(ns, name): _config(ns, BAD[name][0]) for ns, name in CASES}
    configs.update({(ns, "valid"): _config(ns, GOOD) for ns in NAMESPACES})
    configs.update({(ns, "valid_remedy"): _config(ns, GOOD_REMEDY) for ns in NAMESPACES})
    configs["pytorch_lightning", "valid_flat_rollback"] = _config("pytorch_lightning", GOOD_FLAT_ROLLBACK)
    # A mistake outside the callback: jsonargparse's own report must come through unchanged.
    configs["pytorch_lightning", "unrelated"] = _config("pytorch_lightning", GOOD).replace(
        "nan_at_step: 2", "nan_at_step: 2\n  lr: abc"
    )
    started = {
        key: launch(tmp_path_factory.mktemp("_".join(key)), key[0], "ours", text) for key, text in configs.items()
    }
    try:
        yield {key: finish(proc) for key, proc in started.items()}
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("namespace,name", CASES)
def test_bad_setting_prints_one_error_line_naming_the_key(
    runs: dict[tuple[str, str], Run], namespace: str, name: str
) -> None:
    run = runs[namespace, name]
    _, arg, texts = BAD[name]
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    index = 0 if namespace == "pytorch_lightning" else 1
    assert lines[0].startswith(f"error: trainer.callbacks[{index}].init_args.{arg}: "), lines[0]
    for text in texts:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "Namespace(" not in lines[0] and "Expected a <class" not in lines[0], lines[0]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_valid_config_trains(runs: dict[tuple[str, str], Run], namespace: str) -> None:
    run = runs[namespace, "valid"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "error:" not in run.stderr
    # The YAML-configured callback ran every step and halved the LR on the NaN loss at step 2.
    (clip,) = run.clipping()
    assert clip["steps"] == 4 and clip["lr_scales"] == [0.5] and clip["counters"]["nonfinite_steps"] == 1


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_valid_remedy_object_trains(runs: dict[tuple[str, str], Run], namespace: str) -> None:
    run = runs[namespace, "valid_remedy"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "error:" not in run.stderr
    # The YAML-built Rollback ran: one rollback at the NaN step 2, step 3 skipped as its window, LR halved.
    (clip,) = run.clipping()
    assert clip["steps"] == 4 and clip["lr_scales"] == [0.5], clip
    assert clip["counters"]["rollbacks"] == 1 and clip["counters"]["requested_skips"] == 1, clip


def test_divergence_margin_null_in_yaml_turns_the_watch_off(runs: dict[tuple[str, str], Run]) -> None:
    run = runs["pytorch_lightning", "valid_flat_rollback"]
    assert run.returncode == 0, run.stderr[-3000:]
    (clip,) = run.clipping()
    assert clip["counters"]["rollbacks"] == 1 and clip["lr_scales"] == [0.5], clip
    assert clip["divergence_margin"] is None, clip  # None reached the remedy: not the default 0.05


def test_other_mistakes_keep_jsonargparse_report(runs: dict[tuple[str, str], Run]) -> None:
    run = runs["pytorch_lightning", "unrelated"]
    assert run.returncode == 2
    # jsonargparse's usual report (usage block, then its message), not swallowed nor blamed on the callback.
    assert run.stderr.startswith("usage: "), run.stderr[:3000]
    message = run.stderr.split("\nerror: ", 1)[1]
    assert message.startswith('Parser key "model.lr"') and "abc" in message
    assert "trainer.callbacks" not in message


GC, LAMBDA = "lightning_clip.GradientClipping", "pytorch_lightning.callbacks.LambdaCallback"
ADD_GC, ADD_LAMBDA = f"--trainer.callbacks+={GC}", f"--trainer.callbacks+={LAMBDA}"


@pytest.mark.parametrize(
    "args,line",
    [
        # --trainer.callbacks.KEY sets the last entry; += appends one
        (
            [ADD_LAMBDA, ADD_GC, "--trainer.callbacks.init_args.max_nrom=2"],
            'trainer.callbacks[1].init_args.max_nrom: unknown argument "max_nrom" of GradientClipping; '
            'did you mean "max_norm"?',
        ),
        (
            [ADD_GC, "--trainer.callbacks.max_norm=abc"],
            "trainer.callbacks[0].init_args.max_norm: \"max_norm\" must be a number, got 'abc'.",
        ),
        (
            [f"--trainer.callbacks=[{{class_path: {LAMBDA}}}, {{class_path: {GC}, init_args: {{eps: inf}}}}]"],
            "trainer.callbacks[1].init_args.eps: \"eps\" must be a number, got 'inf' (infinity is .inf in YAML).",
        ),
        (
            [ADD_LAMBDA, f"--trainer.callbacks+=[{{class_path: {GC}, init_args: {{lr_factor: 2}}}}]"],
            'trainer.callbacks[1].init_args.lr_factor: "lr_factor" must be in (0, 1), got 2.0.',
        ),
        (
            [
                f"--trainer.callbacks+=[{{class_path: {GC}, init_args: "
                f"{{nan_policy: {{class_path: {ROLLBACK}, init_args: {{snapshot_every: 0}}}}}}}}]"
            ],
            "trainer.callbacks[0].init_args.nan_policy.init_args.snapshot_every: "
            + own_check(Rollback, snapshot_every=0),
        ),
    ],
)
def test_command_line_setting_names_its_entry(monkeypatch: pytest.MonkeyPatch, args: list[str], line: str) -> None:
    # In process: with exit_on_error=False the one line is an ArgumentError's message instead of stderr + exit 2.
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(ArgumentError) as refused:
        GradientClippingCLI(
            *lightning_classes(pytorch_lightning),
            args=["--trainer.logger=false", *args],
            run=False,
            save_config_callback=None,
            parser_kwargs={"exit_on_error": False},
        )
    assert str(refused.value) == line
