"""Input validation shared by the primitives and the losses (DESIGN.md, "Input validation").

Static checks (types, ranks, sizes, devices, dtypes) always run: under ``torch.compile`` they
only read static metadata. Value checks (finite/positive temperatures, label ranges) run only on
Python numbers and CPU tensors and never while compiling, so they cannot synchronise a GPU or
break a graph. Errors: ``ValueError`` for shapes, sizes, values, devices and unsupported
combinations; ``TypeError`` for dtypes and argument types. Messages name the argument.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")

Scalar = Union[float, int, torch.Tensor]


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
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


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


def check_scalar(
    name: str,
    value,
    *,
    rows: Optional[int] = None,
    device: Optional[torch.device] = None,
    positive: bool = False,
) -> None:
    """A Python number, a 0-d tensor or, when ``rows`` is given, an (rows,) tensor.

    ``positive`` asks for a finite value > 0 (temperatures, logit scales of losses); otherwise
    any finite value is accepted (the primitives accept a zero scale).
    """
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
        return
    if isinstance(value, torch.Tensor):
        v = value.detach()
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite, got {_describe(v)}")
        if positive and not bool((v > 0).all()):
            raise ValueError(f"{name} must be > 0, got {_describe(v)}")
    else:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if positive and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _describe(v: torch.Tensor) -> str:
    if v.numel() == 1:
        return str(float(v))
    bad = v[~torch.isfinite(v) | (v <= 0)]
    return f"a tensor with value(s) such as {float(bad[0]) if bad.numel() else float(v[0])}"


def check_labels(
    name: str, labels, rows: int, device: torch.device, *, ndim: int = 1
) -> torch.Tensor:
    check_tensor(name, labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != ndim or labels.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), got {_shape(labels)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    return labels


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
