"""Where and how tensors run: the device of a run, autocast that follows it, torch threads.

Every path (training, evaluation, play, token caches, bench) takes its device from here, so a GPU
machine runs all of them on the GPU, and autocast is always opened for the device type of the
tensors it covers (never a hard-coded "cpu").
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
import time
from contextlib import nullcontext, suppress
from typing import Any

import torch


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or None/`auto` (the GPU when one is visible, else the CPU).

    Asking for CUDA on a machine without one is an error naming the problem, never a silent
    fall-back to the CPU.
    """
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(str(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but no CUDA device is visible")
    return device


def autocast(device: torch.device | str, enabled: bool = True) -> Any:
    """bf16 autocast for `device`'s type (weights stay fp32), or nothing when not enabled."""
    device_type = torch.device(device).type
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def idle_cpus(sample_s: float = 0.25) -> float | None:
    """CPUs the machine left idle over the last `sample_s` seconds (Linux /proc/stat), or None
    where that cannot be read."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total (in jiffies)

    try:
        idle0, total0 = read()
        time.sleep(sample_s)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / (total1 - total0)


def choose_threads(
    requested: int | None = None, processes: int = 1, idle: float | None = None
) -> int:
    """Torch intra-op threads for one process: `requested` when set, else the process's share
    of the CPUs it may use (so 2 DDP ranks on 2 cores get 1 thread each instead of fighting),
    cut to the CPUs other programs leave idle (`idle`, measured when not given).

    Threads that wait for a core another process holds stall every parallel region of a small
    model: with one CPU-bound neighbour on 2 cores a 2-thread step took 2.1x as long, a 1-thread
    step 1.25x. So a busy machine gets fewer threads, an idle one all of its share.
    """
    if requested:
        return int(requested)
    share = max(1, available_cpus() // max(1, processes))
    idle = idle_cpus() if idle is None else idle
    if idle is None:
        return share
    return max(1, min(share, int(idle / max(1, processes) + 0.5)))


def set_threads(requested: int | None = None, processes: int = 1) -> int:
    """Apply `choose_threads` to torch; returns the number set."""
    n = choose_threads(requested, processes)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def release_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS: a garbage collection, then
    glibc's `malloc_trim` (without it, buffers freed by one stage stay in the process for the
    next; a no-op where the C library is another)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_gb() -> dict[str, float]:
    """This process's resident memory now and its peak so far, in GB (peak only off Linux)."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak_kb / 1024**3 if sys.platform == "darwin" else peak_kb / 1024**2  # bytes on macOS
    out = {"peak_rss_gb": round(peak, 3)}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_gb"] = round(int(line.split()[1]) / 1024**2, 3)
    except OSError:
        pass
    return out
