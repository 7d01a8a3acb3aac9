"""What each process of ``python -m mmloss.bench --nproc N`` runs (``run_rank``; spawned by
``multiprocess.py``): one rank of a torch.distributed group measuring the distributed losses.

Per configuration (loss, B_local, D, dtype), on every rank, in this order:

1. inputs: this rank's B_local rows per side (``cases.LossCase.make_inputs`` with a per-rank
   seed), leaves requiring grad; the logit scale and bias as 0-d tensors without grad;
2. skips: rank 0 compares each implementation's memory model with the free memory (CPU: the
   machine's available memory shared by the N ranks; GPU: its device's) and broadcasts the
   decision, so every rank skips the same ones;
3. warm-up: one forward + backward each, a barrier before every call; the first that runs (an
   mmloss implementation) is the reference; each other one's loss value and this rank's feature
   gradients are compared with it (every implementation carries W × this rank's share of the
   global gradient: mmloss by its convention, open_clip through its gathers' backward). The
   ranks then agree (one all-reduce) on which implementations ran everywhere;
4. memory: untimed calls: the peak held above the inputs during forward + backward, gradients
   included (CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated
   before, one call; CPU: ``allocations.peak_bytes_above_start``, repeated until two readings
   agree on every rank, at most 3 calls, the smallest kept — see ``CPU_PEAK_READINGS``);
5. time: ``repeats`` rounds, implementations alternated (order rotated by one every round), a
   barrier before every call, Python's GC off; forward (the loss call) and backward seconds.

Results go to the parent through ``queue`` as ("result", config index, rank, payload); rank 0
also sends ("progress", text) lines. An error in one implementation is recorded in its row and
the run goes on when it is raised on every rank alike; a rank that fails alone leaves the others
waiting in a collective until the process group's timeout, then the whole run stops.
"""
from __future__ import annotations

import functools
import gc
import inspect
import math
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch

from . import measure, peers
from .allocations import peak_bytes_above_start
from .cases import CASES, LossCase
from .options import DTYPES
from .sweep import default_repeats, error_text

MODES = ("gather", "ring")


@dataclass(frozen=True)
class RankPlan:
    """Everything a rank needs (picklable: sent to the spawned processes)."""

    nproc: int
    device_type: str  # "cpu" | "cuda" (rank r uses cuda:r)
    comm: str  # "gloo" | "nccl"
    rendezvous: str  # file of the file:// rendezvous
    configs: tuple  # ((loss, B_local, D, dtype name), …)
    backends: tuple  # mmloss backends; each runs in every mode of MODES
    peers: tuple  # ("open_clip",) or ()
    repeats: Optional[int]  # None: sweep.default_repeats(B_local)
    seed: int
    threads: Optional[int]  # torch threads per rank; None: leave torch's default
    timeout_s: float  # the process group's timeout (a rank stuck in a collective gives up)
    memory_fraction: float = 0.8  # skip an implementation whose model exceeds this share of free memory

    def repeats_for(self, batch: int) -> int:
        return self.repeats if self.repeats is not None else default_repeats(batch, torch.device(self.device_type))


@dataclass(frozen=True)
class RankImplementation:
    """One row source of the multi-process bench."""

    label: str
    kind: str  # "mmloss" | "peer"
    how: str  # one line: how it is called
    make: Callable[[LossCase, int, int], Callable]  # (case, rank, world size) -> callable(inputs) -> loss
    estimate: Callable[[LossCase, int, int, torch.dtype], Optional[int]]  # (case, B_local, W, dtype) -> bytes


def _no_estimate(case, batch, size, dtype):
    return None  # O(W·B_local·D) (gather) or O(B_local·D) (ring) plus a bounded workspace


def mmloss_rank_implementation(backend: str, mode: str) -> RankImplementation:
    def make(case: LossCase, rank: int, size: int):
        fn = functools.partial(case.mmloss_function(), distributed=mode)
        return lambda inp: case.call(fn, inp, backend)

    how = f"mmloss.clip_loss / siglip_loss(…, backend={backend!r}, distributed={mode!r})"
    return RankImplementation(f"mmloss[{backend}] {mode}", "mmloss", how, make, _no_estimate)


# open_clip's distributed losses, each as (label, constructor keywords, what it materialises).
OPEN_CLIP_VARIANTS = {
    "clip": (
        ("open_clip", {"local_loss": False, "gather_with_grad": True},
         "ClipLoss(local_loss=False, gather_with_grad=True, rank, world_size): B_global × B_global logits"),
        ("open_clip local", {"local_loss": True, "gather_with_grad": True},
         "ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size): B_local × B_global logits"),
    ),
    "siglip": (
        ("open_clip bidir", {"dist_impl": "bidir"},
         "SigLipLoss(rank, world_size, dist_impl='bidir'): W blocks of B_local × B_local"),
        ("open_clip gather", {"dist_impl": "gather"},
         "SigLipLoss(rank, world_size, dist_impl='gather'): W blocks of B_local × B_local"),
    ),
}


def _open_clip_make(loss: str, options: dict):
    def make(case: LossCase, rank: int, size: int):
        module, _ = peers.load_peer("open_clip")
        cls = module.ClipLoss if loss == "clip" else module.SigLipLoss
        accepted = inspect.signature(cls).parameters
        missing = [k for k in options if k not in accepted]
        if missing:
            raise peers.PeerUnavailable(f"this open_clip's {cls.__name__} has no {', '.join(missing)} argument")
        fn = cls(rank=rank, world_size=size, **options)
        if loss == "clip":
            return lambda inp: fn(*inp.leaves, inp.scale)
        return lambda inp: fn(*inp.leaves, inp.scale, inp.bias)

    return make


def _open_clip_estimate(loss: str, options: dict):
    """Bytes per rank: the single-process model of ``peers.estimate_bytes`` at the matrix each
    variant builds (B_global² for local_loss=False; two B_local × B_global for local_loss=True;
    W blocks of B_local² kept for the backward in SigLIP)."""
    def estimate(case: LossCase, batch: int, size: int, dtype):
        if loss == "clip" and not options["local_loss"]:
            return peers.estimate_bytes("open_clip", case, batch * size, dtype)
        if loss == "clip":
            return 2 * peers.estimate_bytes("open_clip", case, batch * size, dtype) // size
        return size * peers.estimate_bytes("open_clip", case, batch, dtype)

    return estimate


def implementations_for(loss: str, backends, peer_names) -> list:
    """The row sources of ``loss``: every backend in every mode, then open_clip's variants."""
    impls = [mmloss_rank_implementation(b, m) for b in backends for m in MODES]
    if "open_clip" in peer_names:
        impls += [RankImplementation(label, "peer", how, _open_clip_make(loss, options),
                                     _open_clip_estimate(loss, options))
                  for label, options, how in OPEN_CLIP_VARIANTS[loss]]
    return impls


# ----------------------------------------------------------------------------- one rank


class RankContext:
    """This rank's place (rank, world size, device), its clock, and the queue to the parent;
    collectives go through the default group the rank joined."""

    def __init__(self, rank: int, plan: RankPlan, queue):
        self.rank, self.plan, self.queue = rank, plan, queue
        self.size = plan.nproc
        self.device = torch.device("cuda", rank) if plan.device_type == "cuda" else torch.device("cpu")
        self.clock = measure.clock_for(self.device)
        self.started = time.monotonic()

    def progress(self, text: str) -> None:
        if self.rank == 0:
            self.queue.put(("progress", f"[{time.monotonic() - self.started:5.0f} s] {text}"))

    def barrier(self) -> None:
        dist = torch.distributed
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            dist.barrier(device_ids=[self.rank])
        else:
            dist.barrier()

    def all_agree(self, flags: list) -> list:
        """Each flag true on every rank (one all-reduce, MIN)."""
        if not flags:
            return []
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return [bool(v) for v in t.tolist()]

    def free_bytes_per_rank(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        try:
            return measure.available_cpu_bytes() // self.size
        except OSError:
            return 0  # unknown: run everything


def _skips(ctx: RankContext, case: LossCase, batch: int, dtype, impls: list) -> dict:
    """{label: reason} of the implementations whose memory model exceeds the free memory;
    decided on rank 0 and broadcast, so every rank skips the same ones."""
    decision = [None]
    if ctx.rank == 0:
        free = ctx.free_bytes_per_rank()
        skips = {}
        for impl in impls:
            need = impl.estimate(case, batch, ctx.size, dtype)
            if need is not None and free and need > ctx.plan.memory_fraction * free:
                skips[impl.label] = f"needs ≈{need / 2**30:.1f} GiB per rank, {free / 2**30:.1f} GiB free per rank"
        decision = [skips]
    torch.distributed.broadcast_object_list(decision, src=0)
    return decision[0]


def _grad_errors(grads: list, reference: list) -> tuple:
    """(Σ‖g − r‖², Σ‖r‖²) over this rank's feature gradients (inf when one is missing)."""
    if any(g is None for g in grads):
        return math.inf, sum(float(r.double().square().sum()) for r in reference)
    num = sum(float((g.double() - r.double()).square().sum()) for g, r in zip(grads, reference))
    return num, sum(float(r.double().square().sum()) for r in reference)


def _warm_up(ctx: RankContext, live: list, inputs, results: dict) -> list:
    """One call each (see the module docstring); returns the (label, fn) that ran on every rank."""
    reference = None
    ran = []
    for label, fn in live:
        ctx.barrier()
        try:
            call = measure.timed_call(fn, inputs, ctx.clock)
        except Exception as exc:  # noqa: BLE001 - recorded in the row
            results[label].update(status="error", note=error_text(exc))
            inputs.clear_grads()
            measure.free_cached(ctx.device)
            ran.append(False)
            continue
        grads = [None if g is None else g.detach().clone() for g in inputs.grads()]
        results[label]["value"] = float(call.loss.float())
        if reference is None:
            reference = (label, grads)
            results[label]["reference"] = label
        else:
            err, ref = _grad_errors(grads, reference[1])
            results[label].update(reference=reference[0], grad_sq_err=err, grad_sq_ref=ref)
        ran.append(True)
    inputs.clear_grads()
    everywhere = ctx.all_agree(ran)
    for (label, _), here, all_ranks in zip(live, ran, everywhere):
        if here and not all_ranks:
            results[label].update(status="error", note="failed on another rank")
    return [pair for pair, ok in zip(live, everywhere) if ok]


# The CPU probe replays the allocator events of this rank's thread; a buffer whose last reference
# drops on one of gloo's threads (the outputs of a collective, released with its work object) is
# freed unseen, which can only OVERSTATE a reading. So the call is tracked until two readings
# agree on every rank (at most this many times) and the smallest reading is kept.
CPU_PEAK_READINGS = 3


def _peak_bytes(ctx: RankContext, fn, inputs) -> int:
    """Peak bytes above the inputs of one forward + backward (module docstring, step 4)."""
    def step():
        fn(inputs).backward()

    readings = []
    for _ in range(1 if ctx.device.type == "cuda" else CPU_PEAK_READINGS):
        inputs.clear_grads()
        gc.collect()
        ctx.barrier()
        if ctx.device.type == "cuda":
            probe = measure.CudaMemoryProbe(ctx.device)
            probe.begin()
            step()
            readings.append(probe.end())
        else:
            peak, _ = peak_bytes_above_start(step)
            repeated = peak in readings
            readings.append(peak)
            if ctx.all_agree([repeated])[0]:
                break
    inputs.clear_grads()
    return min(readings)


def _time_rounds(ctx: RankContext, survivors: list, inputs, repeats: int, results: dict) -> None:
    for label, _ in survivors:
        results[label].update(forward=[], backward=[])
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(repeats):
            shift = round_index % max(len(survivors), 1)
            for label, fn in survivors[shift:] + survivors[:shift]:
                ctx.barrier()
                call = measure.timed_call(fn, inputs, ctx.clock)
                results[label]["forward"].append(call.forward)
                results[label]["backward"].append(call.backward)
                del call
            inputs.clear_grads()
    finally:
        if enabled:
            gc.enable()


def measure_config(ctx: RankContext, index: int, config: tuple) -> dict:
    """This rank's results of one configuration: {label: {status, note, value, forward, backward,
    peak, grad_sq_err, grad_sq_ref, reference}}."""
    loss, batch, dim, dtype_name = config
    case, dtype, plan = CASES[loss], DTYPES[dtype_name], ctx.plan
    title = f"{index + 1}/{len(plan.configs)} {loss} B_local={batch} D={dim} {dtype_name}"
    impls = implementations_for(loss, plan.backends, plan.peers)
    results = {impl.label: {"status": "ok", "note": ""} for impl in impls}
    measure.free_cached(ctx.device)
    inputs = case.make_inputs(batch, dim, dtype, ctx.device, plan.seed + 1000 * ctx.rank)
    skips = _skips(ctx, case, batch, dtype, impls)
    live = []
    for impl in impls:
        if impl.label in skips:
            results[impl.label].update(status="skipped", note=skips[impl.label])
            continue
        try:
            live.append((impl.label, impl.make(case, ctx.rank, ctx.size)))
        except Exception as exc:  # noqa: BLE001 - the same on every rank (no collective yet)
            results[impl.label].update(status="skipped", note=error_text(exc))
    ctx.progress(f"{title}: warm-up and agreement ({len(live)} implementations)")
    survivors = _warm_up(ctx, live, inputs, results)
    ctx.progress(f"{title}: peak memory per rank")
    for label, fn in survivors:
        results[label]["peak"] = _peak_bytes(ctx, fn, inputs)
    repeats = plan.repeats_for(batch)
    ctx.progress(f"{title}: timing, {repeats} rounds")
    _time_rounds(ctx, survivors, inputs, repeats, results)
    del inputs, live, survivors
    measure.free_cached(ctx.device)
    return {"results": results, "repeats": repeats}


def run_rank(rank: int, plan: RankPlan, queue) -> None:
    """The body of spawned process ``rank`` (torch.multiprocessing passes the index first)."""
    dist = torch.distributed
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler of the CPU memory probe: no start/stop lines
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                            category=FutureWarning)  # open_clip's gathers, once per call
    if plan.threads:
        torch.set_num_threads(plan.threads)
    ctx = RankContext(rank, plan, queue)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(plan.comm, init_method=f"file://{plan.rendezvous}", rank=rank,
                            world_size=plan.nproc, timeout=timedelta(seconds=plan.timeout_s))
    try:
        ctx.progress(f"{plan.nproc} ranks ready ({plan.comm}, {torch.get_num_threads()} torch thread(s) per rank)")
        for index, config in enumerate(plan.configs):
            try:
                payload = measure_config(ctx, index, config)
            except Exception:
                # Not recoverable: the ranks may no longer be in step. The parent prints this.
                queue.put(("failed", index, rank, traceback.format_exc(limit=8)))
                raise
            queue.put(("result", index, rank, payload))
    finally:
        dist.destroy_process_group()
