"""Memory bound of every loss on the torch backend (issue: "no N×M tensor on the fast path").

Forward + backward may hold at most 10 % of one N×M fp32 matrix above its inputs and their
gradients. Measured with the allocator's event timeline (tests/memtrack.py), not with timing or
RSS. Runs with one intra-op thread (see ``_one_thread``).

Sizes are chosen so the bound separates O((N+M)·D) memory from an N×M matrix at small cost (the
profiler's per-op overhead, which dominates, scales with the number of row chunks,
N·M·4 / workspace, not with N): N = M = 2048, D = 3 and a workspace budget
(``MMLOSS_CHUNK_BYTES``) of 1/32 of the matrix (512 KiB, 32 chunks). N is large enough that the
16-row minimum chunk of the KL primitive (TCL's soft targets) stays well inside the budget. A fast
path then holds one or two workspaces plus a few copies of the operands ((N+M)·D·4 = 48 KiB):
0.5–0.9 MiB against the 1.6 MiB limit, while one N×M fp32 matrix is 16 MiB (10× the limit) and
an N×M bool mask 4 MiB (2.5×).
"""
from __future__ import annotations

import pytest
import torch

import mmloss
from memtrack import grad_bytes, peak_bytes_above_start

N = M = 2048
D = 3
WORKSPACE_BYTES = N * M * 4 // 32
LIMIT = 0.10 * N * M * 4
WARM_UP_ROWS = 48  # the warm-up call (lazy imports, first-call caches) runs at this size


@pytest.fixture(autouse=True)
def _workspace_budget(monkeypatch):
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", str(WORKSPACE_BYTES))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the allocation timeline then does not depend on the machine's core
    count (parallel kernels may allocate per-thread buffers), and the profiler-heavy runs do not
    stall when other processes share the cores (with 2 OpenMP threads on a loaded 2-core
    machine a case took 44 s instead of 1.5 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()


def _case_clip(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    return (x, y), lambda: mmloss.clip_loss(x, y, torch.tensor(14.0), backend="torch")


def _case_clip_labels(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    labels = torch.arange(n) // 2
    return (x, y), lambda: mmloss.clip_loss(x, y, 14.0, labels=labels, label_smoothing=0.1, backend="torch")


def _case_siglip(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    return (x, y), lambda: mmloss.siglip_loss(x, y, 10.0, -10.0, backend="torch")


def _case_siglip_per_row(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    return (x, y), lambda: mmloss.siglip_loss(x, y, 10.0, -10.0, reduction="none", backend="torch").sum()


def _case_infonce(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    return (x, y), lambda: mmloss.infonce_loss(x, y, 14.0, backend="torch")


def _case_infonce_labels(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    lab = torch.arange(n) % 512
    return (x, y), lambda: mmloss.infonce_loss(x, y, 14.0, query_labels=lab, key_labels=lab, backend="torch")


def _case_contrastive_distill(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    xt, yt = _unit(n, 2 * D, 2).detach(), _unit(n, 2 * D, 3).detach()
    return (x, y), lambda: mmloss.contrastive_distill_loss(x, y, 14.0, xt, yt, 20.0, backend="torch")


def _case_distill_clip(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    xt, yt = _unit(n, D, 2).detach(), _unit(n, D, 3).detach()
    loss = mmloss.DistillClipLoss(backend="torch")
    return (x, y), lambda: sum(loss(x, y, 14.0, xt, yt, 20.0))


def _case_modx(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    xo, yo = _unit(n, D, 2).detach(), _unit(n, D, 3).detach()
    return (x, y), lambda: mmloss.modx_loss(x, y, 14.0, xo, yo, backend="torch")


def _case_cyclip(n):
    x, y = _unit(n, D, 0), _unit(n, D, 1)
    return (x, y), lambda: mmloss.cyclip_loss(x, y, 14.0, backend="torch")


def _case_symile(n):
    reps = [_unit(n, D, k) for k in range(3)]
    gen = torch.Generator().manual_seed(0)
    return reps, lambda: mmloss.symile_loss(reps, torch.tensor(10.0), "n", gen, backend="torch")


def _case_tcl(n):
    v, t = _unit(n, D, 0), _unit(n, D, 1)
    v_m, t_m = _unit(n, D, 2).detach(), _unit(n, D, 3).detach()
    tau = torch.tensor(0.07, requires_grad=True)
    return (v, t, tau), lambda: mmloss.tcl_loss(v, t, v_m, t_m, tau, backend="torch")


def _case_isogclr(mode):
    def case(n):
        x, y = _unit(n, D, 0), _unit(n, D, 1)
        loss = mmloss.ISogCLRLoss(n, mode, backend="torch")
        return (x, y), lambda: loss(x, y, torch.arange(n))

    return case


def _case_ssl(name, **kwargs):
    def case(n):
        a, b = _unit(n, D, 0), _unit(n, D, 1)
        fn = getattr(mmloss, name)
        return (a, b), lambda: fn(a, b, backend="torch", **kwargs)

    return case


def _case_supcon(n):
    z = _unit(n, D, 0)
    labels = torch.arange(n) % 512
    return (z,), lambda: mmloss.supcon_loss(z, labels, backend="torch")


def _case_multiview(name):
    def case(n):
        a, b = _unit(n, D, 0), _unit(n, D, 1)
        fn = getattr(mmloss, name)
        return (a, b), lambda: fn([a, b], backend="torch")

    return case


def _case_symile_n_squared_pairs(n):
    reps = [_unit(n, D, k) for k in range(2)]
    return reps, lambda: mmloss.symile_loss(reps, torch.tensor(10.0), "n_squared", backend="torch")


def _case_score_distill(n):
    # B × C candidate scores (no similarity matrix); the bound still applies to its temporaries.
    g = torch.Generator().manual_seed(5)
    student = torch.randn(n, D, generator=g).requires_grad_()
    teacher = torch.randn(n, D, generator=g)
    return (student,), lambda: mmloss.score_distill_loss(student, teacher)


CASES = {
    "symile_n_squared_k2": _case_symile_n_squared_pairs,
    "score_distill": _case_score_distill,
    "ntxent": _case_ssl("ntxent_loss"),
    "dcl": _case_ssl("dcl_loss"),
    "dclw": _case_ssl("dclw_loss"),
    "dhel": _case_ssl("dhel_loss"),
    "hcl": _case_ssl("hcl_loss"),
    "supcon": _case_supcon,
    "mv_infonce": _case_multiview("mv_infonce_loss"),
    "mv_dhel": _case_multiview("mv_dhel_loss"),
    "contrastive_distill": _case_contrastive_distill,
    "distill_clip": _case_distill_clip,
    "modx": _case_modx,
    "cyclip": _case_cyclip,
    "symile_n": _case_symile,
    "tcl": _case_tcl,
    "isogclr_unimodal": _case_isogclr("unimodal"),
    "isogclr_bimodal": _case_isogclr("bimodal"),
    "clip": _case_clip,
    "clip_labels_smoothing": _case_clip_labels,
    "siglip": _case_siglip,
    "siglip_per_row": _case_siglip_per_row,
    "infonce": _case_infonce,
    "infonce_labels": _case_infonce_labels,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward_peak_is_below_a_tenth_of_the_matrix(name):
    # Warm-up at a small size (lazy imports, first-call caches). Whatever the full-size call
    # allocates and keeps (a size-dependent cache included) still counts against the limit.
    _, warm_up = CASES[name](WARM_UP_ROWS)
    warm_up().backward()
    inputs, loss_fn = CASES[name](N)

    def step():
        loss_fn().backward()

    peak, _ = peak_bytes_above_start(step)
    above = peak - grad_bytes(*inputs)
    assert above <= LIMIT, (
        f"{name}: {above / 2**10:.1f} KiB above inputs and gradients "
        f"> {LIMIT / 2**10:.1f} KiB (10 % of one {N}x{M} fp32 matrix; workspace budget "
        f"{WORKSPACE_BYTES / 2**10:.0f} KiB)"
    )


def test_tracker_sees_the_dense_matrix_of_the_reference():
    """The measurement itself must be able to fail: the dense oracle holds whole N×M matrices."""
    x, y = _unit(N, D, 0), _unit(N, D, 1)

    def step():
        mmloss.reference.clip_loss(x, y, 14.0).backward()

    peak, _ = peak_bytes_above_start(step)
    assert peak - grad_bytes(x, y) >= N * M * 4
