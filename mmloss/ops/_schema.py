"""One declaration per fused primitive → its ``torch.library`` ops, fake kernels and autograd.

A ``Primitive`` lists the op's arguments and outputs by name (``Arg`` / ``Out``); ``register``
turns it into

- the forward op ``mmloss::<name>``, whose schema string is generated from the table (the same
  string a C++ ``TORCH_LIBRARY`` block declares, see ``Primitive.schema``);
- for a primitive with ``backward`` set, the op ``mmloss::<name>_backward`` that takes the
  upstream gradients of the differentiable outputs, every forward argument, the saved
  (statistics) outputs and one ``need_<arg>`` flag per differentiable argument, and returns one
  gradient per differentiable argument (an empty tensor where not needed). It is also the
  "backward from given statistics" entry point: a caller (e.g. a ring over ranks) may pass
  statistics it merged itself;
- the fake kernels (symbolic shapes for ``torch.compile``) and the autograd registration:
  tensors are saved and gradient slots chosen by name, never by position.

Adding an argument to a primitive is one ``Arg`` in its declaration plus its use in the
``spec``/``fake`` functions next to it; the op signatures, saving and gradient routing follow.
"""
from __future__ import annotations

import importlib
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .._device import no_autocast

Tensor = torch.Tensor

_TENSOR_TYPES = ("Tensor", "Tensor?")
# Backends implemented by the compiled extension ``mmloss._C`` (csrc/): their ops are
# ``mmloss_C::<name>``, defined from the same declarations (``emit_schema`` writes the C++
# schemas) with CPU / CUDA / Meta kernels and autograd in C++.
COMPILED_BACKENDS = ("cpu", "cuda")


@torch.compiler.assume_constant_result
def _compiled_loaded() -> bool:
    """Import ``mmloss._C`` (registering its ops) once. A constant to ``torch.compile``, which
    runs it eagerly while tracing: dynamo does not trace ``importlib``."""
    from .. import _extension

    _extension.load()
    return True


def compiled_op(name: str):
    """The compiled extension's op ``mmloss_C::<name>``."""
    _compiled_loaded()
    return getattr(torch.ops.mmloss_C, name)


@dataclass(frozen=True)
class Arg:
    """One op argument: ``type`` is a torch schema type ("Tensor", "Tensor?", "float", "int",
    "bool", "str"); ``grad`` marks an argument that receives a gradient."""

    name: str
    type: str
    grad: bool = False


@dataclass(frozen=True)
class Out:
    """One op output (always a Tensor). ``saved``: a non-differentiable statistic kept for the
    backward op; ``grad_of``: a gradient formed during the forward pass for that argument
    (the primitive's backward then only rescales it by the upstream gradient)."""

    name: str
    saved: bool = False
    grad_of: Optional[str] = None

    @property
    def differentiable(self) -> bool:
        return not self.saved and self.grad_of is None


@dataclass(frozen=True)
class Primitive:
    """A fused primitive's declaration.

    ``spec(params)`` builds what a backend receives (``PairSpec`` / ``KLSpec``) from the
    named arguments; ``forward(module, spec, params)`` and ``backward(module, spec, params,
    grads, saved, needs)`` call the backend module (``modules[params.backend]``), with
    ``grads`` / ``saved`` named tuples of the upstream gradients / saved outputs and ``needs``
    one bool per differentiable argument in declaration order. ``fake(params)`` returns
    empty outputs of the right shapes and dtypes. Without ``backward``, gradients come from
    outputs declared with ``grad_of``.
    """

    name: str
    args: tuple[Arg, ...]
    outputs: tuple[Out, ...]
    modules: dict
    spec: Callable
    forward: Callable
    fake: Callable
    backward: Optional[Callable] = None
    doc: str = ""
    # Filled by ``register``.
    ops: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def grad_args(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.grad)

    @property
    def schema(self) -> str:
        """The forward op's schema, e.g. ``(Tensor x, Tensor y, ...) -> (Tensor, Tensor)``."""
        return _schema(self.args, len(self.outputs))

    @property
    def backward_args(self) -> tuple[Arg, ...]:
        upstream = tuple(Arg(f"grad_{o.name}", "Tensor?") for o in self.outputs if o.differentiable)
        saved = tuple(Arg(o.name, "Tensor") for o in self.outputs if o.saved)
        needs = tuple(Arg(f"need_{name}", "bool") for name in self.grad_args)
        return upstream + tuple(Arg(a.name, a.type) for a in self.args) + saved + needs

    @property
    def backward_schema(self) -> str:
        return _schema(self.backward_args, len(self.grad_args))

    def backend_module(self, backend: str):
        """The Python module of ``backend`` (for a compiled backend: its statistics helpers)."""
        if backend in COMPILED_BACKENDS:
            return importlib.import_module("mmloss.ops.compiled")
        try:
            return importlib.import_module(self.modules[backend])
        except KeyError:  # pragma: no cover - resolve_backend refuses these first
            raise RuntimeError(f"mmloss backend {backend!r} has no implementation of {self.name}")

    def __call__(self, *args, **named):
        """Run the forward op on its arguments, positional in declaration order or by name
        (every argument named: the call then reads like the declaration). The compiled
        backends go straight to ``mmloss_C::<name>``, whose autograd is C++."""
        if named:
            args = args + tuple(named[name] for name in self.ops["arg_names"][len(args):])
        if args[self.ops["backend_slot"]] in COMPILED_BACKENDS:
            if torch.compiler.is_compiling():
                # No cache read while tracing: a guard on it would recompile once an eager
                # call fills it.
                return compiled_op(self.name).default(*args)
            # Eager: the op's single overload, looked up once (the packet's overload resolution
            # and the loading check cost more than a small call's epilogue).
            op = self.ops.get("compiled_forward")
            if op is None:
                op = self.ops["compiled_forward"] = compiled_op(self.name).default
            return op(*args)
        return self.ops["forward"](*args)

    def run_backward(self, *args):
        """Run the backward op on positional arguments in ``backward_args`` order."""
        n_upstream = sum(o.differentiable for o in self.outputs)
        if args[n_upstream + self._backend_slot] in COMPILED_BACKENDS:
            return compiled_op(f"{self.name}_backward")(*args)
        return self.ops["backward"](*args)

    @property
    def _backend_slot(self) -> int:
        return self.ops["backend_slot"]


def row_col_fake(x: Tensor, y: Tensor, rows: bool, cols: bool, stat_fields: int):
    """Fake outputs of a primitive returning (row (N,) | (0,), col (M,) | (0,), row statistics
    (stat_fields, N | 0), column statistics (stat_fields, M | 0)) in the compute dtype."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, m = (x.shape[0] if rows else 0), (y.shape[0] if cols else 0)
    return (x.new_empty(n, dtype=dt), x.new_empty(m, dtype=dt), x.new_empty((stat_fields, n), dtype=dt),
            x.new_empty((stat_fields, m), dtype=dt))


def row_col_backward(backend_function: str):
    """The ``backward`` of a row/column primitive: the upstream gradients of the directions that
    were computed (outputs named "row…"/"col…", first two), the saved ``row_stats`` /
    ``col_stats``, then any further saved outputs in declaration order (similarity_lse's
    ``logits``), handed to the backend's ``backend_function``."""
    def backward(module, spec, p, grads, saved, needs):
        row = grads[0] if p.rows else None
        col = grads[1] if p.cols else None
        if row is None and col is None:
            return (None,) * len(needs)
        extra = tuple(getattr(saved, name) for name in saved._fields if name not in ("row_stats", "col_stats"))
        return getattr(module, backend_function)(spec, row, col, saved.row_stats, saved.col_stats, *extra, needs)
    return backward


def _schema(args, n_outputs: int) -> str:
    outs = "Tensor" if n_outputs == 1 else "(" + ", ".join(["Tensor"] * n_outputs) + ")"
    return f"({', '.join(f'{a.type} {a.name}' for a in args)}) -> {outs}"


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def double_backward_error(ctx, *grads):
    raise RuntimeError(
        "mmloss primitives do not support double backward (create_graph=True through "
        "similarity_lse / pairwise_sigmoid / similarity_kl); compute higher-order terms with the "
        "reference backend"
    )


def register(p: Primitive) -> Primitive:
    """Define ``mmloss::<p.name>`` (and its backward op) from the declaration; returns ``p``."""
    Params = namedtuple(f"{_camel(p.name)}Params", [a.name for a in p.args])
    tensor_slots = tuple(i for i, a in enumerate(p.args) if a.type in _TENSOR_TYPES)
    other_slots = tuple(i for i, a in enumerate(p.args) if a.type not in _TENSOR_TYPES)
    grad_slots = tuple(i for i, a in enumerate(p.args) if a.grad)
    saved_outs = tuple(i for i, o in enumerate(p.outputs) if o.saved)
    first = p.args[0].name  # the tensor whose device sets the autocast scope

    def forward_impl(*args):
        params = Params._make(args)
        x = getattr(params, first)
        with no_autocast(x.device):
            out = p.forward(p.backend_module(params.backend), p.spec(params), params)
        return tuple(_empty_if_none(t, x) for t in out) if len(p.outputs) > 1 else out

    p.ops["arg_names"] = tuple(a.name for a in p.args)
    p.ops["backend_slot"] = next(i for i, a in enumerate(p.args) if a.name == "backend")
    forward = torch.library.custom_op(f"mmloss::{p.name}", forward_impl, mutates_args=(), schema=p.schema)
    forward.register_fake(lambda *args: p.fake(Params._make(args)))
    p.ops["forward"] = forward
    if p.backward is not None:
        _register_backward(p, Params, tensor_slots, other_slots, grad_slots, saved_outs)
    else:
        _register_precomputed(p, grad_slots)
    return p


def _register_backward(p: Primitive, Params, tensor_slots, other_slots, grad_slots, saved_outs):
    n_up = sum(o.differentiable for o in p.outputs)
    n_args, n_saved = len(p.args), len(saved_outs)
    Upstream = namedtuple(f"{_camel(p.name)}Grads", [o.name for o in p.outputs if o.differentiable])
    Saved = namedtuple(f"{_camel(p.name)}Saved", [p.outputs[i].name for i in saved_outs])
    grad_names = p.grad_args

    def backward_impl(*args):
        grads = Upstream._make(args[:n_up])
        params = Params._make(args[n_up:n_up + n_args])
        saved = Saved._make(args[n_up + n_args:n_up + n_args + n_saved])
        needs = tuple(args[n_up + n_args + n_saved:])
        x = getattr(params, p.args[0].name)
        with no_autocast(x.device):
            out = p.backward(p.backend_module(params.backend), p.spec(params), params, grads, saved, needs)
        return tuple(_empty_if_none(t, x) for t in out)

    def backward_fake(*args):
        params = Params._make(args[n_up:n_up + n_args])
        needs = args[n_up + n_args + n_saved:]
        x = getattr(params, p.args[0].name)
        return tuple(getattr(params, name).new_empty(getattr(params, name).shape) if need else x.new_empty(0)
                     for name, need in zip(grad_names, needs))

    backward_op = torch.library.custom_op(f"mmloss::{p.name}_backward", backward_impl, mutates_args=(),
                                          schema=p.backward_schema)
    backward_op.register_fake(backward_fake)
    backward_op.register_autograd(double_backward_error, setup_context=_no_setup)
    p.ops["backward"] = backward_op

    def setup_context(ctx, inputs, output):
        saved = tuple(output[i] for i in saved_outs)
        ctx.mark_non_differentiable(*saved)
        # Only tensors are saved (an absent optional tensor stays None in ``args``).
        ctx.tensor_slots = tuple(i for i in tensor_slots if inputs[i] is not None)
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots), *saved)
        ctx.others = tuple(inputs[i] for i in other_slots)
        ctx.set_materialize_grads(False)

    def autograd_backward(ctx, *upstream):
        upstream = tuple(g for g, o in zip(upstream, p.outputs) if o.differentiable)
        needs = tuple(ctx.needs_input_grad[i] for i in grad_slots)
        result = [None] * n_args
        if all(g is None for g in upstream) or not any(needs):
            return tuple(result)
        stored = ctx.saved_tensors
        args = [None] * n_args
        for slot, t in zip(ctx.tensor_slots, stored):
            args[slot] = t
        for slot, v in zip(other_slots, ctx.others):
            args[slot] = v
        grads = backward_op(*upstream, *args, *stored[len(ctx.tensor_slots):], *needs)
        for slot, g, need in zip(grad_slots, grads, needs):
            result[slot] = g if need else None
        return tuple(result)

    p.ops["forward"].register_autograd(autograd_backward, setup_context=setup_context)


def _register_precomputed(p: Primitive, grad_slots):
    """Autograd for a primitive whose outputs hold its gradients (``Out.grad_of``, computed as
    its ``need_<arg>`` arguments ask): the backward rescales them by the upstream gradient of
    the differentiable output and casts them to the dtype of the argument they belong to."""
    grad_outs = {o.grad_of: i for i, o in enumerate(p.outputs) if o.grad_of is not None}
    value_out = next(i for i, o in enumerate(p.outputs) if o.differentiable)
    n_args = len(p.args)

    # The op computed the gradients its ``need_<arg>`` arguments asked for.
    need_slots = tuple(next(j for j, a in enumerate(p.args) if a.name == f"need_{p.args[i].name}")
                       for i in grad_slots)

    def setup_context(ctx, inputs, output):
        ctx.needs = tuple(inputs[j] for j in need_slots)
        ctx.dtypes = tuple(None if inputs[i] is None else inputs[i].dtype for i in grad_slots)
        ctx.save_for_backward(*(output[grad_outs[p.args[i].name]] for i in grad_slots))
        ctx.set_materialize_grads(False)

    def autograd_backward(ctx, *upstream):
        if torch.is_grad_enabled():
            double_backward_error(ctx)
        result = [None] * n_args
        scale = upstream[value_out]
        if scale is not None:
            for slot, g, need, dtype in zip(grad_slots, ctx.saved_tensors, ctx.needs, ctx.dtypes):
                if need:
                    result[slot] = (g * scale).to(dtype)
        return tuple(result)

    p.ops["forward"].register_autograd(autograd_backward, setup_context=setup_context)


def _no_setup(ctx, inputs, output):
    return None


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))
