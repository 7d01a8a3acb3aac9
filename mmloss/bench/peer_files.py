"""A peer's source files loaded by path, never through its package ``__init__``, and never
registered in ``sys.modules``.

open_clip's and lightly's package imports pull torchvision (a CUDA wheel that would replace a
CPU build of torch), while the loss files the benchmark calls need only torch. ``SourceTree``
executes just the files it is asked for, straight from the installed package directory (found
with ``importlib.util.find_spec`` of the top-level name, which imports nothing):

- each file runs as a module object private to the tree (``spec_from_file_location``, then
  ``exec_module``); the interpreter's module table is neither read nor written for the peer's
  names, so loading leaves ``sys.modules`` exactly as it was (test_bench_peers.py pins this);
- the files' own imports of the peer package (``from lightly.utils import dist``, relative
  imports too) resolve to further files of the same directory, loaded the same way: the tree
  gives each module a ``__builtins__`` whose ``__import__`` answers the peer's names itself and
  passes every other name (torch, numpy, …) to the ordinary import;
- packages on the way are bare (``__path__`` only): their ``__init__.py`` never runs;
- ``stand_ins`` answers imports of names the files must not pull (``torchvision.ops`` for a class
  only lightly's ViT helpers construct) with objects given by the caller; any other submodule of
  a stood-in package raises ``ModuleNotFoundError``, as if it were not installed.
"""
from __future__ import annotations

import builtins
import importlib.util
import types
from pathlib import Path
from typing import Mapping, Optional


class SourceTree:
    """The installed files of one top-level package, loaded on demand as private modules."""

    def __init__(self, package: str, stand_ins: Optional[Mapping[str, types.ModuleType]] = None):
        spec = importlib.util.find_spec(package)  # a top-level name: nothing is imported
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"{package} is not installed", name=package)
        self.package = package
        self.root = Path(list(spec.submodule_search_locations)[0])
        self.stand_ins = dict(stand_ins or {})
        self.modules: dict = {}  # dotted name -> module, private to this tree
        self.builtins = {**vars(builtins), "__import__": self.import_name}

    def file_of(self, dotted: str) -> Optional[Path]:
        """``pkg/a/b.py`` or the directory ``pkg/a/b`` for ``pkg.a.b``; None when neither exists."""
        relative = Path(*dotted.split(".")[1:])
        source = (self.root / relative).with_suffix(".py") if relative.parts else None
        if source is not None and source.is_file():
            return source
        directory = self.root / relative
        return directory if directory.is_dir() else None

    def load(self, dotted: str) -> types.ModuleType:
        """The module ``dotted`` (a name inside the package), loading it and its parents once."""
        if dotted in self.modules:
            return self.modules[dotted]
        parent_name, _, child = dotted.rpartition(".")
        parent = self.load(parent_name) if parent_name else None
        location = self.file_of(dotted)
        if location is None:
            raise ModuleNotFoundError(f"no module named {dotted!r} in {self.root}", name=dotted)
        if location.is_dir():
            module = types.ModuleType(dotted)  # bare package: its __init__.py is not run
            module.__path__ = [str(location)]
            module.__package__ = dotted
            self.modules[dotted] = module
        else:
            spec = importlib.util.spec_from_file_location(dotted, location)
            module = importlib.util.module_from_spec(spec)
            module.__dict__["__builtins__"] = self.builtins  # its imports come back to this tree
            self.modules[dotted] = module  # before running it, as the import system does for cycles
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del self.modules[dotted]
                raise
        if parent is not None:
            setattr(parent, child, module)
        return module

    def _stand_in(self, name: str) -> types.ModuleType:
        if name not in self.stand_ins:
            raise ModuleNotFoundError(f"{name} is not available to {self.package}'s files loaded by path",
                                      name=name)
        return self.stand_ins[name]

    def import_name(self, name, globals=None, locals=None, fromlist=(), level=0):
        """``__import__`` for the tree's modules: the peer's own names and the stand-ins are
        answered here, everything else by the ordinary import."""
        absolute = name
        if level:
            package = (globals or {}).get("__package__") or ""
            absolute = importlib.util.resolve_name("." * level + name, package)
        top = absolute.partition(".")[0]
        own = top == self.package
        if own:
            resolve = self.load
        elif top in {key.partition(".")[0] for key in self.stand_ins}:
            resolve = self._stand_in
        else:
            return builtins.__import__(name, globals, locals, fromlist, level)
        module = resolve(absolute)
        if not fromlist:
            return resolve(top) if level == 0 else module
        if own:
            for item in fromlist:  # ``from pkg.a import b`` where b is a module file
                if item != "*" and not hasattr(module, item) and self.file_of(f"{absolute}.{item}"):
                    self.load(f"{absolute}.{item}")
        return module
