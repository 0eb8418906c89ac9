"""A real 2-process DDP run (gloo on CPU): rank-local problems lead to the same decision on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

SCRIPT = Path(__file__).with_name("ddp_script.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_ranks_agree_on_skips(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # step 2: dirty batch on rank 1 only (finite gradients); step 4: NaN loss on rank 0 only
    assert r0["counters"]["skipped_steps"] == r1["counters"]["skipped_steps"] == 2
    assert r0["snapshots"] == r1["snapshots"]  # the replicas never diverge
    snaps = r0["snapshots"]
    assert snaps[2] == snaps[1] and snaps[4] == snaps[3]  # both skipped steps left the weights alone
    assert snaps[3] != snaps[2] and snaps[5] != snaps[4]


def test_sharded_total_norm_equals_unsharded_norm(tmp_path):
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("sharded_norm_script.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(port)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    pieces = [torch.randn(101), torch.randn(7, 3).flatten(), torch.randn(1)]
    full = torch.cat(pieces).double()
    rank0_part = torch.cat([g[0::2] for g in pieces]).double()  # what rank 0 holds
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        for p in (1.0, 2.0, 3.0, float("inf")):
            assert got[str(p)] == pytest.approx(float(torch.linalg.vector_norm(full, p)), rel=1e-5)
        assert got["empty_rank"] == pytest.approx(float(rank0_part.norm()), rel=1e-5)
