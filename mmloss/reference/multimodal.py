"""Dense references of §9 Symile, §10 TCL and §11 iSogCLR (docs/losses.md).

Each function materialises every logit (Symile "n_squared": the full N^{K−1} candidate table)
and lets autograd do the rest: small inputs only. Inputs are computed in float64 when any input
is float64, else float32. Names and arguments match ``mmloss.functional`` (minus ``backend``).

``GCLossReference`` is a literal re-implementation of LibAUC's ``GCLoss_v1`` / ``GCLoss_v2``
with ``enable_isogclr=True`` (dense, its own state in LibAUC's layout: linear-space u, running
max b for the bimodal loss), against which the iSogCLR state updates are tested step by step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .core import _compute_dtype, _pair_marks, _scalar, masked_logsumexp, reduce_terms, softplus

Tensor = torch.Tensor

__all__ = ["GCLossReference", "isogclr_loss", "symile_loss", "tcl_loss"]

_TCL_TERMS = ("i2t", "t2i", "i2i", "t2t", "lmi_v", "lmi_t")
_ISOGCLR_DEFAULTS = {
    False: {"rho": 0.3, "tau": 0.1, "tau_min": 0.05, "tau_max": 0.7},
    True: {"rho": 6.0, "tau": 0.01, "tau_min": 0.005, "tau_max": 0.05},
}


# ============================================================================ §9 Symile


def _hadamard(factors) -> Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


def symile_loss(representations, logit_scale, negative_sampling="n", generator=None, *, reduction="mean"):
    """docs/losses.md §9, literally: "n" builds the shuffled N×N logits and overwrites the diagonal
    with the positive; "n_squared" builds the (N, N^{K−1}) table of every candidate tuple.
    Permutations are drawn exactly as the fast path draws them (anchors in order, then the other
    modalities in order, ``torch.randperm(N, generator=generator)``)."""
    reps = list(representations.unbind(0)) if isinstance(representations, Tensor) else list(representations)
    dt = _compute_dtype(*reps)
    reps = [r.to(dt) for r in reps]
    n, d, device = reps[0].shape[0], reps[0].shape[1], reps[0].device
    s = _scalar(logit_scale, dt, device)
    draw_device = torch.device(generator.device) if generator is not None else device
    positive = s * _hadamard(reps).sum(dim=1)
    terms = []
    for k, anchor in enumerate(reps):
        others = reps[:k] + reps[k + 1:]
        if negative_sampling == "n":
            shuffled = torch.ones_like(anchor)
            for r in others:
                shuffled = shuffled * r[torch.randperm(n, generator=generator, device=draw_device).to(device)]
            eye = _pair_marks("diagonal", n, n, 0, None, None, device)
            logits = torch.where(eye, positive[:, None], s * (anchor @ shuffled.T))
            excluded, target_logit = eye, torch.diagonal(logits)
        elif negative_sampling == "n_squared":
            table = others[0]
            for r in others[1:]:
                table = (table[:, None, :] * r[None, :, :]).reshape(-1, d)
            logits = s * (anchor @ table.T)                               # (N, N^{K−1})
            target = torch.arange(n, device=device) * sum(n ** t for t in range(len(others)))
            excluded = torch.arange(logits.shape[1], device=device)[None, :] == target[:, None]
            target_logit = logits.gather(1, target[:, None])[:, 0]
        else:
            raise ValueError(f"negative_sampling must be 'n' or 'n_squared', got {negative_sampling!r}")
        terms.append(softplus(masked_logsumexp(logits, excluded, dim=1) - target_logit))
    return reduce_terms(torch.stack(terms).mean(dim=0), reduction)


# ============================================================================ §10 TCL


def tcl_loss(image_features, text_features, image_features_m, text_features_m, temperature, *,
             image_queue=None, text_queue=None, image_locals_m=None, text_locals_m=None,
             image_local_mask=None, text_local_mask=None, alpha=0.4, weights=None, return_terms=False):
    """docs/losses.md §10 with dense logits: soft-target cross-entropy over ``log_softmax`` of the
    concatenated keys (as TCL's code), IMC InfoNCE, LMI with explicit masks."""
    given = [image_features, text_features, image_features_m, text_features_m]
    given += [q for q in (image_queue, text_queue, image_locals_m, text_locals_m) if q is not None]
    dt = _compute_dtype(*given)
    v, t = image_features.to(dt), text_features.to(dt)
    v_m, t_m = image_features_m.detach().to(dt), text_features_m.detach().to(dt)
    tau = temperature.to(device=v.device, dtype=dt) if isinstance(temperature, Tensor) else float(temperature)
    keys_v = torch.cat([v_m] + ([image_queue.detach().to(dt)] if image_queue is not None else []))
    keys_t = torch.cat([t_m] + ([text_queue.detach().to(dt)] if text_queue is not None else []))

    def soft_ce(anchor, teacher, keys, a):
        logits = anchor @ keys.T / tau
        q = (1.0 - a) * _pair_marks("diagonal", logits.shape[0], logits.shape[1], 0, None, None,
                                    logits.device).to(dt)
        if a > 0:
            q = q + a * torch.softmax((teacher @ keys.T / tau).detach(), dim=1)
        return -(q * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()

    terms = {
        "i2t": soft_ce(v, v_m, keys_t, alpha),
        "t2i": soft_ce(t, t_m, keys_v, alpha),
        "i2i": soft_ce(v, None, keys_v, 0.0),
        "t2t": soft_ce(t, None, keys_t, 0.0),
    }
    for tag, g, local, mask in (("v", v, image_locals_m, image_local_mask), ("t", t, text_locals_m, text_local_mask)):
        if local is not None:
            terms[f"lmi_{tag}"] = _lmi(g, local.detach().to(dt), mask, tau)
    w = {name: 1.0 / 6.0 for name in _TCL_TERMS}
    w.update(weights or {})
    loss = sum(w[name] * value for name, value in terms.items())
    return (loss, terms) if return_terms else loss


def _lmi(g, local, mask, tau):
    b, p, d = local.shape
    real = torch.ones(b, p, dtype=torch.bool, device=g.device) if mask is None else mask != 0
    positive = torch.einsum("bd,bpd->bp", g, local) / tau
    logits = g @ local.reshape(b * p, d).T / tau                       # (B, B·P)
    owner = torch.arange(b, device=g.device).repeat_interleave(p)
    excluded = (owner[None, :] == torch.arange(b, device=g.device)[:, None]) | ~real.reshape(1, -1)
    lam = masked_logsumexp(logits, excluded, dim=1)
    per_local = softplus(lam[:, None] - positive) * real
    count = real.sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return per_local.sum() * 0.0
    return (per_local.sum(dim=1)[has] / count[has]).mean()


# ============================================================================ §11 iSogCLR


def isogclr_loss(features_a, features_b, index, log_u, tau, tau_momentum, seen, *, running_max=None,
                 mode=None, rho=None, gamma=0.9, beta=0.9, eta=0.01, tau_min=None, tau_max=None,
                 form="libauc", bimodal=None):
    """docs/losses.md §11, dense: explicit weights ``p_z = exp(x_z/τ)/u`` on every negative (x = h, or
    the raw similarity for the unimodal "libauc" form) and the surrogate ``Σ_z p_z·x_z`` with p
    detached (scaled as the form prescribes), so autograd yields the algorithm's gradient. u is
    handled in linear space with a per-row shift: for the bimodal "libauc" form LibAUC's running
    max b (updated in ``running_max``; u clamped at 1e-20 in shifted units), otherwise the row
    max of x/τ over the negatives and the old log u; the unimodal "libauc" weights use max(u, 1e-8). The state
    stays in log space like the fast path's. Updates the state tensors in place.
    ``mode`` "unimodal" | "bimodal" (None: "unimodal", or what ``bimodal`` says)."""
    # mode= as in mmloss.isogclr_loss; the oracle also takes the older bimodal= without a warning.
    bimodal = (mode == "bimodal") if mode is not None else bool(bimodal)
    defaults = _ISOGCLR_DEFAULTS[bimodal]
    rho = defaults["rho"] if rho is None else rho
    tau_min = defaults["tau_min"] if tau_min is None else tau_min
    tau_max = defaults["tau_max"] if tau_max is None else tau_max
    dt = _compute_dtype(features_a, features_b)
    x, y = features_a.to(dt), features_b.to(dt)
    n, device = x.shape[0], x.device
    idx = index.to(log_u.device)
    tau_rows = tau[idx].to(device=device, dtype=dt)
    log_u_old = log_u[idx].to(device=device, dtype=dt)
    momentum_old = tau_momentum[idx].to(device=device, dtype=dt)
    first = ~seen[idx].to(device)[:, None]

    eye = _pair_marks("diagonal", n, n, 0, None, None, device)
    sim_xy = x @ y.T
    positive = torch.diagonal(sim_xy)
    if bimodal:
        groups = [(sim_xy, ~eye, 0), (sim_xy.T, ~eye, 1)]
    else:
        negatives = torch.cat([~eye, ~eye], dim=1)
        groups = [(torch.cat([sim_xy, x @ x.T], dim=1), negatives, 0),
                  (torch.cat([sim_xy.T, y @ y.T], dim=1), negatives, 0)]
    h_based = bimodal or form == "paper"
    libauc_bimodal = bimodal and form == "libauc"
    terms, new_log_u, grads_tau, new_max = [], [], [], []
    for sims, neg, side in groups:
        count = neg.sum(dim=1, keepdim=True).to(dt)
        tau_g = tau_rows[:, side:side + 1]
        scores = sims - positive[:, None] if h_based else sims            # h (or sim) with grad
        z = (scores / tau_g).detach()
        if libauc_bimodal:
            old_max = running_max[idx][:, side:side + 1].to(device=device, dtype=dt)
            shift = torch.maximum(old_max, z.amax(dim=1, keepdim=True))  # every column, diagonal too
            new_max.append(shift)
        else:
            shift = torch.where(neg, z, float("-inf")).amax(dim=1, keepdim=True)
            # The old u may exceed this batch's terms by more than exp's range (|h|/τ in the
            # thousands at τ = 0.01, ‖x‖ = 5): shift by whichever is larger.
            shift = torch.where(first, shift, torch.maximum(shift, log_u_old[:, side:side + 1]))
        e = torch.where(neg, torch.exp(z - shift), 0.0)
        g_shifted = e.sum(dim=1, keepdim=True) / count
        u_shifted = torch.where(first, g_shifted,
                                (1 - gamma) * torch.exp(log_u_old[:, side:side + 1] - shift) + gamma * g_shifted)
        if libauc_bimodal:
            u_shifted = u_shifted.clamp(min=1e-20)
        if form == "libauc" and not bimodal:
            p = e / torch.maximum(u_shifted, 1e-8 * torch.exp(-shift))    # max(u, 1e-8) unshifted
        else:
            p = e / u_shifted
        weighted = torch.where(neg, p * scores, 0.0).sum(dim=1)
        if form == "libauc" and not bimodal:
            terms.append(weighted / count[:, 0] - positive)
        elif form == "libauc":
            terms.append(weighted)
        else:
            terms.append(weighted / count[:, 0])
        log_u_new = torch.log(u_shifted) + shift
        new_log_u.append(log_u_new)
        grads_tau.append(log_u_new + rho - torch.where(neg, p * z, 0.0).sum(dim=1, keepdim=True) / count)
    loss = 0.5 * (terms[0].mean() + terms[1].mean()) if bimodal else (terms[0] + terms[1]).mean()
    with torch.no_grad():
        if bimodal:
            log_u_state = torch.cat(new_log_u, dim=1)
            grad_tau = torch.cat(grads_tau, dim=1)
        else:
            log_u_state = torch.log(0.5 * (torch.exp(new_log_u[0]) + torch.exp(new_log_u[1])))
            grad_tau = 0.5 * (grads_tau[0] + grads_tau[1])
        momentum_new = (1 - beta) * momentum_old + beta * grad_tau
        tau_new = (tau_rows - eta * momentum_new).clamp(tau_min, tau_max)
        per_sample = tau_rows * log_u_state + tau_rows * rho
        if not bimodal and form == "libauc":
            per_sample = per_sample - positive.detach()[:, None]
        objective = per_sample.mean(dim=0).sum()
        log_u[idx] = log_u_state.to(log_u)
        tau[idx] = tau_new.to(tau)
        tau_momentum[idx] = momentum_new.to(tau_momentum)
        seen[idx] = True
        if libauc_bimodal:
            running_max[idx] = torch.cat(new_max, dim=1).to(running_max)
    return loss, objective


class GCLossReference:
    """LibAUC's ``GCLoss_v1`` (``mode="unimodal"``) / ``GCLoss_v2`` (``"bimodal"``) with
    ``enable_isogclr=True``, transcribed line by line (single process).

    Deviations from the LibAUC source, all mechanical: GCLoss_v1 indexes its (N, 1) temperature
    buffer as ``tau[:, None]`` (a (B, 1, 1) tensor that broadcasts every row against every
    temperature and then fails to store u); here each row uses its own (B, 1) temperature, which
    is the algorithm. No ``.cuda()`` / ``.cpu()`` moves; the state lives in ``dtype`` (float64 by
    default, LibAUC uses float32) on the CPU. ``normalize`` (True in GCLoss_v1) may be turned off
    to feed already-normalised features and compare gradients w.r.t. them. First visits follow
    LibAUC: a batch initialises u when ``u[index].sum() == 0``.

    ``__call__(features_a, features_b, index)`` returns the loss (and, bimodal, LibAUC's
    ``(tau_img.mean(), tau_txt.mean())`` second output is dropped).
    """

    def __init__(self, N: int, mode: str = "unimodal", tau: Optional[float] = None, gamma: float = 0.9,
                 tau_min: Optional[float] = None, tau_max: Optional[float] = None, rho: Optional[float] = None,
                 eta: float = 0.01, beta: float = 0.9, normalize: bool = True, dtype=torch.float64):
        self.bimodal = mode == "bimodal"
        defaults = _ISOGCLR_DEFAULTS[self.bimodal]
        self.tau = defaults["tau"] if tau is None else tau
        self.tau_min = defaults["tau_min"] if tau_min is None else tau_min
        self.tau_max = defaults["tau_max"] if tau_max is None else tau_max
        self.rho = defaults["rho"] if rho is None else rho
        self.gamma, self.eta, self.beta, self.normalize = gamma, eta, beta, normalize
        column = lambda value: torch.full((N, 1), float(value), dtype=dtype)  # noqa: E731
        if self.bimodal:
            self.eps = 1e-20
            self.b1, self.b2, self.u1, self.u2 = column(0), column(0), column(0), column(0)
            self.learnable_tau_img, self.learnable_tau_txt = column(self.tau), column(self.tau)
            self.grad_tau_img, self.grad_tau_txt = column(0), column(0)
        else:
            self.eps, self.LARGE_NUM = 1e-8, 1e9
            self.u = column(0)
            self.learnable_tau = column(self.tau)
            self.grad_tau = column(0)

    def __call__(self, features_a, features_b, index):
        return self._v2(features_a, features_b, index) if self.bimodal else self._v1(features_a, features_b, index)

    def _v1(self, hidden1, hidden2, index):
        if self.normalize:
            hidden1, hidden2 = F.normalize(hidden1, p=2, dim=1), F.normalize(hidden2, p=2, dim=1)
        batch_size = hidden1.shape[0]
        dt = hidden1.dtype
        labels = F.one_hot(torch.arange(batch_size), batch_size * 2).to(dt)
        masks = F.one_hot(torch.arange(batch_size), batch_size).to(dt)
        logits_aa = torch.matmul(hidden1, hidden1.T) - masks * self.LARGE_NUM
        logits_bb = torch.matmul(hidden2, hidden2.T) - masks * self.LARGE_NUM
        logits_ab = torch.matmul(hidden1, hidden2.T)
        logits_ba = torch.matmul(hidden2, hidden1.T)
        neg_mask = 1 - labels
        logits_ab_aa = torch.cat([logits_ab, logits_aa], 1)
        logits_ba_bb = torch.cat([logits_ba, logits_bb], 1)
        tau = self.learnable_tau[index].to(dt)                              # (B, 1)
        neg_logits1 = torch.exp(logits_ab_aa / tau) * neg_mask
        neg_logits2 = torch.exp(logits_ba_bb / tau) * neg_mask
        if self.u[index].sum() == 0:
            u1 = torch.sum(neg_logits1, dim=1, keepdim=True) / (2 * (batch_size - 1))
            u2 = torch.sum(neg_logits2, dim=1, keepdim=True) / (2 * (batch_size - 1))
        else:
            u1 = (1 - self.gamma) * self.u[index] + self.gamma * torch.sum(neg_logits1, dim=1, keepdim=True) / (
                2 * (batch_size - 1))
            u2 = (1 - self.gamma) * self.u[index] + self.gamma * torch.sum(neg_logits2, dim=1, keepdim=True) / (
                2 * (batch_size - 1))
        self.u[index] = (u1.detach() + u2.detach()) / 2
        p_neg_weights1 = (neg_logits1 / u1.clamp(min=self.eps)).detach()
        p_neg_weights2 = (neg_logits2 / u2.clamp(min=self.eps)).detach()

        def softmax_cross_entropy_with_logits(labels, logits, weights):
            expsum_neg_logits = torch.sum(weights * logits, dim=1, keepdim=True) / (2 * (batch_size - 1))
            normalized_logits = logits - expsum_neg_logits
            return -torch.sum(labels * normalized_logits, dim=1)

        loss_a = softmax_cross_entropy_with_logits(labels, logits_ab_aa, p_neg_weights1)
        loss_b = softmax_cross_entropy_with_logits(labels, logits_ba_bb, p_neg_weights2)
        loss = (loss_a + loss_b).mean()
        grad_tau_a = torch.log(u1) + self.rho - torch.sum(p_neg_weights1 * (logits_ab_aa / tau).detach(), dim=1,
                                                          keepdim=True) / (2 * (batch_size - 1))
        grad_tau_b = torch.log(u2) + self.rho - torch.sum(p_neg_weights2 * (logits_ba_bb / tau).detach(), dim=1,
                                                          keepdim=True) / (2 * (batch_size - 1))
        grad_tau = ((grad_tau_a + grad_tau_b) / 2.0).detach()
        self.grad_tau[index] = (1.0 - self.beta) * self.grad_tau[index] + self.beta * grad_tau
        self.learnable_tau[index] = (self.learnable_tau[index] - self.eta * self.grad_tau[index]).clamp_(
            min=self.tau_min, max=self.tau_max)
        return loss

    def _v2(self, image_features, text_features, index):
        logits_per_image = image_features @ text_features.T
        logits_per_text = logits_per_image.T
        logits_image = logits_per_image - torch.diagonal(logits_per_image)[:, None]
        logits_text = logits_per_text - torch.diagonal(logits_per_text)[:, None]
        num_logits = logits_per_image.shape[0]
        labels = torch.arange(num_logits)
        large_batch_size = logits_per_image.shape[-1]
        labels_onehot = F.one_hot(labels, large_batch_size).to(logits_image.dtype)
        neg_mask = 1 - labels_onehot
        tau_img = self.learnable_tau_img[index]
        tau_txt = self.learnable_tau_txt[index]
        logits_image_d_tau = (logits_image / tau_img).detach()
        logits_text_d_tau = (logits_text / tau_txt).detach()
        old_b1 = self.b1[index]
        new_b1 = torch.max(logits_image_d_tau, old_b1.tile(1, large_batch_size))
        self.b1[index] = torch.max(new_b1, dim=1, keepdim=True)[0]
        old_b2 = self.b2[index]
        new_b2 = torch.max(logits_text_d_tau, old_b2.tile(1, large_batch_size))
        self.b2[index] = torch.max(new_b2, dim=1, keepdim=True)[0]
        neg_logits_image = torch.exp(logits_image_d_tau - self.b1[index]) * neg_mask
        neg_logits_text = torch.exp(logits_text_d_tau - self.b2[index]) * neg_mask
        if self.u1[index].sum() == 0:
            u1 = torch.sum(neg_logits_image, dim=1, keepdim=True) / (large_batch_size - 1)
        else:
            u1 = (1 - self.gamma) * self.u1[index] * torch.exp(old_b1 - self.b1[index]) \
                + self.gamma * torch.sum(neg_logits_image, dim=1, keepdim=True) / (large_batch_size - 1)
        if self.u2[index].sum() == 0:
            u2 = torch.sum(neg_logits_text, dim=1, keepdim=True) / (large_batch_size - 1)
        else:
            u2 = (1 - self.gamma) * self.u2[index] * torch.exp(old_b2 - self.b2[index]) \
                + self.gamma * torch.sum(neg_logits_text, dim=1, keepdim=True) / (large_batch_size - 1)
        u1 = u1.clamp(min=self.eps)
        u2 = u2.clamp(min=self.eps)
        p1 = (neg_logits_image / u1).detach()
        p2 = (neg_logits_text / u2).detach()
        self.u1[index] = u1.detach()
        self.u2[index] = u2.detach()
        img_loss = torch.sum(p1 * logits_image, dim=1, keepdim=True).mean()
        txt_loss = torch.sum(p2 * logits_text, dim=1, keepdim=True).mean()
        total_loss = (img_loss + txt_loss) / 2
        grad_tau_img = torch.log(u1.detach()) + self.rho + self.b1[index] \
            - torch.sum(p1 * logits_image_d_tau, dim=1, keepdim=True) / (large_batch_size - 1)
        grad_tau_txt = torch.log(u2.detach()) + self.rho + self.b2[index] \
            - torch.sum(p2 * logits_text_d_tau, dim=1, keepdim=True) / (large_batch_size - 1)
        self.grad_tau_img[index] = (1.0 - self.beta) * self.grad_tau_img[index] + self.beta * grad_tau_img
        self.grad_tau_txt[index] = (1.0 - self.beta) * self.grad_tau_txt[index] + self.beta * grad_tau_txt
        self.learnable_tau_img[index] = (self.learnable_tau_img[index] - self.eta * self.grad_tau_img[index]).clamp_(
            min=self.tau_min, max=self.tau_max)
        self.learnable_tau_txt[index] = (self.learnable_tau_txt[index] - self.eta * self.grad_tau_txt[index]).clamp_(
            min=self.tau_min, max=self.tau_max)
        return total_loss

    def log_u(self) -> Tensor:
        """(N, sides) log u in the fast path's layout (bimodal: LibAUC's shifted u times e^b)."""
        if self.bimodal:
            return torch.cat([torch.log(self.u1) + self.b1, torch.log(self.u2) + self.b2], dim=1)
        return torch.log(self.u)

    def temperatures(self) -> Tensor:
        if self.bimodal:
            return torch.cat([self.learnable_tau_img, self.learnable_tau_txt], dim=1)
        return self.learnable_tau

    def momentum(self) -> Tensor:
        if self.bimodal:
            return torch.cat([self.grad_tau_img, self.grad_tau_txt], dim=1)
        return self.grad_tau
