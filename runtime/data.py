"""Training data. Every batch is a pure function of (seed, step, rank's share), so a resumed
run sees exactly the batches the uninterrupted one saw, and N ranks see the single process's
global batch split N ways.

- ``synthetic``: a built-in mixture of sequence tasks (copying, counting, reversal, sorting,
  and fixed random Markov chains), each in its own region of the vocabulary, so a model
  learns quickly and experts have distinct things to specialise on. No download.
- a path: a byte-level text file (vocab_size >= 256); the last 5% is held out.
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

from .corpus import PYSTDLIB_MAX_BYTES, pystdlib_files


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] token ids, [B, T, d] vectors, or [B, H, W, C] images
    targets: torch.Tensor  # [B, T] next tokens, [B, T, d], or [B] class labels
    mask: Optional[torch.Tensor] = None  # [B] bool: the rows that count (held-out images past the end: not)
    # token models, optional: [B, T] int64, each input token's document within its row, counted from 0
    # (prepared corpora under ``--pack documents``: attention stays inside a document, positions restart)
    documents: Optional[torch.Tensor] = None
    # token models, optional: [B, T] bool, the targets that count in the loss (instruction data: the
    # completion's or the assistant's tokens only)
    loss_mask: Optional[torch.Tensor] = None


class Source:
    name = "data"

    def batch(self, step: int, batch: int, seq: int, rank: int = 0, world: int = 1, split: str = "train") -> Batch:
        """Rank ``rank``'s share of the global batch of ``step`` (sequences [rank·B/N, (rank+1)·B/N))."""
        share = batch // world
        rows = range(rank * share, (rank + 1) * share)
        return self.rows(step, rows, seq, split)

    def rows(self, step: int, rows, seq: int, split: str) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError


def _gen(seed: int, *parts) -> torch.Generator:
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
        g = _gen(seed, "markov")
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
            g = _gen(self.seed, split, step, row)
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

    def rows(self, step, rows, seq, split):
        data = self.data[split]
        if data.numel() < seq + 2:
            raise MoedslError(f"{self.name}: the {split} part has {data.numel()} bytes, fewer than a sequence "
                              f"of {seq + 1}")
        out = torch.empty(len(rows), seq + 1, dtype=torch.int64)
        seed = self.seed if split == "train" else 0  # one held-out set, whatever the training seed
        for i, row in enumerate(rows):
            start = int(torch.randint(0, data.numel() - seq - 1, (1,), generator=_gen(seed, split, step, row)))
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


class Regression(Source):
    """input: vectors. x ~ N(0, I); y = W_c · x with c = argmax(x · K), K fixed."""

    name = "synthetic-regression"

    def __init__(self, d: int, seed: int, clusters: int = 8):
        g = _gen(seed, "teacher")
        self.keys = torch.randn(d, clusters, generator=g)
        self.maps = torch.randn(clusters, d, d, generator=g) / d ** 0.5
        self.d, self.seed = d, seed

    def rows(self, step, rows, seq, split):
        x = torch.stack([torch.randn(seq, self.d, generator=_gen(self.seed, split, step, r)) for r in rows])
        c = (x @ self.keys).argmax(-1)
        y = torch.einsum("btd,bted->bte", x, self.maps[c])
        return Batch(x, y)


class Images(Source):
    """Labelled images (model.input: image), split once into training and held-out sets."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int, name: str):
        n = images.shape[0]
        order = torch.randperm(n, generator=_gen(0, "image-split", name, n))  # the data's own, not the run's
        held = n // 6
        self.data = {"train": (images[order[held:]], labels[order[held:]]),
                     "eval": (images[order[:held]], labels[order[:held]])}
        self.name, self.seed = name, seed
        self._epochs: dict = {}

    def size(self, split: str) -> int:
        return self.data[split][0].shape[0]

    def eval_steps(self, batch: int) -> int:
        """Held-out batches of ``batch`` images that cover the held-out set once."""
        return max(math.ceil(self.size("eval") / batch), 1)

    def _epoch(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            self._epochs[epoch] = torch.randperm(self.size("train"), generator=_gen(self.seed, "epoch", epoch))
        return self._epochs[epoch]

    def batch(self, step, batch, seq, rank=0, world=1, split="train"):
        share = batch // world
        stream = [step * batch + r for r in range(rank * share, (rank + 1) * share)]
        images, labels = self.data[split]
        n = images.shape[0]
        if split == "train":
            index = torch.tensor([int(self._epoch(i // n)[i % n]) for i in stream], dtype=torch.int64)
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


def source_problems(spec, data: str, seq: int) -> list:
    """What is wrong with ``data`` as the source of a run of ``spec`` with sequences of ``seq``
    tokens: one message per problem, each naming --data and its value (empty: nothing).
    Cheap: a text file is looked at (os.stat) but not read, pystdlib is not gathered."""
    m = spec.model
    if m.input == "image":
        return _image_problems(spec, data, seq)
    if m.input == "vectors":
        if data not in ("synthetic", "synthetic-regression"):
            return [f"--data {data!r}: a spec over vectors (model.input: vectors) trains on the built-in "
                    "regression task: use synthetic"]
        return []
    if data == "synthetic":
        return [] if m.vocab_size >= 16 else [
            f"--data synthetic needs model.vocab_size >= 16, the spec has {m.vocab_size}"]
    problems = []
    if m.vocab_size < 256:
        problems.append(f"--data {data!r}: byte-level data needs model.vocab_size >= 256, the spec has "
                        f"{m.vocab_size}")
    if data == "pystdlib":
        return problems
    path = Path(data)
    try:
        st = path.stat()
    except OSError as e:
        what = "no such file" if isinstance(e, FileNotFoundError) else e.strerror or str(e)
        return problems + [f"--data {data!r}: {what} (give a text file, synthetic or pystdlib)"]
    if path.is_dir():
        return problems + [f"--data {data!r} is a directory: give a text file, synthetic or pystdlib"]
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


def make_source(spec, data: str, seed: int) -> Source:
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
    if data == "synthetic":
        return Synthetic(m.vocab_size, seed)
    if data == "pystdlib":
        train, held, _ = pystdlib_bytes()
        return Bytes(train, held, m.vocab_size, seed, "pystdlib")
    path = Path(data)
    if path.is_dir():
        raise MoedslError(f"--data {data!r} is a directory: give a text file, synthetic or pystdlib")
    if not path.is_file():
        raise MoedslError(f"--data {data!r}: no such file (give a text file, 'synthetic' or 'pystdlib')")
    raw = path.read_bytes()
    if len(raw) < MIN_TEXT_BYTES:
        raise MoedslError(f"--data {data!r} has {len(raw)} bytes: too little text to train on")
    cut = int(len(raw) * (1 - HELD_OUT))
    return Bytes(raw[:cut], raw[cut:], m.vocab_size, seed, path.name)
