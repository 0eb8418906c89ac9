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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # step 2: dirty batch on rank 1 only (finite gradients); step 4: NaN loss on rank 0 only
    assert r0["counters"]["skipped_steps"] == r1["counters"]["skipped_steps"] == 2
    assert r0["snapshots"] == r1["snapshots"]  # the replicas never diverge
    snaps = r0["snapshots"]
    assert snaps[2] == snaps[1] and snaps[4] == snaps[3]  # both skipped steps left the weights alone
    assert snaps[3] != snaps[2] and snaps[5] != snaps[4]
