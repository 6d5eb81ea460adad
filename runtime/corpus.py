"""Documents from the sources ``moedsl tokenizer train`` and ``moedsl data prepare`` read,
streamed one at a time as ``(text, utf8_bytes)``: nothing holds more than one document (or
one record batch of a columnar file) in memory, so a corpus larger than memory streams.

A source (``SRC``) is:

- ``pystdlib``: the installed Python's standard-library .py files, each one document (the
  files ``moedsl run --data pystdlib`` reads, in the same order, up to the same size);
- a text file: one document, or with a separator (``--split-lines``: one document per line,
  a trailing carriage return dropped; ``--separator TEXT``: the pieces between occurrences of
  TEXT) one document per piece, read in chunks. Text is taken as stored (UTF-8, no newline
  translation); a file that is not UTF-8 is a ``UserError`` naming it and the byte;
- ``*.jsonl`` / ``*.ndjson``: one JSON object per line, the document in its ``field``
  (default ``text``); a line that is not JSON, not an object, lacks the field or whose field
  is not a string is a ``UserError`` naming the file and line (blank lines are skipped);
- ``*.parquet``: the string column ``field``, read by record batches (pyarrow);
- a folder written by ``datasets``' ``save_to_disk`` (``state.json`` beside ``*.arrow``
  files): its ``field`` column, the Arrow IPC streams read by record batches (pyarrow, no
  ``datasets`` import);
- any other folder: every file under it, recursively, in sorted order, hidden files and
  folders (``.git``) left out; .jsonl/.ndjson/.parquet files read as above, the others as
  text. A file whose first 64 KiB hold a NUL byte or are not UTF-8 is binary: skipped and
  counted (``Corpus.skipped``), not read.

Empty documents (an empty file, two separators in a row, ``"text": ""``) are skipped and
counted (``Corpus.empty``): a document is what ends with eos, and eos alone teaches nothing.
"""
from __future__ import annotations

import codecs
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from moedsl.errors import UserError

TEXT, JSONL, PARQUET, ARROW = "text", "jsonl", "parquet", "arrow"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PYSTDLIB = "pystdlib"
PYSTDLIB_MAX_BYTES = 24 * 2**20  # the standard library read up to this size (--data pystdlib too)
SNIFF_BYTES = 1 << 16  # a folder's file is binary when these first bytes hold a NUL or are not UTF-8
CHUNK = 1 << 20  # a separated text file is read this much at a time
ROWS = 4096  # rows per record batch of a parquet file


def pystdlib_files() -> tuple[Path, list]:
    """(root, files): the standard library's .py files outside site-packages and tests, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


@dataclass(frozen=True)
class SourceFile:
    path: Path  # absolute
    kind: str  # TEXT | JSONL | PARQUET | ARROW
    size: int
    mtime_ns: int


def _stat(path: Path, kind: str) -> SourceFile:
    st = path.stat()
    return SourceFile(path, kind, st.st_size, st.st_mtime_ns)


def file_kind(path: Path) -> str:
    """How a file is read, from its name: JSONL, PARQUET or (anything else) TEXT."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return JSONL
    if name.endswith(".parquet"):
        return PARQUET
    return TEXT


def _binary(path: Path) -> bool:
    """Whether a file's first ``SNIFF_BYTES`` hold a NUL byte or are not UTF-8 (an unreadable
    file counts as binary: a folder walk reads what it can)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return True
    if b"\0" in head:
        return True
    try:
        # a multi-byte character cut at the end of the sniffed bytes is fine, not at the file's end
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError:
        return True
    return False


class Corpus:
    """The documents of ``sources`` (see the module's docstring), resolved to files on creation
    (folders walked, binaries found, sizes and mtimes read) and read when iterated:
    ``for text, nbytes in corpus``. ``total_bytes``: the size of everything to be read (for a
    progress bar); ``done_bytes``: how much of it has been read so far."""

    def __init__(self, sources: Iterable, field: str = "text", separator: Optional[str] = None):
        self.field, self.separator = field, separator
        if separator == "":
            raise UserError("--separator: give a non-empty text to cut documents at")
        self.files: list = []  # SourceFile, in reading order, each once
        self.skipped: list = []  # binary files a folder walk left out
        self.entries: list = []  # per source as given: {"path", "kind", "files", "size", "mtime"}
        self.empty = 0  # empty documents skipped
        self.done_bytes = 0
        seen: set = set()
        for src in sources:
            src = str(src)
            files = self._resolve(src)
            fresh = [f for f in files if f.path not in seen]
            seen.update(f.path for f in fresh)
            self.files.extend(fresh)
            self.entries.append({"path": src if src == PYSTDLIB else str(Path(src).expanduser().resolve()),
                                 "kind": self._entry_kind(src, files), "files": len(files),
                                 "size": sum(f.size for f in files),
                                 "mtime": max((f.mtime_ns for f in files), default=0) / 1e9})

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def paths(self) -> list:
        """The sources as given that are paths (not ``pystdlib``): what an --out must stay apart from."""
        return [e["path"] for e in self.entries if e["kind"] != PYSTDLIB]

    def identity(self) -> list:
        """What the documents are a function of (with the options): each file's path, size and
        mtime. A re-run whose identity, tokenizer and options match has nothing to do."""
        return [[str(f.path), f.size, f.mtime_ns] for f in self.files]

    # ------------------------------------------------------------------------------ resolving

    @staticmethod
    def _entry_kind(src: str, files: list) -> str:
        if src == PYSTDLIB:
            return PYSTDLIB
        p = Path(src).expanduser()
        if p.is_dir():
            return "datasets" if (p / "state.json").is_file() else "folder"
        return files[0].kind if files else TEXT

    def _resolve(self, src: str) -> list:
        if src == PYSTDLIB:
            root, files = pystdlib_files()
            out, total = [], 0
            for p in files:  # as runtime.data.pystdlib_bytes: up to the first file past the limit
                f = _stat(p, TEXT)
                out.append(f)
                total += f.size
                if total >= PYSTDLIB_MAX_BYTES:
                    break
            if not out:
                raise UserError(f"found no Python source under {root} for the source pystdlib")
            return out
        p = Path(src).expanduser()
        if not p.exists():
            raise UserError(f"{src}: no such file or folder")
        p = p.resolve()
        if p.is_dir():
            return self._folder(p, src)
        if not p.is_file():
            raise UserError(f"{src}: not a regular file or a folder")
        return [_stat(p, file_kind(p))]

    def _folder(self, root: Path, src: str) -> list:
        if (root / "manifest.json").is_file():
            from .tokens import is_token_folder

            if is_token_folder(root):
                raise UserError(f"{src}: already a prepared token folder (give the text it came from)")
        if (root / "dataset_dict.json").is_file():
            try:
                splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            except (OSError, ValueError, KeyError, TypeError):
                splits = []
            raise UserError(f"{src}: a datasets DatasetDict (splits {', '.join(map(str, splits)) or '?'}): give "
                            f"one split's folder, e.g. {Path(src) / (splits[0] if splits else 'train')}")
        if (root / "state.json").is_file():
            return self._saved_dataset(root, src)
        files = []
        for here, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                p = Path(here) / name
                if not p.is_file():
                    continue
                kind = file_kind(p)
                if kind == TEXT and _binary(p):
                    self.skipped.append(p)
                    continue
                files.append(_stat(p, kind))
        return files

    @staticmethod
    def _saved_dataset(root: Path, src: str) -> list:
        """A ``datasets`` save_to_disk folder: its state.json lists the .arrow files in order."""
        state = root / "state.json"
        try:
            names = [d["filename"] for d in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{state}: not a datasets save_to_disk state ({type(e).__name__}: {e})") from None
        files = []
        for name in names:
            p = root / name
            if not p.is_file():
                raise UserError(f"{p}: missing (listed in {state})")
            files.append(_stat(p, ARROW))
        return files

    # ------------------------------------------------------------------------------ reading

    def __iter__(self) -> Iterator[tuple]:
        self.done_bytes, self.empty = 0, 0
        for f in self.files:
            base = self.done_bytes
            read = {TEXT: self._text, JSONL: self._jsonl, PARQUET: self._parquet, ARROW: self._arrow}[f.kind]
            for text, nbytes in read(f):
                if text:
                    yield text, nbytes
                else:
                    self.empty += 1
            self.done_bytes = base + f.size

    def _text(self, f: SourceFile) -> Iterator[tuple]:
        if self.separator is None:
            try:
                raw = f.path.read_bytes()
            except OSError as e:
                raise UserError(f"{f.path}: cannot be read ({e.strerror or e})") from None
            self.done_bytes += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{f.path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            yield text, len(raw)
            return
        yield from self._separated(f)

    def _separated(self, f: SourceFile) -> Iterator[tuple]:
        sep = self.separator
        lines = sep == "\n"
        decoder = codecs.getincrementaldecoder("utf-8")()
        buf, scanned, offset = "", 0, 0

        def piece(text):
            if lines and text.endswith("\r"):
                text = text[:-1]
            return text, len(text.encode("utf-8"))

        try:
            with open(f.path, "rb") as fh:
                while True:
                    chunk = fh.read(CHUNK)
                    try:
                        buf += decoder.decode(chunk, final=not chunk)
                    except UnicodeDecodeError as e:
                        raise UserError(f"{f.path}: not UTF-8 text (byte {offset + e.start}: {e.reason})") from None
                    offset += len(chunk)
                    self.done_bytes += len(chunk)
                    if not chunk:
                        break
                    if buf.find(sep, max(0, scanned - len(sep) + 1)) < 0:  # a long piece: nothing to cut yet
                        scanned = len(buf)
                        continue
                    *done, buf = buf.split(sep)
                    scanned = len(buf)
                    for text in done:
                        yield piece(text)
        except OSError as e:
            raise UserError(f"{f.path}: cannot be read ({e.strerror or e})") from None
        yield from (piece(text) for text in buf.split(sep))

    def _jsonl(self, f: SourceFile) -> Iterator[tuple]:
        field = self.field
        try:
            fh = open(f.path, "rb")
        except OSError as e:
            raise UserError(f"{f.path}: cannot be read ({e.strerror or e})") from None
        with fh:
            for line, raw in enumerate(fh, 1):
                self.done_bytes += len(raw)
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    raise UserError(f"{f.path}:{line}: not JSON ({str(e).splitlines()[0]})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{f.path}:{line}: a JSON {type(obj).__name__}, not an object with a field "
                                    f"{field!r}")
                if field not in obj:
                    keys = ", ".join(map(repr, list(obj)[:8])) or "none"
                    raise UserError(f"{f.path}:{line}: no field {field!r} (its fields: {keys}; --field names "
                                    f"the one to read)")
                text = obj[field]
                if not isinstance(text, str):
                    raise UserError(f"{f.path}:{line}: field {field!r} is {_json_type(text)}, not a string")
                try:
                    nbytes = len(text.encode("utf-8"))
                except UnicodeEncodeError as e:
                    raise UserError(f"{f.path}:{line}: field {field!r} holds a lone surrogate "
                                    f"({text[e.start]!r} at character {e.start}): not text") from None
                yield text, nbytes

    def _parquet(self, f: SourceFile) -> Iterator[tuple]:
        pa, pq = _pyarrow(f.path, parquet=True)
        try:
            pf = pq.ParquetFile(f.path)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{f.path}: not a parquet file ({str(e).splitlines()[0]})") from None
        rows = max(pf.metadata.num_rows, 1)
        self._column_type(f.path, pf.schema_arrow, pa)
        base, done = self.done_bytes, 0
        for batch in pf.iter_batches(batch_size=ROWS, columns=[self.field]):
            yield from self._strings(f.path, batch.column(0), done, pa)
            done += batch.num_rows
            self.done_bytes = base + f.size * done // rows

    def _arrow(self, f: SourceFile) -> Iterator[tuple]:
        pa, _ = _pyarrow(f.path)
        try:
            source = pa.OSFile(str(f.path))  # read, not memory-mapped: a mapping counts against a memory limit
            reader = pa.ipc.open_stream(source)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{f.path}: not an Arrow stream ({str(e).splitlines()[0]})") from None
        with source:
            self._column_type(f.path, reader.schema, pa)
            column, done = reader.schema.get_field_index(self.field), 0
            base = self.done_bytes
            for batch in reader:
                yield from self._strings(f.path, batch.column(column), done, pa)
                done += batch.num_rows
                self.done_bytes = base + source.tell()

    def _column_type(self, path: Path, schema, pa) -> None:
        if self.field not in schema.names:
            cols = ", ".join(map(repr, schema.names[:12])) or "none"
            raise UserError(f"{path}: no column {self.field!r} (its columns: {cols}; --field names the one to read)")
        t = schema.field(self.field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or getattr(pa.types, "is_string_view", lambda _: False)(t)):
            raise UserError(f"{path}: column {self.field!r} holds {t}, not strings")

    def _strings(self, path: Path, column, first_row: int, pa) -> Iterator[tuple]:
        import pyarrow.compute as pc

        if column.null_count:
            row = first_row + column.is_null().to_pylist().index(True)
            raise UserError(f"{path}: row {row}: column {self.field!r} is null, not a string")
        yield from zip(column.to_pylist(), pc.binary_length(column).to_pylist())


def _json_type(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _pyarrow(path: Path, parquet: bool = False):
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        pq = None
        if parquet:
            import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading it needs pyarrow: pip install 'moedsl[data]'") from None
    return pa, pq


__all__ = ["Corpus", "SourceFile", "file_kind", "pystdlib_files", "PYSTDLIB", "PYSTDLIB_MAX_BYTES"]
