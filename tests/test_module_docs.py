"""Every public loss module documents its ``forward`` (issue 13: the API reference is generated from
the docstrings, and mkdocstrings shows no member without one)."""
from __future__ import annotations

import inspect

import pytest
import torch

import mmloss.losses

MODULES = [getattr(mmloss.losses, name) for name in mmloss.losses.__all__]


def _documented_methods(cls):
    """The call surface a user reads: ``forward`` (and a queue's ``enqueue``)."""
    names = ["forward"] + (["enqueue"] if hasattr(cls, "enqueue") else [])
    return [(name, getattr(cls, name)) for name in names]


@pytest.mark.parametrize("cls", MODULES, ids=lambda cls: cls.__name__)
def test_forward_has_docstring(cls):
    assert issubclass(cls, torch.nn.Module)
    assert cls.forward is not torch.nn.Module.forward, f"{cls.__name__} defines no forward"
    for name, method in _documented_methods(cls):
        # __doc__, not inspect.getdoc: getdoc would fall back to torch.nn.Module.forward's text.
        doc = method.__doc__
        assert doc and doc.strip(), f"{cls.__name__}.{name} has no docstring"


@pytest.mark.parametrize("cls", MODULES, ids=lambda cls: cls.__name__)
def test_forward_docstring_cites_the_math(cls):
    """Each forward names its section of the math contract (docs/losses.md §n)."""
    doc = inspect.cleandoc(cls.forward.__doc__ or "")
    assert "docs/losses.md §" in doc, f"{cls.__name__}.forward cites no docs/losses.md section"
