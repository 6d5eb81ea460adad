"""Hugging Face checkpoints in and out: ``moedsl import``, ``moedsl export``, ``load_model``.

One module per model family in ``families/`` (``families/mixtral.py``, ...), each a
``Family`` registered by the ``model_type`` of its ``config.json``, as the layer kinds of
``moedsl/kinds/`` are: adding a family is adding one file there. A family knows:

* ``spec_text(config, source, name)``: config.json -> a commented spec (YAML text); a field or
  value it cannot express raises ``UserError`` naming it and what is supported;
* ``import_tensors(spec, config, names)``: each moedsl tensor as a function of the checkpoint's
  tensors (names and layout transforms: per-expert w1/w2/w3 -> stacked [E, ...]);
* ``export_config`` / ``export_tensors``: the reverse, and ``architecture_problem(spec)``:
  whether a spec (imported or written by hand) has the family's architecture.

The rest is shared: reading a local folder or the local Hugging Face cache (``files.py``),
writing safetensors tensor by tensor into a folder renamed into place at the end
(``files.py``), the commands (``convert.py``), and loading moedsl-format weights into a
model, each rank reading only its experts (``weights.py``).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from moedsl.errors import UserError
from moedsl.kinds import import_all

_FAMILIES: dict = {}


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: its ``name``, the ``sources`` it is made from (names in the other
    format, each read whole, or one expert ``(name, e)`` of a stacked moedsl tensor), and
    ``make(list of source tensors) -> tensor``."""

    name: str
    sources: tuple
    make: Callable


def same(ts):
    """The one source as it is."""
    return ts[0]


class Family:
    """A Hugging Face model family. Subclasses set ``model_type`` and ``architectures`` and
    implement the methods below; ``register`` them at import."""

    model_type: str = ""
    architectures: Sequence[str] = ()  # transformers' class names; the first is what export writes
    config_class: str = ""  # transformers' config class (tests build the reference model from it)
    # a tiny config (config_class's keyword arguments) the tests build, import, run and export for
    # every registered family (tests/test_hf_import.py): a new family is tested by adding this
    tiny_config: dict = {}
    # ((config overrides, what they cover), ...): each variant the family supports, run like tiny_config
    tiny_variants: tuple = ()
    # regular expressions (``re.search``) of the checkpoint's tensor names that stay float32 whatever the
    # model's dtype, as transformers' ``_keep_in_fp32_modules_strict`` keeps them (DeepSeek-V3's router):
    # the import writes them float32, moedsl's model keeps them float32 (``router_dtype: float32``) and
    # the export writes them float32
    float32_tensors: Sequence[str] = ()
    routed = True  # False: a dense family (Llama, ...): no router, every layer's MLP dense
    # True: an encoder-decoder (XForConditionalGeneration: tests/test_hf_encdec.py runs its tiny
    # model and variants with source and decoder ids; tests/test_hf_import.py the decoder-only ones)
    encoder_decoder = False

    def keeps_float32(self, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` stays float32 in a 16-bit model (``float32_tensors``)."""
        return any(re.search(p, name) for p in self.float32_tensors)

    def spec_text(self, config: dict, source: str, name: str) -> str:
        """The spec of the checkpoint (``source``: where it came from, for the header) as
        commented YAML, each field naming the config.json field it came from."""
        raise NotImplementedError

    def import_tensors(self, spec, config: dict, names: set) -> list:
        """The moedsl tensors (``Tensor``) made from the checkpoint's tensors ``names``."""
        raise NotImplementedError

    def architecture_problem(self, spec) -> Optional[str]:
        """None if ``spec`` computes what this family computes, else the first feature that
        has no equivalent in it (e.g. "layers[1].block[1].moe.gate: capacity (drop_policy drop)")."""
        raise NotImplementedError

    def skipped_tensors(self, config: dict, names: set) -> set:
        """Tensors of the checkpoint ``names`` the import leaves out on purpose (e.g. modules
        that take no part in the logits); any other tensor it does not use is refused."""
        return set()

    def export_config(self, spec, recorded: Optional[dict]) -> dict:
        raise NotImplementedError

    def export_tensors(self, spec) -> list:
        """The checkpoint's tensors (``Tensor``, in its on-disk names) made from moedsl's."""
        raise NotImplementedError


def register(family: Family) -> Family:
    _FAMILIES[family.model_type] = family
    return family


def registered() -> dict:
    """model_type -> Family, every family registered. (Not named ``families``: that is the
    subpackage holding them.)"""
    return dict(_FAMILIES)


def family(model_type) -> Family:
    if model_type not in _FAMILIES:
        raise UserError(f"config.json: model_type {model_type!r} is not supported "
                        f"(supported: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[model_type]


def family_of_spec(spec, model_type: Optional[str] = None) -> Family:
    """The family ``spec`` exports as: ``model_type`` (recorded at import) if given, else the
    first whose architecture it has; a spec no family expresses is refused naming why."""
    if model_type is not None:
        fam = family(model_type)
        why = fam.architecture_problem(spec)
        if why:
            raise UserError(f"spec {spec.source}: {why}: no Hugging Face {model_type} equivalent")
        return fam
    reasons = []
    for name, fam in sorted(_FAMILIES.items()):
        why = fam.architecture_problem(spec)
        if why is None:
            return fam
        reasons.append(f"{name}: {why}")
    raise UserError(f"spec {spec.source} has no Hugging Face equivalent ({'; '.join(reasons)})")


def _load_families() -> None:
    package = importlib.import_module(f"{__name__}.families")
    import_all(package.__name__, package.__path__)


_load_families()
