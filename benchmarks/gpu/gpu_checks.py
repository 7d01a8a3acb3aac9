"""GPU subset of the triton backend's tests (run by benchmarks/gpu/run.sh; needs a CUDA GPU).

- correctness against the float64 reference at moderate, ragged sizes in bf16, fp16 and exact
  fp32, every mark mode, both deterministic settings (docs/design.md tolerances via tests/oracle.py);
- TF32 (``torch.set_float32_matmul_precision("high")``) close to exact;
- determinism: the default mode's forward + backward is bit-identical when repeated;
- N·D ≥ 2³¹ (64-bit offsets) against the chunked torch backend;
- no host synchronisation: forward passes captured in a CUDA graph replay exactly;
- ``MMLOSS_TRITON_AUTOTUNE=1`` runs and agrees (in a subprocess).
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (benchmarks/gpu/run.sh runs this on one)", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import mmloss.functional as F  # noqa: E402
import mmloss.reference as reference  # noqa: E402
from mmloss import ops  # noqa: E402
from oracle import assert_grad_close, assert_loss_close, compare, features, oracle  # noqa: E402

CUDA = torch.device("cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
N_KL, M_KL = 1000, 1531      # ragged similarity_kl shapes
N_DET = 8192                 # determinism checks
N_GRAPH = 4096               # CUDA-graph capture checks


# pytest-xdist (run.sh: -n WORKERS --dist loadgroup) sends each group to one worker. Groups are
# (kernel family, dtype), whose compiled kernels hardly overlap, so from a cold cache no kernel
# is compiled by two workers at once; the other tests join the group whose kernels they use.
def grouped_dtypes(family: str):
    return [pytest.param(k, marks=pytest.mark.xdist_group(f"{family}-{k}")) for k in DTYPES]


@pytest.fixture(autouse=True)
def _exact_fp32():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


def cuda_features(n, d, dtype, seed, **kw):
    return features(n, d, dtype=dtype, seed=seed, requires_grad=False, **kw).to(CUDA).requires_grad_(True)


def _labels(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed)).to(CUDA)


@pytest.mark.parametrize("dtype", grouped_dtypes("lse"))
@pytest.mark.parametrize("d", [67, 768])
@pytest.mark.parametrize("mode", ["diagonal", "same_label", "rows_scale"])
@pytest.mark.parametrize("deterministic", [None, False])
def test_similarity_lse_matches_reference(dtype, d, mode, deterministic):
    dt = DTYPES[dtype]
    n, m = 1000, 1531
    x = cuda_features(n, d, dt, 1, noncontig=mode == "rows_scale")
    y = cuda_features(m, d, dt, 2)
    kw = dict(exclude="diagonal", offset=3)
    s = torch.tensor(20.0, device=CUDA, requires_grad=True)
    if mode == "same_label":
        kw = dict(exclude="same_label", x_labels=_labels(n, 7, 3), y_labels=_labels(m, 7, 4))
    if mode == "rows_scale":
        s = (10.0 + torch.rand(n, device=CUDA)).requires_grad_(True)
    b = torch.tensor(0.5, device=CUDA, requires_grad=True)
    w = torch.rand(n + m, device=CUDA, dtype=torch.float64) + 0.5

    def fast(x, y, s, b):
        return torch.cat(ops.similarity_lse(x, y, s, b, backend="triton", deterministic=deterministic, **kw))

    def ref(x, y, s, b):
        return torch.cat(reference.similarity_lse(x, y, s, b, **kw))

    compare(fast, ref, [x, y, s, b], dt, f"similarity_lse {dtype} D={d} {mode}", weights=w)


@pytest.mark.parametrize("dtype", grouped_dtypes("sigmoid"))
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("deterministic", [None, False])
def test_pairwise_sigmoid_matches_reference(dtype, reduction, deterministic):
    dt = DTYPES[dtype]
    n, m, d = 1100, 937, 768
    x = cuda_features(n, d, dt, 5)
    y = cuda_features(m, d, dt, 6)
    s = torch.tensor(10.0, device=CUDA, requires_grad=True)
    b = torch.tensor(-10.0, device=CUDA, requires_grad=True)
    kw = dict(positives="same_label", x_labels=_labels(n, 50, 7), y_labels=_labels(m, 50, 8))

    def fast(x, y, s, b):
        return ops.pairwise_sigmoid(x, y, s, b, backend="triton", deterministic=deterministic,
                                    reduction=reduction, **kw)

    def ref(x, y, s, b):
        rows = reference.pairwise_sigmoid(x, y, s, b, **kw)
        return rows.sum() if reduction == "sum" else rows

    w = torch.rand(n, device=CUDA, dtype=torch.float64) + 0.5 if reduction == "none" else None
    compare(fast, ref, [x, y, s, b], dt, f"pairwise_sigmoid {dtype} {reduction}", weights=w)


@pytest.mark.parametrize("loss", ["clip", "siglip", "infonce"])
@pytest.mark.xdist_group("sigmoid-bf16")
def test_losses_bf16(loss):
    n, d = 2048, 512
    x, y = cuda_features(n, d, torch.bfloat16, 9), cuda_features(n, d, torch.bfloat16, 10)
    s = torch.tensor(30.0, device=CUDA, requires_grad=True)
    if loss == "clip":
        fast = lambda x, y, s: F.clip_loss(x, y, s, backend="triton")  # noqa: E731
        ref = lambda x, y, s: reference.clip_loss(x, y, s)  # noqa: E731
    elif loss == "siglip":
        fast = lambda x, y, s: F.siglip_loss(x, y, s, -10.0, backend="triton")  # noqa: E731
        ref = lambda x, y, s: reference.siglip_loss(x, y, s, -10.0)  # noqa: E731
    else:
        fast = lambda x, y, s: F.infonce_loss(x, y, s, backend="triton")  # noqa: E731
        ref = lambda x, y, s: reference.infonce_loss(x, y, s)  # noqa: E731
    compare(fast, ref, [x, y, s], torch.bfloat16, f"{loss} bf16")


@pytest.mark.xdist_group("lse-bf16")
def test_large_scale_unnormalised_bf16():
    x = cuda_features(700, 96, torch.bfloat16, 11, normalize=False, scale=3.0)
    y = cuda_features(900, 96, torch.bfloat16, 12, normalize=False, scale=3.0)
    row, col = ops.similarity_lse(x, y, 1000.0, exclude="diagonal", backend="triton")
    r, c = reference.similarity_lse(oracle(x), oracle(y), 1000.0, exclude="diagonal")
    assert_loss_close(row, r, torch.bfloat16, "row LSE at scale 1000")
    assert_loss_close(col, c, torch.bfloat16, "column LSE at scale 1000")


@pytest.mark.parametrize("dtype", grouped_dtypes("kl"))
@pytest.mark.parametrize("d_s,d_t", [(67, 130), (768, 512)])
@pytest.mark.parametrize("deterministic", [None, False])
def test_similarity_kl_matches_reference(dtype, d_s, d_t, deterministic):
    dt = DTYPES[dtype]
    n, m = N_KL, M_KL
    x_s = cuda_features(n, d_s, dt, 51, noncontig=True)
    y_s = cuda_features(m, d_s, dt, 52)
    x_t = features(n, d_t, dtype=dt, seed=53, requires_grad=False).to(CUDA)
    y_t = features(m, d_t, dtype=dt, seed=54, requires_grad=False).to(CUDA)
    s = torch.tensor(20.0, device=CUDA, requires_grad=True)
    w = torch.rand(n + m, device=CUDA, dtype=torch.float64) + 0.5
    for cross_entropy in (False, True):
        def fast(x_s, y_s, s):
            return torch.cat(ops.similarity_kl(x_s, y_s, x_t, y_t, s, 30.0, cross_entropy=cross_entropy,
                                               backend="triton", deterministic=deterministic))

        def ref(x_s, y_s, s):
            return torch.cat(reference.similarity_kl(x_s, y_s, oracle(x_t), oracle(y_t), s, 30.0,
                                                     cross_entropy=cross_entropy))

        compare(fast, ref, [x_s, y_s, s], dt, f"similarity_kl {dtype} D={d_s}/{d_t} ce={cross_entropy}",
                weights=w)


@pytest.mark.xdist_group("kl-bf16")
def test_similarity_kl_large_scale_unnormalised_bf16():
    big = dict(normalize=False, scale=3.0)
    x_s, y_s = cuda_features(700, 96, torch.bfloat16, 55, **big), cuda_features(900, 96, torch.bfloat16, 56, **big)
    x_t, y_t = (cuda_features(700, 64, torch.bfloat16, 57, **big).detach(),
                cuda_features(900, 64, torch.bfloat16, 58, **big).detach())
    for cross_entropy in (False, True):
        row, col = ops.similarity_kl(x_s, y_s, x_t, y_t, 1000.0, 1000.0, cross_entropy=cross_entropy,
                                     backend="triton")
        r, c = reference.similarity_kl(oracle(x_s), oracle(y_s), oracle(x_t), oracle(y_t), 1000.0, 1000.0,
                                       cross_entropy=cross_entropy)
        assert_loss_close(row, r, torch.bfloat16, f"KL rows at scale 1000 (cross_entropy={cross_entropy})")
        assert_loss_close(col, c, torch.bfloat16, f"KL columns at scale 1000 (cross_entropy={cross_entropy})")


@pytest.mark.xdist_group("lse-fp32")
def test_tf32_close_to_exact():
    # "high" precision: fp32 tiles go through TF32 tensor cores (10-bit mantissa products)
    x, y = cuda_features(1200, 768, torch.float32, 13), cuda_features(1300, 768, torch.float32, 14)
    exact = torch.cat(ops.similarity_lse(x, y, 20.0, backend="triton"))
    torch.set_float32_matmul_precision("high")
    tf32 = torch.cat(ops.similarity_lse(x, y, 20.0, backend="triton"))
    rel = ((tf32 - exact).abs() / exact.abs()).max().item()
    assert rel < 2e-3, f"TF32 LSE relative error {rel:.3g}"


def _fwd_bwd(fn, inputs):
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    w = torch.linspace(0.5, 1.5, out.numel(), device=CUDA).reshape(out.shape)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    return [out.detach()] + [g.detach() for g in grads]


@pytest.mark.parametrize("what", ["lse", "siglip_sum", "sigmoid_rows"])
@pytest.mark.xdist_group("sigmoid-bf16")
def test_default_mode_is_bitwise_deterministic(what):
    n, m, d = 8192, 8192 + 77, 768
    x, y = cuda_features(n, d, torch.bfloat16, 21), cuda_features(m, d, torch.bfloat16, 22)
    s = torch.tensor(25.0, device=CUDA, requires_grad=True)
    b = torch.tensor(-5.0, device=CUDA, requires_grad=True)
    if what == "lse":
        fn = lambda x, y, s, b: torch.cat(ops.similarity_lse(x, y, s, b, exclude="diagonal", backend="triton"))  # noqa: E731
    elif what == "siglip_sum":
        fn = lambda x, y, s, b: ops.pairwise_sigmoid(x, y, s, b, backend="triton", reduction="sum")  # noqa: E731
    else:
        fn = lambda x, y, s, b: ops.pairwise_sigmoid(x, y, s, b, backend="triton")  # noqa: E731
    first = _fwd_bwd(fn, [x, y, s, b])
    for _ in range(3):
        again = _fwd_bwd(fn, [x, y, s, b])
        for i, (a, e) in enumerate(zip(again, first)):
            assert torch.equal(a, e), f"{what}: output {i} differs between identical runs"


@pytest.mark.xdist_group("lse-bf16")
def test_64bit_offsets():
    # N·D = (2²¹ + 37)·1024 > 2³¹: row offsets of x overflow int32
    n, m, d = (1 << 21) + 37, 1999, 1024
    g = torch.Generator(device=CUDA).manual_seed(31)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=CUDA, generator=g), dim=1).to(torch.bfloat16)
    y = torch.nn.functional.normalize(torch.randn(m, d, device=CUDA, generator=g), dim=1).to(torch.bfloat16)
    assert n * d >= 2 ** 31
    x.requires_grad_(True)
    y.requires_grad_(True)
    results = {}
    for backend in ("triton", "torch"):
        row, col = ops.similarity_lse(x, y, 15.0, exclude="diagonal", offset=-(n - m), backend=backend)
        dx, dy = torch.autograd.grad(row.sum() + 2.0 * col.sum(), [x, y])
        total = ops.pairwise_sigmoid(x, y, 15.0, -8.0, backend=backend, reduction="sum")
        sx, sy = torch.autograd.grad(total, [x, y])
        results[backend] = (row.detach(), col.detach(), dx, dy, total.detach(), sx, sy)
        del row, col, dx, dy, total, sx, sy
    t, e = results["triton"], results["torch"]
    for i, name in ((0, "row LSE"), (1, "column LSE"), (4, "sigmoid total")):
        assert_loss_close(t[i], e[i], torch.bfloat16, f"N·D ≥ 2³¹: {name}")
    for i, name in ((2, "dx"), (3, "dy"), (5, "sigmoid dx"), (6, "sigmoid dy")):
        assert_grad_close(t[i].float(), e[i].float(), torch.bfloat16, f"N·D ≥ 2³¹: {name}")
    # the last rows (offsets beyond 2³¹ elements) are the ones int32 arithmetic would break
    assert_grad_close(t[2][-1000:].float(), e[2][-1000:].float(), torch.bfloat16, "dx, last rows")


@pytest.mark.xdist_group("lse-bf16")
def test_cuda_graph_capture_no_host_sync():
    n, d = 4096, 768
    x, y = cuda_features(n, d, torch.bfloat16, 41), cuda_features(n, d, torch.bfloat16, 42)
    s = torch.tensor(20.0, device=CUDA)

    def step():
        row, col = ops.similarity_lse(x, y, s, exclude="diagonal", backend="triton")
        total = ops.pairwise_sigmoid(x, y, s, -10.0, backend="triton", reduction="sum")
        return row, col, total

    with torch.no_grad():
        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up on the side stream (compiles, allocates)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    for a, e in zip(captured, eager):
        assert torch.equal(a, e)


@pytest.mark.xdist_group("autotune")
def test_autotune_env_runs_and_agrees():
    code = (
        "import torch; from mmloss import ops\n"
        "g = torch.Generator(device='cuda').manual_seed(0)\n"
        "x = torch.randn(3000, 256, device='cuda', generator=g).bfloat16().requires_grad_()\n"
        "y = torch.randn(2500, 256, device='cuda', generator=g).bfloat16().requires_grad_()\n"
        "r, c = ops.similarity_lse(x, y, 0.1, exclude='diagonal', backend='triton')\n"
        "dx, dy = torch.autograd.grad(r.sum() + c.sum(), [x, y])\n"
        "torch.save([t.detach().cpu() for t in (r, c, dx, dy)], __import__('sys').argv[1])\n"
    )
    outs = []
    for i, env_value in enumerate(("0", "1")):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mmloss_autotune_{os.getpid()}_{i}.pt")
        env = dict(os.environ, MMLOSS_TRITON_AUTOTUNE=env_value)
        subprocess.run([sys.executable, "-c", code, path], env=env, check=True, timeout=240, cwd=ROOT)
        outs.append(torch.load(path))
        os.unlink(path)
    for a, e, name in zip(outs[1], outs[0], ("row", "col", "dx", "dy")):
        if name in ("row", "col"):
            assert_loss_close(a, e.double(), torch.bfloat16, f"autotuned {name}")
        else:
            assert_grad_close(a.float(), e.float(), torch.bfloat16, f"autotuned {name}")


@pytest.mark.xdist_group("kl-bf16")
def test_similarity_kl_is_bitwise_deterministic():
    n, m = N_DET, N_DET + 77
    x, y = cuda_features(n, 768, torch.bfloat16, 61), cuda_features(m, 768, torch.bfloat16, 62)
    x_t, y_t = cuda_features(n, 512, torch.bfloat16, 63).detach(), cuda_features(m, 512, torch.bfloat16, 64).detach()
    s = torch.tensor(25.0, device=CUDA, requires_grad=True)

    def fn(x, y, s):
        return torch.cat(ops.similarity_kl(x, y, x_t, y_t, s, 30.0, cross_entropy=True, backend="triton"))

    first = _fwd_bwd(fn, [x, y, s])
    for _ in range(3):
        again = _fwd_bwd(fn, [x, y, s])
        for i, (a, e) in enumerate(zip(again, first)):
            assert torch.equal(a, e), f"similarity_kl: output {i} differs between identical runs"


@pytest.mark.xdist_group("kl-bf16")
def test_similarity_kl_cuda_graph_capture_no_host_sync():
    n, d = N_GRAPH, 768
    x, y = cuda_features(n, d, torch.bfloat16, 65), cuda_features(n, d, torch.bfloat16, 66)
    x_t, y_t = cuda_features(n, 512, torch.bfloat16, 67), cuda_features(n, 512, torch.bfloat16, 68)
    s = torch.tensor(20.0, device=CUDA)

    def step():
        return ops.similarity_kl(x, y, x_t, y_t, s, 30.0, cross_entropy=True, backend="triton")

    with torch.no_grad():
        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    for a, e in zip(captured, eager):
        assert torch.equal(a, e)
