"""Measure a trial's peak memory, and say what kind of memory it was.

On CUDA the figure is `torch.cuda.max_memory_reserved` (memory_kind "cuda_reserved"): what the
caching allocator held at its peak, which is what decides an OOM. `max_memory_allocated` and,
when NVML is available, the device-level used memory (which includes other processes packed on
the same GPU and the CUDA context) are reported alongside.

On CPU the figure is the peak resident set size of the trial's process (memory_kind "host_rss"),
reset at the start of the trial through /proc/self/clear_refs so that a reused Ray actor does not
carry the previous trial's peak. It includes the Python interpreter and imported libraries; it
is host RAM, never to be read as VRAM.
"""

from __future__ import annotations

import gc
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

MIB = 2**20


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _reset_vm_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS; Linux >= 4.0
        return True
    except OSError:
        return False


class _RssSampler:
    """Fallback where /proc/self/clear_refs is not writable: sample RSS every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class MemoryReading:
    peak_memory_mib: float
    memory_kind: str
    cuda_allocated_mib: float | None = None
    nvml_used_mib: float | None = None

    def as_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peak_memory_mib": round(self.peak_memory_mib, 1), "memory_kind": self.memory_kind}
        if self.cuda_allocated_mib is not None:
            out["cuda_allocated_mib"] = round(self.cuda_allocated_mib, 1)
        if self.nvml_used_mib is not None:
            out["nvml_used_mib"] = round(self.nvml_used_mib, 1)
        return out


class PeakMemoryProbe:
    """Tracks the peak memory of one trial on its device.

    Args:
        device: "cuda" or "cpu" (a torch device string; the index of "cuda:N" is honoured).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.is_cuda = device.startswith("cuda")
        self._sampler: _RssSampler | None = None
        self._nvml_handle: Any = None
        self._nvml_peak = 0.0

    def reset(self) -> None:
        """Start measuring from now."""
        gc.collect()
        if self.is_cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._nvml_handle = _nvml_handle(self.device)
        elif not _reset_vm_hwm():
            self._sampler = _RssSampler()

    def read(self) -> MemoryReading:
        """The peak since `reset`, in MiB."""
        if self.is_cuda:
            import torch

            nvml = _nvml_used_mib(self._nvml_handle)
            if nvml is not None:
                self._nvml_peak = max(self._nvml_peak, nvml)
            return MemoryReading(
                peak_memory_mib=torch.cuda.max_memory_reserved(self.device) / MIB,
                memory_kind="cuda_reserved",
                cuda_allocated_mib=torch.cuda.max_memory_allocated(self.device) / MIB,
                nvml_used_mib=self._nvml_peak or None,
            )
        if self._sampler is not None:
            return MemoryReading(self._sampler.peak / MIB, "host_rss")
        return MemoryReading(_vm_hwm_mib() or 0.0, "host_rss")

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()


def _nvml_handle(device: str) -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(device.split(":")[1]) if ":" in device else 0
        # CUDA_VISIBLE_DEVICES renumbers devices; NVML does not. Map through it when set.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v for v in visible.split(",") if v.strip()]
        if ids and ids[index].strip().isdigit():
            index = int(ids[index])
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # NVML is optional: absent library, driver or permissions
        return None


def _nvml_used_mib(handle: Any) -> float | None:
    if handle is None:
        return None
    try:
        import pynvml

        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB
    except Exception:
        return None


def free_memory(device: str) -> None:
    """Return what a finished trial held to the OS / the CUDA driver."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas otherwise
        except OSError:
            pass
