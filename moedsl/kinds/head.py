"""``head``: the output projection to vocabulary logits (model.input: tokens); with
``model.tie_embeddings`` it multiplies by the embedding's weight (Press & Wolf 2017); with
``rescale`` its input is first scaled by d_model^-0.5, as T5 and Switch do with tied embeddings
(Mesh TensorFlow transformer.py; transformers' T5ForConditionalGeneration)."""
from __future__ import annotations

from dataclasses import dataclass

from moedsl.schema import defaults

from . import LayerKind, register, wider

_D = defaults("head")


@dataclass(frozen=True)
class Head:
    bias: bool = _D["bias"]
    rescale: bool = _D["rescale"]  # x · d_model^-0.5 before the projection (T5 and Switch, tied)


class HeadKind(LayerKind):
    name = "head"
    config = Head
    place = "last"
    needs_tokens = True
    stacks = ("", "decoder")  # an encoder's output is what the decoder reads, not logits

    def module(self, cfg: Head, model, tied=None):
        from moedsl.nn.layers import Head as Module

        if model.tie_embeddings and tied is None:  # counting: the embedding holds the weight
            tied = object()
        return Module(model.d_model, model.vocab_size, cfg.bias, model.init_std, tied=tied,
                      scale=model.d_model ** -0.5 if cfg.rescale else None)

    def flops(self, cfg, model, seq: int) -> float:
        return 2.0 * model.d_model * model.vocab_size  # tied or not, the projection is computed

    def activations(self, cfg, model) -> float:
        """Its input, and the loss's log-probabilities over the vocabulary: float32 whatever the
        model's dtype (the loss upcasts the logits, runtime/step.py ``task_loss``), so counted in
        elements of the model's dtype."""
        return model.d_model + model.vocab_size * wider(model)

    def target(self, layer) -> str:
        return "head"

    def lower(self, ctx, layer, x):
        m = ctx.model
        tied = ctx.modules.get("embedding") if m.tie_embeddings else None
        ctx.module("head", lambda: self.module(layer.config, m, tied=tied))
        if m.tie_embeddings and tied is not None:  # get_attr targets must be in the root
            ctx.modules["embedding.weight"] = tied.weight
        args = (x, ctx.graph.get_attr("embedding.weight")) if m.tie_embeddings else (x,)
        return ctx.call_module("head", args, "head")


register(HeadKind())
