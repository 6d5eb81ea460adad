"""``classifier``: the last layer of a spec over images (model.input: image): the tokens pooled
(the class token's output, or their mean) and projected to model.classes logits (ViT,
Dosovitskiy et al. 2021, §3.1; V-MoE, Riquelme et al. 2021, §2). Its output is [B, classes]."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register

_D = defaults("classifier")


@dataclass(frozen=True)
class Classifier:
    pool: str = _D["pool"]  # token | mean
    bias: bool = _D["bias"]


class ClassifierKind(LayerKind):
    name = "classifier"
    config = Classifier
    place = "last"
    inputs = ("image",)

    def module(self, cfg: Classifier, model):
        from moedsl.nn.vision import Classifier as Module

        return Module(model.d_model, model.classes, cfg.pool, cfg.bias, model.init_std)

    def flops(self, cfg, model, seq: int) -> float:
        return 2.0 * model.d_model * model.classes / max(seq, 1)  # one projection per image

    def activations(self, cfg, model) -> float:
        return 0.0  # [B, classes]: nothing per token

    def target(self, layer) -> str:
        return "classifier"


register(ClassifierKind())
