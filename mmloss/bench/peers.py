"""Peer implementations the benchmark compares against, each called so that it computes mmloss's loss.

Every peer is optional: ``load_peer(name)`` imports it when installed and otherwise raises
``PeerUnavailable`` with a one-line reason the tables print. The adapters fix the call so the
numbers compare the same loss (the sweep still checks each peer's loss and gradients against
mmloss once per configuration):

- ``dense``: the simple dense torch baseline of ``cases.py`` (logits, then cross-entropy /
  log-sigmoid); ``compile``: ``torch.compile`` of it (default options).
- ``open_clip``: ``ClipLoss`` / ``SigLipLoss`` from ``open_clip/loss.py``, which imports only torch.
- ``lightly``: ``NTXentLoss(temperature)`` (memory bank off) from ``lightly/loss/ntx_ent_loss.py``.
  Both packages' ``__init__`` import torchvision, so neither package is imported: the loss files
  (and the lightly files they import) are loaded by path with ``peer_files.SourceTree``, which
  leaves ``sys.modules`` untouched; lightly's ``models/utils.py`` gets a stand-in for
  ``torchvision.ops.StochasticDepth`` (used only by its ViT helpers, never by the loss).
- ``pml`` (pytorch-metric-learning): ``NTXentLoss(temperature)`` on ``cat(out0, out1)`` with labels
  ``cat(arange(B), arange(B))`` — each anchor's only positive is its other view, every other row a
  negative, which is docs/losses.md §4; ``SupConLoss(temperature)`` with the class labels (§5).
  Imported as a package: it does not need torchvision.
- GPU only: ``inf_cl`` (``cal_inf_loss`` both ways, ½(image→text + text→image) = symmetric CLIP),
  ``memeff`` (``MemoryEfficientCLIPLoss(temperature=1/s, normalized_inputs=True)``, with
  ``stable=False`` where the class has that switch, so gradients are the true ones), and
  ``siglip_kernel`` (``fused_siglip_loss(x, y, log(s), b)``).

Memory models (``estimate_bytes``) are rough upper bounds used only to skip configurations that
would not fit; they were calibrated on the CPU with the resident-set probe of ``measure.py``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .cases import CASES, Inputs, LossCase
from .peer_files import SourceTree

Tensor = torch.Tensor


class PeerUnavailable(RuntimeError):
    """A peer cannot be used here; the message is the one-line reason shown in the report."""


@dataclass(frozen=True)
class Peer:
    name: str  # the --peers name
    label: str  # the table's implementation column
    distribution: Optional[str]  # pip distribution (for the version line), None for built-ins
    losses: tuple  # loss names it implements
    gpu_only: bool
    how: str  # one line: how it is called

    def version(self) -> Optional[str]:
        if self.distribution is None:
            return None
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


PEERS = {
    p.name: p
    for p in (
        Peer("dense", "dense", None, ("clip", "siglip", "ntxent", "supcon", "lse"), False,
             "logits = s·x@yᵀ (+b), then F.cross_entropy both ways / F.logsigmoid"),
        Peer("compile", "dense+compile", None, ("clip", "siglip", "ntxent", "supcon", "lse"), False,
             "torch.compile(dense baseline), default options; compilation happens in warm-up"),
        Peer("open_clip", "open_clip", "open_clip_torch", ("clip", "siglip"), False,
             "open_clip.loss.ClipLoss()(x, y, s) / SigLipLoss()(x, y, s, b)"),
        Peer("lightly", "lightly", "lightly", ("ntxent",), False,
             "lightly.loss.NTXentLoss(temperature)(out0, out1)"),
        Peer("pml", "pml", "pytorch-metric-learning", ("ntxent", "supcon"), False,
             "pytorch_metric_learning.losses.NTXentLoss(τ)(cat(out0,out1), cat(arange B, arange B)); "
             "SupConLoss(τ)(emb, labels)"),
        Peer("inf_cl", "inf_cl", "inf-cl", ("clip",), True,
             "½·(cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s))"),
        Peer("memeff", "memeff", None, ("clip",), True,
             "MemoryEfficientCLIPLoss(temperature=1/s, normalized_inputs=True, stable=False)(x, y)"),
        Peer("siglip_kernel", "siglip_kernel", "siglip-kernel", ("siglip",), True,
             "siglip_kernel.fused_siglip_loss(x, y, log s, b)"),
    )
}


# ----------------------------------------------------------------------------- loading


def _source_tree(package: str, install: str, stand_ins=None) -> SourceTree:
    try:
        return SourceTree(package, stand_ins)
    except ModuleNotFoundError:
        raise PeerUnavailable(f"not installed ({install})") from None


def _load_file(tree: SourceTree, dotted: str):
    """``dotted`` from ``tree``; PeerUnavailable (with the reason) when it cannot be loaded."""
    relative = "/".join(dotted.split(".")) + ".py"
    if tree.file_of(dotted) is None:
        raise PeerUnavailable(f"{relative} not found in {tree.root}")
    try:
        return tree.load(dotted)
    except Exception as exc:  # noqa: BLE001 - any failure is the one-line reason of the report
        raise PeerUnavailable(f"{relative} could not be loaded ({type(exc).__name__}: {exc})") from None


def _load_open_clip():
    tree = _source_tree("open_clip", "pip install open_clip_torch")
    return _load_file(tree, "open_clip.loss"), "open_clip/loss.py loaded by path"


class StochasticDepthPlaceholder(torch.nn.Module):
    """Stands in for torchvision.ops.StochasticDepth, which lightly's NT-Xent never uses."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not available to the benchmark's lightly files: "
                           "StochasticDepth cannot be built")


def _torchvision_stand_ins() -> dict:
    """What ``lightly/models/utils.py`` imports from torchvision at its top (for ViT helpers only)."""
    ops = types.ModuleType("torchvision.ops")
    ops.StochasticDepth = StochasticDepthPlaceholder
    vision = types.ModuleType("torchvision")
    vision.ops = ops
    return {"torchvision": vision, "torchvision.ops": ops}


def _load_lightly():
    tree = _source_tree("lightly", "pip install lightly", _torchvision_stand_ins())
    module = _load_file(tree, "lightly.loss.ntx_ent_loss")
    return module.NTXentLoss, ("lightly/loss/ntx_ent_loss.py loaded by path (torchvision.ops.StochasticDepth, "
                               "used only by lightly's ViT helpers, stubbed)")


def _load_pml():
    try:
        from pytorch_metric_learning.losses import NTXentLoss, SupConLoss
    except ImportError as exc:
        if importlib.util.find_spec("pytorch_metric_learning") is None:
            raise PeerUnavailable("not installed (pip install pytorch-metric-learning)")
        raise PeerUnavailable(f"import failed ({type(exc).__name__}: {exc})")
    return (NTXentLoss, SupConLoss), "pytorch_metric_learning.losses"


def _load_inf_cl():
    if importlib.util.find_spec("inf_cl") is None:
        raise PeerUnavailable("not installed (pip install inf-cl; CUDA GPU only)")
    try:
        from inf_cl import cal_inf_loss
    except Exception as exc:  # noqa: BLE001
        raise PeerUnavailable(f"import failed ({type(exc).__name__}: {exc})")
    return cal_inf_loss, "inf_cl.cal_inf_loss"


def _load_memeff():
    """memeff: the pip package ``memeff`` (≥ 0.3 exports ``MemoryEfficientCLIPLoss``), or a
    checkout of its repository on PYTHONPATH (package ``MemoryEfficientCLIP``) or at
    ``MMLOSS_BENCH_MEMEFF_PATH`` (flat module ``clip_loss``)."""
    extra = os.environ.get("MMLOSS_BENCH_MEMEFF_PATH")
    if extra and extra not in sys.path:
        sys.path.insert(0, extra)
    for module_name in ("memeff", "MemoryEfficientCLIP", "clip_loss"):
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001
            raise PeerUnavailable(f"{module_name} import failed ({type(exc).__name__}: {exc})")
        cls = getattr(module, "MemoryEfficientCLIPLoss", None)
        if cls is not None:
            return cls, module_name
    raise PeerUnavailable("not installed (pip install memeff, or set MMLOSS_BENCH_MEMEFF_PATH to "
                          "a checkout; CUDA GPU only)")


def _load_siglip_kernel():
    if importlib.util.find_spec("siglip_kernel") is None:
        raise PeerUnavailable("not installed (pip install siglip-kernel; CUDA GPU only)")
    try:
        from siglip_kernel import fused_siglip_loss
    except Exception as exc:  # noqa: BLE001
        raise PeerUnavailable(f"import failed ({type(exc).__name__}: {exc})")
    return fused_siglip_loss, "siglip_kernel.fused_siglip_loss"


_LOADERS = {
    "open_clip": _load_open_clip,
    "lightly": _load_lightly,
    "pml": _load_pml,
    "inf_cl": _load_inf_cl,
    "memeff": _load_memeff,
    "siglip_kernel": _load_siglip_kernel,
}


@functools.lru_cache(maxsize=None)
def load_peer(name: str):
    """(handle, how it was loaded) for an installed peer; raises PeerUnavailable otherwise."""
    if name in ("dense", "compile"):
        return None, "built in"
    return _LOADERS[name]()


def peer_status(name: str, device: torch.device) -> Optional[str]:
    """None when the peer can run on ``device``, else the reason it cannot."""
    peer = PEERS[name]
    if peer.gpu_only and device.type != "cuda":
        try:
            load_peer(name)
        except PeerUnavailable as exc:
            return f"{exc}"
        return "installed, but runs on CUDA GPUs only"
    try:
        load_peer(name)
    except PeerUnavailable as exc:
        return str(exc)
    return None


# ----------------------------------------------------------------------------- adapters


@functools.lru_cache(maxsize=None)
def _compiled(case_name: str):
    return torch.compile(CASES[case_name].dense)


def _inf_cl_head_dim(dim: int) -> int:
    for head in (256, 128, 64, 32, 16):
        if dim % head == 0:
            return head
    raise PeerUnavailable(f"inf_cl needs D to be a multiple of 16, 32, 64, 128 or 256 (D={dim})")


def make_call(name: str, case: LossCase, inputs: Inputs) -> Callable[[Inputs], Tensor]:
    """A callable computing ``case``'s loss with peer ``name`` on inputs shaped like ``inputs``."""
    handle, _ = load_peer(name)
    if name == "dense":
        return lambda inp: case.dense(*case.dense_args(inp))
    if name == "compile":
        compiled = _compiled(case.name)
        return lambda inp: compiled(*case.dense_args(inp))
    if name == "open_clip":
        if case.name == "clip":
            fn = handle.ClipLoss()
            return lambda inp: fn(*inp.leaves, inp.scale)
        fn = handle.SigLipLoss()
        return lambda inp: fn(*inp.leaves, inp.scale, inp.bias)
    if name == "lightly":
        fn = handle(temperature=inputs.temperature)
        return lambda inp: fn(*inp.leaves)
    if name == "pml":
        ntxent_cls, supcon_cls = handle
        if case.name == "ntxent":
            fn = ntxent_cls(temperature=inputs.temperature)

            def pml_ntxent(inp: Inputs) -> Tensor:
                out0, out1 = inp.leaves
                idx = torch.arange(out0.shape[0], device=out0.device)
                return fn(torch.cat([out0, out1]), torch.cat([idx, idx]))

            return pml_ntxent
        fn = supcon_cls(temperature=inputs.temperature)
        return lambda inp: fn(inp.leaves[0], inp.labels)
    if name == "inf_cl":
        head_dim = _inf_cl_head_dim(inputs.leaves[0].shape[1])

        def inf_cl_symmetric(inp: Inputs) -> Tensor:
            x, y = inp.leaves
            return 0.5 * (handle(x, y, scale=inp.scale, head_dim=head_dim)
                          + handle(y, x, scale=inp.scale, head_dim=head_dim))

        return inf_cl_symmetric
    if name == "memeff":
        options = {"temperature": 1.0 / float(inputs.scale), "normalized_inputs": True}
        if "stable" in inspect.signature(handle).parameters:
            options["stable"] = False  # true gradients, not the √(B/τ)-rescaled ones
        fn = handle(**options)
        return lambda inp: fn(*inp.leaves)
    if name == "siglip_kernel":
        return lambda inp: handle(*inp.leaves, torch.log(inp.scale), inp.bias)
    raise KeyError(name)


# ----------------------------------------------------------------------------- memory models

# Peak bytes above the inputs ≈ copies × one similarity matrix in the inputs' dtype (fp32 when the
# peer upcasts). Calibrated at B = 1024…4096, fp32, on the CPU probe; rounded up.
_MATRIX_COPIES = {
    ("dense", "clip"): 5.0, ("compile", "clip"): 4.0, ("open_clip", "clip"): 6.0,
    ("dense", "siglip"): 6.0, ("compile", "siglip"): 3.0, ("open_clip", "siglip"): 6.0,
    ("dense", "ntxent"): 5.0, ("compile", "ntxent"): 4.0, ("lightly", "ntxent"): 9.0,
    ("dense", "supcon"): 8.0, ("compile", "supcon"): 5.0, ("pml", "supcon"): 12.0,
    ("dense", "lse"): 5.0, ("compile", "lse"): 4.0,  # as CLIP's (not calibrated separately)
}


def estimate_bytes(name: str, case: LossCase, batch: int, dtype: torch.dtype) -> Optional[int]:
    """Rough peak bytes above the inputs for peer ``name``; None when it is O((N+M)·D)."""
    rows, cols = case.similarity_shape(batch)
    elem = max(torch.empty((), dtype=dtype).element_size(), 4)
    if (name, case.name) == ("pml", "ntxent"):
        # pytorch-metric-learning's NTXentLoss broadcasts every positive pair against every
        # negative pair: a (2B) × (2B·(2B−2)) matrix, several times.
        return int(6 * rows * rows * (rows - 2) * elem)
    copies = _MATRIX_COPIES.get((name, case.name))
    if copies is None:
        return None
    return int(copies * rows * cols * elem)
