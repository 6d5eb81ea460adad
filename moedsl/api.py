"""The public API, each name re-exported from the module that does the work:

* ``load_spec``, ``validate_file``: a validated ``Spec`` (``moedsl.spec_loader``);
* ``compile``, ``build_model``: a graph, a ready model (``moedsl.build``);
* ``load_model``: a model with its weights from an import folder, a run, a checkpoint or a spec
  with ``checkpoint=`` (``moedsl.runtime.load``, which asks ``moedsl.runtime.resolve`` what the
  path is);
* ``generate``, ``evaluate``, ``inspect``, ``upcycle``: ``moedsl.runtime.generate``, ``.evaluate``,
  ``.inspect``, ``.upcycle`` (a dense model -> an MoE model whose output equals it).

The last five import torch, so they are looked up on first use: importing moedsl stays fast.
"""
from __future__ import annotations

from .build import build_model, compile
from .spec_loader import SpecLike, load_spec, validate_file

__all__ = ["SpecLike", "load_spec", "validate_file", "compile", "build_model", "load_model", "generate", "evaluate",
           "inspect", "upcycle"]

_LAZY = {"load_model": ("moedsl.runtime.load", "load_model"), "generate": ("moedsl.runtime.generate", "generate"),
         "evaluate": ("moedsl.runtime.evaluate", "evaluate"), "inspect": ("moedsl.runtime.inspect", "inspect"),
         "upcycle": ("moedsl.runtime.upcycle", "upcycle")}


def __getattr__(name):  # lazy: these import torch
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moedsl.api' has no attribute {name!r}")
