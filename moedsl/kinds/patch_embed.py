"""``patch_embed``: the first layer of a spec over images (model.input: image): each image
cut into patches, each patch flattened and projected to d_model, learned positions and an
optional class token (ViT, Dosovitskiy et al. 2021, §3.1, eq. 1)."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register

_D = defaults("patch_embed")


@dataclass(frozen=True)
class PatchEmbed:
    positions: str = _D["positions"]  # none | learned
    class_token: bool = _D["class_token"]


def tokens_per_image(model, layers) -> int:
    """The tokens one image becomes: its patches, plus the class token if the patch embedding
    (the first layer) adds one."""
    first = layers[0] if layers else None
    cls = first is not None and first.kind == "patch_embed" and first.config is not None and first.config.class_token
    return model.image.patches + (1 if cls else 0)


class PatchEmbedKind(LayerKind):
    name = "patch_embed"
    config = PatchEmbed
    place = "first"
    inputs = ("image",)

    def module(self, cfg: PatchEmbed, model):
        from moedsl.nn.vision import PatchEmbed as Module

        im = model.image
        return Module(im.patch, im.channels, im.patches, model.d_model, cfg.class_token, cfg.positions,
                      model.init_std)

    def flops(self, cfg, model, seq: int) -> float:
        return 2.0 * model.image.patch_dim * model.d_model  # the projection of one patch

    def target(self, layer) -> str:
        return "patch_embed"


register(PatchEmbedKind())
