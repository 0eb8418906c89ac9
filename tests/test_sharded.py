"""Sharded training for real: FSDP2, tensor parallelism, FSDP1, DDP and DeepSpeed, in processes over gloo (CPU).

The workers are in ``tests/sharded_scripts.py``; each rank writes a JSON file of what it saw and the tests below
assert on it. Two launches run side by side and are shared by the tests (starting processes is what costs):

* ``lightning_fsdp2`` (2 ranks): Lightning ``ModelParallelStrategy`` (FSDP2) fits A-D, DDP fits E-F, and an FSDP2
  rollback (G) beside a run that never saw its window (H), and a DDP divergence on one rank (I);
* ``plain`` (2 ranks): tensor parallelism, a Partial gradient, the value rule on shards, FSDP1, through
  ``ClipEngine`` in a plain loop.

Together they take about 30 s of wall time on 2 cores. ``plain2d`` (4 ranks: dp x tp, hybrid sharding) adds
about 25 s and runs only with
``LIGHTNING_CLIP_TEST_4_RANKS=1``. References are computed independently, in float64, from the gathered full
gradient (``DTensor.full_tensor()``, ``FSDP.summon_full_params``) or an unsharded copy of the model.
Library defects are ``xfail(strict=True)`` with the reason; ``docs/distributed.md`` lists them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

SCRIPT = Path(__file__).with_name("sharded_scripts.py")
REL = 1e-5
FOUR_RANKS = os.environ.get("LIGHTNING_CLIP_TEST_4_RANKS") == "1"

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def _env() -> dict[str, str]:
    # An outer launcher's variables would make Lightning think it was already launched.
    drop = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _start(command: str, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), command, str(out)],
        cwd=out,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(command: str, proc: subprocess.Popen, out: Path, ranks: int, timeout: float) -> list[dict[str, Any]]:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"`{command}` did not finish in {timeout} s (a rank hung?):\n{log[-3000:]}")
    assert proc.returncode == 0, log[-4000:]
    return [json.loads((out / f"{command}_rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Both 2-rank launches, started together (the machine waits on rendezvous and imports more than it computes)."""
    root = tmp_path_factory.mktemp("sharded")
    procs = {name: _start(name, root / name) for name in ("lightning_fsdp2", "plain")}
    return {name: _finish(name, proc, root / name, 2, timeout=300) for name, proc in procs.items()}


@pytest.fixture(scope="module")
def fits(runs) -> list[dict[str, Any]]:
    return runs["lightning_fsdp2"]


@pytest.fixture(scope="module")
def plain(runs) -> list[dict[str, Any]]:
    return runs["plain"]


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> list[dict[str, Any]]:
    if not FOUR_RANKS:
        pytest.skip("4 ranks on CPU: set LIGHTNING_CLIP_TEST_4_RANKS=1 (about 25 s on 2 cores)")
    out = tmp_path_factory.mktemp("sharded4")
    return _finish("plain2d", _start("plain2d", out), out, 4, timeout=600)


def _close(got: float, want: float, rel: float = REL) -> bool:
    return (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=rel)


# ============================================================================ Lightning: FSDP2 (A-D) and DDP (E-F)
FITS = {
    "A": "FSDP2, 32-true, AdamW foreach, halve_lr, NaN loss on rank 1 at step 2",
    "B": "FSDP2, resumed from A's distributed checkpoint, NaN loss on rank 0 at step 6",
    "C": "FSDP2, bf16-mixed, AdamW fused, skip, accumulate_grad_batches=2, NaN in rank 0's 2nd micro-batch of step 2",
    "D": "FSDP2, manual optimization, SGD momentum foreach, nan_policy=ignore, logging every 3rd step",
    "E": "DDP, bf16-mixed, AdamW fused, skip, accumulate_grad_batches=2, NaN in rank 1's 1st micro-batch of step 2",
    "F": "DDP, 16-mixed (GradScaler), manual optimization, SGD momentum foreach, halve_lr, NaN on rank 0 at step 1",
}
BAD_STEP = {"A": 2, "B": 6, "C": 2, "E": 2, "F": 1}


@pytest.mark.parametrize("fit", list(FITS))
def test_logged_total_and_layer_norms_equal_the_gathered_full_gradient(fits, fit):
    for rank in fits:
        run = rank[fit]
        assert run["world_size"] == 2
        compared = 0
        for before, after in zip(run["before"], run["after"]):
            logged = after["logged"]
            if logged is None:
                continue
            compared += 1
            assert _close(logged["grad_norm/total"], before["total"]), (fit, before["step"])
            layers = {k.split("/", 1)[1]: v for k, v in logged.items() if k.startswith("grad_norm_layer/")}
            assert layers.keys() == before["layers"].keys() == {"net.0", "net.2"}
            for name, value in before["layers"].items():
                assert _close(layers[name], value), (fit, before["step"], name)
        assert compared == (2 if fit == "D" else len(run["before"]))


@pytest.mark.parametrize("fit", list(FITS))
def test_clipping_brings_the_gathered_full_gradient_to_max_norm(fits, fit):
    for rank in fits:
        run = rank[fit]
        clipped = 0
        for before, after in zip(run["before"], run["after"]):
            if before["step"] == BAD_STEP.get(fit):
                continue
            assert before["total"] > 0.5  # the loss is scaled so that every healthy step clips
            assert after["total"] == pytest.approx(0.5, rel=REL), (fit, before["step"])
            clipped += 1
        assert clipped == len(run["before"]) - (fit in BAD_STEP)
        earlier = rank["A"]["counters"]["clipped_steps"] if fit == "B" else 0  # B resumed A's counters
        assert run["counters"]["clipped_steps"] == earlier + clipped


@pytest.mark.parametrize("fit", [f for f in FITS if f in BAD_STEP])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(fits, fit):
    r0, r1 = (rank[fit] for rank in fits)
    assert r0["counters"] == r1["counters"]
    assert r0["counters"]["nonfinite_steps"] == r0["counters"]["skipped_steps"] == (2 if fit == "B" else 1)
    assert r0["counters"]["amp_overflows"] == 0  # under 16-mixed too: a NaN loss is divergence, not an overflow
    bad = BAD_STEP[fit]
    for run in (r0, r1):
        rows = {row["step"]: row for row in run["before"]}
        assert math.isnan(rows[bad]["total"])  # the NaN of one rank reached the reduced norm of both
        # weights and optimizer state going into the bad step == going into the next one: nothing applied
        assert rows[bad + 1]["weights"] == rows[bad]["weights"]
        assert rows[bad + 1]["state"] == rows[bad]["state"]
        assert rows[bad]["weights"] != rows[bad - 1]["weights"]  # the steps around it did move
        assert run["final_weights"] != rows[bad + 1]["weights"]
        assert all(math.isfinite(w) for w in run["final_weights"])
        assert run["final_state_finite"]
    assert r0["final_weights"] == r1["final_weights"]


def test_resume_from_a_distributed_checkpoint_keeps_the_counters_and_the_lr_scale(fits):
    r0, r1 = fits
    files = r0["ckpt_files"]
    assert "meta.pt" in files and any(f.endswith(".distcp") for f in files)  # a sharded checkpoint directory
    for rank in (r0, r1):
        a, b = rank["A"], rank["B"]
        assert a["lr_scales"] == [0.5]
        assert b["at_train_start"] == {"counters": a["counters"], "lr_scales": [0.5]}  # restored before step 5
        assert b["start_weights"] == a["final_weights"]  # the sharded weights came back too
        assert b["before"][0]["step"] == 5 and b["global_step"] == 8
        # counting continues across the resume: one more bad step, the LR scale halves again
        assert b["counters"]["steps"] == 8 and b["counters"]["nonfinite_steps"] == 2
        assert b["lr_scales"] == [0.25]
    assert r0["B"]["counters"] == r1["B"]["counters"]


def test_fsdp2_rollback_with_a_nan_on_one_rank_matches_a_run_that_never_saw_the_window(fits):
    # fit G: FSDP2, AdamW, nan_policy="rollback" (snapshot_every=2, rollback_skip_steps=1, LR kept), NaN loss on
    # rank 1 at step 3; fit H: the same model on the batches G kept, no fault.
    r0, r1 = (rank["G"] for rank in fits)
    assert r0["windows"] == r1["windows"] and len(r0["windows"]) == 1  # both ranks rolled back, at the same step
    (window,) = r0["windows"]
    assert window["global_step"] == 3 and window["skipped"] == [3, 4]
    assert window["snapshot_step"] < 3 and r0["counters"]["rollbacks"] == r1["counters"]["rollbacks"] == 1
    for rank in fits:
        g, h = rank["G"], rank["H"]
        assert h["kept"] == [*range(window["snapshot_step"]), 5] and h["counters"]["rollbacks"] == 0
        assert g["final_weights"] == h["final_weights"]  # the whole weights, gathered from the shards: bit for bit
        assert g["final_state"] == h["final_state"]  # this rank's shard of the AdamW state
        assert g["final_weights"] != g["start_weights"]


def test_ddp_a_divergence_on_one_rank_rolls_back_every_rank_at_the_same_step(fits):
    # fit I: DDP, SGD momentum, nan_policy="rollback"; at steps 6-16 rank 1's loss grows x3 a step (finite), rank
    # 0's stays healthy. The divergence watch reads the loss averaged over the ranks.
    r0, r1 = (rank["I"] for rank in fits)
    assert r0["counters"]["nonfinite_steps"] == 0 and r0["counters"]["rollbacks"] >= 1
    assert r0["windows"] == r1["windows"] and r0["counters"] == r1["counters"]
    assert all(w["global_step"] > 6 for w in r0["windows"])  # not before the drift
    assert r0["lr_scales"] == r1["lr_scales"] and r0["final_weights"] == r1["final_weights"]


def test_fsdp2_hook_makes_no_host_read_on_non_logging_steps(fits):
    for rank in fits:
        reads = rank["D"]["reads"]
        quiet = [r for r in reads if not r["logs"]]
        logging = [r for r in reads if r["logs"]]
        assert len(quiet) == 5 and len(logging) == 2
        assert all(r["reads"] == [] for r in quiet), quiet  # the all-reduces are collectives, not host reads
        assert all(r["reads"] == ["tolist"] for r in logging)  # the one transfer of a logging step


def test_fsdp2_skip_with_a_fused_optimizer_is_taken_on_the_device(fits):
    # fit C: found_inf skips the fused update, so the NaN gradient is still there after the hook
    for rank in fits:
        rows = {row["step"]: row for row in rank["C"]["after"]}
        assert rows[2]["has_grads"] and math.isnan(rows[2]["total"])
        assert rank["C"]["reads"][2]["reads"] == ["tolist"]  # logging step: still one transfer on the bad step


# ============================================================================ plain loops: tensor parallel
def test_tensor_parallel_gradients_are_sharded_and_the_rowwise_bias_replicated(plain):
    for rank in plain:
        assert rank["world_size"] == 2
        assert rank["tp"]["placements"] == {
            "0.weight": ["S(0)"],
            "0.bias": ["S(0)"],
            "2.weight": ["S(1)"],
            "2.bias": ["R"],
        }


@pytest.mark.parametrize("p", ["1.0", "2.0", "inf"])
def test_tensor_parallel_norm_counts_the_replicated_bias_once(plain, p):
    for rank in plain:
        tp = rank["tp"]
        ref, got = tp["reference"][p], tp["measured"][p]
        assert got["total"] == pytest.approx(ref["total"], rel=REL)
        assert got["layers"] == pytest.approx(ref["layers"], rel=REL)
        assert tp["unchanged_by_measuring"]
    # the NeMo-RL bug: reducing the replicated bias over the TP ranks counts it twice; this test would see that
    ref2 = plain[0]["tp"]["reference"]["2.0"]["total"]
    assert plain[0]["tp"]["bias_counted_twice"] > ref2 * 1.05


@pytest.mark.parametrize("p", ["2.0", "inf"])
def test_tensor_parallel_clipping_brings_the_full_gradient_to_max_norm(plain, p):
    for rank in plain:
        clipped = rank["tp"]["clipped"][p]
        assert clipped["after"] == pytest.approx(clipped["max_norm"], rel=REL)
        assert clipped["clipped"]["clipped_steps"] == 1


def test_tensor_parallel_nan_loss_on_one_rank_skips_on_both(plain):
    r0, r1 = (rank["tp"]["nan_on_rank1"] for rank in plain)
    assert r0["counters"] == r1["counters"]
    assert r0["counters"]["skipped_steps"] == 1
    assert r0["weights_unchanged"] and r1["weights_unchanged"]


@pytest.mark.parametrize(
    "nan_rank",
    ["0", "1"],
)
def test_inf_norm_a_nan_in_one_ranks_shard_makes_every_rank_skip(plain, nan_rank):
    for rank in plain:
        seen = rank["tp"]["inf_norm_nan_in_one_shard"][nan_rank]
        assert not math.isfinite(seen["total"])  # NaN turned +inf before the MAX all-reduce, so no rank drops it
        assert seen["counters"]["nonfinite_steps"] == seen["counters"]["skipped_steps"] == 1


def test_value_clipping_on_shards_counts_the_step_on_every_rank(plain):
    # only rank 0's shard held an element beyond the bound; rank 1 must count the clipped step too
    for rank in plain:
        assert rank["tp"]["value_clip"]["counters"]["clipped_steps"] == 1
        assert rank["tp"]["value_clip"]["max_abs"] == 1.0


def test_a_partial_dtensor_gradient_is_refused_naming_the_parameter(plain):
    for rank in plain:
        message = rank["tp"]["partial_error"]
        assert message is not None, "a Partial gradient was measured instead of refused"
        assert "`2.bias`" in message and "Partial" in message


def test_the_bug_scenarios_below_are_set_up_as_described(plain):
    r0, r1 = plain
    # FSDP2 + TP: the placement fully_shard gives a tensor-parallel Shard(0) weight is not a Shard
    assert r0["tp"]["strided_shard"]["placement"] == "_S(0, 2)" and not r0["tp"]["strided_shard"]["is_shard"]
    # FSDP1 with a frozen first layer: rank 0's flat shard holds no trainable element, rank 1's does
    assert r0["fsdp1_frozen_rank"]["params_with_grad"] == 0 < r1["fsdp1_frozen_rank"]["params_with_grad"]
    # FSDP1 use_orig_params: rank 0 holds part of layer 0 only, rank 1 the rest and all of layer 2
    assert r0["fsdp1"]["orig_params"]["grad_shapes"]["_fsdp_wrapped_module.2.weight"] is None
    assert r1["fsdp1"]["orig_params"]["grad_shapes"]["_fsdp_wrapped_module.2.weight"] == [33]


def test_a_strided_shard_gradient_is_reduced_over_its_mesh_dim(plain):
    for rank in plain:
        s = rank["tp"]["strided_shard"]
        assert s["measured"] == pytest.approx(s["reference"], rel=REL)


# ============================================================================ plain loops: FSDP1
@pytest.mark.parametrize("layout", ["orig_params", "flat_param"])
def test_fsdp1_flat_shards_are_detected_and_the_norm_equals_the_unsharded_reference(plain, layout):
    r0, r1 = (rank["fsdp1"] for rank in plain)
    for rank in (r0, r1):
        run = rank[layout]
        assert all(run["flattened"])  # torch FSDP1 marks them: sharded=None detects it
        assert run["measured"] == pytest.approx(rank["reference_total"], rel=REL)


@pytest.mark.parametrize("layout", ["orig_params", "flat_param"])
def test_fsdp1_clipping_brings_the_whole_gradient_to_max_norm(plain, layout):
    for rank in plain:
        assert rank["fsdp1"][layout]["after_clip"] == pytest.approx(0.5, rel=REL)


@pytest.mark.parametrize("layout", ["orig_params", "flat_param"])
def test_fsdp1_nan_loss_on_one_rank_skips_on_both(plain, layout):
    r0, r1 = (rank["fsdp1"][layout]["nan_on_rank1"] for rank in plain)
    assert r0["counters"] == r1["counters"]
    assert r0["counters"]["skipped_steps"] == 1 and r0["counters"]["steps"] == 2
    assert r0["weights_unchanged"] and r1["weights_unchanged"]
    assert r0["finite"] and r1["finite"]


def test_fsdp1_no_shard_with_sharded_false_measures_the_whole_gradient(plain):
    for rank in plain:
        assert rank["fsdp1"]["no_shard"]["explicit_false"] == pytest.approx(rank["fsdp1"]["reference_total"], rel=REL)


@pytest.mark.xfail(
    strict=True,
    reason="known limitation (documented): with sharded=None the engine takes any `_fsdp_flattened` "
    "parameter for a shard, but "
    "NO_SHARD marks its parameters too: each rank holds the whole gradient and the world all-reduce gives "
    "sqrt(world_size) times the norm (the callback avoids it through strategy.sharding_strategy; plain loops do not)",
)
def test_fsdp1_no_shard_auto_detected_measures_the_whole_gradient_once(plain):
    for rank in plain:
        assert rank["fsdp1"]["no_shard"]["measured"] == pytest.approx(rank["fsdp1"]["reference_total"], rel=REL)


@pytest.mark.parametrize("hint", ["auto", "sharded"])
def test_fsdp1_every_rank_issues_the_same_collectives_when_one_rank_has_no_gradient(plain, hint):
    r0, r1 = (rank["fsdp1_frozen_rank"]["collectives"][hint] for rank in plain)
    assert r0 == r1


def test_fsdp1_logged_layer_norms_are_those_of_the_local_shard_as_documented(plain):
    # a documented limitation (docs/distributed.md): flat shards are not reduced per layer; rank 0 holds part of
    # layer 0 and nothing of layer 2, so it logs a partial layer 0 norm and no layer 2 at all
    r0, r1 = (rank["fsdp1"]["orig_params"] for rank in plain)
    for run in (r0, r1):
        assert run["logged_layers"] == pytest.approx(run["local_layers"], rel=REL)
    whole = plain[0]["fsdp1"]["reference_layers"]
    assert list(r0["logged_layers"]) == ["_fsdp_wrapped_module.0"]
    assert r0["logged_layers"]["_fsdp_wrapped_module.0"] < whole["0"] * 0.9


def test_value_mode_logs_the_whole_gradients_norm_after_clamping(plain):
    for rank in plain:
        value = rank["tp"]["value_clip"]
        assert value["logged_total_clipped"] == pytest.approx(value["gathered_total_clipped"], rel=REL)


# ============================================================================ DeepSpeed, and what Lightning refuses
@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_deepspeed_is_refused_at_setup_naming_the_deepspeed_setting(namespace, tmp_path):
    import importlib

    pl = pytest.importorskip(namespace)
    strategies = importlib.import_module(f"{namespace}.strategies")
    from lightning_clip import GradientClipping

    try:
        strategy = strategies.DeepSpeedStrategy()
    except Exception as err:  # deepspeed not installed: Lightning's __init__ refuses; the class is what counts
        assert "DeepSpeed" in str(err)
        strategy = object.__new__(strategies.DeepSpeedStrategy)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    trainer._accelerator_connector.strategy = strategy
    assert isinstance(trainer.strategy, strategies.DeepSpeedStrategy) and trainer.gradient_clip_val is None
    with pytest.raises(Exception, match="gradient_clipping") as raised:
        GradientClipping().setup(trainer, pl.LightningModule(), "fit")
    assert type(raised.value).__name__ == "MisconfigurationException"


@pytest.mark.parametrize("sharding", ["HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"])
def test_fsdp1_hybrid_sharding_is_refused_at_setup(sharding, tmp_path):
    # The norm would need the shard group only; Lightning's FSDPStrategy needs a GPU, so the strategy object is
    # built without its __init__ (which refuses the CPU) and given the sharding strategy the callback reads.
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    from lightning_clip import GradientClipping

    strategy = object.__new__(FSDPStrategy)
    strategy.sharding_strategy = ShardingStrategy[sharding]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    trainer._accelerator_connector.strategy = strategy
    with pytest.raises(Exception, match=f"sharding_strategy={sharding}.*shard group") as raised:
        GradientClipping().setup(trainer, pl.LightningModule(), "fit")
    assert type(raised.value).__name__ == "MisconfigurationException"


def test_lightning_fsdp1_strategy_refuses_the_cpu():
    # why the callback under Lightning's FSDPStrategy is untested here; FSDP1 itself runs on CPU (plain loop above)
    import pytorch_lightning as pl

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp")


def test_lightning_model_parallel_strategy_refuses_16_mixed():
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    with pytest.raises(ValueError, match="16-mixed"):
        pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            precision="16-mixed",
        )


# ========================================================================= 4 ranks (opt-in): dp x tp, hybrid sharding
def test_2d_gradients_on_two_meshes_are_reduced_over_their_own_sharded_dims(four):
    for rank in four:
        assert rank["meshes"]["2.weight"] == [2, 2] and rank["meshes"]["4.weight"] == [2]  # two meshes
        assert rank["placements"]["2.bias"] == ["S(0)", "R"]  # sharded over dp, replicated over tp
        for p in ("2.0", "inf"):
            for layer in ("2", "4"):
                got, want = rank["measured"][p]["layers"][layer], rank["reference"][p]["layers"][layer]
                assert got == pytest.approx(want, rel=REL), (p, layer)


def test_2d_total_norm_and_clipping_match_the_gathered_gradient(four):
    for rank in four:
        assert rank["placements"]["0.weight"] == ["_S(0, 2)", "S(0)"]
        assert rank["measured"]["2.0"]["total"] == pytest.approx(rank["reference"]["2.0"]["total"], rel=REL)
        assert rank["after_clip"] == pytest.approx(0.1, rel=REL)


def test_2d_nan_loss_on_one_rank_of_four_skips_on_all(four):
    counters = [rank["nan_on_rank3"]["counters"] for rank in four]
    assert all(c == counters[0] for c in counters) and counters[0]["skipped_steps"] == 1
    assert all(rank["nan_on_rank3"]["weights_unchanged"] for rank in four)


def test_fsdp2_hybrid_sharding_counts_each_replica_once(four):
    for rank in four:
        hsdp = rank["hsdp"]["fsdp2"]
        assert hsdp["placements"] == ["R", "S(0)"]
        assert hsdp["gathered"] == pytest.approx(rank["hsdp"]["reference"], rel=REL)
        assert hsdp["measured"] == pytest.approx(hsdp["gathered"], rel=REL)


@pytest.mark.xfail(
    strict=True,
    reason="known limitation (documented; the callback refuses HYBRID_SHARD; plain loops pass "
    "sharded=<shard group>): FSDP1 HYBRID_SHARD flat shards auto-detected are all-reduced over the whole world, "
    "so the replicas are "
    "counted twice (sqrt(2) x the norm here); the callback passes sharded=None for it too",
)
def test_fsdp1_hybrid_shard_counts_each_replica_once(four):
    for rank in four:
        hybrid = rank["hsdp"]["fsdp1_hybrid"]
        assert hybrid["gathered"] == pytest.approx(rank["hsdp"]["reference"], rel=REL)
        assert hybrid["measured"] == pytest.approx(hybrid["gathered"], rel=REL)
