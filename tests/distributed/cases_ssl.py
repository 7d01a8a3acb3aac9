"""Distributed cases of the self-supervised losses (harness.py says what a case is): NT-Xent (and
its memory-bank form), SupCon (views, labels, reference set), DCL/DCLW, DHEL, MV-InfoNCE, MV-DHEL,
HCL, functions and modules, under distributed="gather" (the only mode they offer; "ring" raises).

The views are the raw outputs of the harness's Linear towers (not normalised: the losses
normalise inside, so the normalisation's gradient crosses the gather too). Ranks hold uneven
shards (harness.SHARDS, one rank a single row): every loss here needs ≥ 2 rows of the global
batch only, which each world size has.
"""
from __future__ import annotations

import torch

import mmloss
from harness import D_OUT, DT, SHARDS, ids, part_of


def _views(model, xin, yin):
    """Two views of the same samples: the image and text towers' raw outputs."""
    return model.image(xin), model.text(yin)


def _three_views(model, xin, yin):
    return [model.image(xin), model.text(yin), model.image(xin.roll(1, dims=1))]


def _coupled_weights(a, b):
    """A DCL weight_fn that couples the rows (DCLW's vMF weights, not detached): exact only if it
    sees the global batch, and its gradient crosses the gather."""
    return 2.0 - a.shape[0] * torch.softmax(torch.linalg.vecdot(a, b) / 0.5, dim=0)


def loss_cases(size):
    """name → (sizes_x, sizes_y, loss_call, reduction)."""
    sx = SHARDS[size]
    n = sum(sx)
    even = (2,) * size
    labels = ids(n, 3, 11)
    ref_labels = ids(n, 3, 12)
    bank = torch.nn.functional.normalize(torch.randn(4, D_OUT, generator=torch.Generator().manual_seed(13),
                                                     dtype=DT), dim=1)

    def part(t, p):
        return part_of(t, p, sx)

    def two_view(fn, **extra):
        def call(model, xin, yin, kw, p):
            return fn(*_views(model, xin, yin), **extra, **kw)
        return call

    def ntxent_none(model, xin, yin, kw, p):
        # (2N,) terms, view-0 anchors first → (N, 2) so that the harness slices this rank's rows
        terms = mmloss.ntxent_loss(*_views(model, xin, yin), 0.3, reduction="none", **kw)
        return terms.view(2, -1).t()

    def module(make, call_views=_views):
        """make(kw) → the module: kw is {} for the single-process reference (local default)."""
        def call(model, xin, yin, kw, p):
            return make(kw if p is not None else {})(*call_views(model, xin, yin))
        return call

    def ntxent_bank_module(model, xin, yin, kw, p):
        """Two steps of lightly's memory-bank form: the second scores the bank the first one
        filled with the gathered out1 rows (K = 4 < N: the rows of the first ranks)."""
        torch.manual_seed(5)  # the bank starts equal everywhere
        gather = {} if p is None else dict(gather_distributed=True, group=kw["group"])
        loss_fn = mmloss.NTXentLoss(0.4, memory_bank_size=(4, D_OUT), **gather)
        first = loss_fn(*_views(model, xin, yin))
        second = loss_fn(model.image(xin.roll(2, dims=1)), model.text(0.5 * yin))
        return first + second

    def supcon(mode, **extra):
        def call(model, xin, yin, kw, p):
            a, b = _views(model, xin, yin)
            if mode == "views":          # (B, 2, D), default labels: the (global) sample index
                return mmloss.supcon_loss(torch.stack([a, b], dim=1), **extra, **kw)
            if mode == "views+labels":
                return mmloss.supcon_loss(torch.stack([a, b], dim=1), part(labels, p), **extra, **kw)
            if mode == "labels":         # PML's (n, D) + labels
                return mmloss.supcon_loss(a, part(labels, p), **extra, **kw)
            if mode == "refs":
                return mmloss.supcon_loss(a, part(labels, p), ref_emb=b, ref_labels=part(ref_labels, p),
                                          **extra, **kw)
            own = part(labels, p)        # ref_labels IS labels: the pairs (i, i) are excluded
            return mmloss.supcon_loss(a, own, ref_emb=b, ref_labels=own, **extra, **kw)
        return call

    def supcon_module(model, xin, yin, kw, p):
        a, b = _views(model, xin, yin)
        return mmloss.SupConLoss(0.2, **kw)(torch.stack([a, b], dim=1), part(labels, p))

    def multiview(fn, **extra):
        def call(model, xin, yin, kw, p):
            return fn(_three_views(model, xin, yin), **extra, **kw)
        return call

    return {
        "ntxent": (sx, sx, two_view(mmloss.ntxent_loss, temperature=0.3), "mean"),
        "ntxent/sum": (sx, sx, two_view(mmloss.ntxent_loss, temperature=0.3, reduction="sum"), "sum"),
        "ntxent/none": (sx, sx, ntxent_none, "none"),
        "ntxent/uniform_shards": (even, even, two_view(mmloss.ntxent_loss, uniform_shards=True), "mean"),
        "ntxent/memory_bank/sum": (sx, sx, two_view(mmloss.ntxent_loss, memory_bank=bank, reduction="sum"), "sum"),
        "NTXentLoss(gather_distributed=True)": (sx, sx, module(
            lambda kw: mmloss.NTXentLoss(0.3, gather_distributed=bool(kw), group=kw.get("group"))), "mean"),
        "NTXentLoss(memory bank, gather_distributed=True), 2 steps": (sx, sx, ntxent_bank_module, "mean"),
        "supcon/views(default labels)": (sx, sx, supcon("views"), "mean"),
        "supcon/views+labels+base_temperature": (sx, sx, supcon("views+labels", base_temperature=0.07), "mean"),
        "supcon/labels(n,D)": (sx, sx, supcon("labels", temperature=0.3), "mean"),
        "supcon/ref_emb": (sx, sx, supcon("refs"), "mean"),
        "supcon/ref_labels is labels": (sx, sx, supcon("same"), "mean"),
        "SupConLoss(gather)": (sx, sx, supcon_module, "mean"),
        "dcl": (sx, sx, two_view(mmloss.dcl_loss), "mean"),
        "dcl/weight_fn(global batch)": (sx, sx, two_view(mmloss.dcl_loss, weight_fn=_coupled_weights), "mean"),
        "dclw": (sx, sx, two_view(mmloss.dclw_loss, sigma=0.3), "mean"),
        "DCLLoss(gather_distributed=True)": (sx, sx, module(
            lambda kw: mmloss.DCLLoss(0.2, None, bool(kw), group=kw.get("group"))), "mean"),
        "DCLWLoss(gather)": (sx, sx, module(lambda kw: mmloss.DCLWLoss(0.2, **kw)), "mean"),
        "dhel": (sx, sx, two_view(mmloss.dhel_loss), "mean"),
        "dhel/include_augs=False": (sx, sx, two_view(mmloss.dhel_loss, include_augs=False), "mean"),
        "DHELLoss(gather)": (sx, sx, module(lambda kw: mmloss.DHELLoss(**kw)), "mean"),
        "hcl": (sx, sx, two_view(mmloss.hcl_loss), "mean"),
        "hcl/beta=0,tau_plus=0.2": (sx, sx, two_view(mmloss.hcl_loss, beta=0.0, tau_plus=0.2), "mean"),
        "HardNegativeLoss(gather)": (sx, sx, module(lambda kw: mmloss.HardNegativeLoss(0.4, **kw)), "mean"),
        "mv_infonce(V=3)": (sx, sx, multiview(mmloss.mv_infonce_loss), "mean"),
        "mv_infonce/same_view_negatives=False": (
            sx, sx, multiview(mmloss.mv_infonce_loss, same_view_negatives=False), "mean"),
        "MultiViewInfoNCELoss(gather)": (sx, sx, module(
            lambda kw: lambda *v: mmloss.MultiViewInfoNCELoss(**kw)(list(v)), _three_views), "mean"),
        "mv_dhel(V=3)": (sx, sx, multiview(mmloss.mv_dhel_loss, temperature=0.3), "mean"),
        "MultiViewDHELLoss(gather)": (sx, sx, module(
            lambda kw: lambda *v: mmloss.MultiViewDHELLoss(**kw)(list(v)), _three_views), "mean"),
    }
