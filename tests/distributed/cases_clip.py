"""Distributed cases of the CLIP family: clip_loss / siglip_loss / infonce_loss and their
modules (harness.py says what a case is)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmloss
from harness import D_OUT, DT, SHARDS, ids, part_of


def loss_cases(size):
    """name → (sizes_x, sizes_y, loss_call, reduction)."""
    sx = SHARDS[size]
    n = sum(sx)
    sy_rect = tuple(s + 1 + (r % 2) for r, s in enumerate(sx))  # texts per rank differ from images
    m_rect = sum(sy_rect)
    labels = ids(n, 3, 1)
    text_labels = ids(m_rect, 3, 2)
    queue_gen = torch.Generator().manual_seed(3)
    queue = F.normalize(torch.randn(4, D_OUT, generator=queue_gen, dtype=DT), dim=1)
    queue_labels = ids(4, 3, 4)
    targets = ids(n, n + 4, 5)  # index the global keys followed by the queue
    soft = torch.softmax(torch.randn(n, n + 4, generator=queue_gen, dtype=DT), dim=1)

    def part(t, p, sizes=sx):
        return part_of(t, p, sizes)

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

    def clip_module_ring(model, xin, yin, kw, p):
        x, y, s, b = model(xin, yin)
        return mmloss.ClipLoss(**kw)(x, y, s, b) if kw else mmloss.ClipLoss(distributed=None)(x, y, s, b)

    caption_logits = torch.randn(n, 3, 7, generator=torch.Generator().manual_seed(6), dtype=DT)
    caption_labels = ids(n * 3, 7, 7).view(n, 3)

    def coca_module(model, xin, yin, kw, p):
        """CoCaLoss's contrastive term gathers under "auto" (its caption term is rank-local, as in
        open_clip, so it is weighted 0 here to compare with one process)."""
        x, y, s, _ = model(xin, yin)
        module = mmloss.CoCaLoss(0.0, 1.0, distributed=None) if p is None else mmloss.CoCaLoss(0.0, 1.0, group=kw["group"])
        contrastive, caption = module(x, y, part(caption_logits, p), part(caption_labels, p), s)
        return contrastive + caption

    def siglip_module(model, xin, yin, kw, p):
        x, y, s, b = model(xin, yin)
        if p is None:
            return mmloss.SigLipLoss(distributed=None)(x, y, s, b)
        return mmloss.SigLipLoss(dist_impl="reduce", group=kw["group"])(x, y, s, b)

    def infonce_module(model, xin, yin, kw, p):
        x, y, s, _ = model(xin, yin)
        return mmloss.InfoNCELoss(**kw)(x, y, s, extra_keys=queue)

    def ring(call):
        """The same call with distributed="ring" (the single-process call is unchanged)."""
        def ringed(model, xin, yin, kw, p):
            return call(model, xin, yin, dict(kw, distributed="ring") if kw else kw, p)
        return ringed

    def siglip_bidir(model, xin, yin, kw, p):
        x, y, s, b = model(xin, yin)
        if p is None:
            return mmloss.SigLipLoss(distributed=None)(x, y, s, b)
        return mmloss.SigLipLoss(dist_impl="bidir", group=kw["group"])(x, y, s, b)

    ring_cases = {
        "ring clip": (sx, sx, ring(clip()), "mean"),
        "ring clip/label_smoothing/sum": (sx, sx, ring(clip(label_smoothing=0.1, reduction="sum")), "sum"),
        "ring clip/none": (sx, sx, ring(clip(reduction="none")), "none"),
        "ring ClipLoss": (sx, sx, ring(clip_module_ring), "mean"),
        "ring siglip": (sx, sx, ring(siglip()), "mean"),
        "ring siglip/none": (sx, sx, ring(siglip(reduction="none")), "none"),
        "ring SigLipLoss(dist_impl=bidir)": (sx, sx, siglip_bidir, "mean"),
        "ring infonce+queue": (sx, sx, ring(infonce("default")), "mean"),
        "ring infonce/sum": (sx, sx, ring(infonce("default", reduction="sum")), "sum"),
    }

    return ring_cases | {
        "clip": (sx, sx, clip(), "mean"),
        "clip/labels": (sx, sx, clip(labels=labels), "mean"),
        "clip/label_smoothing": (sx, sx, clip(label_smoothing=0.1), "mean"),
        "clip/labels+smoothing/sum": (sx, sx, clip(labels=labels, label_smoothing=0.2, reduction="sum"), "sum"),
        "clip/none": (sx, sx, clip(reduction="none"), "none"),
        "ClipLoss(default auto)": (sx, sx, clip_module, "mean"),
        "CoCaLoss(default auto, contrastive)": (sx, sx, coca_module, "mean"),
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
