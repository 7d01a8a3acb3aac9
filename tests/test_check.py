"""`python -m mmloss.check` (the users' self-test), run in-process on small configurations.

It must pass on this machine's backends, print a table naming every row, and — what makes it a
test at all — fail with exit status 1, naming the failing row and element, when a backend
returns a wrong value or gradient.
"""
import math
import runpy
import sys

import pytest
import torch

import mmloss
from mmloss import check
from mmloss.check import runner
from mmloss.ops import torch_chunked

SMALL = ["--backends", "torch", "--dtypes", "fp32", "--quick", "--checks", "lse,clip_loss"]


def _rows(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("cpu") and line.split()[-1] == status]


def test_passes_and_prints_the_table(capsys):
    assert check.main(SMALL) == 0
    out = capsys.readouterr().out
    assert "device" in out and "worst error" in out and "bound" in out and "status" in out
    ok = _rows(out, "ok")
    # 3 lse modes × (2 sizes + 2 large-logit problems) + clip_loss × 4
    assert len(ok) == 16, out
    for name in ("lse/none", "lse/diagonal", "lse/same_label", "clip_loss"):
        assert any(f" {name} " in row for row in ok), name
    assert any("L=1e6" in row for row in ok) and any("ragged 37x53x67" in row for row in ok)
    assert "16 checks, 0 failed" in out and "all checks passed" in out


def test_runs_as_a_module(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "mmloss.check")  # run it fresh, as `python -m` does
    monkeypatch.setattr(sys, "argv", ["mmloss.check", "--backends", "torch", "--dtypes", "fp64", "--quick",
                                      "--checks", "sigmoid/none"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("mmloss.check", run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 0
    assert "sigmoid/none" in capsys.readouterr().out


def _perturb_row_lse(monkeypatch, delta: float):
    real = torch_chunked.similarity_lse_forward

    def wrong(spec, rows, cols):
        row, col, row_stats, col_stats, logits = real(spec, rows, cols)
        return row + delta if row.numel() else row, col, row_stats, col_stats, logits

    monkeypatch.setattr(torch_chunked, "similarity_lse_forward", wrong)


def test_fails_on_a_wrong_value(monkeypatch, capsys):
    _perturb_row_lse(monkeypatch, 1e-3)  # ~3e-4 relative: 30× the fp32 bound
    assert check.main(SMALL) == 1
    out = capsys.readouterr().out
    failed = _rows(out, "FAIL")
    assert any(" lse/none " in row and "tiny 3x5x3" in row for row in failed), out
    assert "-> row_lse: row_lse[" in out  # the failing element is named
    assert "FAILED:" in out
    # the column LSE and the losses that use only it are untouched; clip uses both and fails
    assert any(" clip_loss " in row for row in failed)


def _scale_gradient_off(monkeypatch, factor: float):
    real = torch_chunked.similarity_lse_backward

    def wrong(spec, grad_row, grad_col, row_stats, col_stats, logits, needs):
        dx, dy, ds, db = real(spec, grad_row, grad_col, row_stats, col_stats, logits, needs)
        return dx, dy, (None if ds is None else ds * factor), db

    monkeypatch.setattr(torch_chunked, "similarity_lse_backward", wrong)


def test_fails_on_a_wrong_gradient(monkeypatch, capsys):
    _scale_gradient_off(monkeypatch, 1.001)
    assert check.main(["--backends", "torch", "--dtypes", "fp32", "--quick", "--checks", "lse/none"]) == 1
    out = capsys.readouterr().out
    assert len(_rows(out, "FAIL")) == 4, out  # every problem of the check
    assert "-> dscale: dscale: got" in out


def test_a_named_backend_that_cannot_run_fails(monkeypatch, capsys):
    real = runner.usable_backends

    def without_cpu_extension(device):
        return {**real(device), "cpu": "mmloss._C is not built (test)"}

    monkeypatch.setattr(runner, "usable_backends", without_cpu_extension)  # where run_checks looks it up
    assert check.main(["--backends", "torch,cpu", "--dtypes", "fp64", "--quick", "--checks", "sigmoid/none"]) == 1
    out = capsys.readouterr().out
    failed = _rows(out, "FAIL")
    assert len(failed) == 1 and " cpu " in failed[0] and " available " in failed[0], out
    assert "mmloss._C is not built (test)" in out
    assert len(_rows(out, "ok")) == 4  # torch still ran


def test_unsupported_dtype_is_skipped_not_failed(monkeypatch, capsys):
    real = runner.supported_dtypes

    def no_fp64(backend, device):
        return {**real(backend, device), "fp64": "no fp64 kernels (test)"}

    monkeypatch.setattr(runner, "supported_dtypes", no_fp64)
    assert check.main(["--backends", "torch", "--dtypes", "fp64", "--quick", "--checks", "lse/none"]) == 1
    out = capsys.readouterr().out
    assert "no fp64 kernels (test)" in out and "no check ran" in out
    assert check.main(["--backends", "torch", "--dtypes", "fp64,fp32", "--quick", "--checks", "lse/none"]) == 0
    out = capsys.readouterr().out
    assert "4 checks, 0 failed, 1 skipped" in out


def test_works_under_the_newer_fp32_precision_api(capsys):
    """A user who enabled TF32 through ``torch.backends.cuda.matmul.fp32_precision`` (after which
    reading the legacy setting raises) still gets exact fp32 checks, and the setting back."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API")
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert check.main(["--backends", "torch", "--dtypes", "fp32", "--quick", "--checks", "lse/none"]) == 0
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = saved
    assert "4 checks, 0 failed" in capsys.readouterr().out


def test_rejects_unknown_options():
    with pytest.raises(SystemExit):
        check.main(["--dtypes", "fp8"])
    with pytest.raises(SystemExit):
        check.main(["--checks", "no_such_check"])


# ----------------------------------------------------------------------------- the engine


def test_value_rule_is_logit_aware():
    ref = torch.tensor([2.0, 0.0, -math.inf], dtype=torch.float64)
    # fp32 bound: 1e-5·|ref| + 1e-6·L with L = 100 → 1.2e-4 and 1e-4
    ok = check.compare_values("v", torch.tensor([2.0 + 1.1e-4, 9e-5, -math.inf]), ref, torch.float32, 100.0)
    assert ok.ok and ok.what == "v"
    bad = check.compare_values("v", torch.tensor([2.0, 1.1e-4, -math.inf]), ref, torch.float32, 100.0)
    assert not bad.ok and "v[1]" in bad.detail  # names the failing element, not merely the largest diff
    inf_lost = check.compare_values("v", torch.tensor([2.0, 0.0, 0.0]), ref, torch.float32, 1.0)
    assert not inf_lost.ok and "finiteness" in inf_lost.detail
    nan = check.compare_values("v", torch.tensor([math.nan, 0.0, -math.inf]), ref, torch.float32, 1.0)
    assert not nan.ok
    # never held to better than 4× dense fp32 on the same inputs (the worst of its formulations)
    dense = [ref + torch.tensor([0.0, 1e-4, 0.0], dtype=torch.float64), ref + torch.tensor([0.0, 3e-4, 0.0],
                                                                                             dtype=torch.float64)]
    got = torch.tensor([2.0, 1.1e-3, -math.inf])
    assert check.compare_values("v", got, ref, torch.float32, 100.0, dense=dense).ok
    assert not check.compare_values("v", got, ref, torch.float32, 100.0, dense=dense[:1]).ok


def test_gradient_rules():
    e = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # fp32: 1e-4·max|g| = 2e-4
    assert check.compare_grads("g", e + 1.9e-4, e, torch.float32, 1.0).ok
    assert not check.compare_grads("g", e + 2.1e-4, e, torch.float32, 1.0).ok
    # large logits: 4× dense fp32's error + 1e-7·max|g| (here 4·1e-6 + 2e-7), stricter than 1e-4
    dense = e + torch.tensor([1e-6, 0.0, 0.0], dtype=torch.float64)
    assert check.compare_grads("g", e + 4.1e-6, e, torch.float32, 1e4, dense=dense).ok
    assert not check.compare_grads("g", e + 5e-6, e, torch.float32, 1e4, dense=dense).ok
    # below large logits a path is never held to better than 4× dense fp32
    dense_poor = e + 1e-3
    assert check.compare_grads("g", e + 3e-3, e, torch.float32, 10.0, dense=dense_poor).ok
    # fp16: relative norm 1e-2, plus what rounding the reference to fp16 loses (underflow)
    tiny = torch.tensor([1e-12, -2e-12], dtype=torch.float64)
    assert check.compare_grads("g", torch.zeros(2, dtype=torch.float16), tiny, torch.float16, 1.0).ok
    assert not check.compare_grads("g", (e * 1.02).half(), e, torch.float16, 1.0).ok
    # non-finite gradients always fail
    assert not check.compare_grads("g", torch.tensor([1.0, math.inf, 0.5]), e, torch.float32, 1.0).ok


def test_prescaled_is_the_other_dense_formulation():
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    s = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    direct = mmloss.reference.similarity_lse(x, y, s)
    other = check.prescaled(mmloss.reference.similarity_lse, [(0, 2)])(x, y, s)
    for a, b in zip(direct, other):
        torch.testing.assert_close(a, b)


def test_primitive_case_runs_every_option():
    case = check.PrimitiveCase("lse", 5, 7, 3, scale=4.0, scale_kind="per_row", bias=1.5, bias_kind="tensor",
                               mode="same_label", classes=2, rows=False, noncontiguous=True, chunk_size=2)
    fast, _, inputs, names, outputs, logit, variants = check.build_primitive_case(case, "torch")
    assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    assert inputs[2].shape == (5,) and inputs[2].requires_grad and inputs[3].requires_grad
    assert logit > 4.0 and len(variants) == 1
    comparisons = check.run_primitive_case(case, "torch")
    assert [c.what for c in comparisons] == ["col_lse", "dx", "dy", "dscale", "dbias"]
    assert all(c.ok for c in comparisons), [str(c) for c in comparisons]


def test_agree_reports_exceptions_as_failures():
    x = torch.randn(3, 2, requires_grad=True)

    def broken(t):
        raise RuntimeError("kernel exploded")

    (c,) = check.agree(broken, lambda t: t.sum(), [x], torch.float32, 1.0)
    assert not c.ok and "kernel exploded" in c.detail


def test_agree_compares_values_and_each_gradient():
    x = torch.randn(4, 3, dtype=torch.float32, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    comparisons = check.agree(lambda t, k: mmloss.ops.similarity_lse(t, t, k, backend="torch"),
                              lambda t, k: mmloss.reference.similarity_lse(t, t, k),
                              [x, s], torch.float32, 2.0 * 3.0 * 3.0, names=["x", "s"],
                              output_names=["row", "col"])
    assert [c.what for c in comparisons] == ["row", "col", "dx", "ds"]
    assert all(c.ok for c in comparisons), [str(c) for c in comparisons]
