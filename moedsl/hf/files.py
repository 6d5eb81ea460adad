"""Files: a checkpoint folder (local, or in the local Hugging Face cache), safetensors read
memory-mapped and written tensor by tensor, and output folders that appear whole or not at all.

safetensors (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian
header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}}``
(offsets into the data that follows), then the data. ``write_sharded`` writes that header
first, from the shapes alone, then each tensor as it is made, so a shard is never held in
memory; ``problem`` finds a truncated file from its header without reading the data.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open

from moedsl.dtypes import parse_bytes
from moedsl.errors import UserError
from moedsl.paths import HF_CONFIG, apart, side_file, swap_in  # noqa: F401 - here too (moedsl.paths has no torch)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# copied as they are, for generation later
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "chat_template.jinja")  # transformers 5 saves the chat template apart


def read_tokenizer(folders: Iterable):
    """The ``tokenizers`` Tokenizer of the first ``tokenizer.json`` in ``folders`` (``side_file``),
    or None where there is none. One there that the ``tokenizers`` library is missing to read is a
    ``UserError`` naming the file and the install, not ids shown in place of text."""
    path = side_file(folders, "tokenizer.json")
    if path is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError(f"{path}: reading it needs the tokenizers library: pip install 'moedsl[hf]'") from None
    return Tokenizer.from_file(str(path))


def read_generation_config(folders: Iterable) -> dict:
    """The first ``generation_config.json`` in ``folders`` (``side_file``: an import copies it
    beside the weights) as a dict; {} where there is none."""
    path = side_file(folders, "generation_config.json")
    return {} if path is None else read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; anything else is a ``UserError`` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def dtype_codes() -> dict:
    """torch dtype -> safetensors' dtype code (its format's names, not the spec's)."""
    return {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


def torch_dtype_of(code: str):
    """safetensors' dtype code -> torch dtype."""
    return {v: k for k, v in dtype_codes().items()}[code]


# -- where the checkpoint is ---------------------------------------------------------------

def hub_cache() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
    (huggingface_hub's constants.py)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve(source: str) -> Path:
    """A local folder, or ``ORG/NAME`` already in the Hugging Face cache
    (``models--ORG--NAME/snapshots/<revision of refs/main>``). Nothing is downloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{source} is a file: give the folder holding config.json and the *.safetensors files")
    cache = hub_cache()
    if source.count("/") == 1 and not source.startswith((".", "/")):
        repo = cache / ("models--" + source.replace("/", "--"))
        snapshots = repo / "snapshots"
        if snapshots.is_dir():
            try:
                rev = (repo / "refs" / "main").read_text().strip()
            except OSError:
                rev = None
            if rev and (snapshots / rev).is_dir():
                return snapshots / rev
            found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
    raise UserError(f"{source}: no such folder, and no model {source!r} in the Hugging Face cache {cache} "
                    "(moedsl import reads local files only; HF_HUB_CACHE or HF_HOME move the cache)")


def read_config(folder: Path) -> dict:
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no config.json (a Hugging Face checkpoint folder has config.json and "
                        "*.safetensors)")
    return read_json_object(folder / "config.json")


# -- reading -------------------------------------------------------------------------------

def header(path: Path) -> tuple[dict, int]:
    """(the JSON header, the offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise UserError(f"{path}: not a safetensors file (header of {n:,} bytes)")
        text = f.read(n)
    if len(text) < n:
        raise UserError(f"{path} is truncated (its header says {n:,} bytes, the file has {len(text) + 8:,})")
    try:
        head = json.loads(text)
    except ValueError:
        raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from None
    return head, 8 + n


def problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be read (missing, truncated), or None: from its header alone."""
    try:
        head, start = header(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except UserError as e:
        return str(e)
    end = max((v["data_offsets"][1] for k, v in head.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < start + end:
        return f"{path} is truncated ({size:,} of {start + end:,} bytes)"
    return None


class Checkpoint:
    """The tensors of a folder of safetensors (one file, or shards listed in
    ``model.safetensors.index.json``), read memory-mapped: ``get(name)``, ``get_expert(name, e)``
    (one slice of a stacked tensor), ``shape(name)``, ``file_of(name)``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index}: unreadable ({type(e).__name__}: {str(e)[:120]})") from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise UserError(f"{self.folder}: no *.safetensors files (moedsl reads safetensors only, not "
                                "pytorch_model.bin)")
            weight_map = None
        self.headers = {}
        for name in files:
            why = problem(self.folder / name)
            if why:
                if weight_map is not None and not (self.folder / name).exists():
                    why = f"{self.folder / name}, named in {INDEX}, is missing"
                raise UserError(why)
            self.headers[name] = header(self.folder / name)[0]
        self.where = {}
        for name, head in self.headers.items():
            for key in head:
                if key != "__metadata__":
                    self.where[key] = name
        if weight_map is not None:
            for key, name in sorted(weight_map.items()):
                if key not in self.headers[name]:
                    raise UserError(f"{index}: {key} is listed in {name}, which does not hold it")

    @property
    def names(self) -> set:
        return set(self.where)

    def file_of(self, name: str) -> Path:
        return self.folder / self.where[name]

    def shape(self, name: str) -> list:
        return list(self.headers[self.where[name]][name]["shape"])

    def _file(self, name: str):
        if name not in self.where:
            raise KeyError(name)
        # a fresh map per tensor, dropped after it: pages touched count in the process's
        # resident memory only while mapped, so a load holds its weights, not the files too
        return safe_open(str(self.folder / self.where[name]), framework="pt")

    def get(self, name: str):
        return self._file(name).get_tensor(name)

    def get_expert(self, name: str, e: int):
        return self._file(name).get_slice(name)[e:e + 1][0]


# -- writing -------------------------------------------------------------------------------

def nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def parse_size(text: str) -> int:
    """'5GB' -> 5·10⁹ bytes (transformers' convention: GB = 10⁹, GiB = 2³⁰), '500MB', '1GiB', '2000000'."""
    try:
        return parse_bytes(text)
    except ValueError:
        raise UserError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or 1GiB") from None


def write_sharded(folder: Path, entries: list, max_shard: int, index_name: str = INDEX,
                  stem: str = "model", written: Optional[Callable[[int], None]] = None) -> list:
    """Write ``entries`` [(name, shape, torch dtype, make() -> tensor)] as safetensors into
    ``folder``: one ``model.safetensors`` if they fit in ``max_shard`` bytes, else
    ``model-0000i-of-0000n.safetensors`` plus the index (``index_name``). Each tensor is made,
    written and dropped before the next: memory holds one tensor, not a shard. ``written(nbytes)``,
    if given, is called after each tensor is written (``progress.Written``)."""
    shards, current, size = [], [], 0
    for entry in entries:
        b = nbytes(entry[1], entry[2])
        if current and size + b > max_shard:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += b
    if current or not shards:
        shards.append(current)
    n = len(shards)
    names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        total += _write_file(folder / fname, shard, written)
        weight_map.update({e[0]: fname for e in shard})
    if n > 1:
        (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2) + "\n")
    return names


def _write_file(path: Path, entries: list, written: Optional[Callable[[int], None]] = None) -> int:
    head, offset, codes = {"__metadata__": {"format": "pt"}}, 0, dtype_codes()
    for name, shape, dtype, _ in entries:
        b = nbytes(shape, dtype)
        head[name] = {"dtype": codes[dtype], "shape": list(shape),
                      "data_offsets": [offset, offset + b]}
        offset += b
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, dtype, make in entries:
            t = make()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(f"{name}: made {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
            t = t.detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            if written is not None:
                written(t.numel() * t.element_size())
            del t
    return offset


@contextlib.contextmanager
def staged(out: Path, overwrite: bool, option: str = "--out"):
    """A folder to write into, renamed to ``out`` when the block ends without an error (an
    existing ``out`` is replaced then, with ``overwrite``); on an error it is removed and
    ``out`` is as it was. A non-empty ``out`` without ``overwrite`` is refused first; a write
    that fails (a read-only place, a full disk) is a ``UserError`` saying why, in the words a
    failed checkpoint save uses, with the folders it made removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{option} {out} is not empty: --overwrite to replace it, or another {option}")
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # nearest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise UserError(f"{option} {out}: cannot create {out.parent} ({e.strerror})") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        swap_in(tmp, out)
    except OSError as e:
        from moedsl.compiler.plan import human_bytes
        from moedsl.runtime.ckpt_storage import failure_reason, free_space  # runtime imports moedsl.hf

        why, full = failure_reason(e, tmp)  # before the removal: without an errno it probes tmp
        free = free_space(out.parent) if full else None
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        text = f"{option} {out}: not written, {why} in {out.parent}"
        if free is not None:
            text += f" ({human_bytes(free)} free there)"
        if e.filename and not str(e.filename).startswith(str(tmp)):
            text += f" ({e.filename})"
        raise UserError(text) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list) -> None:
    """Remove ``folders`` (nearest first) that a failed write made and left empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def copy_side_files(src: Path, dst: Path, names: Iterable[str] = TOKENIZER_FILES) -> list:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


__all__ = ["Checkpoint", "resolve", "read_config", "write_sharded", "staged", "apart", "parse_size", "problem",
           "hub_cache", "copy_side_files", "side_file", "HF_CONFIG"]
