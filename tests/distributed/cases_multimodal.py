"""Distributed cases of the multimodal losses (harness.py says what a case is): Symile (K = 2, 3, 4
modalities, both samplings), the distillation family (contrastive distillation, DistillClipLoss
with open_clip's arguments, ModX, CyCLIP, score distillation) and MemoryQueue's gathered enqueue.

Teachers / old models / scores are fixed random tensors of the global batch sliced per rank
(``part_of``). Symile's third and fourth modalities are built from the two towers' outputs, so
every modality's gradient reaches the encoders the harness compares.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmloss
from harness import D_OUT, DT, SHARDS, part_of


def _fixed(rows, cols, seed, *, unit=True):
    t = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return F.normalize(t, dim=1) if unit else t


def _modalities(model, xin, yin, k):
    """K (N, D) unit-norm modalities from the two towers (x, y, then combinations of them)."""
    x, y, s, _ = model(xin, yin)
    extra = [F.normalize(x - 0.5 * y, dim=1), F.normalize(x * y + 0.1, dim=1)]
    return [x, y, *extra][:k], s


def _world(kw):
    import torch.distributed as dist

    return dist.get_world_size(kw.get("group"))


def _as_global_value(local, kw):
    """open_clip's ``local_loss=True`` returns this rank's share with its own gradient; with equal
    shards the mean of the shares is the global loss. Returns that mean as the value while
    keeping the share's gradient (what DDP averages), for the harness's comparison."""
    import torch.distributed as dist

    mean = local.detach().clone()
    dist.all_reduce(mean, group=kw.get("group"))
    return local + (mean / _world(kw) - local.detach())


def loss_cases(size):
    """name → (sizes_x, sizes_y, loss_call, reduction)."""
    sx = SHARDS[size]
    n = sum(sx)
    sy_rect = tuple(s + 1 + (r % 2) for r, s in enumerate(sx))  # texts per rank differ from images
    m_rect = sum(sy_rect)
    equal = (2,) * size
    teacher_x, teacher_y = _fixed(max(n, 2 * size), 3, 31), _fixed(max(m_rect, 2 * size), 3, 32)
    old_noise = _fixed(n, D_OUT, 33, unit=False)
    teacher_scores = _fixed(n, D_OUT, 34, unit=False)
    positives = torch.randint(0, D_OUT, (n,), generator=torch.Generator().manual_seed(35))

    def part(t, p, sizes=sx):
        return part_of(t, p, sizes)

    def teachers(p, sizes_x=sx, sizes_y=sx):
        tx, ty = teacher_x[: sum(sizes_x)], teacher_y[: sum(sizes_y)]
        return part(tx, p, sizes_x), part(ty, p, sizes_y)

    # ---------------------------------------------------------------- Symile

    def symile(k, sampling, **extra):
        def call(model, xin, yin, kw, p):
            reps, s = _modalities(model, xin, yin, k)
            # Rank 0 seeds as the single process; the others differently: the permutations
            # must be rank 0's on every rank.
            generator = torch.Generator().manual_seed(7 if not p else 7 + 100 * p)
            return mmloss.symile_loss(reps, s, sampling, generator, **extra, **kw)
        return call

    def symile_module(model, xin, yin, kw, p):
        reps, s = _modalities(model, xin, yin, 3)
        generator = torch.Generator().manual_seed(7 if not p else 8)
        auto = {} if p is None else dict(distributed="auto", group=kw["group"])
        return mmloss.SymileLoss("n", **auto)(reps, s, generator)

    # ---------------------------------------------------------------- distillation

    def distill(sizes_y=sx, **extra):
        def call(model, xin, yin, kw, p):
            x, y, s, _ = model(xin, yin)
            xt, yt = teachers(p, sx, sizes_y)
            return mmloss.contrastive_distill_loss(x, y, s, xt, yt, 4.0, **extra, **kw)
        return call

    def old_model(x, p):
        """The previous model: the current features plus noise (some argmaxes off the diagonal)."""
        return F.normalize(x.detach() + 0.8 * part(old_noise, p), dim=1)

    def modx(**extra):
        def call(model, xin, yin, kw, p):
            x, y, s, _ = model(xin, yin)
            return mmloss.modx_loss(x, y, s, old_model(x, p), old_model(y, p), 2.0, **extra, **kw)
        return call

    def cyclip(*lambdas):
        def call(model, xin, yin, kw, p):
            x, y, s, _ = model(xin, yin)
            return mmloss.cyclip_loss(x, y, s, *lambdas, **kw)
        return call

    def student_scores(model, xin):
        return 3.0 * model.image(xin)  # (B, C = D_OUT) logits with a gradient

    def score_distill(index_tensor):
        def call(model, xin, yin, kw, p):
            index = part(positives, p) if index_tensor else 2
            return mmloss.score_distill_loss(student_scores(model, xin), part(teacher_scores, p), index, 0.3, **kw)
        return call

    def module(make, forward):
        """A module built with the harness's options (explicit "gather") or none (single process)."""
        def call(model, xin, yin, kw, p):
            return make(**kw)(*forward(model, xin, yin, p))
        return call

    def distill_clip_default(model, xin, yin, kw, p):
        x, y, s, _ = model(xin, yin)
        options = dict(distributed=None) if p is None else dict(group=kw["group"])  # default: "auto"
        return sum(mmloss.DistillClipLoss(label_smoothing=0.1, **options)(x, y, s, *teachers(p), 4.0))

    def distill_clip_open_clip_args(model, xin, yin, kw, p):
        x, y, s, _ = model(xin, yin)
        options = dict(distributed=None) if p is None else dict(rank=p, world_size=_world(kw), group=kw["group"])
        out = mmloss.DistillClipLoss(gather_with_grad=True, **options)(x, y, s, *teachers(p), 4.0, output_dict=True)
        return out["contrastive_loss"] + out["distill_loss"]

    def distill_clip_local_loss(model, xin, yin, kw, p):
        x, y, s, _ = model(xin, yin)
        if p is None:
            return sum(mmloss.DistillClipLoss(distributed=None)(x, y, s, *teachers(None, equal, equal), 4.0))
        loss = mmloss.DistillClipLoss(local_loss=True, gather_with_grad=True, group=kw["group"])
        return _as_global_value(sum(loss(x, y, s, *teachers(p, equal, equal), 4.0)), kw)

    # ---------------------------------------------------------------- MemoryQueue

    def queued_infonce(model, xin, yin, kw, p):
        """MoCo-style: enqueue this step's keys (gathered under distribution: every rank writes the
        global keys), then score against the queues as extra_keys. ``kept`` has two slots more
        than the batch, and ranks other than 0 start from a different random queue: the first
        gathered enqueue adopts rank 0's. ``ring`` (3 slots, empty at first) wraps around."""
        x, y, s, _ = model(xin, yin)
        options = {} if p is None else dict(distributed="auto", group=kw["group"])
        seed = torch.Generator().manual_seed(5 + 10 * (p or 0))
        kept = mmloss.MemoryQueue(n + 2, D_OUT, dtype=DT, generator=seed, **options)
        ring = mmloss.MemoryQueue(3, D_OUT, init="empty", dtype=DT, **options)
        kept.enqueue(y, defer=True)
        ring.enqueue(y, defer=True)
        # One row per rank: the first of each shard (gathered in rank order).
        firsts = [0] if p is not None else [sum(sx[:r]) for r in range(len(sx))]
        ring.enqueue(x.detach()[firsts])
        return mmloss.infonce_loss(x, y, s, extra_keys=torch.cat([kept.keys, ring.keys]), **kw)

    def distill_inputs(model, xin, yin, p):
        x, y, s, _ = model(xin, yin)
        return (x, y, s, *teachers(p), 4.0)

    def modx_inputs(model, xin, yin, p):
        x, y, s, _ = model(xin, yin)
        return x, y, s, old_model(x, p), old_model(y, p)

    def cyclip_inputs(model, xin, yin, p):
        x, y, s, _ = model(xin, yin)
        return x, y, s

    def score_inputs(model, xin, yin, p):
        return student_scores(model, xin), part(teacher_scores, p), part(positives, p)

    def symile_inputs(model, xin, yin, p):
        reps, s = _modalities(model, xin, yin, 3)
        return reps, s

    cases = {
        "symile/n K=2": (sx, sx, symile(2, "n"), "mean"),
        "symile/n K=3": (sx, sx, symile(3, "n"), "mean"),
        "symile/n K=3/sum": (sx, sx, symile(3, "n", reduction="sum"), "sum"),
        "symile/n K=4/none": (sx, sx, symile(4, "n", reduction="none"), "none"),
        "symile/n_squared K=2": (sx, sx, symile(2, "n_squared"), "mean"),
        "symile/n_squared K=2/none": (sx, sx, symile(2, "n_squared", reduction="none"), "none"),
        "symile/n_squared K=3": (sx, sx, symile(3, "n_squared"), "mean"),
        "symile/n_squared K=3/sum": (sx, sx, symile(3, "n_squared", reduction="sum"), "sum"),
        "symile/n_squared K=4/none": (sx, sx, symile(4, "n_squared", reduction="none"), "none"),
        "SymileLoss(auto)": (sx, sx, symile_module, "mean"),
        "SymileLoss(n_squared, gather)": (sx, sx, module(lambda **kw: mmloss.SymileLoss("n_squared", **kw),
                                                         symile_inputs), "mean"),
        "contrastive_distill": (sx, sx, distill(), "mean"),
        "contrastive_distill/kl(N!=M)": (sx, sy_rect, distill(sy_rect, cross_entropy=False), "mean"),
        "ContrastiveDistillLoss(gather)": (sx, sx, module(mmloss.ContrastiveDistillLoss, distill_inputs), "mean"),
        "DistillClipLoss(default auto)": (sx, sx, distill_clip_default, "mean"),
        "DistillClipLoss(rank, world_size, gather_with_grad)": (sx, sx, distill_clip_open_clip_args, "mean"),
        "DistillClipLoss(local_loss, equal shards)": (equal, equal, distill_clip_local_loss, "mean"),
        "modx": (sx, sx, modx(), "mean"),
        "ModXLoss(gather)": (sx, sx, module(lambda **kw: mmloss.ModXLoss(3.0, **kw), modx_inputs), "mean"),
        "cyclip": (sx, sx, cyclip(), "mean"),
        "cyclip/lambda_in=0": (sx, sx, cyclip(0.0, 0.7), "mean"),
        "cyclip/lambdas=0": (sx, sx, cyclip(0.0, 0.0), "mean"),
        "CyCLIPLoss(gather)": (sx, sx, module(mmloss.CyCLIPLoss, cyclip_inputs), "mean"),
        "score_distill/index tensor": (sx, sx, score_distill(True), "mean"),
        "score_distill/index int": (sx, sx, score_distill(False), "mean"),
        "ScoreDistillLoss(gather)": (sx, sx, module(mmloss.ScoreDistillLoss, score_inputs), "mean"),
        "MemoryQueue(auto) enqueue + infonce extra_keys": (sx, sx, queued_infonce, "mean"),
    }
    return cases
