"""Pre-tokenized corpora: the folder ``moedsl data prepare`` writes and ``moedsl run --data DIR``
reads. The layout follows nanoGPT's and Megatron's memory-mapped token files (Megatron-LM
``megatron/core/datasets/indexed_dataset.py``: a flat token file and a document index): ids
are read straight from the page cache, so a corpus larger than memory trains as fast as a small
one.

    DIR/manifest.json        what the folder holds (``Manifest``), written last
    DIR/tokenizer.json       the tokenizer the ids came from (a copy; its hash is in the manifest)
    DIR/train-00000.bin      token ids, little-endian uint16 (every id < 65536) or uint32, the
                             documents back to back, each ending with the tokenizer's eos
    DIR/train-00000.idx      little-endian uint64 [documents + 1]: where each document starts in
                             the shard's tokens; the last entry is the shard's token count
    DIR/eval-00000.bin/.idx  the held-out documents (whole documents: nothing of one leaks)

A document never spans two shards. Each problem found on opening (a missing or truncated
shard, a manifest that does not match its shards) is one ``UserError`` line naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from moedsl.errors import UserError
from moedsl.paths import side_file

FORMAT = "moedsl-tokens"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "eval")
SHARD_TOKENS = 1 << 28  # tokens per shard file before the next starts (512 MiB of uint16)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits (vocab_size <= 65536), else uint32, little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokenizer_json(path):
    """The parsed JSON of the tokenizer.json ``path``; one that cannot be read or parsed is a
    ``UserError`` naming it."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{p}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not a tokenizer.json ({e})") from None


def tokenizer_sha256(path) -> str:
    """The hash that names a tokenizer: sha256 of its tokenizer.json as canonical JSON (keys
    sorted, no spaces), so the same tokenizer saved with other formatting hashes the same."""
    canon = json.dumps(tokenizer_json(path), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def tokenizer_entries(path) -> tuple:
    """(the model's vocabulary [(token, id)], its added tokens [{"id": int, "content": ..., ...}])
    of a tokenizer.json, read from the JSON alone (no ``tokenizers``): {token: id} of BPE,
    WordPiece and WordLevel, Unigram's list of [token, score] in id order (an entry that is not
    one: token None). A file that is not a JSON object is a ``UserError`` naming it."""
    data = tokenizer_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a tokenizer.json (a JSON {type(data).__name__}, not an object)")
    vocab = (data.get("model") or {}).get("vocab") if isinstance(data.get("model"), dict) else None
    if isinstance(vocab, dict):
        entries = [(token, i) for token, i in vocab.items() if isinstance(i, int)]
    elif isinstance(vocab, list):
        entries = [(e[0] if isinstance(e, list) and e else None, i) for i, e in enumerate(vocab)]
    else:
        entries = []
    added = [a for a in data.get("added_tokens") or () if isinstance(a, dict) and isinstance(a.get("id"), int)]
    return entries, added


def tokenizer_max_id(path) -> int:
    """The largest id a tokenizer.json can give (``tokenizer_entries``: its model's vocabulary and
    its added tokens). -1 where it has none."""
    entries, added = tokenizer_entries(path)
    return max([-1] + [i for _, i in entries] + [a["id"] for a in added])


# ---------------------------------------------------------------------------------------- writing

@dataclass
class ShardInfo:
    file: str  # the .bin file's name in DIR
    index: str  # the .idx file's name in DIR
    tokens: int
    documents: int
    max_id: int  # the largest id in the shard (-1: empty), so a loader checks vocab_size unread


@dataclass
class SplitInfo:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text (bits per byte: loss · tokens / (bytes · ln 2))
    shards: list = field(default_factory=list)  # [ShardInfo]


class ShardWriter:
    """Appends one split's documents to ``DIR/{split}-NNNNN.bin`` shards (a new shard once one
    holds ``shard_tokens``) with their ``.idx``; ``close()`` gives the ``SplitInfo``."""

    def __init__(self, folder, split: str, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS):
        self.folder, self.split, self.dtype, self.shard_tokens = Path(folder), split, np.dtype(dtype), shard_tokens
        self.info = SplitInfo()
        self._f = None
        self._starts: list = []
        self._tokens = 0
        self._max = -1

    def add(self, ids, text_bytes: int) -> None:
        """One document's ids (its eos included) and the UTF-8 size of its text."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        hi = int(ids.max())
        if hi >= 1 << (8 * self.dtype.itemsize) or int(ids.min()) < 0:
            raise ValueError(f"token id {hi} does not fit {self.dtype}")
        if self._f is None:
            self._open()
        self._starts.append(self._tokens)
        self._f.write(ids.astype(self.dtype, copy=False).tobytes())
        self._tokens += int(ids.size)
        self._max = max(self._max, hi)
        self.info.documents += 1
        self.info.tokens += int(ids.size)
        self.info.bytes += int(text_bytes)
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def _open(self) -> None:
        n = len(self.info.shards)
        self._name = f"{self.split}-{n:05d}"
        self._f = open(self.folder / f"{self._name}.bin", "wb")
        self._starts, self._tokens, self._max = [], 0, -1

    def _close_shard(self) -> None:
        self._f.close()
        self._f = None
        index = np.asarray(self._starts + [self._tokens], dtype="<u8")
        index.tofile(self.folder / f"{self._name}.idx")
        self.info.shards.append(ShardInfo(f"{self._name}.bin", f"{self._name}.idx", self._tokens,
                                          len(self._starts), self._max))

    def close(self) -> SplitInfo:
        if self._f is not None:
            self._close_shard()
        return self.info


def write_manifest(folder, *, tokenizer_sha256: str, vocab_size: int, eos_id: int, dtype: np.dtype,
                   splits: dict, sources: list, options: dict, key: str) -> dict:
    """Write ``DIR/manifest.json`` (the folder's last file: a folder without one is unfinished).
    ``splits``: {"train": SplitInfo, "eval": SplitInfo}; ``sources``: [{"path", "size", ...}];
    ``options``: what prepare was asked (field, held-out fraction, ...); ``key``: the hash of
    inputs, tokenizer and options that makes re-running prepare on the same inputs a no-op."""
    m = {
        "format": FORMAT, "version": VERSION, "key": key,
        "tokenizer": {"sha256": tokenizer_sha256, "vocab_size": int(vocab_size), "eos_id": int(eos_id),
                      "file": TOKENIZER},
        "dtype": np.dtype(dtype).name,
        "splits": {name: {"documents": s.documents, "tokens": s.tokens, "bytes": s.bytes,
                          "shards": [vars(sh) for sh in s.shards]} for name, s in splits.items()},
        "sources": sources, "options": options,
    }
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(m, indent=1) + "\n", encoding="utf-8")
    return m


# ---------------------------------------------------------------------------------------- reading

def is_token_folder(path) -> bool:
    """Whether ``path`` is a folder with a manifest of this format (cheap: reads one small file)."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class Split:
    """One split's shards as one sequence of tokens: ``tokens(start, n)`` reads across shard
    ends; ``documents(start, n)`` numbers each token's document from 0 within the window."""

    def __init__(self, name: str, ids: list, starts: list):
        self.name = name
        self._ids, self._starts = ids, starts  # per shard: memmapped ids, memmapped document starts
        self.offsets = np.cumsum([0] + [a.shape[0] for a in ids]).astype(np.int64)  # shard k starts at offsets[k]
        self.size = int(self.offsets[-1])
        self.document_count = int(sum(s.shape[0] for s in starts))

    def _pieces(self, start: int, n: int):
        if start < 0 or start + n > self.size:
            raise IndexError(f"{self.name}: tokens [{start}, {start + n}) outside [0, {self.size})")
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while n > 0:
            lo = start - int(self.offsets[k])
            take = min(n, self._ids[k].shape[0] - lo)
            yield k, lo, take
            start, n, k = start + take, n - take, k + 1

    def tokens(self, start: int, n: int) -> np.ndarray:
        """int64 [n]: the split's tokens start .. start+n-1."""
        return np.concatenate([np.asarray(self._ids[k][lo:lo + t], dtype=np.int64)
                               for k, lo, t in self._pieces(start, n)])

    def documents(self, start: int, n: int) -> np.ndarray:
        """int64 [n]: for each token of the window, which document it belongs to, counted from 0 at
        the window's first token (a window that starts inside a document starts with 0)."""
        parts, base = [], 0
        for k, lo, t in self._pieces(start, n):
            doc = np.searchsorted(self._starts[k], np.arange(lo, lo + t), side="right").astype(np.int64)
            doc -= doc[0]
            parts.append(doc + base)
            base = int(parts[-1][-1]) + 1  # a shard starts a document
        return np.concatenate(parts)


@dataclass
class TokenFolder:
    """A prepared folder, checked against its manifest (``open_tokens``)."""

    path: Path
    manifest: dict
    splits: dict  # name -> Split

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.manifest["tokenizer"]["eos_id"]

    def max_id(self) -> int:
        return max((sh["max_id"] for s in self.manifest["splits"].values() for sh in s["shards"]), default=-1)

    def bytes_per_token(self, split: str = "eval") -> float:
        s = self.manifest["splits"][split]
        return s["bytes"] / s["tokens"] if s["tokens"] else float("nan")


def open_tokens(path) -> TokenFolder:
    """Open ``path`` (a prepared folder), every shard memory-mapped and checked against the
    manifest: sizes, document counts, index bounds. Each mismatch is one ``UserError``."""
    folder = Path(path)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if not mpath.is_file():
        raise UserError(f"{folder}: no {MANIFEST} (not a folder `moedsl data prepare` finished)")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{mpath}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{mpath}: not JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{mpath}: not a manifest of prepared tokens (format {FORMAT!r})")
    if m.get("version") != VERSION:
        raise UserError(f"{mpath}: format version {m.get('version')!r}; this moedsl reads version {VERSION}")
    try:
        dtype = np.dtype(m["dtype"]).newbyteorder("<")
        splits = {}
        for name in SPLITS:
            s = m["splits"][name]
            ids, starts, tokens, docs = [], [], 0, 0
            for sh in s["shards"]:
                ids.append(_map(folder / sh["file"], dtype, sh["tokens"], "tokens"))
                idx = _map(folder / sh["index"], np.dtype("<u8"), sh["documents"] + 1, "document starts")
                _check_index(folder / sh["index"], idx, sh["tokens"])
                starts.append(idx[:-1])
                tokens += sh["tokens"]
                docs += sh["documents"]
            if (tokens, docs) != (s["tokens"], s["documents"]):
                raise UserError(f"{mpath}: the {name} split says {s['tokens']} tokens in {s['documents']} "
                                f"documents, its shards hold {tokens} in {docs}")
            splits[name] = Split(name, ids, starts)
    except (KeyError, TypeError) as e:
        raise UserError(f"{mpath}: incomplete manifest (missing {e})") from None
    return TokenFolder(folder, m, splits)


def _map(path: Path, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path}: missing (the manifest lists it)") from None
    want = count * dtype.itemsize
    if size != want:
        raise UserError(f"{path}: {size} bytes, the manifest says {count} {what} of {dtype.itemsize} bytes "
                        f"({want} bytes){': truncated' if size < want else ''}")
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _check_index(path: Path, idx: np.ndarray, tokens: int) -> None:
    if idx[0] != 0 or int(idx[-1]) != tokens:
        raise UserError(f"{path}: document starts run from {int(idx[0])} to {int(idx[-1])}, not 0 to the "
                        f"shard's {tokens} tokens")
    if idx.shape[0] > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise UserError(f"{path}: document starts are not increasing (an empty or reordered document)")


def atomic_folder(out) -> Path:
    """A fresh temporary folder beside ``out`` (same file system), to fill and then
    ``os.replace`` onto ``out``: a half-written folder never has ``out``'s name."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=False)
    return tmp


def model_tokenizer(spec, init=None) -> Optional[Path]:
    """The tokenizer.json of the model a run trains: the spec's ``model.tokenizer`` (a path, read
    relative to the spec file's folder), else the one beside an import's spec.yaml, else the one
    in the ``--init`` import folder; None where the model has none (its text is bytes)."""
    source = Path(spec.source) if getattr(spec, "source", None) else None
    here = source.parent if source is not None and source.is_file() else None
    named = getattr(spec.model, "tokenizer", None)
    if not named:
        return side_file([here, init], TOKENIZER)
    p = Path(named).expanduser()
    if not p.is_absolute() and here is not None:
        p = here / p
    if p.is_file():
        return p
    # a trained run's spec, rebuilt from its checkpoint, names the file relative to a spec file that is not
    # there: the run kept its copy beside the checkpoints (runtime/train.py)
    return side_file([init], TOKENIZER) or p
