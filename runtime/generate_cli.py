"""``moedsl generate``: its options (the model folder, the prompt as text or ids, the device),
what it refuses before any worker starts, and one worker's run. The generation itself is
``moedsl.runtime.generate``."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from moedsl.errors import UserError
from moedsl.hf.files import read_generation_config, read_tokenizer

from moedsl.mesh import resolve_mesh

from .generate import check_generates, check_prompt, check_source, generate, left_pad, right_pad, sampling
from .load import build
from .resolve import resolve


class Codec:
    """Text <-> ids: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), or UTF-8 bytes
    for a byte-level vocabulary (vocab_size >= 256); None when neither applies."""

    def __init__(self, kind: str, tokenizer=None):
        self.kind, self.tokenizer = kind, tokenizer

    @classmethod
    def find(cls, spec, folders) -> Optional["Codec"]:
        tokenizer = read_tokenizer(folders)
        if tokenizer is not None:
            return cls("tokenizer", tokenizer)
        if spec.model.vocab_size >= 256:
            return cls("bytes")
        return None

    def encode(self, text: str) -> list:
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list) -> str:
        if self.kind == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)


def _device(choice: str, world: int) -> torch.device:
    """``moedsl generate --device``: auto takes the GPU when there is one and the job is one
    process (several processes generate on the CPU, over gloo)."""
    if choice == "cuda" and world > 1:
        raise UserError("--device cuda: generating with --nproc runs on the CPU (gloo); leave out --device or --nproc")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if choice == "cuda" or (choice == "auto" and world == 1 and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def model_for_rank(src, checkpoint, rank: int, world: int, device="cpu"):
    """``load_model``'s model for rank ``rank`` of ``world`` (its experts only, collectives bound),
    its spec, and the ``ModelSource`` it was loaded from (``moedsl.runtime.resolve``)."""
    source = resolve(src, checkpoint)
    check_generates(source.spec)  # an image model: one line before its weights are read
    return build(source, device=device, rank=rank, world=world), source.spec, source


def parse_ids(text: str, option: str = "--prompt-ids") -> list:
    parts = text.replace(" ", "").split(",")
    if parts == [""]:
        raise UserError(f"{option}: give at least one id")
    try:
        ids = [int(t) for t in parts]  # an empty item (1,,3) is an error, not skipped
    except ValueError:
        raise UserError(f"{option} {text!r}: expected whole numbers separated by commas (1,2,3)") from None
    return ids


def stops(args, codec) -> list:
    """``--stop``'s sequences of ids: each a comma-separated id list (5 or 7,8), or else text through
    the run's codec (its tokenizer.json, or UTF-8 bytes; refused where there is neither)."""
    out = []
    for item in getattr(args, "stop", None) or []:
        if item.replace(" ", "").replace(",", "").isdigit():
            out.append(parse_ids(item, "--stop"))
        elif codec is None:
            raise UserError(f"--stop {item!r}: text needs a tokenizer.json beside the weights (or a byte-level "
                            "vocabulary); give token ids (5 or 7,8)")
        else:
            ids = codec.encode(item)
            if not ids:
                raise UserError(f"--stop {item!r}: the tokenizer makes no ids of it")
            out.append(ids)
    return out


def _prompt(args, source) -> tuple:
    """(the codec, the prompt's ids) of ``moedsl generate``'s options; ``source``: the model's
    ``ModelSource``, whose folders may hold a tokenizer.json."""
    spec = source.spec
    check_generates(spec)
    codec = Codec.find(spec, source.folders)
    if args.prompt_ids is not None:
        return codec, parse_ids(args.prompt_ids)
    if codec is None:
        raise UserError(f"--prompt: {spec.source} has a vocabulary of {spec.model.vocab_size} ids and no "
                        "tokenizer.json: give --prompt-ids")
    ids = codec.encode(args.prompt)
    if spec.encoder_decoder and ids[-1:] != [spec.model.eos_id]:
        # the source ends with eos, as the encoder saw its sources in training (runtime/seq2seq.py) and
        # as T5's tokenizer writes them; --prompt-ids are taken as given
        ids = ids + [spec.model.eos_id]
    return codec, ids


def precheck(args) -> None:
    """What ``moedsl generate --nproc`` refuses before it starts a worker: the model folder, the
    prompt (ids in the vocabulary, not too long), from the spec alone (no weights read)."""
    _device(getattr(args, "device", "auto"), args.nproc)  # --device cuda with --nproc: refused before any worker
    source = resolve(args.model, args.checkpoint)
    codec, prompt = _prompt(args, source)
    if source.spec.encoder_decoder:  # the prompt is the encoder's source
        check_source(source.spec, *right_pad([prompt], source.spec.model.pad_id), args.max_new_tokens)
    else:
        ids, mask = left_pad([prompt])
        check_prompt(source.spec, ids, mask, args.max_new_tokens)
    stops(args, codec)
    sampling(read_generation_config(source.folders), args.temperature, args.top_k, args.top_p)
    resolve_mesh(source.spec, args.nproc)  # a placement error is a SpecError, once, before any worker starts


def run_cli(args, on_text=None) -> dict:
    """``moedsl generate`` in this process (one of ``--nproc`` workers, or alone): returns what rank 0
    prints. ``on_text(row, piece)``: called on rank 0 with each row's new text (or ids) as tokens come."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    if args.checkpoint is None and not os.path.isdir(args.model) and not str(args.model).endswith((".yaml", ".yml")):
        raise UserError(f"{args.model}: no such folder (give a run or import folder, or a spec with --checkpoint)")
    device = _device(getattr(args, "device", "auto"), world)
    model, spec, source = model_for_rank(args.model, args.checkpoint, rank, world, device)
    codec, prompt = _prompt(args, source)
    timings: dict = {}
    stream = _Stream(codec, on_text) if on_text is not None and rank == 0 else None
    ids = generate(model, [prompt] * args.batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, timings=timings, graphs=getattr(args, "cuda_graphs", "auto"),
                   stop=stops(args, codec), on_token=stream)
    new = ids[:, 1 if spec.encoder_decoder else len(prompt):].tolist()  # an encoder-decoder's: after decoder_start
    elapsed = timings["prefill_s"] + timings["decode_s"]
    result = {"ids": new, "tokens_per_s": args.batch * timings["new_tokens"] / max(elapsed, 1e-9),
              "prefill_s": timings["prefill_s"], "decode_s": timings["decode_s"], "processes": world,
              "device": device.type, "cuda_graphs": timings["graphs"], "stopped": timings["stopped"]}
    if codec is not None:
        result["text"] = [codec.decode(row) for row in new]
    return result


class _Stream:
    """``generate``'s ``on_token`` for the terminal: each row's text so far decoded again, and what
    it adds since the last piece passed on (held back while it ends in half a character)."""

    def __init__(self, codec, on_text):
        self.codec, self.on_text, self.rows, self.shown = codec, on_text, [], []

    def __call__(self, step: int, tokens) -> None:
        if not self.rows:
            self.rows, self.shown = [[] for _ in range(len(tokens))], [0] * len(tokens)
        for b, t in enumerate(tokens.tolist()):
            self.rows[b].append(t)
            if self.codec is None:
                self.on_text(b, ("," if step else "") + str(t))
                continue
            now = self.codec.decode(self.rows[b])
            if not now.endswith("\ufffd") and len(now) > self.shown[b]:
                self.on_text(b, now[self.shown[b]:])
                self.shown[b] = len(now)
