"""Body of the spawned gloo ranks of test_gather.py (one spawn per world size, many checks each).

Every check compares, in float64, a distributed call on this rank's shard with one process on the
concatenated global batch (computed on every rank, it is cheap): the loss value on every rank, and
the DDP-averaged gradients (all-reduce, ÷ W, as DDP does) of small encoders (a Linear layer per
side applied to the inputs), of logit_scale and of logit_bias. Norm-wise error ≤ 1e-10·‖g‖; an
exactly-zero single-process gradient must stay exactly zero. Each rank writes rank<k>.json:
check name → None (passed) or the failure message; the parent asserts.
"""
from __future__ import annotations

import json
import math
import os
import traceback

import torch
import torch.nn.functional as F

import mmloss

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


def _slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start: start + sizes[rank]]


def _global_inputs(seed: int, n: int, m: int):
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


def _compare_grads(got, want, names):
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


def _compare_value(got, want, what="loss"):
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got - want).abs().max()) if got.numel() else 0.0
    if err > TOL * max(1.0, float(want.abs().max())):
        return f"{what}: value {got.tolist()} != single-process {want.tolist()} (err {err:.3e})"
    return None


def check_against_single(model_seed, data_seed, sizes_x, sizes_y, loss_call, rank, size, *, reduction="mean",
                         group=None, group_rank=None):
    """loss_call(model, x_inputs, y_inputs, dist_kwargs, part) → loss. ``part`` is None for the
    global (single-process) call, else this rank's index in the group (for sharded extras)."""
    group_rank = rank if group_rank is None else group_rank
    xin, yin = _global_inputs(data_seed, sum(sizes_x), sum(sizes_y))
    single = Towers(model_seed)
    want = loss_call(single, xin, yin, {}, None)
    (want.sum() if reduction == "none" else want).backward()
    want_grads = _grads(single)

    model = Towers(model_seed)
    got = loss_call(model, _slice(xin, sizes_x, group_rank), _slice(yin, sizes_y, group_rank),
                    dict(distributed="gather", group=group), group_rank)
    if reduction == "none":
        # this rank's terms of the global loss: compare with its slice of the single-process terms
        problem = _compare_value(got.detach(), _slice(want.detach(), sizes_x, group_rank), "terms")
        got.sum().backward()
    else:
        problem = _compare_value(got.detach(), want.detach())
        got.backward()
    if problem:
        return problem
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), _grads(model))]
    return _compare_grads(_ddp_average(grads, size, group), want_grads, _names(model))


# ----------------------------------------------------------------------------- cases


def _ids(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def loss_cases(size):
    """name → (sizes_x, sizes_y, loss_call, reduction)."""
    sx = SHARDS[size]
    n = sum(sx)
    sy_rect = tuple(s + 1 + (r % 2) for r, s in enumerate(sx))  # texts per rank differ from images
    m_rect = sum(sy_rect)
    labels = _ids(n, 3, 1)
    text_labels = _ids(m_rect, 3, 2)
    queue_gen = torch.Generator().manual_seed(3)
    queue = F.normalize(torch.randn(4, D_OUT, generator=queue_gen, dtype=DT), dim=1)
    queue_labels = _ids(4, 3, 4)
    targets = _ids(n, n + 4, 5)  # index the global keys followed by the queue
    soft = torch.softmax(torch.randn(n, n + 4, generator=queue_gen, dtype=DT), dim=1)

    def part(t, p, sizes=sx):
        return t if p is None else _slice(t, sizes, p)

    def clip(**extra):
        def call(model, xin, yin, kw, p):
            x, y, s, b = model(xin, yin)
            kwargs = dict(extra)
            if "labels" in kwargs:
                kwargs["labels"] = part(kwargs["labels"], p)
            return mmloss.clip_loss(x, y, s, b, **kwargs, **kw)
        return call

    def siglip(pair_labels=False, **extra):
        def call(model, xin, yin, kw, p):
            x, y, s, b = model(xin, yin)
            kwargs = dict(extra)
            if "labels" in kwargs:
                kwargs["labels"] = part(kwargs["labels"], p)
            if pair_labels:
                kwargs["labels"] = (part(labels, p), part(text_labels, p, sy_rect))
            return mmloss.siglip_loss(x, y, s, b, **kwargs, **kw)
        return call

    def infonce(mode, **extra):
        def call(model, xin, yin, kw, p):
            x, y, s, _ = model(xin, yin)
            kwargs = dict(extra)
            if mode == "targets":
                kwargs["targets"] = part(targets, p)
            elif mode == "labels":
                kwargs.update(query_labels=part(labels, p), key_labels=part(labels, p),
                              extra_key_labels=queue_labels)
            elif mode == "soft":
                kwargs["soft_targets"] = part(soft, p)
            return mmloss.infonce_loss(x, y, s, extra_keys=queue, **kwargs, **kw)
        return call

    def clip_module(model, xin, yin, kw, p):
        x, y, s, b = model(xin, yin)
        if p is None:
            return mmloss.ClipLoss(distributed=None)(x, y, s, b)
        return mmloss.ClipLoss(group=kw["group"])(x, y, s, b)  # the default: distributed="auto"

    def siglip_module(model, xin, yin, kw, p):
        x, y, s, b = model(xin, yin)
        if p is None:
            return mmloss.SigLipLoss(distributed=None)(x, y, s, b)
        return mmloss.SigLipLoss(dist_impl="reduce", group=kw["group"])(x, y, s, b)

    def infonce_module(model, xin, yin, kw, p):
        x, y, s, _ = model(xin, yin)
        return mmloss.InfoNCELoss(**kw)(x, y, s, extra_keys=queue)

    return {
        "clip": (sx, sx, clip(), "mean"),
        "clip/labels": (sx, sx, clip(labels=labels), "mean"),
        "clip/label_smoothing": (sx, sx, clip(label_smoothing=0.1), "mean"),
        "clip/labels+smoothing/sum": (sx, sx, clip(labels=labels, label_smoothing=0.2, reduction="sum"), "sum"),
        "clip/none": (sx, sx, clip(reduction="none"), "none"),
        "ClipLoss(default auto)": (sx, sx, clip_module, "mean"),
        "siglip": (sx, sx, siglip(), "mean"),
        "siglip/labels": (sx, sx, siglip(labels=labels), "mean"),
        "siglip/pair_labels(N!=M)": (sx, sy_rect, siglip(pair_labels=True), "mean"),
        "siglip/sum": (sx, sx, siglip(reduction="sum"), "sum"),
        "siglip/none": (sx, sx, siglip(reduction="none"), "none"),
        "SigLipLoss(dist_impl=reduce)": (sx, sx, siglip_module, "mean"),
        "infonce/default+queue": (sx, sx, infonce("default"), "mean"),
        "infonce/targets(global)+queue": (sx, sx, infonce("targets"), "mean"),
        "infonce/labels+queue": (sx, sx, infonce("labels"), "mean"),
        "infonce/soft_targets+queue/sum": (sx, sx, infonce("soft", reduction="sum"), "sum"),
        "infonce/none": (sx, sx, infonce("default", reduction="none"), "none"),
        "InfoNCELoss(gather)": (sx, sx, infonce_module, "mean"),
    }


# ----------------------------------------------------------------------------- DDP training


def ddp_training_check(rank, size, steps=5, lr=0.5):
    """5 SGD steps of the two towers under DistributedDataParallel with ``ClipLoss()`` (default
    "auto") on uneven shards; parameters must equal single-process training within 1e-10."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = SHARDS[size]
    single = Towers(11)
    local = DDP(Towers(11))
    opt_single = torch.optim.SGD(single.parameters(), lr=lr)
    opt_local = torch.optim.SGD(local.parameters(), lr=lr)
    loss_fn, ref_fn = mmloss.ClipLoss(), mmloss.ClipLoss(distributed=None)
    for step in range(steps):
        xin, yin = _global_inputs(100 + step, sum(sizes), sum(sizes))
        opt_single.zero_grad()
        ref = ref_fn(*single(xin, yin))
        ref.backward()
        opt_single.step()
        opt_local.zero_grad()
        got = loss_fn(*local(_slice(xin, sizes, rank), _slice(yin, sizes, rank)))
        got.backward()
        opt_local.step()
        problem = _compare_value(got.detach(), ref.detach(), f"step {step} loss")
        if problem:
            return problem
    for (name, p), q in zip(local.module.named_parameters(), single.parameters()):
        err = float((p - q).detach().norm())
        if err > TOL * float(q.detach().norm()):
            return f"after {steps} DDP steps {name} differs: {err:.3e} > 1e-10·‖p‖"
    return None


# ----------------------------------------------------------------------------- open_clip parity


def open_clip_parity(rank, size, open_clip_path):
    """Equal shards: mmloss ClipLoss(local_loss=L, gather_with_grad=True, rank, world_size) gives
    open_clip's per-rank loss and per-rank gradients (features and logit_scale)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_open_clip_loss", open_clip_path)
    oc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oc)
    out = {}
    g = torch.Generator().manual_seed(21)
    n = 3
    xg = F.normalize(torch.randn(n * size, D_OUT, generator=g, dtype=DT), dim=1)
    yg = F.normalize(torch.randn(n * size, D_OUT, generator=g, dtype=DT), dim=1)
    for local_loss in (False, True):
        results = []
        for make in (lambda: oc.ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=size),
                     lambda: mmloss.ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank,
                                             world_size=size)):
            x = xg[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            y = yg[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            s = torch.tensor(7.0, dtype=DT, requires_grad=True)
            loss = make()(x, y, s)
            loss.backward()
            results.append((loss.detach(), x.grad, y.grad, s.grad))
        (l0, *g0), (l1, *g1) = results
        problem = _compare_value(l1, l0, "per-rank loss")
        if not problem:
            problem = _compare_grads(list(g1), list(g0), ["image_features", "text_features", "logit_scale"])
        out[f"open_clip parity local_loss={local_loss}"] = problem
    return out


# ----------------------------------------------------------------------------- bad setups


def error_checks(rank, size):
    """Clear errors, raised on every rank (no rank left waiting in a collective)."""
    import torch.distributed as dist

    out = {}

    def expect(name, call, exc, *words):
        try:
            call()
        except exc as e:
            msg = str(e)
            missing = [w for w in words if w.lower() not in msg.lower()]
            out[name] = f"message lacks {missing}: {msg}" if missing else None
        except Exception as e:  # the wrong type
            out[name] = f"{type(e).__name__} instead of {exc.__name__}: {e}"
        else:
            out[name] = "no error"

    g = torch.Generator().manual_seed(rank)
    d = 4 if rank == 0 else 5
    x = torch.randn(2, d, generator=g, dtype=DT)
    expect("mismatched D", lambda: mmloss.clip_loss(x, x, 5.0, distributed="gather"), ValueError,
           "feature dimension", "rank 0: 4", "rank 1: 5")
    xt = torch.randn(2, 5, generator=g, dtype=torch.float64 if rank == 0 else torch.float32)
    expect("mismatched dtype", lambda: mmloss.siglip_loss(xt, xt, 5.0, -1.0, distributed="gather"), ValueError,
           "dtype", "float64", "float32")
    y = torch.randn(2, 5, generator=g, dtype=DT)
    expect("ring", lambda: mmloss.clip_loss(y, y, 5.0, distributed="ring"), ValueError, "ring", "not available")
    expect("SigLipLoss bidir", lambda: mmloss.SigLipLoss(dist_impl="bidir")(y, y, 5.0, -1.0), ValueError,
           "bidir", "ring", "not available")
    expect("world_size disagrees", lambda: mmloss.ClipLoss(world_size=size + 1)(y, y, 5.0), ValueError,
           f"world_size={size + 1}", f"world size {size}")
    subgroup = dist.new_group([0])  # a collective: every rank creates it
    if rank != 0:
        expect("not in group", lambda: mmloss.clip_loss(y, y, 5.0, distributed="gather", group=subgroup),
               RuntimeError, "not a member")
    else:  # a group of size 1: gathering is the local loss
        got = mmloss.clip_loss(y, y, 5.0, distributed="gather", group=subgroup)
        out["group of one"] = _compare_value(got, mmloss.clip_loss(y, y, 5.0))
    dist.barrier()
    return out


def subgroup_check(rank, size):
    """Any process group: ranks 1..W-1 form a group, rank 0 stays out; within it the loss and the
    averaged gradients equal one process on the group's batch."""
    import torch.distributed as dist

    members = list(range(1, size))
    group = dist.new_group(members)
    if rank == 0:
        return {}
    sizes = SHARDS[size][1:]
    calls = loss_cases(size)
    out = {}
    for name in ("clip", "siglip"):
        _, _, call, reduction = calls[name]
        out[f"subgroup {members}: {name}"] = check_against_single(
            7, 8, sizes, sizes, call, rank, len(members), reduction=reduction, group=group,
            group_rank=rank - 1)
    return out


def extra_keys_check():
    """Single process: extra_keys equal appending them to keys (and their labels to key_labels)."""
    g = torch.Generator().manual_seed(9)
    x, y, q = (torch.randn(r, 4, generator=g, dtype=DT) for r in (5, 6, 3))
    ql, kl, el = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 0, 1])
    t = torch.tensor([0, 7, 2, 8, 4])
    keys = torch.cat([y, q])
    pairs = [
        (mmloss.infonce_loss(x, y, 3.0, extra_keys=q), mmloss.infonce_loss(x, keys, 3.0)),
        (mmloss.infonce_loss(x, y, 3.0, extra_keys=q, targets=t), mmloss.infonce_loss(x, keys, 3.0, targets=t)),
        (mmloss.infonce_loss(x, y, 3.0, extra_keys=q, query_labels=ql, key_labels=kl, extra_key_labels=el),
         mmloss.infonce_loss(x, keys, 3.0, query_labels=ql, key_labels=torch.cat([kl, el]))),
    ]
    for k, (got, want) in enumerate(pairs):
        problem = _compare_value(got, want, f"extra_keys case {k}")
        if problem:
            return problem
    return None


def worker(rank: int, size: int, init_file: str, result_dir: str, open_clip_path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    results = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception:
            results[name] = traceback.format_exc(limit=6)

    try:
        for k, (name, (sx, sy, call, reduction)) in enumerate(loss_cases(size).items()):
            run(name, lambda: check_against_single(1 + k, 50 + k, sx, sy, call, rank, size, reduction=reduction))
        run("extra_keys = appended keys (single process)", extra_keys_check)
        run("DDP training (5 SGD steps, ClipLoss())", lambda: ddp_training_check(rank, size))
        try:
            results.update(subgroup_check(rank, size))
        except Exception:
            results["subgroup"] = traceback.format_exc(limit=6)
        if size == 2:
            try:
                results.update(error_checks(rank, size))
            except Exception:
                results["error checks"] = traceback.format_exc(limit=6)
            if open_clip_path:
                try:
                    results.update(open_clip_parity(rank, size, open_clip_path))
                except Exception:
                    results["open_clip parity"] = traceback.format_exc(limit=6)
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(results, fh)
    finally:
        dist.destroy_process_group()
