"""Representation caching (GradCache; Gao et al. 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup") for large contrastive batches on one device.

A contrastive loss couples every pair of the batch, so a batch of B pairs normally needs the
encoders' activations for all B inputs at once. mmloss removes the B×B logit matrix; this
module removes the activations too. ``grad_cache_step`` trains on the full batch in three
passes:

1. **Cache**: run each encoder on sub-batches of ``chunk_size`` rows under ``torch.no_grad()``
   and keep only the (B, D) representations (the RNG state before every sub-batch is recorded).
2. **Loss**: make the cached representations leaves, compute the loss on the full batch and
   back-propagate it: this fills ``∂L/∂rep`` (B×D per encoder) and the gradients of parameters
   that live in the loss (``logit_scale``, ``logit_bias``, ...).
3. **Replay**: re-run every sub-batch with autograd, under the RNG state recorded for it in
   pass 1 (so dropout draws the same masks), and back-propagate the cached ``∂L/∂rep`` slice
   into the encoder's parameters with ``rep.backward(grad)``; gradients accumulate across
   sub-batches.

The parameter gradients equal those of one backward through ``loss_fn`` of the concatenated
sub-batch outputs (tests/test_grad_cache.py checks ≤ 1e-10 in float64, logit scale and bias
included). Peak memory is the activations of one sub-batch plus O(B·D) for the cached
representations and their gradients, plus the loss's own memory (O(B·D) for mmloss losses).
The price is a second forward pass of every encoder.

Rules and caveats:

* **Equality with full-batch training** needs encoders whose output row i depends only on
  input row i (true for MLPs, transformers, CNNs in eval mode or with LayerNorm/GroupNorm).
  Train-mode BatchNorm normalises with sub-batch statistics, exactly like per-GPU BatchNorm
  under DDP without SyncBatchNorm; that is a different (common) model, not an error.
* **BatchNorm running statistics are updated once**, in the cache pass (one update per
  sub-batch, as a plain training loop over the sub-batches would). The replay pass restores
  every ``_BatchNorm`` buffer (``running_mean``, ``running_var``, ``num_batches_tracked``) to
  its value after the cache pass, so the statistics are never updated twice.
* **RNG replay** (``replay_rng=True``): the CPU generator and the CUDA generators of the devices
  the sub-batch lives on are set to their pass-1 state around each replayed sub-batch
  (``torch.random.fork_rng``), so the global RNG ends the step exactly where pass 1 left it.
* **DDP**: an encoder with a ``no_sync()`` method (``DistributedDataParallel``) replays every
  sub-batch but its last inside ``no_sync()``, so gradients are all-reduced once per step
  (at the last sub-batch's backward, over the gradients accumulated locally). The cache pass
  runs under ``no_grad`` and triggers no communication. Parameters used only inside
  ``loss_fn`` (a ``logit_scale`` outside the DDP module) are not reduced by DDP: keep them
  inside the wrapped model, or all-reduce their gradients yourself. Each rank computes the
  loss of its own batch unless ``loss_fn`` gathers across ranks.
* Encoders must be deterministic given the RNG state (no data-dependent randomness outside
  torch's generators) and must not change their own state in forward other than BatchNorm.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
Batch = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]


def _split(batch: Batch, chunk_size: int) -> list:
    """Sub-batches of ``chunk_size`` rows (dim 0) of a tensor, a tuple/list of tensors (called
    as ``encoder(*chunk)``) or a mapping of tensors (``encoder(**chunk)``)."""
    if isinstance(batch, Tensor):
        return list(batch.split(chunk_size))
    if isinstance(batch, Mapping):
        keys = list(batch)
        parts = [batch[k].split(chunk_size) for k in keys]
        return [dict(zip(keys, chunk)) for chunk in zip(*parts)]
    if isinstance(batch, (list, tuple)):
        return [tuple(chunk) for chunk in zip(*(t.split(chunk_size) for t in batch))]
    raise TypeError(f"inputs must be tensors, tuples of tensors or dicts of tensors, got {type(batch).__name__}")


def _rows(batch: Batch) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return next(iter(batch.values())).shape[0]
    return batch[0].shape[0]


def _call(encoder: Callable, chunk) -> Tensor:
    if isinstance(chunk, Mapping):
        out = encoder(**chunk)
    elif isinstance(chunk, tuple):
        out = encoder(*chunk)
    else:
        out = encoder(chunk)
    if not isinstance(out, Tensor):
        raise TypeError(f"each encoder must return one tensor of representations, got {type(out).__name__}")
    return out


def _cuda_devices(chunk) -> list[int]:
    tensors = chunk.values() if isinstance(chunk, Mapping) else (chunk if isinstance(chunk, tuple) else (chunk,))
    return sorted({t.device.index or 0 for t in tensors if isinstance(t, Tensor) and t.device.type == "cuda"})


class _RngState:
    """The CPU generator state and those of the CUDA devices a sub-batch lives on."""

    def __init__(self, devices: list[int]):
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, d)
            yield


def _batchnorm_buffers(encoders: Sequence[Callable]) -> list[tuple[torch.nn.Module, dict]]:
    """(module, {buffer name: copy}) of every BatchNorm layer reachable from the encoders."""
    seen, saved = set(), []
    for encoder in encoders:
        if not isinstance(encoder, torch.nn.Module):
            continue
        for module in encoder.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and id(module) not in seen:
                seen.add(id(module))
                buffers = {name: b.detach().clone() for name, b in module.named_buffers(recurse=False)
                           if b is not None}
                saved.append((module, buffers))
    return saved


def _restore(saved: list[tuple[torch.nn.Module, dict]]) -> None:
    with torch.no_grad():
        for module, buffers in saved:
            for name, value in buffers.items():
                getattr(module, name).copy_(value)


def grad_cache_step(
    encoders: Sequence[Callable],
    inputs: Sequence[Batch],
    loss_fn: Callable[..., Tensor],
    chunk_size: Union[int, Sequence[int]],
    *,
    replay_rng: bool = True,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
) -> Tensor:
    """One GradCache training step: fills ``.grad`` of the encoders' parameters (and of the
    parameters ``loss_fn`` uses) as ``loss_fn(*(encoder(batch) for ...)).backward()`` would on
    the full batch, holding the activations of one sub-batch at a time.

    Args:
        encoders: one callable per input (an ``nn.Module``, possibly DDP-wrapped); the same
            encoder may appear several times (SimCLR's two views).
        inputs: one batch per encoder — a tensor, a tuple of tensors (``encoder(*chunk)``) or a
            dict of tensors (``encoder(**chunk)``); split along dim 0.
        loss_fn: ``loss_fn(*representations, **loss_kwargs)`` → 0-d loss on the full batch,
            e.g. ``lambda img, txt: mmloss.clip_loss(img, txt, model.logit_scale.exp())``.
        chunk_size: rows per sub-batch, one int or one per encoder.
        replay_rng: replay each sub-batch under the RNG state of its cache pass (dropout).

    Returns the detached full-batch loss. Does not zero gradients (they accumulate, as
    ``backward`` does) and does not step the optimizer. See the module docstring for
    BatchNorm, DDP and the memory it needs.
    """
    encoders, inputs = list(encoders), list(inputs)
    if len(encoders) != len(inputs) or not encoders:
        raise ValueError(f"need one input per encoder, got {len(encoders)} encoders and {len(inputs)} inputs")
    sizes = [chunk_size] * len(encoders) if isinstance(chunk_size, int) else list(chunk_size)
    if len(sizes) != len(encoders) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"chunk_size must be a positive int or one per encoder, got {chunk_size!r}")
    chunks = [_split(batch, size) for batch, size in zip(inputs, sizes)]
    if any(_rows(batch) == 0 for batch in inputs):
        raise ValueError("every input needs at least one row")

    # Pass 1: representations without graphs, recording the RNG state of each sub-batch.
    states: list[list[Optional[_RngState]]] = []
    cached: list[Tensor] = []
    with torch.no_grad():
        for encoder, parts in zip(encoders, chunks):
            encoder_states, outputs = [], []
            for chunk in parts:
                encoder_states.append(_RngState(_cuda_devices(chunk)) if replay_rng else None)
                outputs.append(_call(encoder, chunk))
            states.append(encoder_states)
            cached.append(torch.cat(outputs).requires_grad_(True))

    # Pass 2: the full-batch loss and its gradient w.r.t. the cached representations (and the
    # loss's own parameters, which receive their final gradient here).
    loss = loss_fn(*cached, **(loss_kwargs or {}))
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a 0-d tensor")
    loss.backward()
    grads = [rep.grad if rep.grad is not None else torch.zeros_like(rep) for rep in cached]

    # Pass 3: replay each sub-batch with autograd and push its slice of the cached gradient.
    saved_stats = _batchnorm_buffers(encoders)
    last_use = {id(encoder): (k, len(parts) - 1) for k, (encoder, parts) in enumerate(zip(encoders, chunks))}
    try:
        for k, (encoder, parts) in enumerate(zip(encoders, chunks)):
            offset = 0
            for c, chunk in enumerate(parts):
                is_last = last_use[id(encoder)] == (k, c)
                sync = contextlib.nullcontext() if is_last or not hasattr(encoder, "no_sync") else encoder.no_sync()
                rng = states[k][c].replay() if replay_rng else contextlib.nullcontext()
                with sync:
                    with rng:
                        rep = _call(encoder, chunk)
                    rows = rep.shape[0]
                    rep.backward(grads[k][offset:offset + rows].to(rep.dtype))
                    offset += rows
    finally:
        _restore(saved_stats)
    return loss.detach()


__all__ = ["grad_cache_step"]
