"""The tile table and the grid plans (pure Python: no compiler, no device)."""
import dataclasses

import pytest
import torch

from mmloss.ops.triton import _config
from mmloss.ops.triton._launch import SPLIT_ALIGN, SPLIT_ALIGN_INTERPRET, dv_chunks, owner_plan, stats_plan


def test_architecture_rows():
    assert _config.arch_for_capability(9, 0) == "sm90"
    assert _config.arch_for_capability(8, 0) == "sm80"
    assert _config.arch_for_capability(8, 6) == "default"   # 99 KiB of shared memory per block
    assert _config.arch_for_capability(10, 0) == "default"
    assert _config.arch_key(torch.device("cpu")) == "interpret"


@pytest.mark.parametrize("key", list(_config.TABLE))
def test_table_rows_are_consistent(key):
    align = SPLIT_ALIGN_INTERPRET if key[0] == "interpret" else SPLIT_ALIGN
    for kind in _config.KINDS:
        t = _config.TABLE[key][kind]
        if kind == "combine":
            continue
        for v in (t.block_a, t.block_b, t.block_k, t.block_dv):
            assert v >= 16 and v & (v - 1) == 0, (key, kind, t)
        assert align % t.block_b == 0, "column splits must not depend on block_b"
        assert t.max_width <= 4 * t.block_dv, "at most four accumulators per program"


def test_autotune_candidates_keep_the_split_alignment():
    for kind, cands in _config.AUTOTUNE_CANDIDATES.items():
        for block_b, warps, stages in cands:
            assert SPLIT_ALIGN % block_b == 0 and warps in (4, 8, 16) and stages >= 1, (kind, block_b)


@pytest.mark.parametrize("key", list(_config.TABLE))
def test_statistics_and_owner_kernels_share_block_k(key):
    # the backward recomputes the forward's logit tiles bit for bit (issue 8, item 1): the K-chunk
    # (the order in which D is summed) must be the same for every matrix kind of a table row
    row = _config.TABLE[key]
    ks = {kind: row[kind].block_k for kind in _config.TILE_KINDS}
    assert len(set(ks.values())) == 1, (key, ks)
    assert _config.shared_block_k(row) == row["stats"].block_k


def test_a_row_with_mixed_block_k_is_refused():
    bad = dict(_config.TABLE[("sm90", "half")])
    bad["owner"] = dataclasses.replace(bad["owner"], block_k=bad["owner"].block_k // 2)
    with pytest.raises(AssertionError, match="share block_k"):
        _config.shared_block_k(bad)


def test_autotuning_never_changes_block_k():
    # the autotuner's configurations name BLOCK_B only; BLOCK_K is always the table's
    from mmloss.ops.triton import _autotune

    assert _autotune.TUNED_PARAMS == ("BLOCK_B",)


@pytest.mark.parametrize("width,max_dv,expected", [
    (384, 128, (128, 3)), (768, 256, (256, 3)), (67, 128, (32, 3)), (1, 128, (16, 1)), (256, 128, (128, 2)),
])
def test_dv_chunks_cover_with_least_padding(width, max_dv, expected):
    assert dv_chunks(width, max_dv) == expected


def test_stats_plan():
    # N = M = 32768, 128-row blocks, 132 programs: all programs busy, no column split
    plan = stats_plan(32768, 32768, 128, 256, 132)
    assert (plan.progs_a, plan.splits) == (128, 1)
    # 140 row blocks on 132 programs: a second round for 8 blocks would idle half the device;
    # splitting the columns keeps ≥ 90% of the programs' time busy
    plan = stats_plan(140 * 128, 32768, 128, 256, 132)
    assert plan.splits > 1 and plan.progs_a * plan.splits <= 132
    rounds = -(-140 // plan.progs_a)
    work = 140 * (32768 // 256)
    assert work / (132 * rounds * (plan.cols_per_split // 256)) >= 0.9
    # one row block: the columns are split across the programs (row partials + combine)
    plan = stats_plan(100, 1 << 20, 128, 256, 132)
    assert plan.progs_a == 1 and 100 <= plan.splits <= 132
    assert plan.cols_per_split % 256 == 0 and plan.cols_per_split * plan.splits >= 1 << 20


def test_owner_plan_slices_d():
    sm90 = _config.table_tiles("sm90", torch.bfloat16, "owner")
    plan = owner_plan(32768, 32768, 768, sm90, True, 256, 132)
    assert (plan.slices, plan.num_dv, plan.block_dv, plan.splits) == (2, 3, 128, 1)
    # at most 3 chunks of 128 (4 spill in the sigmoid / KL owners, issue 11): D = 512 in 2 slices
    plan = owner_plan(32768, 32768, 512, sm90, True, 256, 132)
    assert (plan.slices, plan.num_dv, plan.block_dv) == (2, 2, 128)
    # nothing to accumulate (the sigmoid forward): one slice; few rows: split the columns
    plan = owner_plan(64, 65536, 768, sm90, False, 256, 132)
    assert plan.slices == 1 and 100 <= plan.splits <= 132
