"""``moedsl tokenizer train``: a byte-level BPE tokenizer trained on a corpus, saved as a
``tokenizer.json`` (the ``tokenizers`` library's format, which transformers' fast tokenizers
load) with a ``tokenizer_config.json`` beside it naming its bos, eos and pad tokens.

Byte-level BPE as GPT-2's (Radford et al. 2019, §2.2): text is cut by the GPT-2 regex and
mapped byte by byte onto 256 printable characters (``ByteLevel`` pre-tokenizer and decoder),
and the initial alphabet holds all 256 of them, so any text encodes, with no unknown token,
and decodes back to itself. Merges are learned from the corpus up to ``vocab_size`` ids,
the special tokens first (ids 0, 1, 2).

Also here: which special token of a tokenizer is its eos (``special_tokens``), read from the
``tokenizer_config.json`` beside it as transformers reads it, else from common names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

from moedsl.errors import UserError
from moedsl.paths import apart

from .corpus import Corpus

CONFIG = "tokenizer_config.json"
SPECIAL = {"bos": "<|bos|>", "eos": "<|endoftext|>", "pad": "<|pad|>"}  # in id order: 0, 1, 2
BYTES = 256
# eos of a tokenizer without a tokenizer_config.json naming it: GPT-2's, Llama's/Mistral's,
# Gemma's, Llama 3's
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")


def tokenizer_file(path) -> Path:
    """``path`` (a tokenizer.json), or the tokenizer.json in the folder ``path`` (an import's)."""
    path = Path(path).expanduser()
    return path / "tokenizer.json" if path.is_dir() else path


def load_tokenizer(path: Path):
    """The ``tokenizers`` Tokenizer in ``path``; a missing file, a missing library or a file
    that is not a tokenizer.json is a ``UserError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such tokenizer file")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError(f"{path}: reading it needs the tokenizers library: pip install 'moedsl[data]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
        raise UserError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None


def _token_text(value) -> Optional[str]:
    """A special token of a tokenizer_config.json: a string, or {"content": ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_tokens(path: Path, tokenizer) -> dict:
    """{"bos"|"eos"|"pad": (text, id)} for the tokenizer at ``path``: the ``*_token`` entries
    of the tokenizer_config.json beside it where the vocabulary has them; an eos not named
    there is the first of ``EOS_NAMES`` the vocabulary has. Missing ones are left out."""
    found = {}
    config = Path(path).parent / CONFIG
    named = {}
    if config.is_file():
        try:
            named = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{config}: unreadable ({str(e).splitlines()[0]})") from None
        if not isinstance(named, dict):
            raise UserError(f"{config}: not a JSON object")
    for role in SPECIAL:
        text = _token_text(named.get(f"{role}_token"))
        if text is not None and tokenizer.token_to_id(text) is not None:
            found[role] = (text, tokenizer.token_to_id(text))
    if "eos" not in found:
        for text in EOS_NAMES:
            if tokenizer.token_to_id(text) is not None:
                found["eos"] = (text, tokenizer.token_to_id(text))
                break
    return found


def _write_atomic(path: Path, text: str) -> Path:
    """``text`` into a temporary file beside ``path``; the caller ``os.replace``s it into place."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    return tmp


def train_tokenizer(sources: Iterable, vocab_size: int, out, *, field: str = "text", separator: Optional[str] = None,
                    min_frequency: int = 2, overwrite: bool = False, progress: bool = False) -> dict:
    """Train a byte-level BPE of at most ``vocab_size`` ids on ``sources`` (``runtime.corpus``)
    and write it to ``out`` (a ``.json`` path, or a folder for ``tokenizer.json``) with
    ``tokenizer_config.json`` beside it, each written whole (a temporary file renamed into
    place). Returns {"out", "config", "vocab_size", "documents", "bytes", "special", "skipped"}."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("moedsl tokenizer train needs the tokenizers library: pip install 'moedsl[data]'") from None
    least = BYTES + len(SPECIAL)
    if vocab_size < least:
        raise UserError(f"--vocab-size {vocab_size}: at least {least} (the {BYTES} bytes and the "
                        f"{len(SPECIAL)} special tokens {', '.join(SPECIAL.values())})")
    out = Path(out).expanduser()
    if out.is_dir() or not out.suffix:
        out = out / "tokenizer.json"
    config = out.parent / CONFIG
    if not overwrite:
        for p in (out, config):
            if p.exists():
                raise UserError(f"--out {out}: {p} exists: --overwrite to replace it, or another --out")
    corpus = Corpus(sources, field, separator)
    for p in (out, config):
        apart(p, corpus.paths())

    stats = {"documents": 0, "bytes": 0}

    def texts():
        for text, nbytes in corpus:
            stats["documents"] += 1
            stats["bytes"] += nbytes
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts(), trainer=trainer)
    if stats["documents"] == 0:
        raise UserError(f"no documents in {', '.join(map(str, sources))}: nothing to train a tokenizer on")
    special = {role: (text, tok.token_to_id(text)) for role, text in SPECIAL.items()}
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 60,
                "clean_up_tokenization_spaces": False,
                **{f"{role}_token": text for role, (text, _) in special.items()}}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temps = [_write_atomic(out, tok.to_str(pretty=True)),
                 _write_atomic(config, json.dumps(settings, indent=2) + "\n")]
    except OSError as e:
        for p in (out, config):
            (p.parent / f".{p.name}.tmp-{os.getpid()}").unlink(missing_ok=True)
        raise UserError(f"--out {out}: not written ({e.strerror or e})") from None
    os.replace(temps[1], config)  # the config first: a tokenizer.json is never without its specials
    os.replace(temps[0], out)
    return {"out": out, "config": config, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "special": special, "skipped": len(corpus.skipped), **stats}


__all__ = ["train_tokenizer", "tokenizer_file", "load_tokenizer", "special_tokens", "SPECIAL", "CONFIG", "EOS_NAMES"]
