"""Generation with a KV cache: ``moedsl.generate`` (``moedsl generate``'s options and workers:
``moedsl.runtime.generate_cli``).

The compiler builds the model's decode graph (``moedsl.compiler.decode_graph.compile_decode``: a
``torch.fx.GraphModule`` over the trained model's own submodules, the same weights, nothing
copied; a model whose experts are split over processes generates through the same all-to-alls).
Here: the prompt is prefilled in one forward, then one token per step, each picked from the
last logits (greedy, or sampled after top-k and top-p).

Prompts of different lengths are LEFT-padded (as transformers' generate with an
attention_mask): row b's prompt occupies the last slots of the prompt block, its positions
start at 0 at its first real token, and its padding is masked from every key
(``moedsl.nn.decode``). Every MoE layer routes each token as its own routing group, so a row
generates the same ids whatever the other rows of the batch and the number of processes.

Shape legend: B batch, T prompt block (the longest prompt), N new tokens, V vocabulary.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from moedsl.compiler.collectives import bind
from moedsl.compiler.decode_graph import compile_decode, compile_encoder
from moedsl.errors import UserError
from moedsl.nn.decode import DecodeCache

from .cudagraph import GraphedDecodeStep


# ----------------------------------------------------------------------------- the decode graph

def decode_module(model, static: bool = False) -> fx.GraphModule:
    """The decode GraphModule of ``model`` (made by ``moedsl.load_model`` or ``build_model``),
    sharing its submodules: ``forward(tokens [B, t], cache, start)`` (``compile_decode``), its
    collectives bound to the model's process groups. Made once per model. ``static``: capacity
    layers through their fixed buffers, for a static cache and CUDA-graph capture
    (``GraphedDecodeStep``)."""
    made = model.__dict__.setdefault("_moedsl_decode", {})
    if static not in made:
        spec, compiled = getattr(model, "spec", None), getattr(model, "compiled", None)
        if spec is None or compiled is None:
            raise UserError("generate: give a model made by moedsl.load_model or moedsl.build_model")
        gm = compile_decode(spec, compiled, model, static)
        groups = getattr(model, "groups", None)
        if groups is not None:
            bind(gm, groups.topo)
        made[static] = gm.eval()
    return made[static]


def encoder_module(model) -> fx.GraphModule:
    """An encoder-decoder's encoder GraphModule over ``model``'s submodules (``compile_encoder``):
    ``forward(tokens [B, S], source_mask)``, its output the encoder's [B, S, d]. Made once per model."""
    made = model.__dict__.setdefault("_moedsl_decode", {})
    if "encoder" not in made:
        gm = compile_encoder(model.spec, model.compiled, model)
        groups = getattr(model, "groups", None)
        if groups is not None:
            bind(gm, groups.topo)
        made["encoder"] = gm.eval()
    return made["encoder"]


# ----------------------------------------------------------------------------- generation config

def _ids(value, what: str) -> list:
    """``eos_token_id`` / ``pad_token_id`` as transformers takes them (an int, a list of ints, or
    None) -> a list of ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"generate: {what} must be a token id or a list of token ids, got {value!r}")
    return values


# ----------------------------------------------------------------------------- sampling

def sampling(config: dict, temperature: Optional[float], top_k: Optional[int], top_p: Optional[float]) -> tuple:
    """(temperature, top_k, top_p) of ``generate``: what the user gave, the rest from the model's
    generation config (``do_sample`` with its ``temperature``, ``top_k``, ``top_p``, transformers'
    defaults 1.0, 50, 1.0; greedy without it). ``top_k``/``top_p`` with a temperature of 0 are
    refused (``UserError``): greedy decoding would silently ignore them."""
    sampled = bool(config.get("do_sample", False))
    if temperature is None:
        t = config.get("temperature", 1.0)
        temperature = float(1.0 if t is None else t) if sampled else 0.0
    if sampled and temperature > 0:  # the config's filters; its top_k 0 (or null) is transformers' "no top-k"
        top_k = (config.get("top_k", 50) or None) if top_k is None else top_k
        top_p = config.get("top_p", 1.0) if top_p is None else top_p
    if temperature < 0 or temperature != temperature:
        raise UserError(f"generate: temperature must be >= 0, got {temperature}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise UserError("generate: top_k and top_p filter sampling: give a temperature above 0 with them "
                        "(temperature 0 is greedy decoding, which would ignore them)")
    if top_k is not None and top_k < 1:
        raise UserError(f"generate: top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"generate: top_p must be in (0, 1], got {top_p}")
    return temperature, top_k, top_p


def pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
         generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token of each row from logits [B, V]: the argmax at temperature 0; otherwise a
    sample of softmax(logits / temperature) restricted to the top_k tokens and then to the
    nucleus of top_p, in transformers' order and definitions (TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper: the smallest set of most likely tokens whose
    probability reaches top_p, at least one)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, idx = torch.sort(scores, descending=False)
        cum = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)
        drop[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- prompts

def _pad(prompts: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError(f"generate: every {'prompt' if left else 'source'} needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), T), dtype=torch.int64)
    for b, p in enumerate(prompts):
        at = slice(T - len(p), T) if left else slice(0, len(p))
        ids[b, at] = torch.as_tensor(list(p), dtype=torch.int64)
        mask[b, at] = 1
    return ids, mask


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths -> (ids [B, T] left-padded with ``pad_id``, attention_mask [B, T])."""
    return _pad(prompts, pad_id, left=True)


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder-decoder's sources of any lengths -> (ids [B, S] right-padded with ``pad_id``, their
    mask [B, S]), as T5's tokenizers pad."""
    return _pad(prompts, pad_id, left=False)


def _check_shape(ids: torch.Tensor, max_new_tokens: int) -> None:
    if ids.dim() != 2:
        raise UserError(f"generate: input_ids must be [batch, tokens], got shape {list(ids.shape)}")
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}")


def check_source(spec, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
    """Refuses (``UserError``, one line) an encoder-decoder's sources that cannot be encoded, or
    more new tokens than the decoder takes. Any padding is masked (right padding, T5's, is usual)."""
    m = spec.model
    _check_shape(ids, max_new_tokens)
    real = mask.bool()
    empty = (~real.any(dim=1)).nonzero()
    if len(empty):
        raise UserError(f"generate: source {int(empty[0])} is empty (its attention_mask is all 0)")
    bad = real & ((ids < 0) | (ids >= m.vocab_size))
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise UserError(f"generate: source {b} has token id {int(ids[b, t])} at position {t}, outside the "
                        f"vocabulary 0..{m.vocab_size - 1} ({spec.source}: model.vocab_size = {m.vocab_size})")
    for what, n in (("a source", ids.shape[1]), ("the decoder start and the new tokens", 1 + max_new_tokens)):
        if n > m.max_seq_len:
            raise UserError(f"generate: {what}: {n} tokens, past the model's {m.max_seq_len} "
                            f"({spec.source}: model.max_seq_len = {m.max_seq_len})")


def check_generates(spec) -> None:
    """Refuses (``UserError``, one line) a model that does not continue token sequences."""
    if spec.model.input != "tokens":
        raise UserError(f"generate: {spec.source} is a model of {spec.model.input} inputs (model.input = "
                        f"{spec.model.input}): generation continues token ids; it needs model.input = tokens")


def check_prompt(spec, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The left padding of each row [B]; refuses (``UserError``, one line) what cannot be generated."""
    check_generates(spec)
    m = spec.model
    _check_shape(ids, max_new_tokens)
    real = mask.bool()
    lengths = real.sum(dim=1)
    pad = ids.shape[1] - lengths
    if bool((lengths == 0).any()):
        raise UserError(f"generate: prompt {int((lengths == 0).nonzero()[0])} is empty")
    left = torch.arange(ids.shape[1])[None, :] >= pad[:, None]
    if not torch.equal(left, real):
        raise UserError("generate: the attention_mask must be left padding (0s, then 1s in each row)")
    bad = real & ((ids < 0) | (ids >= m.vocab_size))
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise UserError(f"generate: prompt {b} has token id {int(ids[b, t])} at position {int(t - pad[b])}, outside "
                        f"the vocabulary 0..{m.vocab_size - 1} ({spec.source}: model.vocab_size = {m.vocab_size})")
    longest = int(lengths.max())
    if longest + max_new_tokens > m.max_seq_len:
        raise UserError(f"generate: a prompt of {longest} tokens plus {max_new_tokens} new tokens is "
                        f"{longest + max_new_tokens}, past the model's {m.max_seq_len} "
                        f"({spec.source}: model.max_seq_len = {m.max_seq_len})")
    return pad


# ----------------------------------------------------------------------------- generate

MODEL = object()  # generate()'s default eos/pad: the model's generation_config.json (``moedsl.hf.files.read_generation_config``)


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int, temperature: Optional[float] = None,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0, attention_mask=None,
             timings: Optional[dict] = None, graphs: str = "auto", eos_token_id=MODEL, pad_token_id=MODEL,
             stop: Sequence = (), on_token: Optional[Callable] = None):
    """Continue each prompt by ``max_new_tokens`` tokens; returns ids [B, T + N] (the prompts as
    given, left-padded, then the new tokens; N fewer when every row stops first, see below).

    An encoder-decoder (``spec.encoder_decoder``): ``input_ids`` are the sources (a list of any
    lengths is RIGHT-padded with model.pad_id, T5's way; a tensor's ``attention_mask`` marks the
    real tokens, any padding masked, though the padding is routed and takes capacity in the
    encoder's MoE layers, as in transformers' Switch). The encoder runs once; the decoder starts
    from model.decoder_start_id and decodes with self-attention and cross-attention caches (the
    cross-attention's keys and values computed from the encoder's output at the first step).
    Returns the decoder's ids [B, 1 + N], decoder_start_id first, as transformers' generate
    does; eos and pad default to the generation config's, else the spec's model.eos_id and
    pad_id. No CUDA graph (``graphs`` "on" is refused).

    ``input_ids``: a tensor [B, T] (with ``attention_mask`` [B, T]: left padding, 0 on padding,
    as transformers' generate takes it), or a list of prompts (lists of ids) of any lengths,
    left-padded here with id 0. The prompt block is prefilled in one forward, then one token
    per step from the cache. ``temperature`` 0 is greedy (argmax); otherwise tokens are sampled
    from a ``torch.Generator`` seeded with ``seed``, after ``top_k`` and ``top_p`` (nucleus)
    filtering as transformers defines them. In a job of several processes (the model's experts
    split over them) every process gets the same ids: rank 0's choice is broadcast.
    ``timings``: filled with prefill and decode seconds (and ``graphs``: whether decoding replayed
    a CUDA graph).

    ``graphs``: "auto" (default) decodes through a CUDA graph (``GraphedDecodeStep``: a static
    cache, one step captured after the prefill and replayed for every later token) when the
    model is on a GPU in one process, and eagerly elsewhere (a CPU, experts split over
    processes); if capture fails it says so in one line and decodes eagerly. "on" refuses
    (``UserError``) where it cannot capture; "off" decodes eagerly.

    Stopping, as transformers' generate: a row is finished once it emits one of
    ``eos_token_id`` (an id or a list; default the model's ``generation_config.json``, as an
    import copies it; None never stops) or ends with one of ``stop`` (ids, or sequences of ids);
    a finished row continues with ``pad_token_id`` (default the config's, else the first eos id),
    and generation ends when every row is finished, so the result may be shorter than
    T + ``max_new_tokens``. ``timings["stopped"]``: per row, "eos", "stop" or "length".
    ``on_token(step, tokens [B])``: called with each step's tokens as they come (streaming).

    Sampling settings left None take the model's generation config (its ``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, with transformers' defaults 1.0, 50, 1.0); without
    one, greedy. ``top_k`` or ``top_p`` given with a temperature of 0 is refused (greedy
    decoding would ignore them).

    A prompt id outside the vocabulary, or a prompt plus the new tokens longer than
    ``model.max_seq_len``, is a ``UserError`` (one line)."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise UserError("generate: give a model made by moedsl.load_model or moedsl.build_model")
    config = getattr(model, "generation_config", None) or {}
    encdec = spec.encoder_decoder
    if eos_token_id is MODEL:  # an encoder-decoder without a generation config: the spec's ids
        eos_token_id = config.get("eos_token_id", spec.model.eos_id if encdec else None)
    eos = _ids(eos_token_id, "eos_token_id")
    if pad_token_id is MODEL:
        pad_token_id = config.get("pad_token_id", spec.model.pad_id if encdec else None)
    pads = _ids(pad_token_id, "pad_token_id")
    pad_id = pads[0] if pads else (eos[0] if eos else 0)
    stops = [[s] if isinstance(s, int) else list(s) for s in ([stop] if isinstance(stop, int) else stop)]
    if any(len(s) == 0 for s in stops):
        raise UserError("generate: an empty stop sequence")
    for s in stops:
        _ids(s, "stop")
    temperature, top_k, top_p = sampling(config, temperature, top_k, top_p)
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.detach().to("cpu", torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to("cpu")
    elif encdec:
        ids, mask = right_pad([list(p) for p in input_ids], spec.model.pad_id)
    else:
        ids, mask = left_pad([list(p) for p in input_ids])
    device = next(iter(model.parameters())).device
    B = ids.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed) if temperature > 0 else None
    if encdec:
        check_source(spec, ids, mask, max_new_tokens)
        if _use_graphs(graphs, device) and graphs == "on":
            raise UserError("generate: CUDA graphs on: an encoder-decoder decodes eagerly (its capture is not "
                            "checked on a GPU yet)")
    else:
        pad = check_prompt(spec, ids, mask, max_new_tokens)
    was = model.training
    model.eval()
    if encdec:  # encode once; the decoder starts from decoder_start_id, its cross-attention reads memory
        use_graphs = False
        dec = decode_module(model)
        t0 = time.perf_counter()
        source_mask = mask.bool().to(device)
        memory = encoder_module(model)(ids.to(device), source_mask).output  # [B, S, d]
        extra = (memory, source_mask)
        prompt = torch.full((B, 1), spec.model.decoder_start_id, dtype=torch.int64)
        cache = DecodeCache(B, 1 + max_new_tokens, device=device)
        tokens = prompt.to(device)
    else:
        use_graphs = _use_graphs(graphs, device)
        dec = decode_module(model, static=use_graphs)
        extra, prompt = (), ids
        cache = DecodeCache(B, ids.shape[1] + max_new_tokens, pad, device=device, static=use_graphs)
        t0 = time.perf_counter()
        tokens = torch.where(mask.bool(), ids, torch.zeros_like(ids)).to(device)
    T = prompt.shape[1]
    out = torch.empty(B, T + max_new_tokens, dtype=torch.int64)
    out[:, :T] = prompt
    logits = dec(tokens, cache, 0, *extra).output[:, -1]  # [B, V]
    t1 = time.perf_counter()
    graphed = None
    eos_t = torch.tensor(eos, dtype=torch.int64)
    finished = torch.zeros(B, dtype=torch.bool)
    stopped = ["length"] * B
    steps = max_new_tokens
    for step in range(max_new_tokens):
        nxt = _agree(pick(logits.float().cpu(), temperature, top_k, top_p, generator))
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)  # transformers pads finished rows
        out[:, T + step] = nxt
        if on_token is not None:
            on_token(step, nxt)
        hit = torch.isin(nxt, eos_t) & ~finished  # [B]; one vector test a step, rows in Python only on a hit
        for b in hit.nonzero().flatten().tolist():
            stopped[b] = "eos"
        finished |= hit
        for b in ((~finished).nonzero().flatten().tolist() if stops else ()):
            if any(step + 1 >= len(s) and out[b, T + step + 1 - len(s):T + step + 1].tolist() == s for s in stops):
                finished[b], stopped[b] = True, "stop"
        if bool(finished.all()):
            steps = step + 1
            break
        if step + 1 < max_new_tokens:
            tokens = nxt[:, None].to(device)
            if use_graphs and graphed is None:
                graphed = _capture(dec, cache, tokens, T + step, strict=graphs == "on")
                use_graphs = graphed is not None
            if graphed is not None:
                logits = graphed(tokens, T + step)
            else:
                logits = dec(tokens, cache, T + step, *extra).output[:, -1]
    t2 = time.perf_counter()
    model.train(was)
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=int(mask.sum()), batch=B,
                       new_tokens=steps, graphs=graphed is not None, stopped=stopped)
    return out[:, :T + steps]


def _use_graphs(graphs: str, device) -> bool:
    """Whether to decode through a CUDA graph (``generate``'s ``graphs``)."""
    if graphs not in ("auto", "on", "off"):
        raise UserError(f"generate: graphs must be auto, on or off, got {graphs!r}")
    if graphs == "off":
        return False
    why = None
    if device.type != "cuda":
        why = "the model is on the CPU"
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        why = "the experts are split over processes (their all-to-alls' sizes depend on the routing)"
    if why is not None and graphs == "on":
        raise UserError(f"generate: CUDA graphs on: cannot capture, {why}")
    return why is None


def _capture(dec, cache, tokens: torch.Tensor, slot: int, strict: bool):
    """A ``GraphedDecodeStep`` of the step at ``slot``; None (after one line on stderr) when capture
    fails and ``strict`` is off."""
    try:
        return GraphedDecodeStep(dec, cache, tokens, slot)
    except Exception as e:  # what capture refused: decode eagerly, over the same static cache
        if strict:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"moedsl: CUDA graphs off: capture failed ({type(e).__name__}: {first}); decoding eager",
              file=sys.stderr)
        return None


def _agree(tokens: torch.Tensor) -> torch.Tensor:
    """In a job of several processes: rank 0's tokens on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tokens, src=0)
    return tokens
