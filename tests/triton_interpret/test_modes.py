"""The triton kernels' named modes (mmloss/ops/triton/_modes.py): the host enums and the
``tl.constexpr`` constants the kernels compare with stay in sync, and the host picks the modes
and owner-pass flags the kernels expect (pure Python: nothing is launched)."""
import pytest
import torch
import triton.language as tl

from mmloss.ops import triton as backend
from mmloss.ops._spec import MARKS, KLSpec, PairSpec
from mmloss.ops.triton import _autotune
from mmloss.ops.triton import _modes as M
from mmloss.ops.triton._launch import MARK_MODES, OwnerFlags, make_pair
from mmloss.ops.triton.owner import run_owner

# every kernel constant and the enum member it names
KERNEL_CONSTANTS = {
    "SCALAR_FLOAT": (M.ScaleMode.FLOAT, M.BiasMode.FLOAT),
    "SCALAR_TENSOR": (M.ScaleMode.TENSOR, M.BiasMode.TENSOR),
    "SCALE_PER_A_ROW": (M.ScaleMode.PER_A_ROW,),
    "SCALE_PER_B_ROW": (M.ScaleMode.PER_B_ROW,),
    "MARKS_NONE": (M.MarkMode.NONE,),
    "MARKS_DIAGONAL": (M.MarkMode.DIAGONAL,),
    "MARKS_SAME_LABEL": (M.MarkMode.SAME_LABEL,),
    "KIND_LSE": (M.OwnerKind.LSE,),
    "KIND_SIGMOID": (M.OwnerKind.SIGMOID,),
    "KL_STUDENT_MAX": (M.KLStat.STUDENT_MAX,),
    "KL_TEACHER_MAX": (M.KLStat.TEACHER_MAX,),
    "KL_TEACHER_LOG_SUM": (M.KLStat.TEACHER_LOG_SUM,),
    "KL_PART_TEACHER_MAX": (M.KLPartial.TEACHER_MAX,),
    "KL_PART_TEACHER_SUM": (M.KLPartial.TEACHER_SUM,),
    "KL_PART_WEIGHTED_DIFF": (M.KLPartial.WEIGHTED_DIFF,),
    "KL_PART_ENTROPY_SUM": (M.KLPartial.ENTROPY_SUM,),
}


@pytest.mark.parametrize("name", sorted(KERNEL_CONSTANTS))
def test_kernel_constants_match_their_enum_members(name):
    constant = getattr(M, name)
    # only tl.constexpr globals may be read inside @triton.jit code
    assert isinstance(constant, tl.constexpr), name
    for member in KERNEL_CONSTANTS[name]:
        assert constant.value == member.value and type(constant.value) is int, (name, member)


def test_every_constexpr_global_is_listed():
    # a new kernel constant gets its enum member above (or is one of the tile axes / numbers)
    found = {k for k, v in vars(M).items() if isinstance(v, tl.constexpr)}
    assert found == set(KERNEL_CONSTANTS) | {"PER_ROW", "PER_COLUMN", "LOG2E", "LN2"}


def test_tile_axes_and_numbers():
    assert (M.PER_ROW.value, M.PER_COLUMN.value) == (1, 0)  # reduce over columns → one per row
    assert M.LOG2E.value == pytest.approx(1 / M.LN2.value, rel=1e-15)


def test_statistics_rows_come_in_max_log_sum_pairs():
    # _launch.weighted_shifts reads any (2k, n) statistics as (max, log-sum) pairs
    assert (M.LseStat.MAX, M.LseStat.LOG_SUM) == (0, 1)
    for mx, lg in ((M.KLStat.STUDENT_MAX, M.KLStat.STUDENT_LOG_SUM),
                   (M.KLStat.TEACHER_MAX, M.KLStat.TEACHER_LOG_SUM)):
        assert mx % 2 == M.LseStat.MAX and lg == mx + 1
    assert [int(f) for f in M.KLPartial] == list(range(len(M.KLPartial)))
    assert M.KLPartial.ENTROPY_SUM == len(M.KLPartial) - 1  # the cross-entropy's extra field is last


def test_every_mark_name_has_a_mode():
    assert set(MARK_MODES) == set(MARKS)
    assert sorted(MARK_MODES.values()) == list(M.MarkMode)


def _spec(scale, bias, marks="diagonal"):
    x, y = torch.zeros(3, 4), torch.zeros(5, 4)
    same = marks == "same_label"
    return PairSpec(x=x, y=y, scale=scale, scale_value=2.0, bias=bias, bias_value=0.5, marks=marks, offset=0,
                    x_labels=torch.zeros(3, dtype=torch.int64) if same else None,
                    y_labels=torch.zeros(5, dtype=torch.int64) if same else None)


@pytest.mark.parametrize("scale,a_is_x,mode", [
    (None, True, M.ScaleMode.FLOAT), (torch.tensor(2.0), False, M.ScaleMode.TENSOR),
    (torch.ones(3), True, M.ScaleMode.PER_A_ROW), (torch.ones(3), False, M.ScaleMode.PER_B_ROW),
])
def test_make_pair_modes(scale, a_is_x, mode):
    pair = make_pair(_spec(scale, None), a_is_x)
    assert pair.scale_mode is mode and pair.bias_mode is M.BiasMode.FLOAT
    args = pair.args()
    # the kernels receive plain integers (the launch cache and the compiled code see what a
    # literal gave)
    assert type(args["SCALE_MODE"]) is int and args["SCALE_MODE"] == mode
    assert type(args["MARKS"]) is int and args["MARKS"] == M.MarkMode.DIAGONAL
    assert make_pair(_spec(None, torch.tensor(1.0), "same_label"), True).args()["BIAS_MODE"] == M.BiasMode.TENSOR


def test_owner_flags_expand_and_refuse_impossible_passes():
    flags = OwnerFlags(True, False, store_out=True, atomic_b=True)
    assert flags.accumulate
    assert flags.constexprs() == dict(HAS_A_GRAD=True, HAS_B_GRAD=False, STORE_OUT=True, NEED_DSCALE=False,
                                      ATOMIC_B=True)
    flags.check(M.ScaleMode.PER_A_ROW)
    with pytest.raises(AssertionError, match="ATOMIC_B"):
        flags.check(M.ScaleMode.PER_B_ROW)  # the column pass never adds the other side by atomics
    with pytest.raises(AssertionError, match="ATOMIC_B"):
        OwnerFlags(True, True, atomic_b=True).check(M.ScaleMode.FLOAT)  # nothing accumulated


def test_loss_and_bias_partials_belong_to_the_sigmoid_owner():
    pair = make_pair(_spec(None, None), True)
    with pytest.raises(AssertionError, match="sigmoid"):
        run_owner(pair, M.OwnerKind.LSE, with_loss=True)


def test_launches_pass_plain_constexprs(monkeypatch):
    # every launch of every path (records instead of runs): the mode and flag constexprs reach
    # the kernels as plain ints / bools / strings, never as enum members (which would key the
    # launch cache and name the specialisation differently from the literal they stand for)
    records = []
    monkeypatch.setattr(_autotune, "launch", lambda kernel, kind, t, grid, kwargs, atomic_target="":
                        records.append((kernel, kwargs)))
    monkeypatch.setattr(_autotune, "launch_fixed", lambda kernel, grid, kwargs, num_warps:
                        records.append((kernel, kwargs)))
    for scale in (None, torch.tensor(2.0), torch.ones(3)):
        needs = (True, True, scale is not None, True)
        for marks in MARKS:
            spec = _spec(scale, torch.tensor(1.0), marks)
            row, col, rs, cs, kept = backend.similarity_lse_forward(spec, True, True)
            backend.similarity_lse_backward(spec, torch.ones(3), torch.ones(5), rs, cs, kept, needs)
            backend.pairwise_sigmoid_sum(spec, needs)
            backend.pairwise_sigmoid_forward(spec)
    x, y = torch.zeros(3, 4), torch.zeros(5, 4)
    kl = KLSpec(x, y, torch.zeros(3, 6), torch.zeros(5, 6), torch.tensor(2.0), 0.0, None, 3.0)
    row, col, rs, cs = backend.similarity_kl_forward(kl, True, True, True)
    backend.similarity_kl_backward(kl, torch.ones(3), torch.ones(5), rs, cs, (True, True, True))
    names = set()
    for kernel, kwargs in records:
        # the kernels' constexpr parameters are the upper-case ones
        for name in (k for k in kwargs if k.isupper()):
            names.add(name)
            assert type(kwargs[name]) in (int, bool, str), (kernel, name, kwargs[name])
    assert {"SCALE_MODE", "T_SCALE_MODE", "BIAS_MODE", "MARKS", "KIND"} <= names
