"""``GradientClippingCLI`` reports a bad ``GradientClipping`` setting in one ``error:`` line, in both namespaces.

Real ``python cli_script.py NAMESPACE ours fit --config cfg.yaml`` subprocesses (tests/cli_script.py): a
plain ``LightningCLI`` prints ~75 lines of usage for these configs; ours prints one line naming the key and
what is allowed, and exits 2. Every run of this module is started at once and awaited once (2-core CI).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cli_script import Run, finish, launch

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
MODES = ("'norm'", "'value'", "'none'")
POLICIES = ("'skip'", "'halve_lr'", "'raise'", "'ignore'")

# name: (init_args, the argument the error line must name, texts the line must contain)
BAD = {
    "mode": ("{mode: l2}", "mode", ["'l2'", *MODES]),
    "nan_policy": ("{nan_policy: halve}", "nan_policy", ["'halve'", *POLICIES]),
    "max_norm_not_a_number": ("{max_norm: abc}", "max_norm", ["a number", "'abc'"]),
    "misspelled_key": ("{max_nrom: 1.0}", "max_nrom", ['unknown argument "max_nrom"', 'did you mean "max_norm"?']),
}
# All four cases for pytorch_lightning; two for lightning.pytorch, where the GradientClipping entry comes
# second (after a LambdaCallback), so the index in the key path is checked too.
CASES = [("pytorch_lightning", name) for name in BAD] + [("lightning", "mode"), ("lightning", "misspelled_key")]
NAMESPACES = ("pytorch_lightning", "lightning")


def _config(namespace: str, init_args: str) -> str:
    before = "\n    - class_path: lightning.pytorch.callbacks.LambdaCallback" if namespace == "lightning" else ""
    return CONFIG.format(before=before, init_args=init_args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Run]]:
    """Start every case, the valid config per namespace and one unrelated mistake at once; wait for all."""
    configs = {(ns, name): _config(ns, BAD[name][0]) for ns, name in CASES}
    configs.update({(ns, "valid"): _config(ns, GOOD) for ns in NAMESPACES})
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


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_valid_config_trains(runs: dict[tuple[str, str], Run], namespace: str) -> None:
    run = runs[namespace, "valid"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "error:" not in run.stderr
    # The YAML-configured callback ran every step and halved the LR on the NaN loss at step 2.
    (clip,) = run.clipping()
    assert clip["steps"] == 4 and clip["lr_scales"] == [0.5] and clip["counters"]["nonfinite_steps"] == 1


def test_other_mistakes_keep_jsonargparse_report(runs: dict[tuple[str, str], Run]) -> None:
    run = runs["pytorch_lightning", "unrelated"]
    assert run.returncode == 2
    # jsonargparse's usual report (usage block, then its message), not swallowed nor blamed on the callback.
    assert run.stderr.startswith("usage: "), run.stderr[:3000]
    message = run.stderr.split("\nerror: ", 1)[1]
    assert message.startswith('Parser key "model.lr"') and "abc" in message
    assert "trainer.callbacks" not in message
