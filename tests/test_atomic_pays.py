"""``atomic_pays`` weighs the atomic read-modify-write traffic of dy, not only GEMM work
(issue 11): pure host arithmetic on the tile table and the device figures (no GPU)."""
import pytest
import torch

from mmloss.ops.triton import _config
from mmloss.ops.triton import _launch as L


def cost(arch, dtype, n, d, recompute=1.0, n_b=None, figures=None):
    n_b = n if n_b is None else n_b
    owner_t, atomic_t = (_config.table_tiles(arch, dtype, k) for k in ("owner", "atomic"))
    s_owner, s_atomic = (L.owner_plan(n, n_b, d, t, True, L.SPLIT_ALIGN, 1).slices for t in (owner_t, atomic_t))
    fig = _config.FIGURES[arch] if figures is None else figures
    return L.atomic_pass_cost(n, n_b, d, owner_slices=s_owner, atomic_slices=s_atomic,
                              atomic_block_a=atomic_t.block_a, figures=fig,
                              flops=fig.gemm_flops(dtype, False), recompute=recompute)


def test_atomic_bytes_count_one_rmw_per_a_block_and_element():
    # 64-row A blocks: 512 of them at N = 32768, each adds into all M × D fp32 elements of dy
    assert L.atomic_bytes(32768, 32768, 768, 64) == 512 * 32768 * 768 * 8
    # a ragged last block adds as much as a full one (its tiles are masked by B rows and D only)
    assert L.atomic_bytes(65, 100, 16, 64) == 2 * 100 * 16 * 8


def test_without_figures_only_gemm_work_counts():
    # the interpreter: the rule before issue 11 (s_atomic + 2 against 2·(s_owner + 1))
    owner, atomic = L.atomic_pass_cost(1000, 1000, 64, owner_slices=2, atomic_slices=3, atomic_block_a=16,
                                       figures=None)
    assert (owner, atomic) == (6.0, 5.0)


def test_traffic_in_gemm_equivalents():
    # H100 bf16, dy of 32768 × 768 fp32 = 96 MiB > 50 MiB of L2: the RMWs go to HBM.
    # traffic / GEMM-equivalent = (N/64·M·D·8 B / 3.35 TB/s) / (2·N·M·D / 989 TFLOP/s) = 4·989/(64·3.35)
    owner, atomic = cost("sm90", torch.bfloat16, 32768, 768)
    s_owner, s_atomic = 2, 3  # 2 slices of 3×128 (owner), 3 of 4×64 (atomic)
    assert owner == 2 * (s_owner + 1)
    assert atomic == pytest.approx(s_atomic + 2 + 4 * 989 / (64 * 3.35))
    # a dy that fits the L2 (M·D·4 ≤ 50 MiB) is charged at the (estimated) L2 bandwidth
    owner, atomic = cost("sm90", torch.bfloat16, 32768, 128)
    assert atomic == pytest.approx(1 + 2 + 4 * 989 / (64 * 7.0))


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [128, 512, 768, 1024])
def test_atomics_pay_for_clip_or_siglip_only_where_owners_need_many_slices(arch, dtype, d):
    # saving one logit recompute does not pay for N/64 read-modify-writes of all of dy — except
    # on sm_80 fp32 at D ≥ 768, where the spill-free owner holds only 128 columns (2 chunks of
    # 64), so the deterministic pair of passes recomputes the tile 2·6 or 2·8 times
    owner, atomic = cost(arch, dtype, 32768, d)
    many_slices = arch == "sm80" and dtype == torch.float32 and d >= 768
    assert (atomic < owner) == many_slices, (owner, atomic)


def test_atomics_pay_when_the_saved_recomputes_are_expensive():
    # similarity_kl with D_t = 8·D_s: each owner pass recomputes the teacher's tile as well, and
    # the saved column pass outweighs the atomic traffic of a narrow (L2-resident) dy. D = 64:
    # one slice for both kinds (the sm_80 atomic owner holds 2 chunks of 32 since its spill fix,
    # so at D = 128 it needs a second slice, which costs another 9 recomputes)
    owner, atomic = cost("sm80", torch.bfloat16, 32768, 64, recompute=9.0)
    assert atomic < owner


def test_more_bandwidth_or_fewer_flops_favours_atomics():
    base = _config.FIGURES["sm90"]
    fast_memory = _config.DeviceFigures(base.half_flops, base.tf32_flops, base.fp32_flops, 100 * base.hbm_bw,
                                        100 * base.l2_bw, base.l2_bytes)
    owner, atomic = cost("sm90", torch.bfloat16, 32768, 768, figures=fast_memory)
    assert atomic < owner  # 3 + 2 + 0.18 < 6: with nearly free atomics the GEMM count decides
    _, slow = cost("sm90", torch.bfloat16, 32768, 768)
    assert slow > atomic


def test_atomic_pass_pays_reads_the_device_row(monkeypatch):
    # the interpreter row has no figures: GEMM work alone decides, so its tests keep exercising
    # the atomic kernels; a GPU row weighs the traffic
    t = _config.table_tiles("interpret", torch.float32, "owner")
    assert L.atomic_pass_pays(40, 40, 64, t, t, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(_config, "arch_key", lambda device: "sm90")
    owner_t, atomic_t = (_config.table_tiles("sm90", torch.bfloat16, k) for k in ("owner", "atomic"))
    assert not L.atomic_pass_pays(32768, 32768, 768, owner_t, atomic_t, torch.device("meta"), torch.bfloat16)
    assert L.atomic_pass_pays(32768, 32768, 128, owner_t, atomic_t, torch.device("meta"), torch.bfloat16,
                              recompute=9.0)


def test_exact_fp32_is_charged_at_the_fma_rate():
    fig = _config.FIGURES["sm90"]
    assert fig.gemm_flops(torch.float32, True) == fig.fp32_flops
    assert fig.gemm_flops(torch.float32, False) == fig.tf32_flops
    assert fig.gemm_flops(torch.float16, True) == fig.half_flops


def test_figures_match_the_performance_model():
    devices = pytest.importorskip("mmloss.bench.devices", reason="mmloss.bench (the performance model)")
    for arch, key in (("sm90", "h100"), ("sm80", "a100")):
        fig, dev = _config.FIGURES[arch], devices.DEVICES[key]
        assert (fig.half_flops, fig.tf32_flops, fig.fp32_flops, fig.hbm_bw, fig.l2_bw) == (
            dev.bf16_flops, dev.tf32_flops, dev.fp32_flops, dev.hbm_bw, dev.l2_bw)
