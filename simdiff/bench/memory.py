"""Peak memory of a block of code: the CUDA allocator on GPUs, the resident set's high-water mark on CPU.

On CPU, torch allocates through malloc, which ``tracemalloc`` never sees, so we use the kernel's own
accounting instead: ``VmHWM`` (peak resident set) of this process, reset at the start of the block by
writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), with freed heap memory first returned to the
OS (``malloc_trim``) so that an earlier phase's cached allocations do not hide this phase's growth. The
figure is the whole process's peak RSS (weights included); ``delta`` is the growth above the RSS at the
start of the block (activations and temporaries). Where clear_refs is unavailable a 1 ms sampling thread
is used instead (it can miss very short peaks; ``method`` says which one was used).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
from dataclasses import dataclass

import torch

STATUS = "/proc/self/status"


@dataclass
class PeakMemory:
    """The outcome of :func:`track_peak`: bytes at the start, the peak, and how they were measured."""

    start: int = 0
    peak: int = 0
    method: str = ""

    @property
    def delta(self) -> int:
        """Growth of the peak above the start (activations and temporaries of the block)."""
        return max(0, self.peak - self.start)


def _status_bytes(field: str) -> int:
    with open(STATUS, encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in {STATUS}")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_bytes("VmRSS")


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_bytes()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())


class track_peak:  # noqa: N801 - used like a function: ``with track_peak(device) as peak:``
    """Context manager measuring the peak memory of its block on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.result = PeakMemory()
        self._sampler: _Sampler | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.result.start = torch.cuda.memory_allocated(self.device)
            self.result.method = "torch.cuda.max_memory_allocated"
            return self.result
        _malloc_trim()
        self.result.start = rss_bytes()
        if _reset_hwm():
            self.result.method = "VmHWM after clear_refs"
        else:
            self._sampler = _Sampler()
            self._sampler.start()
            self.result.method = "RSS sampled every 1 ms"
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._sampler.stop.set()
            self._sampler.join()
            self.result.peak = max(self._sampler.peak, rss_bytes())
        else:
            self.result.peak = _status_bytes("VmHWM")
