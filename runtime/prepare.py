"""``moedsl data prepare``: text sources -> a prepared token folder (``runtime.tokens``).

Documents stream from the sources (``runtime.corpus``) in batches, each batch tokenized by the
``tokenizers`` library's ``encode_batch`` (Rust threads over the batch's documents), with no
special tokens added and the tokenizer's eos appended to each document. Whole documents are
held out: a document goes to the eval split when a hash of its text falls under the held-out
fraction, so the split is stable whatever the order or the other documents (and a document
that appears twice is on one side). Nothing holds more than a batch, so a corpus larger than
memory prepares in a bounded footprint.

The folder is written under a temporary name beside ``out`` and renamed onto it at the end: an
error or Ctrl-C leaves no ``out`` (and an existing one as it was). Re-running on the same
inputs (the sources' paths, sizes and mtimes, the tokenizer's hash, the options) finds the
folder's manifest key equal and writes nothing.

This module does not import torch (``python -X importtime -c 'import moedsl.runtime.prepare'``):
preparing needs none, and a memory-limited prepare stays small.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from moedsl.errors import UserError
from moedsl.paths import apart, swap_in

from .corpus import PYSTDLIB, TEXT, Corpus, file_kind
from .tokenizer_train import CONFIG, EOS_NAMES, load_tokenizer, special_tokens, tokenizer_file
from .tokens import (MANIFEST, TOKENIZER, VERSION, ShardWriter, atomic_folder, is_token_folder, open_tokens,
                     token_dtype, tokenizer_max_id, tokenizer_sha256, write_manifest)

HELD_OUT = 0.05
PARAGRAPHS = "\n\n"  # where cached_prepare cuts a lone text file into documents
BATCH_DOCS = 1024  # documents per encode_batch call ...
BATCH_BYTES = 1 << 20  # ... or this much text, whichever comes first (bounds the memory of a batch)


def cache_root() -> Path:
    """Where ``cached_prepare`` keeps prepared folders: $MOEDSL_CACHE_DIR, else
    $XDG_CACHE_HOME/moedsl, else ~/.cache/moedsl."""
    if os.environ.get("MOEDSL_CACHE_DIR"):
        return Path(os.environ["MOEDSL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "moedsl"


def unescape(text: str) -> str:
    """A separator given on the command line: ``\\n``, ``\\t``, ``\\r``, ``\\0`` and ``\\\\`` as
    the characters they name (a shell passes them as two characters)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}.get(m[1], m[0]), text)


@dataclass
class _Plan:
    """What a prepare reads and how: everything its manifest key is a function of."""

    corpus: Corpus
    tokenizer_path: Path
    tokenizer: object  # tokenizers.Tokenizer
    sha256: str
    eos: tuple  # (text, id)
    vocab_size: int
    options: dict
    key: str


def _plan(sources: Iterable, tokenizer, field: str, separator: Optional[str], held_out: float) -> _Plan:
    if not 0.0 < held_out < 1.0:
        raise UserError(f"--held-out {held_out}: the fraction of documents held out, above 0 and below 1")
    path = tokenizer_file(tokenizer)
    tok = load_tokenizer(path)
    eos = special_tokens(path, tok).get("eos")
    if eos is None:
        raise UserError(f"{path}: no eos token to end documents with (name it as eos_token in a {CONFIG} "
                        f"beside it, or give the tokenizer one of {', '.join(EOS_NAMES)})")
    sha = tokenizer_sha256(path)
    vocab = max(tok.get_vocab_size(with_added_tokens=True), tokenizer_max_id(path) + 1)
    corpus = Corpus(list(sources), field, separator)
    options = {"field": field, "separator": separator, "held_out": held_out, "eos": eos[0]}
    ident = {"format": VERSION, "files": corpus.identity(), "tokenizer": sha, "options": options}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()
    return _Plan(corpus, path, tok, sha, eos, vocab, options, key)


def up_to_date(out: Path, key: str) -> bool:
    """Whether ``out`` is a finished prepared folder of this key whose shards match its manifest."""
    if not is_token_folder(out):
        return False
    try:
        if json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8")).get("key") != key:
            return False
        open_tokens(out)
    except (OSError, ValueError, UserError):
        return False
    return True


def prepare(sources: Iterable, tokenizer, out, *, field: str = "text", separator: Optional[str] = None,
            held_out: float = HELD_OUT, overwrite: bool = False, progress=False, batch_docs: int = BATCH_DOCS,
            report: Optional[Callable[[str], None]] = None) -> Path:
    """Tokenize ``sources`` (paths or ``pystdlib``, see ``runtime.corpus``) with ``tokenizer``
    (a tokenizer.json) into the prepared folder ``out``; returns ``out``.

    ``field``: the JSONL field / column holding the text; ``separator``: cut text files into
    documents at it (None: a file is a document); ``held_out``: the fraction of documents in
    the eval split (at least one document on each side); ``overwrite``: replace an ``out`` that
    holds something else; ``progress``: False (quiet), True (a rich bar on a terminal, a line
    every 10% otherwise); ``report``: called with each message for the person running
    (skipped files, up to date, what was written)."""
    say = report or (lambda _text: None)
    plan = _plan(sources, tokenizer, field, separator, held_out)
    out = Path(out).expanduser()
    apart(out, plan.corpus.paths() + [str(plan.tokenizer_path)])
    if plan.corpus.skipped:
        names = ", ".join(str(p) for p in plan.corpus.skipped[:3]) + (", ..." if len(plan.corpus.skipped) > 3 else "")
        say(f"skipped {len(plan.corpus.skipped)} binary file(s): {names}")
    if up_to_date(out, plan.key):
        say(f"{out} is up to date (same sources, tokenizer and options): nothing written")
        return out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = ("tokens prepared from other sources, tokenizer or options" if is_token_folder(out)
                else "other files")
        raise UserError(f"--out {out} holds {what}: --overwrite to replace it, or another --out")
    _write(plan, out, batch_docs, progress)
    m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    tr, ev = m["splits"]["train"], m["splits"]["eval"]
    say(f"prepared {out}: {tr['documents']:,} documents, {tr['tokens']:,} tokens to train on; {ev['documents']:,} "
        f"documents, {ev['tokens']:,} tokens held out ({m['dtype']}, eos {plan.eos[0]} = {plan.eos[1]}"
        + (f", {plan.corpus.empty} empty documents skipped" if plan.corpus.empty else "") + ")")
    return out


def _write(plan: _Plan, out: Path, batch_docs: int, progress) -> None:
    """Fill a temporary folder beside ``out`` and rename it onto ``out`` (an old ``out`` moved
    aside first, removed after); on any failure the temporary folder goes and ``out`` stays."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp = atomic_folder(out)
        except FileExistsError as e:  # left by a killed process that had this pid
            shutil.rmtree(e.filename, ignore_errors=True)
            tmp = atomic_folder(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create a folder in {out.parent} ({e.strerror or e})") from None
    try:
        _fill(plan, tmp, batch_docs, progress)
        swap_in(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"--out {out}: not written, {e.strerror or e}{where}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _batches(corpus: Corpus, batch_docs: int):
    texts, sizes, nbytes = [], [], 0
    for text, n in corpus:
        texts.append(text)
        sizes.append(n)
        nbytes += n
        if len(texts) >= batch_docs or nbytes >= BATCH_BYTES:
            yield texts, sizes
            texts, sizes, nbytes = [], [], 0
    if texts:
        yield texts, sizes


def _fill(plan: _Plan, tmp: Path, batch_docs: int, progress) -> None:
    dtype = token_dtype(plan.vocab_size)
    eos = plan.eos[1]
    writers = {"train": ShardWriter(tmp, "train", dtype), "eval": ShardWriter(tmp, "eval", dtype)}
    # each split's latest document is written one behind, so that at the end one can move to the
    # other split when that one is empty (at least one document on each side)
    last: dict = {"train": None, "eval": None}
    cut = int(plan.options["held_out"] * 2**64)
    bar = _Progress(progress, plan.corpus.total_bytes)
    # the same ids as encode_batch without the character offsets (tokenizers >= 0.21): 1.6x faster
    encode = getattr(plan.tokenizer, "encode_batch_fast", plan.tokenizer.encode_batch)

    def write(texts, sizes, encoded, done):
        for text, nbytes, enc in zip(texts, sizes, encoded.result()):
            ids = np.array(enc.ids + [eos], dtype=dtype)
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
            split = "eval" if int.from_bytes(digest, "little") < cut else "train"
            if last[split] is not None:
                writers[split].add(*last[split])
            last[split] = (ids, nbytes)
        bar.update(done)

    # one batch encodes (Rust threads, the GIL released) while this thread reads the next and
    # writes the one before: the reading and writing hide behind the tokenizer's work
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="moedsl-encode") as pool:
            before = None
            for texts, sizes in _batches(plan.corpus, batch_docs):
                job = (texts, sizes, pool.submit(encode, texts, add_special_tokens=False), plan.corpus.done_bytes)
                if before is not None:
                    write(*before)
                before = job
            if before is not None:
                write(*before)
    finally:
        bar.close()
    counts = {s: w.info.documents + (last[s] is not None) for s, w in writers.items()}
    if counts["train"] + counts["eval"] < 2:
        given = ", ".join(e["path"] for e in plan.corpus.entries)
        raise UserError(f"{given}: {'no documents' if not sum(counts.values()) else 'one document'} "
                        f"({plan.corpus.empty} empty skipped): a prepared folder needs at least 2, one to train on "
                        f"and one held out")
    if counts["eval"] == 0:
        last["train"], last["eval"] = None, last["train"]
    elif counts["train"] == 0:
        last["train"], last["eval"] = last["eval"], None
    for split, doc in last.items():
        if doc is not None:
            writers[split].add(*doc)
    splits = {s: w.close() for s, w in writers.items()}
    shutil.copyfile(plan.tokenizer_path, tmp / TOKENIZER)
    if (plan.tokenizer_path.parent / CONFIG).is_file():
        shutil.copyfile(plan.tokenizer_path.parent / CONFIG, tmp / CONFIG)
    write_manifest(tmp, tokenizer_sha256=plan.sha256, vocab_size=plan.vocab_size, eos_id=eos, dtype=dtype,
                   splits=splits, sources=plan.corpus.entries,
                   options={**plan.options, "skipped_binary": len(plan.corpus.skipped),
                            "skipped_empty": plan.corpus.empty}, key=plan.key)


class _Progress:
    """MB of source read of the total: a rich bar on a terminal, a line every 10% otherwise."""

    def __init__(self, on, total: int):
        self.total, self.bar, self.next = max(total, 1), None, 0.1
        self.on = bool(on)
        if self.on and sys.stdout.isatty():
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bar = Progress(TextColumn("[bold]prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("prepare", total=self.total)
            self.bar.start()

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif self.on and done / self.total >= self.next:
            print(f"prepare: {done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB read ({100 * done / self.total:.0f}%)",
                  flush=True)
            self.next = (int(10 * done / self.total) + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def cached_prepare(source: str, tokenizer, field: str = "text", progress=False,
                   report: Optional[Callable[[str], None]] = None) -> Path:
    """``source`` (a text file, a folder, a JSONL file) prepared with ``tokenizer`` once, into
    a folder of the cache (``cache_root()/tokens``) named by the sources' identity (paths,
    sizes, mtimes), the tokenizer's hash and the options; later calls return it unread. A lock
    file makes processes that ask at once prepare it once.

    A text file is cut into documents at blank lines (paragraphs: ``PARAGRAPHS``, the blank
    line itself replaced by the eos that ends each one), so that one file has documents to
    hold out; a folder's files and JSONL lines are documents as in ``prepare``."""
    p = Path(str(source)).expanduser()
    separator = PARAGRAPHS if str(source) != PYSTDLIB and p.is_file() and file_kind(p) == TEXT else None
    plan = _plan([source], tokenizer, field, separator, HELD_OUT)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(source)).name)[:40] or "corpus"
    out = cache_root() / "tokens" / f"{stem}-{plan.key[:16]}"
    if up_to_date(out, plan.key):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f".{out.name}.lock", "w")
    except OSError as e:
        raise UserError(f"the data cache {out.parent}: cannot be written ({e.strerror or e}; $MOEDSL_CACHE_DIR "
                        f"chooses another place)") from None
    with lock, _locked(lock):
        if not up_to_date(out, plan.key):  # not prepared by another process meanwhile
            _write(plan, out, BATCH_DOCS, progress)
            if report:
                report(f"prepared {source} into {out}")
    return out


@contextlib.contextmanager
def _locked(f):
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


__all__ = ["prepare", "cached_prepare", "cache_root", "up_to_date", "unescape", "HELD_OUT"]
