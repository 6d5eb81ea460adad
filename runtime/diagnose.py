"""Where a non-finite value first appears: named for the person whose run stopped."""
from __future__ import annotations

import torch


def _bad(obj) -> bool:
    if torch.is_tensor(obj):
        return obj.is_floating_point() and not bool(torch.isfinite(obj).all())
    if isinstance(obj, (tuple, list)):
        return any(_bad(o) for o in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return any(_bad(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return False


def first_nonfinite(model, inputs: torch.Tensor, amp, extra: tuple = ()) -> str:
    """The first module (in execution order) whose output has a NaN or inf, else the first
    non-finite parameter, else "the loss". Every module is hooked; a module's hook runs when
    its forward returns, after those of the modules it called, so the first to see a
    non-finite output is the innermost one that produced it."""
    found: list = []

    def hook(m, a, out, name):
        if not found and _bad(out):
            found.append(name)

    hooks = []
    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(lambda m, a, out, name=name: hook(m, a, out, name)))
    try:
        with torch.no_grad(), torch.autocast(inputs.device.type, dtype=amp, enabled=amp is not None):
            model(inputs, *extra)  # extra: an encoder-decoder's decoder inputs and source mask
    finally:
        for h in hooks:
            h.remove()
    if found:
        return found[0]
    bad_params = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    return f"parameter {bad_params[0]}" if bad_params else "the loss (activations are finite)"
