"""Checkpoints with torch.distributed.checkpoint: every rank writes its own experts.

Four modules, one job each; this one re-exports their names for ``from moedsl.runtime import
checkpoint``:

* ``ckpt_format``: what a checkpoint folder holds (DCP shards per global expert, ``meta.json``
  with a format version), which versions this moedsl reads, and reading one back into a model;
* ``ckpt_compat``: what a resume may change (``compare``, ``training_only``);
* ``ckpt_storage``: atomic saves, why a save failed, and which saved checkpoint is newest;
* ``ckpt_resume``: which checkpoint ``--resume`` loads.
"""
from __future__ import annotations

from .ckpt_compat import TRAJECTORY, architecture, compare, fingerprint, training_only
from .ckpt_format import FORMAT, READS, BrokenCheckpoint, load, make_meta, problem, read_meta, state_dict
from .ckpt_resume import resume
from .ckpt_storage import KEEP, latest, newest_first, newest_whole, remove_partial_saves, save

__all__ = ["TRAJECTORY", "architecture", "compare", "fingerprint", "training_only", "FORMAT",
           "READS", "BrokenCheckpoint", "load", "make_meta", "problem", "read_meta", "state_dict", "resume", "KEEP",
           "latest", "newest_first", "newest_whole", "remove_partial_saves", "save"]
