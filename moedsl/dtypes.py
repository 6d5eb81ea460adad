"""The dtype names a spec may use (``model.dtype``, ``model.router_dtype``): the one table of
name -> torch dtype and bytes per element. The JSON Schema's ``dtype`` enum lists the same
names (a test holds them together). Importing this module does not import torch."""
from __future__ import annotations

# name -> (torch attribute, bytes per element, computed under autocast)
_TABLE = {
    "float32": ("float32", 4, False),
    "bfloat16": ("bfloat16", 2, True),
    "float16": ("float16", 2, True),
}
NAMES = tuple(_TABLE)
BYTES = {name: row[1] for name, row in _TABLE.items()}


def torch_dtype(name: str):
    """"bfloat16" -> torch.bfloat16."""
    import torch

    return getattr(torch, _TABLE[name][0])


def autocast_dtype(name: str):
    """The autocast dtype a model of dtype ``name`` trains under (None: no autocast, float32)."""
    return torch_dtype(name) if _TABLE[name][2] else None


def itemsize(name: str) -> int:
    return BYTES[name]
