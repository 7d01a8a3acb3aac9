"""The losses the benchmark knows: inputs, the mmloss call, the dense baseline and the floor.

Each ``LossCase`` states the similarity matrix it implies (B×B for CLIP and SigLIP, 2B×2B for
NT-Xent, n×n for SupCon), how many (N×D)·(D×M) products its floor holds (docs/design.md,
"Benchmarks and measurement": 4 for a softmax loss with both directions, 3 for a sigmoid loss or
a symmetric self-similarity loss) and a simple dense torch implementation — the "dense
baseline" peer: the logits matrix, then ``F.cross_entropy`` / ``F.logsigmoid``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import mmloss

Tensor = torch.Tensor

# Constants every implementation receives (the usual initialisations).
CLIP_SCALE = 1.0 / 0.07  # open_clip's logit_scale.exp() at init
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # docs/losses.md §3 init conventions
NTXENT_TEMPERATURE = 0.5  # lightly's default (docs/losses.md §4)
SUPCON_TEMPERATURE = 0.1  # docs/losses.md §5 default


@dataclass
class Inputs:
    """One configuration's inputs, created before any measurement.

    ``leaves`` are the feature tensors (leaves requiring grad, rows L2-normalised as a model's
    projection head emits them); ``scale``/``bias`` are 0-d tensors on the device (no grad);
    ``labels`` is used by SupCon only.
    """

    batch: int
    leaves: tuple
    scale: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    temperature: float = 1.0
    labels: Optional[Tensor] = None

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def grads(self) -> list:
        return [t.grad for t in self.leaves]


def _features(rows: int, dim: int, dtype, device, generator) -> Tensor:
    t = torch.randn(rows, dim, generator=generator, dtype=torch.float32)
    t = F.normalize(t, dim=1).to(device=device, dtype=dtype)
    return t.requires_grad_()


def _scalar(value: float, device) -> Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class LossCase:
    """A loss the benchmark sweeps (see the module docstring)."""

    name: str
    title: str
    mmloss_name: str  # attribute of mmloss (functional API)
    floor_gemms: int
    rows_per_batch: int  # similarity rows per batch element (2 for NT-Xent's two views)
    make: Callable
    call: Callable  # (mmloss function, inputs, backend) -> loss
    dense: Callable  # (*dense_args(inputs)) -> loss; tensors and numbers only, so torch.compile traces it
    dense_args: Callable  # (inputs) -> tuple
    floor_operands: Callable  # (inputs) -> (A (rows×D), B (cols×D)), detached
    note: str = ""  # printed under the table title

    def similarity_shape(self, batch: int) -> tuple[int, int]:
        n = batch * self.rows_per_batch
        return n, n

    def useful_flops(self, batch: int, dim: int) -> float:
        """6·N·M·D: three GEMM-equivalents (logits, and the two operand gradients)."""
        n, m = self.similarity_shape(batch)
        return 6.0 * n * m * dim

    def mmloss_function(self) -> Optional[Callable]:
        return getattr(mmloss, self.mmloss_name, None)

    def make_inputs(self, batch: int, dim: int, dtype, device, seed: int = 0) -> Inputs:
        generator = torch.Generator().manual_seed(seed)
        return self.make(batch, dim, dtype, torch.device(device), generator)


# ----------------------------------------------------------------------------- CLIP (§1)


def _make_pair(batch, dim, dtype, device, generator, scale, bias=None):
    x = _features(batch, dim, dtype, device, generator)
    y = _features(batch, dim, dtype, device, generator)
    return Inputs(batch, (x, y), _scalar(scale, device), None if bias is None else _scalar(bias, device))


def _dense_clip(x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    logits = scale * x @ y.T
    targets = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


CLIP = LossCase(
    name="clip",
    title="CLIP (symmetric InfoNCE, docs/losses.md §1)",
    mmloss_name="clip_loss",
    floor_gemms=4,
    rows_per_batch=1,
    make=lambda b, d, dt, dev, g: _make_pair(b, d, dt, dev, g, CLIP_SCALE),
    call=lambda fn, inp, backend: fn(*inp.leaves, inp.scale, backend=backend),
    dense=_dense_clip,
    dense_args=lambda inp: (*inp.leaves, inp.scale),
    floor_operands=lambda inp: (inp.leaves[0].detach(), inp.leaves[1].detach()),
)


# ----------------------------------------------------------------------------- SigLIP (§3)


def _dense_siglip(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    n = x.shape[0]
    logits = scale * x @ y.T + bias
    signs = 2.0 * torch.eye(n, device=x.device, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(signs * logits).sum() / n


SIGLIP = LossCase(
    name="siglip",
    title="SigLIP (pairwise sigmoid, docs/losses.md §3)",
    mmloss_name="siglip_loss",
    floor_gemms=3,
    rows_per_batch=1,
    make=lambda b, d, dt, dev, g: _make_pair(b, d, dt, dev, g, SIGLIP_SCALE, SIGLIP_BIAS),
    call=lambda fn, inp, backend: fn(*inp.leaves, inp.scale, inp.bias, backend=backend),
    dense=_dense_siglip,
    dense_args=lambda inp: (*inp.leaves, inp.scale, inp.bias),
    floor_operands=lambda inp: (inp.leaves[0].detach(), inp.leaves[1].detach()),
    note="mmloss forms SigLIP's gradients inside the loss call (its upstream gradient is one scalar), "
         "so its forward column holds most of its work: compare totals",
)


# ----------------------------------------------------------------------------- NT-Xent (§4)


def _make_views(batch, dim, dtype, device, generator):
    out0 = _features(batch, dim, dtype, device, generator)
    out1 = _features(batch, dim, dtype, device, generator)
    return Inputs(batch, (out0, out1), temperature=NTXENT_TEMPERATURE)


def _dense_ntxent(out0: Tensor, out1: Tensor, temperature: float) -> Tensor:
    n = out0.shape[0]
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    sim = (z @ z.T) / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_pairs, float("-inf"))
    idx = torch.arange(n, device=z.device)
    targets = torch.cat([idx + n, idx])
    return F.cross_entropy(sim, targets)


def _cat_floor(inp: Inputs):
    z = torch.cat([t.detach() for t in inp.leaves])
    return z, z


NTXENT = LossCase(
    name="ntxent",
    title="NT-Xent (SimCLR, docs/losses.md §4)",
    mmloss_name="ntxent_loss",
    floor_gemms=3,
    rows_per_batch=2,
    make=_make_views,
    call=lambda fn, inp, backend: fn(*inp.leaves, temperature=inp.temperature, backend=backend),
    dense=_dense_ntxent,
    dense_args=lambda inp: (*inp.leaves, inp.temperature),
    floor_operands=_cat_floor,
)


# ----------------------------------------------------------------------------- SupCon (§5)


def _make_supcon(batch, dim, dtype, device, generator):
    emb = _features(batch, dim, dtype, device, generator)
    # Classes of 4 members: every anchor has positives (pytorch-metric-learning call style).
    classes = max(1, batch // 4)
    labels = (torch.arange(batch) % classes).to(device)
    return Inputs(batch, (emb,), temperature=SUPCON_TEMPERATURE, labels=labels)


def _dense_supcon(emb: Tensor, labels: Tensor, temperature: float) -> Tensor:
    z = F.normalize(emb, dim=1)
    sim = (z @ z.T) / temperature
    n = z.shape[0]
    self_pairs = torch.eye(n, dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(sim.masked_fill(self_pairs, float("-inf")), dim=1)
    positives = (labels[:, None] == labels[None, :]) & ~self_pairs
    counts = positives.sum(dim=1)
    mean_positive = (sim * positives).sum(dim=1) / counts.clamp(min=1)
    keep = counts > 0
    return (lse - mean_positive)[keep].mean()


SUPCON = LossCase(
    name="supcon",
    title="SupCon (L_out, docs/losses.md §5)",
    mmloss_name="supcon_loss",
    floor_gemms=3,
    rows_per_batch=1,
    make=_make_supcon,
    call=lambda fn, inp, backend: fn(inp.leaves[0], inp.labels, temperature=inp.temperature, backend=backend),
    dense=_dense_supcon,
    dense_args=lambda inp: (inp.leaves[0], inp.labels, inp.temperature),
    floor_operands=lambda inp: (inp.leaves[0].detach(), inp.leaves[0].detach()),
)


# ----------------------------------------------------------------------------- similarity_lse


def _dense_lse(x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    logits = scale * x @ y.T
    diagonal = torch.eye(x.shape[0], y.shape[0], dtype=torch.bool, device=x.device)
    logits = logits.masked_fill(diagonal, float("-inf"))
    return 0.5 * (torch.logsumexp(logits, dim=1).mean() + torch.logsumexp(logits, dim=0).mean())


def _mmloss_lse(fn, inp: Inputs, backend: str) -> Tensor:
    row, col = fn(*inp.leaves, inp.scale, exclude="diagonal", backend=backend)
    return 0.5 * (row.mean() + col.mean())


# The primitive alone: what mmloss adds around its GEMMs (host time of the op layer, elementwise
# passes) shows as its total minus the floor row's (the 4 products of the same shapes).
LSE = LossCase(
    name="lse",
    title="similarity_lse (the primitive: row and column LSE, diagonal excluded)",
    mmloss_name="similarity_lse",
    floor_gemms=4,
    rows_per_batch=1,
    make=lambda b, d, dt, dev, g: _make_pair(b, d, dt, dev, g, CLIP_SCALE),
    call=_mmloss_lse,
    dense=_dense_lse,
    dense_args=lambda inp: (*inp.leaves, inp.scale),
    floor_operands=lambda inp: (inp.leaves[0].detach(), inp.leaves[1].detach()),
    note="loss = ½·(mean row LSE + mean column LSE); time above the GEMMs = total − the floor row's total",
)


CASES = {case.name: case for case in (CLIP, SIGLIP, NTXENT, SUPCON, LSE)}
DEFAULT_LOSSES = ("clip", "siglip", "ntxent")


def fp32_logits_mib(batch: int) -> float:
    """MiB of an N×N fp32 logit matrix (the dense baseline's floor on memory)."""
    return batch * batch * 4 / 2**20


def describe_flop_model() -> str:
    return ("useful FLOPs per loss = 6·N·M·D (three GEMM-equivalents: logits, d/dx, d/dy); "
            "N×M is the similarity matrix: B×B for CLIP/SigLIP/SupCon, 2B×2B for NT-Xent")

