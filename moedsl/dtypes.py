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


# memory sizes as a user writes them: decimal units (GB = 10⁹, transformers' convention for
# shard sizes) and binary ones (GiB = 2³⁰, a device's memory)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int:
    """``80GiB``, ``5 GB``, ``500MB``, ``2000000`` -> bytes; ValueError when it is none of those."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or not value > 0:
        raise ValueError(f"{text!r} is not a memory size (e.g. 80GiB, 80GB, 81920MiB)")
    return int(value * _SIZE_UNITS[unit])
