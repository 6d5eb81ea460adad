"""Instruction data: ``--data FILE.jsonl`` whose records are prompt/completion pairs or chat
conversations, trained with the loss on the answer's tokens only (``Batch.loss_mask``).

    {"prompt": "Capital of France?", "completion": " Paris."}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

The first record says which (a JSONL with ``text`` is a plain corpus, not this); every record must
then be of that kind, and each one that is not (not JSON, a key missing, a value of the wrong type)
is one ``UserError`` naming ``file:line``. Text is tokenized with the model's tokenizer
(``tokens.model_tokenizer``: the spec's ``model.tokenizer`` or the import's tokenizer.json).

- prompt/completion: ids = [what the tokenizer puts before a sequence: bos, if any] +
  enc(prompt) + enc(completion) + [eos]; the loss covers the completion's tokens and the eos.
- messages: the conversation rendered with the tokenizer's chat template (runtime/chat_template.py,
  as transformers renders it) and encoded without added special tokens (the template writes them,
  as ``apply_chat_template`` encodes with ``add_special_tokens=False``). The loss covers the
  assistant's text: a template that marks it with ``{% generation %}`` blocks gives those spans
  (transformers' ``return_assistant_tokens_mask``); any other template, for each assistant message
  i, the characters between the conversation up to message i rendered with the generation prompt
  and the conversation up to message i inclusive: exactly what a model prompted with the first
  must generate, its end-of-turn marker included. A token counts when its characters overlap a
  span (transformers' rule: a token straddling a span's edge counts, so a span's edges are never
  lost to a merge across them).

Each example is one row of seq + 1 tokens: cut at seq + 1 (counted: ``notes``), or padded with the
pad token (else eos), the padding outside the loss. Training batch s, row r is example s·B + r of
an endless stream of epochs, each a permutation of the training examples seeded by (seed, epoch)
(runtime/data.py ``Images``), so a resumed run and N processes see the single process's batches.
One example in ``HOLD_OUT`` (by a stable hash of its line, at least one) is held out; held-out batch
s, row r is held-out example (s·B + r) mod their number.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from moedsl.errors import UserError

from .chat_template import TemplateRefused, find_chat_template, special_tokens
from .data import Batch, Epochs, Source
from .tokens import model_tokenizer

HOLD_OUT = 20  # one example in 20 (5%) held out, by the hash of its line; at least one
SNIFF_BYTES = 1 << 26  # detection reads at most this much of a file for its first record (one line)
PROMPT, MESSAGES = "prompt/completion", "messages"
PAIRS = "source/target"  # train.objective seq2seq's records (runtime/seq2seq.py)
# eos by name, where the tokenizer's config names none (byte-level BPE tokenizers and the like)
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


def kind_of(path) -> Optional[str]:
    """PROMPT or MESSAGES where the first record of ``path`` (a JSONL file) has those keys, else None
    (not a file, not JSONL, or a plain corpus such as ``{"text": ...}``). Cheap: one line read."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        with open(p, "rb") as f:
            if f.read(1).strip() not in (b"{", b""):  # a JSONL of objects starts with one (blank lines aside)
                return None
            f.seek(0)
            line = f.readline(SNIFF_BYTES)
            while line and not line.strip():
                line = f.readline(SNIFF_BYTES)
    except OSError:
        return None
    if line.strip():
        try:
            first = json.loads(line)
        except ValueError:
            return None
        if not isinstance(first, dict):
            return None
        if "messages" in first:
            return MESSAGES
        if "prompt" in first or "completion" in first:
            return PROMPT
    return None


@dataclass
class Record:
    line: int  # 1-based line of the file
    value: dict
    key: int  # stable hash of the line: which split it belongs to


def read_records(path, kind: str) -> list:
    """Every record of ``path``, checked: a bad one is a ``UserError`` naming ``file:line`` and why;
    fewer than two (one is held out), a ``UserError``."""
    path = Path(path)
    records = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"--data {path}: cannot be read ({e.strerror or e})") from None
    with f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                value = json.loads(raw)
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            except ValueError as e:
                raise UserError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(value, dict):
                raise UserError(f"{where}: a JSON {_json_type(value)}, not an object ({kind} records)")
            _check_record(value, kind, where)
            records.append(Record(n, value, int.from_bytes(hashlib.blake2b(raw.strip(), digest_size=8).digest(),
                                                           "little")))
    if len(records) < 2:
        raise UserError(f"--data {path}: {len(records)} record(s): at least 2 (one is held out)")
    return records


def held_out(records: list, examples: list) -> dict:
    """{"train": [...], "eval": [...]}: ``examples`` (one per record) split by their records' line
    hashes, one in ``HOLD_OUT`` held out (at least one, never all)."""
    held = [i for i, r in enumerate(records) if r.key % HOLD_OUT == 0]
    if not held or len(held) == len(records):
        held = [min(range(len(records)), key=lambda i: records[i].key)]
    held_set = set(held)
    return {"eval": [examples[i] for i in held], "train": [e for i, e in enumerate(examples) if i not in held_set]}


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def _check_record(value: dict, kind: str, where: str) -> None:
    if kind in (PROMPT, PAIRS):
        why = ("the file's first record is a prompt/completion pair" if kind == PROMPT else
               "train.objective seq2seq")
        for key in kind.split("/"):
            if key not in value:
                raise UserError(f"{where}: no {key!r} ({why}: every record needs both {' and '.join(kind.split('/'))})")
            if not isinstance(value[key], str):
                raise UserError(f"{where}: {key!r} is a JSON {_json_type(value[key])}, not a string")
        return
    messages = value.get("messages", None)
    if "messages" not in value:
        raise UserError(f"{where}: no 'messages' (the file's first record is a conversation: every record needs "
                        "messages)")
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if isinstance(messages, list) else f"a JSON {_json_type(messages)}"
        raise UserError(f"{where}: 'messages' is {what}, not a list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: messages[{i}] is a JSON {_json_type(m)}, not a {{role, content}} object")
        for key in ("role", "content"):
            if key not in m:
                raise UserError(f"{where}: messages[{i}] has no {key!r}")
            if not isinstance(m[key], str):
                raise UserError(f"{where}: messages[{i}].{key} is a JSON {_json_type(m[key])}, not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message (the loss covers the assistant's text: nothing to learn)")


# ----------------------------------------------------------------------------------- the tokenizer

class Codec:
    """The model's tokenizer for instruction data: its ids, offsets and special tokens."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"{path}: reading it needs the tokenizers library: pip install 'moedsl[data]'") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library's own error for a broken file
            raise UserError(f"{path}: not a tokenizer.json the tokenizers library reads ({e})") from None
        self.path = path
        self.template = find_chat_template(path)
        named = special_tokens(path)
        self.eos = self._id(named.get("eos_token"), EOS_NAMES)
        if self.eos is None:
            raise UserError(f"{path}: no eos token (tokenizer_config.json eos_token, or an added token named "
                            f"{' '.join(EOS_NAMES[:3])} ...): instruction data ends each completion with it")
        pad = self._id(named.get("pad_token"), PAD_NAMES)
        self.pad = self.eos if pad is None else pad
        # what the tokenizer's post-processor puts before a sequence (Llama's bos; none for GPT-2 or Qwen)
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        at = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), 0)
        self.prefix = full[:at]

    def _id(self, token: Optional[str], names: tuple) -> Optional[int]:
        if token is not None and self.tok.token_to_id(token) is not None:
            return self.tok.token_to_id(token)
        added = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        return next((self.tok.token_to_id(n) for n in names if n in added), None)

    def encode(self, texts: list) -> list:
        return self.tok.encode_batch(texts, add_special_tokens=False)


def tokenize(records: list, kind: str, codec: Codec, path) -> list:
    """[(ids int64 [n], counts bool [n]: token i is a target in the loss)] for each record."""
    if kind == PROMPT:
        prompts = codec.encode([r.value["prompt"] for r in records])
        completions = codec.encode([r.value["completion"] for r in records])
        out = []
        for p, c in zip(prompts, completions):
            ids = codec.prefix + p.ids + c.ids + [codec.eos]
            counts = np.zeros(len(ids), dtype=bool)
            counts[len(codec.prefix) + len(p.ids):] = True
            out.append((np.asarray(ids, dtype=np.int64), counts))
        return out
    texts, spans = [], []
    for r in records:
        text, s = _assistant_spans(codec.template, r.value["messages"], f"{path}:{r.line}")
        texts.append(text)
        spans.append(s)
    out = []
    for enc, s in zip(codec.encode(texts), spans):
        out.append((np.asarray(enc.ids, dtype=np.int64), _overlapping(enc.offsets, s)))
    return out


def _assistant_spans(template, messages: list, where: str) -> tuple:
    """(rendered text, [(start, end)] character spans of the assistant's text): the module docstring."""
    try:
        if template.marks_generation:
            return template.spans(messages)
        full = template.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = template.render(messages[:i], add_generation_prompt=True)
            upto = template.render(messages[:i + 1])
            if not (full.startswith(upto) and upto.startswith(before)):
                raise UserError(f"{where}: the chat template renders the conversation up to messages[{i}] (an "
                                "assistant's) as other than a prefix of the whole, so its text cannot be told apart")
            spans.append((len(before), len(upto)))
        return full, spans
    except TemplateRefused as e:
        raise UserError(f"{where}: {e}") from None


def _overlapping(offsets: list, spans: list) -> np.ndarray:
    """bool per token: its characters [start, end) overlap one of ``spans`` (both in order)."""
    mask = np.zeros(len(offsets), dtype=bool)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = True
    return mask


# ----------------------------------------------------------------------------------- the source

class Instructions(Source):
    """prompt/completion or chat examples of one JSONL file, a row each (module docstring)."""

    def __init__(self, path, spec, seed: int, init=None):
        self.path = Path(path)
        self.name, self.seed = self.path.name, seed
        self.kind = kind_of(self.path)
        tokenizer = model_tokenizer(spec, init)
        problem = tokenizer_problem(tokenizer, self.kind, str(path))
        if problem:
            raise UserError(problem)
        self.codec = Codec(Path(tokenizer))
        self.tokenizer = Path(tokenizer)
        problem = template_problem(self.codec, self.kind, str(path))
        if problem:
            raise UserError(problem)
        records = read_records(self.path, self.kind)
        examples = tokenize(records, self.kind, self.codec, self.path)
        self.examples = held_out(records, examples)
        hi = max(int(ids.max()) for ids, _ in examples if ids.size)
        if hi >= spec.model.vocab_size:
            raise UserError(f"--data {path}: token id {hi} from {tokenizer} is outside model.vocab_size "
                            f"{spec.model.vocab_size}")
        self._epochs = Epochs(self.size("train"), seed, "instruct-epoch")

    def size(self, split: str) -> int:
        return len(self.examples[split])

    def notes(self, seq: int) -> list:
        """What the run's first lines say about the data: the tokenizer, the examples, how many are cut."""
        examples = self.examples["train"] + self.examples["eval"]
        cut = [counts for ids, counts in examples if ids.size > seq + 1]
        lost = sum(1 for counts in cut if not counts[1:seq + 1].any())
        cuts = f"{self.name}: {len(cut)} of {len(examples)} examples truncated to seq+1 = {seq + 1} tokens"
        return [f"{self.name}: {len(examples)} {self.kind} examples ({self.size('eval')} held out), tokenized with "
                f"{self.codec.path}", cuts + (f" ({lost} of them keep no token of the answer)" if lost else "")]

    def batch(self, step, batch, seq, rank=0, world=1, split="train"):
        stream = Epochs.stream(step, batch, rank, world)
        n = self.size(split)
        index = [self._epochs.order(i) if split == "train" else i % n for i in stream]
        rows = torch.full((len(index), seq + 1), self.codec.pad, dtype=torch.int64)
        counts = torch.zeros(len(index), seq + 1, dtype=torch.bool)
        for r, i in enumerate(index):
            ids, c = self.examples[split][i]
            k = min(ids.size, seq + 1)
            rows[r, :k] = torch.from_numpy(ids[:k])
            counts[r, :k] = torch.from_numpy(c[:k])
        return Batch(rows[:, :-1], rows[:, 1:], loss_mask=counts[:, 1:])


def tokenizer_problem(tokenizer, kind: Optional[str], data: str) -> Optional[str]:
    """Why instruction data ``data`` cannot be tokenized with the model's ``tokenizer`` (None: it can)."""
    if tokenizer is None:
        return (f"--data {data!r}: instruction data ({kind}) is tokenized with the model's tokenizer, and this "
                "model has none (model.tokenizer in the spec, or --init an import folder with tokenizer.json)")
    if not Path(tokenizer).is_file():
        return f"--data {data!r}: the model's tokenizer {tokenizer}: no such file"
    return None


def template_problem(codec: Codec, kind: Optional[str], data: str) -> Optional[str]:
    """Why chat data ``data`` cannot be rendered with ``codec``'s tokenizer (None: it can, or it is not chat)."""
    if kind != MESSAGES or codec.template is not None:
        return None
    return (f"--data {data!r}: chat messages are rendered with the tokenizer's chat template, and "
            f"{codec.path.parent} has none (tokenizer_config.json chat_template, or chat_template.jinja)")


def problems(spec, data: str, init=None) -> list:
    """``source_problems`` for instruction data: the tokenizer, its chat template, every record
    (read and checked, and each conversation rendered once; nothing is tokenized)."""
    kind = kind_of(data)
    tokenizer = model_tokenizer(spec, init)
    problem = tokenizer_problem(tokenizer, kind, data)
    if problem:
        return [problem]
    try:
        codec = Codec(Path(tokenizer))
        problem = template_problem(codec, kind, data)
        if problem:
            return [problem]
        vocab = codec.tok.get_vocab_size(with_added_tokens=True)
        if vocab > spec.model.vocab_size:
            return [f"--data {data!r}: the tokenizer {tokenizer} has {vocab} tokens, more than model.vocab_size "
                    f"{spec.model.vocab_size}"]
        records = read_records(data, kind)
        if kind == MESSAGES:
            for r in records:
                try:
                    codec.template.render(r.value["messages"])
                except UserError as e:
                    return [f"{data}:{r.line}: {e}"]
    except UserError as e:
        return [str(e)]
    return []
