"""Shared harness of the spawned gloo ranks (tests/distributed/_gather_worker.py runs it).

Every check compares, in float64, a distributed call on this rank's shard with one process on the
concatenated global batch (computed on every rank, it is cheap): the loss value on every rank, and
the DDP-averaged gradients (all-reduce, ÷ W, as DDP does) of small encoders (a Linear layer per
side applied to the inputs), of logit_scale and of logit_bias. Norm-wise error ≤ 1e-10·‖g‖; an
exactly-zero single-process gradient must stay exactly zero.

A case module (cases_*.py, listed in _gather_worker.CASE_MODULES) defines ``loss_cases(size)``:
name → (sizes_x, sizes_y, loss_call, reduction), where ``loss_call(model, x_inputs, y_inputs,
dist_kwargs, part)`` returns the loss; ``part`` is None for the single-process call on the global
batch, else this rank's index in the group (to slice per-row extras such as labels with
``part_of``); ``dist_kwargs`` is {} for the single-process call and
``dict(distributed="gather", group=...)`` otherwise (a case may replace "gather" by another mode).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


DT = torch.float64
TOL = 1e-10
D_IN_X, D_IN_Y, D_OUT = 6, 7, 5

# Uneven per-rank row counts (one rank holds a single row).
SHARDS = {2: (1, 4), 3: (3, 1, 2), 4: (2, 1, 3, 2)}


class Towers(torch.nn.Module):
    """Two Linear encoders plus a learnable log-scale and bias (float64)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image = torch.nn.Linear(D_IN_X, D_OUT).to(DT)
        self.text = torch.nn.Linear(D_IN_Y, D_OUT).to(DT)
        with torch.no_grad():
            for p in list(self.image.parameters()) + list(self.text.parameters()):
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(5.0), dtype=DT))
        self.bias = torch.nn.Parameter(torch.tensor(-1.0, dtype=DT))

    def forward(self, image_inputs, text_inputs):
        x = F.normalize(self.image(image_inputs), dim=1)
        y = F.normalize(self.text(text_inputs), dim=1)
        return x, y, self.log_scale.exp(), self.bias


def slice_rows(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start: start + sizes[rank]]


def global_inputs(seed: int, n: int, m: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D_IN_X, generator=g, dtype=DT), torch.randn(m, D_IN_Y, generator=g, dtype=DT))


def _grads(model: Towers):
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _names(model):
    return [name for name, _ in model.named_parameters()]


def _ddp_average(grads, size, group=None):
    import torch.distributed as dist

    out = []
    for g in grads:
        g = g.clone()
        dist.all_reduce(g, group=group)
        out.append(g / size)
    return out


def compare_grads(got, want, names):
    for name, g, w in zip(names, got, want):
        w = torch.zeros_like(g) if w is None else w
        if bool((w == 0).all()):
            if not bool((g == 0).all()):
                return f"{name}: single-process gradient is exactly 0, distributed max |g| = {g.abs().max():.3e}"
            continue
        err = float((g - w).norm())
        if err > TOL * float(w.norm()):
            return f"{name}: gradient error {err:.3e} > {TOL:g}·‖g‖ = {TOL * float(w.norm()):.3e}"
    return None


def compare_value(got, want, what="loss"):
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got - want).abs().max()) if got.numel() else 0.0
    if err > TOL * max(1.0, float(want.abs().max())):
        return f"{what}: value {got.tolist()} != single-process {want.tolist()} (err {err:.3e})"
    return None


def ids(n, classes, seed):
    """n integer labels in [0, classes), reproducible."""
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def part_of(t, part, sizes):
    """``t`` itself for the single-process call (part None), else rank ``part``'s rows."""
    return t if part is None else slice_rows(t, sizes, part)


def check_against_single(model_seed, data_seed, sizes_x, sizes_y, loss_call, rank, size, *, reduction="mean",
                         group=None, group_rank=None, mode="gather"):
    """loss_call(model, x_inputs, y_inputs, dist_kwargs, part) → loss. ``part`` is None for the
    global (single-process) call, else this rank's index in the group (for sharded extras)."""
    group_rank = rank if group_rank is None else group_rank
    xin, yin = global_inputs(data_seed, sum(sizes_x), sum(sizes_y))
    single = Towers(model_seed)
    want = loss_call(single, xin, yin, {}, None)
    (want.sum() if reduction == "none" else want).backward()
    want_grads = _grads(single)

    model = Towers(model_seed)
    got = loss_call(model, slice_rows(xin, sizes_x, group_rank), slice_rows(yin, sizes_y, group_rank),
                    dict(distributed=mode, group=group), group_rank)
    if reduction == "none":
        # this rank's terms of the global loss: compare with its slice of the single-process terms
        problem = compare_value(got.detach(), slice_rows(want.detach(), sizes_x, group_rank), "terms")
        got.sum().backward()
    else:
        problem = compare_value(got.detach(), want.detach())
        got.backward()
    # The gradient all-reduce runs on every rank even when this rank's value is already wrong:
    # returning early would leave the other ranks waiting in the collective until the timeout.
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), _grads(model))]
    averaged = _ddp_average(grads, size, group)
    return problem or compare_grads(averaged, want_grads, _names(model))





def spawn_ranks(worker, size: int, tmp, *extra, what: str = "gloo run", limit_s: float = 150) -> list:
    """Run ``worker(rank, size, rendezvous_file, result_dir, *extra)`` in ``size`` spawned
    processes; each writes ``rank<k>.json`` into ``tmp``. Kills them and fails the test after
    ``limit_s``. Returns the ranks' JSON results in rank order."""
    import json
    import time

    import pytest

    context = torch.multiprocessing.start_processes(
        worker, args=(size, str(tmp / "rendezvous"), str(tmp), *extra), nprocs=size, join=False,
        start_method="spawn")
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {size}-process {what} did not finish within {limit_s:.0f} s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(size)]
