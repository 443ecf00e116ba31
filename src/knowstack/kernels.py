"""The CPU kernel path torch computes on: pinned where a setting can pin it, and recorded with what it made.

MKL (torch's matrix products on x86) splits its sums by thread count and picks its code by CPU unless its
conditional numerical reproducibility is on; then its sums are the same on 1 or more threads and on any CPU
that has the branch's instructions (torch's own kernels still pick their code by CPU, and split larger sums by
thread count). MKL reads MKL_CBWR at its first call, so setting it when knowstack is
imported (knowstack/__init__.py; spawned workers inherit the environment) is in time unless a matrix product
ran before. A user's own MKL_CBWR wins; an empty one is MKL's default (off). docs/builtin-world.md says what
is identical under which settings, measured (scripts/kernel_paths.py).
"""

from __future__ import annotations

import os

# AVX2 is the widest branch every x86-64 CPU of the last decade has; STRICT makes sums independent of threads.
DEFAULT_MKL_CBWR = "AVX2,STRICT"


def pin_mkl() -> None:
    """MKL's reproducible mode, unless the user chose MKL_CBWR (an empty value: MKL's default)."""
    os.environ.setdefault("MKL_CBWR", DEFAULT_MKL_CBWR)


def large_pages_for_tensors() -> None:
    """torch's large tensors (2 MB and up) in transparent huge pages where the kernel grants them on request
    (THP_MEM_ALLOC_ENABLE, unless the user set it): a merge's fresh tensors then fault a page in per 2 MB, not
    per 4 KB (a third of a streamed merge's CPU time went to page faults). torch reads the variable at its first
    tensor allocation, so it counts in a process whose first tensors are the caller's (`knowstack merge`) and
    changes nothing in one that allocated before; it changes no number, only where memory comes from."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def sums_independent_of_threads() -> bool:
    """Whether MKL runs in its strict reproducible mode here, in which its sums do not depend on the thread count:
    then the test world's steps give the same bytes on any thread count (the tests assert it; the larger worlds'
    fine-tunes differ still, torch's own kernels splitting their sums: docs/builtin-world.md)."""
    return "STRICT" in os.environ.get("MKL_CBWR", "").upper()


def kernel_path() -> dict[str, object]:
    """What selects the kernels here: torch's CPU capability, oneDNN's ISA cap, MKL's mode, the thread count."""
    import torch

    return {"cpu": cpu_model(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or "default (the CPU's best)",
            "mkl_cbwr": os.environ.get("MKL_CBWR") or "MKL default (off)", "torch_threads": torch.get_num_threads()}


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the machine's architecture."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
