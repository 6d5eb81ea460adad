"""Fault injection for tests: ``MOEDSL_FAULT="exit@STEP[:RANK]"`` ends the process abruptly at that
step (1-based), ``"nan@STEP[:RANK]"`` puts a NaN into the first expert weight before it."""
from __future__ import annotations

import os

import torch


def inject_fault(step: int, rank: int, model) -> None:
    """Called before 0-based ``step``; does nothing unless MOEDSL_FAULT names this step and rank."""
    spec = os.environ.get("MOEDSL_FAULT")
    if not spec:
        return
    kind, _, where = spec.partition("@")
    at, _, who = where.partition(":")
    if int(at) != step + 1 or (who and int(who) != rank):
        return
    if kind == "exit":
        os._exit(3)
    if kind == "nan":
        with torch.no_grad():
            name, p = next((n, p) for n, p in model.named_parameters() if ".experts." in n)
            p.view(-1)[0] = float("nan")
