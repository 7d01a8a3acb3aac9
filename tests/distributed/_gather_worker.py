"""Body of the spawned gloo ranks of test_gather.py (one spawn per world size, many checks each).

Runs every case of the case modules in CASE_MODULES through harness.check_against_single, then
the DDP training run, the subgroup and (at world size 2) the bad-setup and open_clip checks. Each
rank writes rank<k>.json: check name → None (passed) or the failure message; the parent asserts.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import traceback

import torch
import torch.nn.functional as F

import mmloss
from harness import (D_OUT, DT, SHARDS, TOL, Towers, check_against_single, compare_grads, compare_value,
                     global_inputs, slice_rows)

# Modules defining loss_cases(size); one spawn runs them all.
CASE_MODULES = ("cases_clip", "cases_ssl", "cases_multimodal")


def loss_cases(size):
    """Every case module's cases, by name (names must not collide)."""
    cases = {}
    for module_name in CASE_MODULES:
        module = importlib.import_module(module_name)
        for name, case in module.loss_cases(size).items():
            if name in cases:
                raise AssertionError(f"case {name!r} of {module_name} is defined twice")
            cases[name] = case
    return cases


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
        xin, yin = global_inputs(100 + step, sum(sizes), sum(sizes))
        opt_single.zero_grad()
        ref = ref_fn(*single(xin, yin))
        ref.backward()
        opt_single.step()
        opt_local.zero_grad()
        got = loss_fn(*local(slice_rows(xin, sizes, rank), slice_rows(yin, sizes, rank)))
        got.backward()
        opt_local.step()
        problem = compare_value(got.detach(), ref.detach(), f"step {step} loss")
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
        problem = compare_value(l1, l0, "per-rank loss")
        if not problem:
            problem = compare_grads(list(g1), list(g0), ["image_features", "text_features", "logit_scale"])
        out[f"open_clip parity local_loss={local_loss}"] = problem
    out.update(_siglip_parity(oc, rank, size, xg, yg, n))
    return out


def lightly_parity(rank, size):
    """Equal shards: mmloss.NTXentLoss(gather_distributed=True) against lightly's NTXentLoss with
    the same flag (loaded by file path, no torchvision). lightly returns the mean over this rank's
    rows (mmloss: the global loss, the mean over ranks of lightly's values) and gathers with
    gradient, so the per-rank feature gradients are the same."""
    import torch.distributed as dist

    from mmloss.bench.peers import load_peer

    lightly_ntxent, _ = load_peer("lightly")
    g = torch.Generator().manual_seed(23)
    n = 3
    a_all = torch.randn(n * size, D_OUT, generator=g, dtype=DT)
    b_all = torch.randn(n * size, D_OUT, generator=g, dtype=DT)
    results = []
    for make in (lambda: lightly_ntxent(temperature=0.5, gather_distributed=True),
                 lambda: mmloss.NTXentLoss(temperature=0.5, gather_distributed=True)):
        a = a_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = b_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        loss = make()(a, b)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    (l0, ga0, gb0), (l1, ga1, gb1) = results
    mean_value = l0.clone()
    dist.all_reduce(mean_value)
    problem = compare_value(l1, mean_value / size, "global loss = mean of lightly's per-rank losses")
    return problem or compare_grads([ga1, gb1], [ga0, gb0], ["out0", "out1"])


def _siglip_parity(oc, rank, size, xg, yg, n):
    """open_clip's SigLipLoss returns this rank's rows / n_local (mmloss: the global loss) and
    leaves logit_scale/bias with this rank's partial gradient (mmloss: the global one). The
    feature gradients are the same per rank; value and scalar gradients agree after averaging
    over the ranks (what a logger's mean and DDP's average see)."""
    import torch.distributed as dist

    out = {}
    for impl in ("bidir", "shift", "reduce", "gather"):
        results = []
        for make in (lambda: oc.SigLipLoss(rank=rank, world_size=size, dist_impl=impl),
                     lambda: mmloss.SigLipLoss(rank=rank, world_size=size, dist_impl=impl)):
            x = xg[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            y = yg[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            s = torch.tensor(7.0, dtype=DT, requires_grad=True)
            b = torch.tensor(-3.0, dtype=DT, requires_grad=True)
            loss = make()(x, y, s, b)
            loss.backward()
            results.append((loss.detach(), x.grad, y.grad, s.grad, b.grad))
        (l0, gx0, gy0, gs0, gb0), (l1, gx1, gy1, gs1, gb1) = results
        mean_value = l0.clone()
        dist.all_reduce(mean_value)
        problem = compare_value(l1, mean_value / size, "global loss = mean of open_clip's per-rank losses")
        if not problem:
            problem = compare_grads([gx1, gy1], [gx0, gy0], ["image_features", "text_features"])
        if not problem:
            scalars = [g.clone() for g in (gs0, gb0)]
            for g in scalars:
                dist.all_reduce(g)
            problem = compare_grads([gs1, gb1], [g / size for g in scalars], ["logit_scale", "logit_bias"])
        out[f"open_clip parity SigLipLoss(dist_impl={impl})"] = problem
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
    expect("ring without a ring form", lambda: mmloss.ntxent_loss(y, y, distributed="ring"), ValueError,
           "ntxent_loss", "ring", "not available", "gather")
    expect("ring with labels", lambda: mmloss.clip_loss(y, y, 5.0, labels=torch.arange(2), distributed="ring"),
           ValueError, "ring", "labels", "gather")
    expect("ring with soft targets", lambda: mmloss.infonce_loss(y, y, 5.0, soft_targets=torch.full((2, 4), 0.25,
           dtype=DT), distributed="ring"), ValueError, "ring", "soft_targets", "gather")
    expect("world_size disagrees", lambda: mmloss.ClipLoss(world_size=size + 1)(y, y, 5.0), ValueError,
           f"world_size={size + 1}", f"world size {size}")
    subgroup = dist.new_group([0])  # a collective: every rank creates it
    if rank != 0:
        expect("not in group", lambda: mmloss.clip_loss(y, y, 5.0, distributed="gather", group=subgroup),
               RuntimeError, "not a member")
    else:  # a group of size 1: gathering is the local loss
        got = mmloss.clip_loss(y, y, 5.0, distributed="gather", group=subgroup)
        out["group of one"] = compare_value(got, mmloss.clip_loss(y, y, 5.0))
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
    calls = importlib.import_module("cases_clip").loss_cases(size)
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
        problem = compare_value(got, want, f"extra_keys case {k}")
        if problem:
            return problem
    return None


def grad_cache_ddp_check(rank, size):
    """mmloss.grad_cache_step under a real process group: two DDP-wrapped towers (no_sync on every
    sub-batch but the last), a gathering clip_loss on the cached representations, a log-scale
    outside DDP (its gradient is already global: the gather convention all-reduces it). After the
    step every gradient equals one process's full-batch gradient within 1e-10."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = SHARDS[size]
    xin, yin = global_inputs(77, sum(sizes), sum(sizes))
    single = Towers(13)
    x, y, s, _ = single(xin, yin)
    mmloss.clip_loss(x, y, s).backward()
    want = [single.image.weight.grad, single.image.bias.grad, single.text.weight.grad, single.text.bias.grad,
            single.log_scale.grad]

    local = Towers(13)
    image, text = DDP(local.image), DDP(local.text)

    def loss_fn(a, b):
        return mmloss.clip_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), local.log_scale.exp(),
                                distributed="gather")

    loss = mmloss.grad_cache_step([image, text], [slice_rows(xin, sizes, rank), slice_rows(yin, sizes, rank)],
                                  loss_fn, chunk_size=2)
    got = [local.image.weight.grad, local.image.bias.grad, local.text.weight.grad, local.text.bias.grad,
           local.log_scale.grad]
    problem = compare_value(loss, mmloss.clip_loss(x, y, s).detach())
    return problem or compare_grads(got, want, ["image.weight", "image.bias", "text.weight", "text.bias",
                                                "log_scale"])


def bf16_check(rank, size):
    """bf16 features (gloo), gather and ring CLIP and SigLIP against float64 on the same (rounded)
    global batch: loss within 1e-4·|ref| + 1e-6·L, this rank's feature gradients (÷ W, the DDP
    convention) within 1e-2 relative norm — the bf16 tolerances of docs/guarantees.md."""
    sizes = SHARDS[size]
    g = torch.Generator().manual_seed(31)
    n = sum(sizes)
    xg = F.normalize(torch.randn(n, 16, generator=g), dim=1).to(torch.bfloat16)
    yg = F.normalize(torch.randn(n, 16, generator=g), dim=1).to(torch.bfloat16)
    scale, bias = 10.0, -2.0
    bound = scale + abs(bias)  # L: unit features
    out = {}
    for loss_name, call in (("clip", lambda x, y, **kw: mmloss.clip_loss(x, y, scale, **kw)),
                            ("siglip", lambda x, y, **kw: mmloss.siglip_loss(x, y, scale, bias, **kw))):
        xr, yr = xg.double().requires_grad_(), yg.double().requires_grad_()
        want = call(xr, yr)
        want.backward()
        for mode in ("gather", "ring"):
            x = slice_rows(xg, sizes, rank).clone().requires_grad_()
            y = slice_rows(yg, sizes, rank).clone().requires_grad_()
            got = call(x, y, distributed=mode)
            got.backward()
            problem = None
            if abs(float(got) - float(want)) > 1e-4 * abs(float(want)) + 1e-6 * bound:
                problem = f"loss {float(got)} vs float64 {float(want)}"
            for name, grad, ref in (("x", x.grad, xr.grad), ("y", y.grad, yr.grad)):
                ref = slice_rows(ref, sizes, rank)
                err = float((grad.double() / size - ref).norm() / ref.norm())
                if problem is None and err > 1e-2:
                    problem = f"{name} gradient relative error {err:.2e} > 1e-2"
            out[f"bf16 {loss_name} {mode}"] = problem
    return out


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
        run("grad_cache_step under DDP (no_sync)", lambda: grad_cache_ddp_check(rank, size))
        try:
            results.update(bf16_check(rank, size))
        except Exception:
            results["bf16"] = traceback.format_exc(limit=6)
        try:
            results.update(subgroup_check(rank, size))
        except Exception:
            results["subgroup"] = traceback.format_exc(limit=6)
        if size == 2:
            try:
                results.update(error_checks(rank, size))
            except Exception:
                results["error checks"] = traceback.format_exc(limit=6)
        if size in (2, 4):
            if importlib.util.find_spec("lightly") is not None:
                run("lightly parity NTXentLoss(gather_distributed=True)", lambda: lightly_parity(rank, size))
            if open_clip_path:
                try:
                    results.update(open_clip_parity(rank, size, open_clip_path))
                except Exception:
                    results["open_clip parity"] = traceback.format_exc(limit=6)
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(results, fh)
    finally:
        dist.destroy_process_group()
