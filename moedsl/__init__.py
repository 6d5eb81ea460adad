"""moedsl: a graph-compiled, declarative Mixture-of-Experts modeling DSL.

    spec = moedsl.load_spec("specs/switch.yaml")      # validate (SpecError on any mistake)
    gm, plan = moedsl.compile(spec, world_size=4)     # torch.fx graph + plan
    model = moedsl.build_model(spec)                  # a ready nn.Module
    model = moedsl.load_model("imported/")            # with weights (moedsl import, a run, a checkpoint)
    ids = moedsl.generate(model, [[1, 2, 3]], 20)     # greedy continuation with a KV cache
    figures = moedsl.inspect("runs/switch-small")     # what its experts learned (per MoE layer)

Importing moedsl does not import torch: validating a spec stays fast.
"""
from __future__ import annotations

from .spec_loader import load_spec
from .errors import Issue, MoedslError, SpecError
from .spec import Spec

__version__ = "0.1.0"
__all__ = ["load_spec", "compile", "build_model", "load_model", "evaluate", "generate", "inspect", "upcycle", "Spec",
           "SpecError", "Issue", "MoedslError", "__version__"]


def __getattr__(name):  # lazy: these import torch
    if name in ("compile", "build_model", "load_model", "evaluate", "generate", "inspect", "upcycle"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'moedsl' has no attribute {name!r}")
