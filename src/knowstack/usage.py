"""What a piece of work cost: wall seconds, peak host memory (RSS) and peak GPU memory of this process, and the
disk size of what it wrote. Train steps record it in train_summary.json, every study step in its step.json ("cost").

Peak host memory is the kernel's high-water mark (VmHWM), reset at the start (Linux: /proc/self/clear_refs "5")
so that a process that ran earlier steps reports this step's peak; where it cannot be reset (another OS, a
kernel that refuses), it is the process's peak since it started (`peak_host_scope` says which: "step" or
"process"), an upper bound.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak_host() -> bool:
    """Resets this process's RSS high-water mark; False where the OS cannot."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm() is not None


def peak_host_bytes() -> int:
    """This process's peak resident memory since the last reset (or since it started)."""
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux kB


def _vm_hwm() -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cuda() -> Any:
    """torch.cuda where this process has already used a GPU; None otherwise (importing torch only to ask
    would cost a CPU step seconds, and initialising CUDA here would take a GPU from a step that has none)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def reset_peak_gpu() -> None:
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()


def peak_gpu_bytes() -> int | None:
    """The most GPU memory torch allocated in this process since the reset; None where no GPU was used."""
    cuda = _cuda()
    return int(cuda.max_memory_allocated()) if cuda is not None else None


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """The size of the files under `path` (or of the file), links not followed."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def torch_threads() -> int:
    """The torch thread count of this process: on some models a step's sums, so its numbers, depend on it."""
    import torch

    return torch.get_num_threads()


class Usage:
    """Measures the work in its `with` block: `record()` gives seconds, peak_host_bytes, peak_host_scope and
    peak_gpu_bytes (None where no GPU was used)."""

    @classmethod
    def start(cls) -> Usage:
        """A measurement running from now, for a function that cannot wrap its body in `with`."""
        return cls().__enter__()

    def __enter__(self) -> Usage:
        self._scope = "step" if reset_peak_host() else "process"
        reset_peak_gpu()
        self._start = time.perf_counter()
        self._done: dict[str, Any] | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        self._done = self._measure()  # a later block resets the peaks: keep this one's

    def record(self) -> dict[str, Any]:
        """The block's numbers; inside it, so far."""
        return self._done if self._done is not None else self._measure()

    def _measure(self) -> dict[str, Any]:
        return {"seconds": round(time.perf_counter() - self._start, 3), "peak_host_bytes": peak_host_bytes(),
                "peak_host_scope": self._scope, "peak_gpu_bytes": peak_gpu_bytes()}
