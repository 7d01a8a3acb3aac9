"""Published figures of the GPUs the performance model (``python -m mmloss.bench --model``)
knows. Peak FLOP/s are NVIDIA's dense (no 2:4 sparsity) tensor-core figures for the SXM boards;
bandwidths NVIDIA's HBM figures. L2 bandwidth is not published: the values below are ESTIMATES
(stated as such wherever they are printed), as is the gap between dependent kernel launches.

Sources:
- H100 SXM: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): FP16/BF16
  1,979 TFLOP/s with sparsity → 989 dense; TF32 989 with sparsity → 494 dense; FP32 67 TFLOP/s;
  HBM3 3.35 TB/s. NVIDIA H100 whitepaper ("NVIDIA H100 Tensor Core GPU Architecture"): 132 SMs on
  the SXM5 board, 50 MB L2.
- H200 SXM: NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): the same compute figures
  as H100 SXM (989 dense BF16), HBM3e 4.8 TB/s, 141 GB; the same GH100 die (132 SMs, 50 MB L2).
- A100 SXM4 80 GB: NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16/FP16 312
  TFLOP/s dense, TF32 156 dense, FP32 19.5; HBM2e 2,039 GB/s (taken as 2.0 TB/s). A100 whitepaper
  ("NVIDIA A100 Tensor Core GPU Architecture"): 108 SMs, 40 MB L2, L2 read bandwidth 5,120
  bytes/clock (7.2 TB/s at 1.41 GHz).
- L2 bandwidth estimates: A100 ≈ 5.0 TB/s (≈ 70 % of the whitepaper's 7.2 TB/s peak, what
  microbenchmarks typically reach); H100/H200 SXM ≈ 7.0 TB/s (Chips and Cheese measured ≈ 5.5
  TB/s on an H100 PCIe — 114 SMs at ≤ 1.755 GHz —, scaled to 132 SMs at the SXM clock; the
  commonly quoted figure is "~7 TB/s"). Change ``l2_bw`` here once a GPU run measures it.
- Launch gap ≈ 2 µs per dependent kernel (ESTIMATE: launch latency plus the tail of the previous
  kernel on a busy stream; eager launches are assumed queued ahead of the GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TERA = 1e12


@dataclass(frozen=True)
class Device:
    name: str
    arch: str                 # the triton tile-table row (mmloss/ops/triton/_config.py)
    sms: int
    bf16_flops: float         # dense tensor-core FLOP/s (fp16 the same)
    tf32_flops: float         # dense tensor-core FLOP/s
    fp32_flops: float         # FMA units, no tensor cores (fp32 matmuls at "highest" precision)
    hbm_bw: float             # bytes/s, published
    l2_bw: float              # bytes/s, ESTIMATE
    l2_bytes: int
    launch_gap_s: float = 2e-6  # ESTIMATE

    def peak_flops(self, operand_dtype: torch.dtype, fp32_exact: bool) -> float:
        """Peak FLOP/s of a GEMM on operands of ``operand_dtype``: tensor cores for half
        precision, TF32 tensor cores or the FMA units for fp32 (``fp32_exact``: torch's
        "highest" fp32 matmul precision)."""
        if operand_dtype in (torch.float16, torch.bfloat16):
            return self.bf16_flops
        if operand_dtype == torch.float32:
            return self.fp32_flops if fp32_exact else self.tf32_flops
        return self.fp32_flops / 2  # fp64 and anything else: far from the peak; never the fast path


DEVICES = {
    "h100": Device("H100 SXM", "sm90", 132, 989 * TERA, 494 * TERA, 67 * TERA, 3.35 * TERA, 7.0 * TERA, 50 << 20),
    "h200": Device("H200 SXM", "sm90", 132, 989 * TERA, 494 * TERA, 67 * TERA, 4.8 * TERA, 7.0 * TERA, 50 << 20),
    "a100": Device("A100 SXM4 80GB", "sm80", 108, 312 * TERA, 156 * TERA, 19.5 * TERA, 2.0 * TERA, 5.0 * TERA,
                   40 << 20),
}


def device_for_gpu_name(name: str) -> str:
    """The table key for a CUDA device name (e.g. "NVIDIA H200"), "h100" when unknown."""
    lower = name.lower()
    for key in ("h200", "a100", "h100"):
        if key in lower:
            return key
    return "h100"
