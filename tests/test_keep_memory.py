"""``keep_freed_memory`` (what `moedsl run` does on a CPU): once the heap has its working size
(three warm-up steps), a step that allocates and frees the same large tensors touches next to
no new pages; glibc's default faults them all in again every time. ``release_freed_memory``
hands the kept pages back."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from moedsl.runtime.cpu import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    def step():  # 64 MiB and 16 MiB of activations, filled and freed, like a forward + backward
        a = torch.ones(4096, 4096)
        b = torch.ones(2048, 2048)
        return float(a[-1, -1] + b[-1, -1])
    for _ in range(3):  # the heap reaches its working size in the first steps
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_kept_memory_is_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        applied, n = out.stdout.split()
        return applied == "True", int(n)

    applied, kept = faults("keep")
    assert applied
    _, default = faults("default")
    pages = 5 * (80 << 20) // 4096  # what five steps touch
    assert default > pages // 2, f"glibc's default should fault the blocks in again: {default} faults"
    # glibc's default faults in about every page every step; kept, at most a block now and then
    assert kept < pages // 10, f"kept memory still faulted {kept} of {pages} pages in five steps"


RELEASE = textwrap.dedent("""
    import torch
    from moedsl.runtime.cpu import keep_freed_memory, release_freed_memory
    keep_freed_memory()
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 >> 20
    base = rss()
    for n in range(8, 40):  # new shapes every time, as a benchmark's rows: the kept heap fragments
        a = torch.ones(n * 1024, 1024)
        b = torch.ones(n * 512, 1000 + n)
        del a, b
    kept = rss() - base
    release_freed_memory()
    print(kept, rss() - base)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_released_memory_goes_back():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept, after = map(int, out.stdout.split())
    assert kept > 150, f"the kept heap should hold the freed blocks (grew {kept} MiB)"
    assert after < 40, f"release_freed_memory left {after} MiB of {kept} MiB"
