"""Training data. Every batch is a pure function of (seed, step, rank's share), so a resumed
run sees exactly the batches the uninterrupted one saw, and N ranks see the single process's
global batch split N ways.

- ``synthetic``: a built-in mixture of sequence tasks (copying, counting, reversal, sorting,
  and fixed random Markov chains), each in its own region of the vocabulary, so a model
  learns quickly and experts have distinct things to specialise on. No download.
- a prepared folder (``moedsl data prepare``, runtime/tokens.py), or several mixed by weight
  (``a:0.7,b:0.3``): random windows of ``seq + 1`` tokens (``Tokens``); each folder's eval
  split is held out (whole documents). A relative path in a spec's ``train.data`` is read from
  the spec file's folder (``spec_data``), one on the command line from the working directory.
- raw text (a text file or folder, ``pystdlib``) for a model with a tokenizer (the spec's
  ``model.tokenizer``, an import's tokenizer.json): prepared once into a cache folder with it,
  then read as a prepared folder.
- a path, for a model with no tokenizer and a vocabulary of bytes (a hand-written spec,
  vocab_size >= 256): a byte-level text file; the last 5% is held out. An import's
  vocabulary is its tokenizer's, never bytes: raw text without its tokenizer.json is refused.
- ``pystdlib``: the installed Python's standard-library source, a real text corpus every
  machine has; one file in 20 is held out (whole files, so nothing leaks).
- for ``model.input: vectors``: a synthetic regression whose target is a fixed mixture of
  linear maps chosen by a fixed clustering of the input.
- for ``model.input: image`` (images [B, H, W, C], float, channels last; labels [B] int64):
  ``digits``, the 1,797 8×8 handwritten digits scikit-learn ships in its package (no
  download; ``pip install 'moedsl[digits]'``), pixels scaled from 0..16 to [0, 1]; or a path
  to an ``.npz`` file with arrays ``images`` [N, H, W] or [N, H, W, C] (uint8 scaled by 1/255,
  floats taken as they are) and ``labels`` [N] (integers in [0, model.classes)). Either way a
  fixed split, whatever the training seed: a permutation seeded by the data alone puts
  N // 6 images in the held-out set (digits: 299 of 1,797) and the rest in training.
  Training batch s, row r is example s·B + r of an endless stream of epochs, each a
  permutation of the training set seeded by (seed, epoch); held-out batch s, row r is
  held-out image s·B + r, and evaluation covers the held-out set once (``eval_steps``):
  the rows past its end wrap around to fill the last batch and count nowhere (``Batch.mask``:
  not in the loss, and routed nowhere).
"""
from __future__ import annotations

import bisect
import hashlib
import importlib.util
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from moedsl.errors import MoedslError, UserError
from moedsl.paths import HF_CONFIG

from .corpus import PYSTDLIB_MAX_BYTES, pystdlib_files
from .resolve import is_import_dir
from .tokens import MANIFEST, TOKENIZER, model_tokenizer, open_tokens, tokenizer_sha256


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] token ids, [B, T, d] vectors, or [B, H, W, C] images
    targets: torch.Tensor  # [B, T] next tokens, [B, T, d], or [B] class labels
    mask: Optional[torch.Tensor] = None  # [B] bool: the rows that count (held-out images past the end: not)
    # token models, optional: [B, T] int64, each input token's document within its row, counted from 0
    # (prepared corpora under ``--pack documents``: attention stays inside a document, positions restart)
    documents: Optional[torch.Tensor] = None
    # token models, optional: [B, T] bool, the targets that count in the loss (instruction data: the
    # completion's or the assistant's tokens only; an encoder-decoder's: the labels that are not padding)
    loss_mask: Optional[torch.Tensor] = None
    # an encoder-decoder's (spec.encoder_decoder): ``inputs`` are the source ids [B, S] (padded with
    # model.pad_id), ``targets`` the labels [B, T]; the decoder reads ``decoder_inputs`` [B, T] int64, the
    # labels shifted right behind model.decoder_start_id (T5's _shift_right); ``source_mask`` [B, S] bool
    # marks the real source tokens (None: all real)
    decoder_inputs: Optional[torch.Tensor] = None
    source_mask: Optional[torch.Tensor] = None

    def model_args(self, device=None) -> tuple:
        """What the model is called with after ``inputs``: an encoder-decoder's (decoder inputs, source
        mask), else nothing (packed documents come from ``packed``); on ``device`` when given."""
        if self.decoder_inputs is None:
            return ()
        return tuple(None if t is None else t if device is None else t.to(device, non_blocking=True)
                     for t in (self.decoder_inputs, self.source_mask))


class Source:
    name = "data"
    _notes: tuple = ()  # what the run's first lines say about the data (the files, the tokenizer): notes()
    tokenizer: Optional[Path] = None  # the tokenizer.json its token ids come from (None: bytes, synthetic, ...)

    def batch(self, step: int, batch: int, seq: int, rank: int = 0, world: int = 1, split: str = "train") -> Batch:
        """Rank ``rank``'s share of the global batch of ``step`` (sequences [rank·B/N, (rank+1)·B/N))."""
        share = batch // world
        rows = range(rank * share, (rank + 1) * share)
        return self.rows(step, rows, seq, split)

    def rows(self, step: int, rows, seq: int, split: str) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def bytes_per_token(self, step: int, rows, seq: int, split: str) -> Optional[torch.Tensor]:
        """[len(rows)] float64: UTF-8 bytes of text per token in each row of ``rows(step, rows, seq,
        split)`` (bits per byte), or None where the tokens are not text (synthetic tasks)."""
        return None

    def notes(self, seq: int) -> list:
        """Lines the run prints first about its data (at sequences of ``seq`` tokens)."""
        return list(self._notes)


def seeded_generator(seed: int, *parts) -> torch.Generator:
    """A generator seeded by a hash of (seed, *parts) (say the split, step and row): the draws of
    one row of one batch, the same on every rank and across a resume."""
    h = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))


class Synthetic(Source):
    """Five task families; a sequence is one task, announced by its first token."""

    name = "synthetic"
    TASKS = ("copy", "count", "reverse", "sort", "markov")

    def __init__(self, vocab: int, seed: int):
        if vocab < 16:
            raise MoedslError(f"the synthetic data needs vocab_size >= 16, the spec has {vocab}")
        self.vocab, self.seed = vocab, seed
        self.region = max((vocab - len(self.TASKS)) // len(self.TASKS), 2)  # tokens of one task's alphabet
        g = seeded_generator(seed, "markov")
        probs = torch.rand(self.region, self.region, generator=g) ** 8  # peaked transitions
        self.markov_cdf = (probs / probs.sum(-1, keepdim=True)).cumsum(-1).tolist()

    def _one(self, g: torch.Generator, task: int, n: int) -> torch.Tensor:
        R = self.region
        base = len(self.TASKS) + task * R
        if self.TASKS[task] == "copy":
            k = int(torch.randint(2, 9, (1,), generator=g))
            seg = torch.randint(0, R, (k,), generator=g)
            body = seg.repeat(n // k + 1)[:n]
        elif self.TASKS[task] == "count":
            start, step = int(torch.randint(0, R, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
            body = (start + step * torch.arange(n)) % R
        elif self.TASKS[task] == "reverse":
            k = int(torch.randint(3, 9, (1,), generator=g))
            seg = torch.randint(0, R, (k,), generator=g)
            body = torch.cat([seg, seg.flip(0)]).repeat(n // (2 * k) + 1)[:n]
        elif self.TASKS[task] == "sort":
            k = int(torch.randint(3, 9, (1,), generator=g))
            seg = torch.randint(0, R, (k,), generator=g)
            body = torch.cat([seg, seg.sort().values]).repeat(n // (2 * k) + 1)[:n]
        else:  # a walk of the task's Markov chain, by inverse CDF
            state = int(torch.randint(0, R, (1,), generator=g))
            walk = []
            for u in torch.rand(n, generator=g).tolist():
                walk.append(state)
                state = min(bisect.bisect_left(self.markov_cdf[state], u), R - 1)
            body = torch.tensor(walk)
        return base + body

    def rows(self, step, rows, seq, split):
        out = torch.empty(len(rows), seq + 1, dtype=torch.int64)
        for i, row in enumerate(rows):
            g = seeded_generator(self.seed, split, step, row)
            task = int(torch.randint(0, len(self.TASKS), (1,), generator=g))
            out[i, 0] = task
            out[i, 1:] = self._one(g, task, seq)
        return Batch(out[:, :-1], out[:, 1:])


class Bytes(Source):
    """Windows of a byte string (one token per byte)."""

    def __init__(self, train: bytes, held_out: bytes, vocab: int, seed: int, name: str):
        if vocab < 256:
            raise MoedslError(f"byte-level data ({name}) needs model.vocab_size >= 256, the spec has {vocab}")
        self.name, self.seed = name, seed
        self.data = {"train": torch.frombuffer(bytearray(train), dtype=torch.uint8),
                     "eval": torch.frombuffer(bytearray(held_out), dtype=torch.uint8)}
        self._notes = (f"text as UTF-8 bytes: the model has no tokenizer ({name}: train {len(train):,} bytes, "
                      f"eval {len(held_out):,})",)

    def bytes_per_token(self, step, rows, seq, split):
        return torch.ones(len(rows), dtype=torch.float64)

    def rows(self, step, rows, seq, split):
        data = self.data[split]
        if data.numel() < seq + 2:
            raise MoedslError(f"{self.name}: the {split} part has {data.numel()} bytes, fewer than a sequence "
                              f"of {seq + 1}")
        out = torch.empty(len(rows), seq + 1, dtype=torch.int64)
        seed = self.seed if split == "train" else 0  # one held-out set, whatever the training seed
        for i, row in enumerate(rows):
            g = seeded_generator(seed, split, step, row)
            start = int(torch.randint(0, data.numel() - seq - 1, (1,), generator=g))
            out[i] = data[start:start + seq + 1].long()
        return Batch(out[:, :-1], out[:, 1:])


def pystdlib_bytes(limit: int = PYSTDLIB_MAX_BYTES) -> tuple[bytes, bytes, int]:
    """(train, held-out, files) from the standard library's .py files, in a fixed order."""
    root, files = pystdlib_files()
    train, held, total = [], [], 0
    for p in files:
        try:
            b = p.read_bytes()
        except OSError:
            continue
        key = int(hashlib.md5(str(p.relative_to(root)).encode()).hexdigest(), 16)
        (held if key % 20 == 0 else train).append(b)
        total += len(b)
        if total >= limit:
            break
    if not train or not held:
        raise MoedslError(f"found no Python source under {root} for --data pystdlib")
    return b"\n".join(train), b"\n".join(held), len(files)


class Tokens(Source):
    """Random windows of prepared folders (runtime/tokens.py), mixed by weight.

    Row r of step s draws, from ``seeded_generator(seed, split, s, r)``, a folder (folder k with probability
    ``weights[k]``) and then a uniform start in that folder's split, and reads the ``seq + 1``
    tokens there: inputs are the first ``seq``, targets the last ``seq``, and ``documents`` numbers
    each input token's document within the row (a window crosses document ends: each document
    ends with eos). Held-out windows come from each folder's eval split drawn with seed 0, so
    every run (whatever its training seed) and ``moedsl eval`` see the same ones, and eval batch
    i is a function of i alone.
    """

    def __init__(self, folders: list, weights: list, seed: int, name: str, notes: tuple = ()):
        self.folders, self.seed, self.name, self._notes = list(folders), seed, name, tuple(notes)
        self.tokenizer = self.folders[0].path / TOKENIZER  # one tokenizer for all (source_problems holds them equal)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.cdf = np.cumsum(self.weights).tolist()

    def _draw(self, step: int, row: int, seq: int, split: str) -> tuple:
        """(folder, start) of row ``row`` of batch ``step``: a function of (seed, split, step, row),
        read from the 128 bits of one blake2b hash of them (the first 64 choose the folder by the
        weights, the next 64 the start; a torch Generator per row costs a third of a batch)."""
        h = hashlib.blake2b(repr((self.seed if split == "train" else 0, split, step, row)).encode(),
                            digest_size=16).digest()
        u = int.from_bytes(h[:8], "little") / 2.0**64
        k = min(bisect.bisect_right(self.cdf, u), len(self.folders) - 1)
        data = self.folders[k].splits[split]
        if data.size < seq + 1:
            raise MoedslError(f"{self.folders[k].path}: the {split} split has {data.size} tokens, fewer than a "
                              f"sequence of {seq} tokens plus its target ({seq + 1})")
        return k, int.from_bytes(h[8:], "little") % (data.size - seq)

    def rows(self, step, rows, seq, split):
        windows, documents = [], []
        for row in rows:
            k, start = self._draw(step, row, seq, split)
            data = self.folders[k].splits[split]
            windows.append(data.tokens(start, seq + 1))
            documents.append(data.documents(start, seq))
        out = torch.from_numpy(np.stack(windows))  # [B, seq + 1] int64
        return Batch(out[:, :-1], out[:, 1:], documents=torch.from_numpy(np.stack(documents)))

    def bytes_per_token(self, step, rows, seq, split):
        return torch.tensor([self.folders[self._draw(step, row, seq, split)[0]].bytes_per_token(split)
                             for row in rows], dtype=torch.float64)


class Regression(Source):
    """input: vectors. x ~ N(0, I); y = W_c · x with c = argmax(x · K), K fixed."""

    name = "synthetic-regression"

    def __init__(self, d: int, seed: int, clusters: int = 8):
        g = seeded_generator(seed, "teacher")
        self.keys = torch.randn(d, clusters, generator=g)
        self.maps = torch.randn(clusters, d, d, generator=g) / d ** 0.5
        self.d, self.seed = d, seed

    def rows(self, step, rows, seq, split):
        x = torch.stack([torch.randn(seq, self.d, generator=seeded_generator(self.seed, split, step, r)) for r in rows])
        c = (x @ self.keys).argmax(-1)
        y = torch.einsum("btd,bted->bte", x, self.maps[c])
        return Batch(x, y)


class Epochs:
    """Example i of an endless stream of epochs over ``n`` examples, each epoch a permutation seeded
    by (seed, epoch): ``order(i)``; ``stream(step, batch, rank, world)``: the stream positions of
    rank ``rank``'s rows of global batch ``step`` (row r of batch s is position s·B + r)."""

    def __init__(self, n: int, seed: int, name: str = "epoch"):
        self.n, self.seed, self.name = n, seed, name
        self._perms: dict = {}

    def order(self, i: int) -> int:
        epoch = i // self.n
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = torch.randperm(self.n, generator=seeded_generator(self.seed, self.name, epoch))
        return int(self._perms[epoch][i % self.n])

    @staticmethod
    def stream(step: int, batch: int, rank: int, world: int) -> list:
        share = batch // world
        return [step * batch + r for r in range(rank * share, (rank + 1) * share)]


class Images(Source):
    """Labelled images (model.input: image), split once into training and held-out sets."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int, name: str):
        n = images.shape[0]
        order = torch.randperm(n, generator=seeded_generator(0, "image-split", name, n))  # the data's, not the run's
        held = n // 6
        self.data = {"train": (images[order[held:]], labels[order[held:]]),
                     "eval": (images[order[:held]], labels[order[:held]])}
        self.name, self.seed = name, seed
        self._epochs = Epochs(self.size("train"), seed)

    def size(self, split: str) -> int:
        return self.data[split][0].shape[0]

    def eval_steps(self, batch: int) -> int:
        """Held-out batches of ``batch`` images that cover the held-out set once."""
        return max(math.ceil(self.size("eval") / batch), 1)

    def batch(self, step, batch, seq, rank=0, world=1, split="train"):
        stream = Epochs.stream(step, batch, rank, world)
        images, labels = self.data[split]
        n = images.shape[0]
        if split == "train":
            index = torch.tensor([self._epochs.order(i) for i in stream], dtype=torch.int64)
            return Batch(images[index], labels[index])
        index = torch.tensor([i % n for i in stream], dtype=torch.int64)
        return Batch(images[index], labels[index], mask=torch.tensor([i < n for i in stream]))


def digits(seed: int = 0) -> Images:
    """scikit-learn's 8×8 handwritten digits (Alpaydin & Kaynak 1998, the UCI optdigits test set),
    loaded from the files in its package: [1797, 8, 8, 1] in [0, 1], labels 0..9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("--data digits needs scikit-learn: pip install 'moedsl[digits]'") from None
    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(-1) / 16.0
    return Images(images, torch.as_tensor(d.target, dtype=torch.int64), seed, "digits")


def read_npz(path: str, spec) -> tuple:
    """``images`` [N, H, W, C] float32 and ``labels`` [N] int64 from an .npz file, checked against
    ``spec``'s model.image and model.classes; each problem is one ``UserError`` line."""
    im, where = spec.model.image, f"--data {path}"
    takes = (f"a spec over images ({spec.name}) takes digits or an .npz file with arrays images [N, H, W(, C)] "
             "and labels [N] (numpy.savez)")
    try:
        with open(path, "rb") as raw:
            head = raw.read(512)
        if not head.startswith((b"PK", b"\x93NUMPY")):  # a zip archive (.npz) or one .npy array
            # np.load would take anything else for a pickle and say so ("contains pickled (object) data")
            what = "a text file" if _is_text(head) else "neither a zip archive nor a .npy array"
            raise UserError(f"{where}: {what}, not an .npz file: {takes}")
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise UserError(f"{where}: not an .npz file (a single .npy array): save with numpy.savez("
                            "path, images=..., labels=...)")
        with f:
            names = sorted(f.files)
            for key in ("images", "labels"):
                if key not in names:
                    raise UserError(f"{where} has no array '{key}' (it has: {', '.join(names) or 'none'})")
            images, labels = f["images"], f["labels"]
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where} is a directory: give an .npz file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UserError(f"{where}: not an .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if images.ndim not in (3, 4):
        raise UserError(f"{where}: 'images' has shape {list(images.shape)}, not [N, H, W] or [N, H, W, C]")
    if labels.ndim != 1:
        raise UserError(f"{where}: 'labels' has shape {list(labels.shape)}, not [N]")
    if images.ndim == 3:
        images = images[..., None]
    N, H, W, C = images.shape
    if (H, W, C) != (im.size, im.size, im.channels):
        raise UserError(f"{where}: the images are {H}×{W}×{C} (H×W×C) but model.image is {im.size}×{im.size}×"
                        f"{im.channels} (size {im.size}, channels {im.channels})")
    if labels.shape[0] != N:
        raise UserError(f"{where}: {N} images but {labels.shape[0]} labels")
    if N < 2:
        raise UserError(f"{where}: {N} image(s): too few to hold some out")
    if labels.dtype.kind not in "iu":
        raise UserError(f"{where}: 'labels' are {labels.dtype}, not integers")
    bad = np.flatnonzero((labels < 0) | (labels >= spec.model.classes))
    if bad.size:
        i = int(bad[0])
        raise UserError(f"{where}: label {int(labels[i])} at index {i} is outside [0, {spec.model.classes}) "
                        f"(model.classes {spec.model.classes}; {bad.size} label(s) out of range)")
    if images.dtype.kind not in "uif" and images.dtype != np.bool_:
        raise UserError(f"{where}: 'images' are {images.dtype}, not numbers")
    x = torch.as_tensor(images.astype(np.float32))
    if images.dtype == np.uint8:
        x = x / 255.0
    return x, torch.as_tensor(labels.astype(np.int64))


def _is_text(head: bytes) -> bool:
    """Whether a file's first bytes read as UTF-8 text (a multi-byte character cut at the end aside)."""
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # only the last character was cut by the read
    return True


MIN_TEXT_BYTES = 1024
HELD_OUT = 0.05  # the last 5% of a text file is held out


BUILT_IN = ("synthetic", "synthetic-regression", "pystdlib", "digits")


@dataclass(frozen=True)
class Item:
    """One element of ``--data``: as the user wrote it, its path, and its weight (normalised)."""

    given: str
    path: str
    weight: float


def data_items(data: str, base: Optional[Path] = None) -> list:
    """``--data`` as a list of ``Item``: one (a built-in name, a path that exists, or anything else,
    refused later by name), or a mixture ``a:0.7,b:0.3`` (``a,b``: equal weights) whose weights
    are normalised to sum to 1. ``base``: the folder relative paths are read from (None: the working
    directory). A weight that is not a number > 0, or weights for some items and not others, is a
    ``UserError`` naming the item."""
    here = Path(data).expanduser()
    if data in BUILT_IN or (base / here if base is not None else here).exists() or not any(c in data for c in ",:"):
        return [Item(data, data, 1.0)]
    parsed = []
    for given in data.split(","):
        path, sep, text = given.rpartition(":") if ":" in given else (given, "", "")
        if not path:
            raise UserError(f"--data {data}: item {given!r} names no folder (give path or path:weight)")
        if path in BUILT_IN and path != "pystdlib":
            raise UserError(f"--data {data}: item {given!r}: {path} cannot be mixed; a mixture takes prepared "
                            "folders (or text the model's tokenizer prepares)")
        try:
            weight = float(text) if sep else 1.0
        except ValueError:
            weight = float("nan")
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"--data {data}: item {given!r}: the weight {text!r} is not a number > 0")
        parsed.append((given, path, weight, bool(sep)))
    if len({has for *_, has in parsed}) > 1:
        given = next(g for g, _, _, has in parsed if not has)
        raise UserError(f"--data {data}: item {given!r} has no weight: give every item one (path:weight) or "
                        "none (equal weights)")
    total = sum(w for _, _, w, _ in parsed)
    return [Item(given, path, weight / total) for given, path, weight, _ in parsed]


def spec_data(spec) -> str:
    """The spec's ``train.data`` with each relative path read from the spec file's folder, as a
    spec's other paths are (a path on the command line is read from the working directory)."""
    data = spec.train.data
    source = Path(spec.source) if getattr(spec, "source", None) else None
    if source is None or not source.is_file() or data in BUILT_IN:
        return data
    try:
        items = data_items(data, source.parent)
    except UserError:
        return data  # refused as it is written, when the run checks its data
    rebased = [str(source.parent / Path(it.path).expanduser()) for it in items]
    if len(items) == 1 and items[0].given == data:
        return rebased[0]
    return ",".join(f"{path}:{it.weight!r}" for path, it in zip(rebased, items))


def is_prepared(path) -> bool:
    """A folder with a manifest: prepared tokens (``open_tokens`` checks it), not raw text."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def vocabulary_not_bytes(spec, init) -> Optional[str]:
    """Why a model with no tokenizer must still not read text as bytes: its vocabulary is a Hugging
    Face model's (the spec is an import's, or the weights come from ``init``: either folder keeps
    the checkpoint's config as hf_config.json). None: a spec of moedsl's own (hand-written, or
    upcycled or distill-initialised from a run), whose vocabulary (>= 256 ids) may be bytes."""
    if init and (Path(init) / HF_CONFIG).is_file():
        return f"its weights come from {init}, a Hugging Face import with no {TOKENIZER}"
    source = Path(spec.source) if getattr(spec, "source", None) else None
    if source is not None and source.is_file() and is_import_dir(source.parent) \
            and (source.parent / HF_CONFIG).is_file():
        return f"{source} is an import's spec and {source.parent} has no {TOKENIZER}"
    return None


def not_bytes(data: str, why: str) -> str:
    return (f"--data {data!r}: raw text for a model with no tokenizer whose vocabulary is not bytes ({why}): give "
            f"a folder prepared with the model's tokenizer (moedsl data prepare --tokenizer), or put its {TOKENIZER} "
            "beside the weights")


def source_problems(spec, data: str, seq: int, *, init=None) -> list:
    """What is wrong with ``data`` as the source of a run of ``spec`` with sequences of ``seq``
    tokens: one message per problem, each naming --data and its value (empty: nothing).
    ``init``: the import folder the weights come from (``--init``), or the folder holding a trained
    run's side files; the model's tokenizer is looked for there too (``tokens.model_tokenizer``).
    Cheap: a text file is looked at (os.stat) but not read, pystdlib is not gathered, a prepared
    folder's shards are checked against its manifest but not read."""
    m = spec.model
    if m.input == "image":
        return _image_problems(spec, data, seq)
    if m.input == "vectors":
        if data not in ("synthetic", "synthetic-regression"):
            return [f"--data {data!r}: a spec over vectors (model.input: vectors) trains on the built-in "
                    "regression task: use synthetic"]
        return []
    from . import instruct, seq2seq  # here, not at the top: they build on this module's Source

    if seq2seq.encoder_decoder_data(spec):  # span corruption, source/target pairs
        return seq2seq.problems(spec, data, seq, init)
    if data == "synthetic":
        return [] if m.vocab_size >= 16 else [
            f"--data synthetic needs model.vocab_size >= 16, the spec has {m.vocab_size}"]
    if instruct.kind_of(data):  # JSONL of prompt/completion pairs or chat messages
        return instruct.problems(spec, data, init)
    return text_problems(spec, data, seq, init=init)


def text_problems(spec, data: str, seq: int, *, init=None) -> list:
    """``source_problems`` for text (a prepared folder, a mixture of them, raw text) read in windows
    of ``seq + 1`` tokens."""
    try:
        items = data_items(data)
        tokenizer = model_tokenizer(spec, init)
    except UserError as e:
        return [str(e)]
    problems, folders = [], []
    for it in items:
        if is_prepared(it.path):
            try:
                folders.append((it, open_tokens(it.path)))
            except UserError as e:
                problems.append(f"--data {it.given}: {e}")
        elif len(items) > 1 and it.path != "pystdlib" and not Path(it.path).exists():
            problems.append(f"--data {data}: item {it.given!r}: no such file or folder")
        elif tokenizer is not None:  # raw text: prepared with the model's tokenizer when the run starts
            if it.path != "pystdlib" and not Path(it.path).exists():
                problems.append(f"--data {it.given}: no such file or folder")
        elif len(items) > 1:
            problems.append(f"--data {data}: item {it.given!r} is raw text, not a prepared folder (no {MANIFEST}), "
                            "and the model has no tokenizer to prepare it with: moedsl data prepare it first")
        else:
            why = vocabulary_not_bytes(spec, init)
            problems += [not_bytes(data, why)] if why else _byte_text_problems(spec, data, seq)
    try:
        problems += _folder_problems(spec, folders, tokenizer, seq)
    except UserError as e:  # the model's tokenizer.json cannot be read
        problems.append(f"--data {data}: {e}")
    return problems


def _folder_problems(spec, folders: list, tokenizer: Optional[Path], seq: Optional[int]) -> list:
    """Prepared ``folders`` ([(Item, TokenFolder)]) against the model: the tokenizer they were
    prepared with is the model's (by hash), or, where the model has none, one and the same for
    all; every id < model.vocab_size; each split holds a window of ``seq + 1`` tokens."""
    problems, vocab = [], spec.model.vocab_size
    want = tokenizer_sha256(tokenizer) if tokenizer is not None and folders else None
    for it, f in folders:
        have = f.tokenizer_sha256
        if want is not None and have != want:
            problems.append(f"--data {it.given}: prepared with the tokenizer {f.path / TOKENIZER} (sha256 "
                            f"{have[:12]}), not the model's {tokenizer} (sha256 {want[:12]}): prepare it again with "
                            f"--tokenizer {tokenizer}")
        if f.max_id() >= vocab:
            problems.append(f"--data {it.given}: token id {f.max_id()} >= model.vocab_size {vocab} (its tokenizer "
                            f"has {f.vocab_size} ids): a model over this data needs vocab_size > {f.max_id()}")
        for name, split in f.splits.items():
            if seq is not None and split.size < seq + 1:
                problems.append(f"--data {it.given}: the {name} split has {split.size} tokens, fewer than a "
                                f"sequence of {seq} tokens plus its target ({seq + 1})")
    if want is None and len({f.tokenizer_sha256 for _, f in folders}) > 1:
        (a, fa), (b, fb) = next(((x, y) for x, y in zip(folders, folders[1:])
                                 if x[1].tokenizer_sha256 != y[1].tokenizer_sha256))
        problems.append(f"--data: {a.given} and {b.given} were prepared with different tokenizers (sha256 "
                        f"{fa.tokenizer_sha256[:12]} and {fb.tokenizer_sha256[:12]}), and the model has none to "
                        "say which its ids are")
    return problems


def _byte_text_problems(spec, data: str, seq: int) -> list:
    """source_problems for raw text read as bytes (a model with no tokenizer, a byte vocabulary)."""
    m = spec.model
    path = Path(data)
    if path.is_dir():
        return [f"--data {data!r} is a directory but not a prepared folder (no {MANIFEST}): give a prepared folder "
                "(moedsl data prepare), a text file, synthetic or pystdlib"]
    problems = []
    if m.vocab_size < 256:
        problems.append(f"--data {data!r}: byte-level data needs model.vocab_size >= 256, the spec has "
                        f"{m.vocab_size}")
    if data == "pystdlib":
        return problems
    try:
        st = path.stat()
    except OSError as e:
        what = "no such file" if isinstance(e, FileNotFoundError) else e.strerror or str(e)
        return problems + [f"--data {data!r}: {what} (give a text file, a prepared folder, synthetic or pystdlib)"]
    if not path.is_file():
        return problems + [f"--data {data!r} is not a regular file: give a text file, synthetic or pystdlib"]
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return problems + [f"--data {data!r}: cannot be read ({e.strerror or e})"]
    held = st.st_size - int(st.st_size * (1 - HELD_OUT))
    if st.st_size < MIN_TEXT_BYTES:
        problems.append(f"--data {data!r} has {st.st_size} bytes: too little text to train on (at least "
                        f"{MIN_TEXT_BYTES})")
    elif held < seq + 2:
        problems.append(f"--data {data!r} has {st.st_size} bytes: its held-out last {HELD_OUT:.0%} "
                        f"({held} bytes) is shorter than a sequence of {seq} tokens plus its target; give "
                        f"at least {int((seq + 2) / HELD_OUT) + 1} bytes or a shorter --seq")
    return problems


def _image_problems(spec, data: str, seq: int) -> list:
    """source_problems for a spec over images: digits (scikit-learn importable) or a sound .npz."""
    tokens = spec.train.seq_len
    problems = [] if seq == tokens else [
        f"--seq {seq}: an image of {spec.name} is {tokens} tokens (from model.image): leave --seq out"]
    if data == "digits":
        im = spec.model.image
        if (im.size, im.channels) != (8, 1):
            problems.append(f"--data digits: the digits are 8×8 grey images, model.image is {im.size}×{im.size} "
                            f"with {im.channels} channel(s)")
        if spec.model.classes < 10:
            problems.append(f"--data digits has 10 classes, model.classes is {spec.model.classes}")
        if importlib.util.find_spec("sklearn") is None:  # looked up, not imported (seconds): make_source loads it
            problems.append("--data digits needs scikit-learn: pip install 'moedsl[digits]'")
        return problems
    if not data.endswith(".npz") and not Path(data).is_file():
        return problems + [f"--data {data!r}: a spec over images trains on digits or an .npz file (images, labels)"]
    try:
        read_npz(data, spec)
    except UserError as e:
        problems.append(str(e))
    return problems


def make_source(spec, data: str, seed: int, *, init=None) -> Source:
    """The source of ``data`` for a run of ``spec`` (``source_problems`` has refused what cannot
    work); ``init`` as there."""
    m = spec.model
    if m.input == "image":
        if data == "digits":
            return digits(seed)
        images, labels = read_npz(data, spec)
        return Images(images, labels, seed, Path(data).name)
    if m.input == "vectors":
        if data not in ("synthetic", "synthetic-regression"):
            raise MoedslError(f"a spec over vectors trains on the built-in regression task, not {data!r}")
        return Regression(m.d_model, seed)
    from . import seq2seq
    from .instruct import Instructions, kind_of  # here: they build on this module's Source

    if seq2seq.encoder_decoder_data(spec):  # span corruption, source/target pairs
        return seq2seq.make(spec, data, seed, init)
    if data == "synthetic":
        return Synthetic(m.vocab_size, seed)
    if kind_of(data):  # JSONL of prompt/completion pairs or chat messages
        return Instructions(data, spec, seed, init)
    return text_source(spec, data, seed, init=init)


def text_source(spec, data: str, seed: int, *, init=None) -> Source:
    """The source of text ``data`` (a prepared folder, a mixture of them, raw text): windows of
    ``seq + 1`` tokens (``make_source``)."""
    items = data_items(data)
    tokenizer = model_tokenizer(spec, init)
    if tokenizer is None and not all(is_prepared(it.path) for it in items):
        why = vocabulary_not_bytes(spec, init)
        if why or len(items) > 1:
            raise UserError(not_bytes(data, why or "a mixture takes prepared folders"))
        return _byte_text(spec, data, seed)
    folders = []
    for it in items:
        path = it.path
        if not is_prepared(path):  # raw text for a model with a tokenizer: prepared once, then read from a cache
            from .prepare import cached_prepare

            path = cached_prepare(it.path, tokenizer)
        folders.append(open_tokens(path))
    found = _folder_problems(spec, list(zip(items, folders)), tokenizer, None)
    if found:
        raise UserError(found[0])
    return Tokens(folders, [it.weight for it in items], seed, data, notes=_data_notes(items, folders, tokenizer))


def _data_notes(items: list, folders: list, tokenizer: Optional[Path]) -> tuple:
    """The run's first lines about prepared data: each folder, its tokens per split, its weight
    in a mixture; the tokenizer file and its hash."""
    lines = []
    for it, f in zip(items, folders):
        weight = f" (weight {it.weight:.3g})" if len(items) > 1 else ""
        tr, ev = f.manifest["splits"]["train"], f.manifest["splits"]["eval"]
        lines.append(f"data {f.path}{weight}: train {tr['tokens']:,} tokens in {tr['documents']:,} documents, eval "
                     f"{ev['tokens']:,} tokens in {ev['documents']:,} documents")
    sha = folders[0].tokenizer_sha256[:12]
    if tokenizer is not None:
        lines.append(f"tokenizer {tokenizer} (sha256 {sha}), the model's: the data was prepared with it")
    else:
        named = folders[0].path / folders[0].manifest["tokenizer"].get("file", TOKENIZER)
        lines.append(f"tokenizer {named} (sha256 {sha}), the data's: the model has none of its own and trains on "
                     "its ids")
    return tuple(lines)


def _byte_text(spec, data: str, seed: int) -> Bytes:
    """Raw text as UTF-8 bytes: pystdlib, or a text file whose last 5% is held out."""
    m = spec.model
    if data == "pystdlib":
        train, held, _ = pystdlib_bytes()
        return Bytes(train, held, m.vocab_size, seed, "pystdlib")
    path = Path(data)
    if path.is_dir():
        raise MoedslError(f"--data {data!r} is a directory but not a prepared folder (no {MANIFEST}): give a "
                          "prepared folder, a text file, synthetic or pystdlib")
    if not path.is_file():
        raise MoedslError(f"--data {data!r}: no such file (give a text file, a prepared folder, 'synthetic' or "
                          "'pystdlib')")
    raw = path.read_bytes()
    if len(raw) < MIN_TEXT_BYTES:
        raise MoedslError(f"--data {data!r} has {len(raw)} bytes: too little text to train on")
    cut = int(len(raw) * (1 - HELD_OUT))
    return Bytes(raw[:cut], raw[cut:], m.vocab_size, seed, path.name)


PACKS = ("none", "documents")


def packed(batch: Batch, pack: str, source: Source, device=None) -> Optional[torch.Tensor]:
    """``batch.documents`` (on ``device``) when the run packs documents (``pack`` "documents"), else
    None; batches with no document boundaries under it are refused in one line."""
    if pack != "documents":
        return None
    if batch.documents is None:
        raise UserError(f"--pack documents: the batches of --data {source.name} carry no document boundaries "
                        "(a folder from `moedsl data prepare` has them)")
    return batch.documents if device is None else batch.documents.to(device, non_blocking=True)


def pack_problems(spec, data: str, pack: str, init=None, name: str = "--pack") -> list:
    """What is wrong with packing ``pack`` (given as ``name``) for a run of ``spec`` on ``data``: one
    message per problem (empty: nothing). ``documents`` needs a token model and data with document
    boundaries: not the synthetic tasks, nor raw text read as bytes (a model with no tokenizer
    reads a text file or pystdlib as one stream; with one, raw text is prepared into documents)."""
    if pack not in PACKS:
        return [f"{name} {pack!r}: must be {' or '.join(PACKS)}"]
    if pack == "none":
        return []
    if spec.train.objective != "lm":
        return [f"{name} documents: train.objective {spec.train.objective} builds one example per row (an "
                "encoder–decoder's source and target): there is nothing to pack"]
    if spec.model.input != "tokens":
        return [f"{name} documents: a spec over {spec.model.input} (model.input) has no documents to pack"]
    if data == "synthetic":
        return [f"{name} documents: --data synthetic has no document boundaries (a folder from "
                "`moedsl data prepare` has them)"]
    from .instruct import kind_of

    if kind_of(data):
        return [f"{name} documents: --data {data!r} is instruction data, one example per row (padded): there is "
                "nothing to pack"]
    if (data == "pystdlib" or Path(data).is_file()) and model_tokenizer(spec, init) is None:
        return [f"{name} documents: --data {data!r} is read as bytes, one stream with no document "
                "boundaries (a folder from `moedsl data prepare` has them)"]
    return []
