"""Input validation shared by the primitives and the losses (docs/design.md, "Input validation").

Static checks (types, ranks, sizes, devices, dtypes) always run: under ``torch.compile`` they
only read static metadata. Value checks (finite/positive temperatures, label ranges) run only on
Python numbers and CPU tensors and never while compiling, so they cannot synchronise a GPU or
break a graph. Errors: ``ValueError`` for shapes, sizes, values, devices and unsupported
combinations; ``TypeError`` for dtypes and argument types. Messages name the argument.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")

Scalar = Union[float, int, torch.Tensor]


def compute_dtype(t: Union[torch.Tensor, torch.dtype]) -> torch.dtype:
    """The accumulation dtype of a tensor (or dtype): fp64 stays fp64 (gradcheck), the rest
    accumulate in fp32 (docs/design.md, "Numerics")."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast casts matmul inputs to on ``device``, or None when it is off."""
    if device.type not in ("cpu", "cuda"):
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """One dtype for several feature tensors, chosen as a matmul would: type promotion, then
    the autocast dtype when autocast is on (fp64 is never lowered)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    cast = autocast_dtype(tensors[0].device)
    if cast is not None and dtype != torch.float64:
        dtype = cast
    return dtype


def prepare_features(x_name: str, x, y_name: str, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two (rows × D) feature matrices (floating, same device, same D) and bring them
    to their ``common_dtype``."""
    check_features(x_name, x)
    check_features(y_name, y)
    check_same_device((x_name, x), (y_name, y))
    check_same_dim(x_name, x, y_name, y)
    dtype = common_dtype(x, y)
    # ``Tensor.to`` to the tensor's own dtype returns it, but still costs a dispatcher call.
    return (x if x.dtype == dtype else x.to(dtype)), (y if y.dtype == dtype else y.to(dtype))


def check_real(name: str, value, kind: str = "a float"):
    """A real Python (or numpy) number that is not a bool; TypeError "``name`` must be ``kind``"
    otherwise. Returned unchanged (a traced symbolic float stays symbolic under torch.compile)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return value


def renamed_argument(caller: str, old: str, old_value, new: str, new_value, *, unset=None):
    """The value of an argument that was renamed from ``old`` to ``new``: the old spelling still
    works with a DeprecationWarning; passing both is a TypeError. ``unset`` marks "not given"."""
    if old_value is unset:
        return new_value
    if new_value is not unset:
        raise TypeError(f"{caller}() got both {new}= and its deprecated alias {old}=; pass only {new}=")
    warnings.warn(f"{caller}({old}=...) is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return old_value


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def value_checks_enabled(*values) -> bool:
    """True when every tensor among ``values`` can be inspected without a device sync."""
    if _compiling():
        return False
    for v in values:
        if isinstance(v, torch.Tensor) and v.device.type != "cpu":
            return False
    return True


def _shape(t: torch.Tensor) -> str:
    """The shape as Python prints a tuple: (7,) for one dimension."""
    return str(tuple(int(s) for s in t.shape))


def check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_features(name: str, t, ndim: int = 2, min_rows: int = 1) -> torch.Tensor:
    """A floating (rows × D) feature matrix with at least ``min_rows`` rows and D ≥ 1."""
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(t)}")
    if t.shape[0] < min_rows:
        raise ValueError(
            f"{name} must have at least {min_rows} row(s), got shape {_shape(t)}"
        )
    if t.shape[-1] < 1:
        raise ValueError(f"{name} must have a feature dimension ≥ 1, got shape {_shape(t)}")
    return t


def check_same_device(*named: tuple[str, Optional[torch.Tensor]]) -> None:
    ref_name, ref = None, None
    for name, t in named:
        if t is None:
            continue
        if ref is None:
            ref_name, ref = name, t
        elif t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                "all inputs must be on one device"
            )


def check_same_dim(x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor) -> None:
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"{x_name} {_shape(x)} and {y_name} {_shape(y)} must have the same feature "
            "dimension D"
        )


def check_same_shape(x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(
            f"{x_name} {_shape(x)} and {y_name} {_shape(y)} must have the same shape"
        )


def as_number(value):
    """A numpy scalar or 0-d numpy array of real type as a Python float; anything else as given."""
    np = sys.modules.get("numpy")  # only values made by an already imported numpy can be numpy
    if np is not None and isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
        if np.asarray(value).dtype.kind in "iuf":
            return float(value)
    return value


def check_scalar(
    name: str,
    value,
    *,
    rows: Optional[int] = None,
    device: Optional[torch.device] = None,
    positive: bool = False,
    dtype: Optional[torch.dtype] = None,
    reciprocal: bool = False,
):
    """A real number, a 0-d tensor or, when ``rows`` is given, an (rows,) tensor.

    ``positive`` asks for a value > 0 (temperatures, logit scales of losses); otherwise any
    value is accepted (the primitives accept a zero scale). Python numbers must be finite.
    Tensors follow the NaN policy (docs/guarantees.md): NaN/Inf entries propagate to the result
    as in torch (``check_all_finite`` refuses them when a caller asks), but a finite tensor value
    that is not representable in the compute ``dtype`` raises. With ``dtype`` the value must stay
    finite (and nonzero when ``positive``) once converted to ``dtype``; with ``reciprocal`` so must
    ``1/value`` (for temperatures, which divide the logits).
    """
    value = as_number(value)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(
            f"{name} must be a float or a floating tensor, got {type(value).__name__}"
        )
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
        allowed = value.dim() == 0 or (rows is not None and value.dim() == 1 and value.shape[0] == rows)
        if not allowed:
            want = "a 0-d tensor" if rows is None else f"a 0-d or ({rows},) tensor"
            raise ValueError(f"{name} must be a float or {want}, got shape {_shape(value)}")
        if device is not None and value.device != device and not (
            value.dim() == 0 and value.device.type == "cpu"
        ):
            raise ValueError(
                f"{name} is on {value.device} but the features are on {device}"
            )
    if not value_checks_enabled(value):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        # One host read instead of a dozen tensor ops (a CPU tensor: no device sync).
        v = value.item()
        if not math.isfinite(v):
            return value  # NaN policy: non-finite values propagate
        if positive and not v > 0:
            raise ValueError(f"{name} must be > 0, got {_describe(value.detach())}")
        _check_representable_number(name, v, dtype, positive, reciprocal)
        return value
    if isinstance(value, torch.Tensor):
        v = value.detach()
        finite = torch.isfinite(v)
        checked = v[finite]  # non-finite entries propagate (NaN policy)
        if positive and not bool((checked > 0).all()):
            raise ValueError(f"{name} must be > 0, got {_describe(v)}")
        _check_representable(name, checked.double(), dtype, positive, reciprocal)
        return value
    else:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if positive and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        _check_representable_number(name, float(value), dtype, positive, reciprocal)
    return value


# |v| in this range survives the cast to fp32 or fp64 finite and nonzero, and so does 1/v.
_SAFE_MAGNITUDE = (1e-30, 1e30)


def _check_representable_number(name: str, v: float, dtype: Optional[torch.dtype], positive: bool,
                                reciprocal: bool) -> None:
    """``_check_representable`` of one finite Python float: values of ordinary magnitude (and
    a zero where zero is allowed) pass without creating a tensor; the rest take the tensor check."""
    if dtype is None:
        return
    if v == 0.0 and not (positive or reciprocal):
        return
    if dtype in (torch.float32, torch.float64) and _SAFE_MAGNITUDE[0] <= abs(v) <= _SAFE_MAGNITUDE[1]:
        return
    _check_representable(name, torch.tensor(v, dtype=torch.float64), dtype, positive, reciprocal)


def _check_representable(name: str, v: torch.Tensor, dtype: Optional[torch.dtype], positive: bool,
                         reciprocal: bool) -> None:
    """Finite values that must survive the cast to the compute dtype (and, for temperatures,
    inversion in it): 1e39 overflows fp32 to inf, 1e-45 is a denormal whose reciprocal is inf."""
    if dtype is None or v.numel() == 0:
        return
    cast = v.to(dtype)
    bad = ~torch.isfinite(cast)
    if positive:
        bad |= cast == 0
    if reciprocal:
        bad |= ~torch.isfinite(1.0 / cast)
    if bool(bad.any()):
        first = float(v[bad.nonzero()[0]] if v.dim() else v)
        what = f"{name} and 1/{name}" if reciprocal else name
        need = "finite and nonzero" if positive or reciprocal else "finite"
        raise ValueError(f"{what} must be {need} in the compute dtype {dtype}, got {name} = {first:g}")


def check_all_finite(*named: tuple[str, Optional[torch.Tensor]]) -> None:
    """ValueError naming the first tensor with a NaN or Inf entry and that entry's index.

    The opt-in half of the NaN policy (``check_finite=True`` on the losses): by default NaN/Inf
    propagate as in torch. Skipped while compiling; on a GPU this reads a device value (a host
    synchronisation), which is why it is opt-in.
    """
    if _compiling():
        return
    for name, t in named:
        if t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name} {_shape(t)} has non-finite entries (check_finite=True): "
                f"{name}[{', '.join(map(str, idx))}] = {float(t.detach()[idx])}"
            )


def _describe(v: torch.Tensor) -> str:
    if v.numel() == 1:
        return str(float(v))
    bad = v[~torch.isfinite(v) | (v <= 0)]
    return f"a tensor with value(s) such as {float(bad[0]) if bad.numel() else float(v[0])}"


def check_labels(
    name: str, labels, rows: int, device: torch.device, *, ndim: int = 1
) -> torch.Tensor:
    """An (rows,) integer tensor on ``device``; returned as int64 (any integer dtype is accepted)."""
    check_tensor(name, labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != ndim or labels.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), got {_shape(labels)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    return labels if labels.dtype == torch.int64 else labels.to(torch.int64)


def check_index_range(name: str, index: torch.Tensor, upper: int) -> None:
    """Value check: every entry in [0, upper)."""
    if index.numel() == 0 or not value_checks_enabled(index):
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got values in [{lo}, {hi}]")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_reduction(reduction) -> str:
    return check_choice("reduction", reduction, _REDUCTIONS)


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_fraction(name: str, value, *, upper_open: bool = True) -> float:
    """A Python float in [0, 1) (or [0, 1] when ``upper_open`` is False)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value}")
    return float(value)
