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
from moedsl.hf.files import read_tokenizer

from .generate import check_prompt, generate, left_pad
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
    return build(source, device=device, rank=rank, world=world), source.spec, source


def parse_ids(text: str) -> list:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"--prompt-ids {text!r}: expected whole numbers separated by commas (1,2,3)") from None
    if not ids:
        raise UserError("--prompt-ids: give at least one id")
    return ids


def _prompt(args, source) -> tuple:
    """(the codec, the prompt's ids) of ``moedsl generate``'s options; ``source``: the model's
    ``ModelSource``, whose folders may hold a tokenizer.json."""
    spec = source.spec
    codec = Codec.find(spec, source.folders)
    if args.prompt_ids is not None:
        return codec, parse_ids(args.prompt_ids)
    if codec is None:
        raise UserError(f"--prompt: {spec.source} has a vocabulary of {spec.model.vocab_size} ids and no "
                        "tokenizer.json: give --prompt-ids")
    return codec, codec.encode(args.prompt)


def precheck(args) -> None:
    """What ``moedsl generate --nproc`` refuses before it starts a worker: the model folder, the
    prompt (ids in the vocabulary, not too long), from the spec alone (no weights read)."""
    _device(getattr(args, "device", "auto"), args.nproc)  # --device cuda with --nproc: refused before any worker
    source = resolve(args.model, args.checkpoint)
    _, prompt = _prompt(args, source)
    ids, mask = left_pad([prompt])
    check_prompt(source.spec, ids, mask, args.max_new_tokens)


def run_cli(args) -> dict:
    """``moedsl generate`` in this process (one of ``--nproc`` workers, or alone): returns what rank 0
    prints."""
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
    ids = generate(model, [prompt] * args.batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, timings=timings, graphs=getattr(args, "cuda_graphs", "auto"))
    new = ids[:, ids.shape[1] - args.max_new_tokens:].tolist()
    elapsed = timings["prefill_s"] + timings["decode_s"]
    result = {"ids": new, "tokens_per_s": args.batch * args.max_new_tokens / max(elapsed, 1e-9),
              "prefill_s": timings["prefill_s"], "decode_s": timings["decode_s"], "processes": world,
              "device": device.type, "cuda_graphs": timings["graphs"]}
    if codec is not None:
        result["text"] = [codec.decode(row) for row in new]
    return result
