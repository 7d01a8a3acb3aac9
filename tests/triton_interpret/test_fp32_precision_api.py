"""The triton backend under torch's newer fp32 matmul API (issue: every fp32 call crashed once a
user set ``torch.backends.cuda.matmul.fp32_precision``, because the launch code asked
``torch.get_float32_matmul_precision()``, which then raises)."""
import subprocess
import sys
import types

import torch

from mmloss.ops.triton import _launch


def test_new_api_setting_is_read_without_the_legacy_getter(monkeypatch):
    def legacy():
        raise RuntimeError("mix of the legacy and new APIs")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", legacy)
    for setting, want in (("tf32", "tf32"), ("ieee", "ieee")):
        monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(fp32_precision=setting))
        assert _launch.dot_precision(torch.float32) == want
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(fp32_precision="none"))
    assert _launch.dot_precision(torch.float32) == "ieee"  # unreadable legacy state counts as exact
    assert _launch.dot_precision(torch.float16) == "tf32"


def test_fp32_call_works_after_setting_the_new_api():
    """A fresh process (the setting is process-wide and cannot be undone cleanly)."""
    code = (
        "import torch, mmloss\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "x = torch.randn(6, 4, requires_grad=True); y = torch.randn(5, 4)\n"
        "row, col = mmloss.similarity_lse(x, y, 2.0, backend='triton')\n"
        "(row.sum() + col.sum()).backward()\n"
        "ref_row, ref_col = mmloss.similarity_lse(x.detach(), y, 2.0, backend='reference')\n"
        "assert torch.allclose(row, ref_row, atol=1e-3) and torch.isfinite(x.grad).all()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
