"""The fault matrix: a non-finite step never reaches the weights or the optimizer state ("nothing is lost").

{fault} x {optimizer} x {policy} x {precision} on a real CPU Trainer; the cells, faults and expected outcomes are
built in ``tests/fault_matrix.py``, which also regenerates ``docs/fault_matrix.md`` (``python tests/fault_matrix.py``).
Each cell is a no-op across the bad step (bit-identical weights and ``optimizer.state_dict()``), finite after two
good steps, counted once (LR scale 0.5 under ``halve_lr``); or a GradScaler overflow (fp16 Inf gradient); or a
refusal whose message is asserted. Library defects are ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import pytest
from fault_matrix import Cell, all_cells, check, expectation, known_bug, run_cell


def _param(cell: Cell):
    reason = known_bug(cell)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(cell, id=cell.id, marks=marks)


@pytest.mark.parametrize("cell", [_param(c) for c in all_cells()])
def test_fault_matrix(tmp_path, cell: Cell):
    check(run_cell(cell, tmp_path), expectation(cell))
