"""Measure a trial's peak memory, and say what kind of memory it was.

On CUDA the figure is `torch.cuda.max_memory_reserved` (memory_kind "cuda_reserved"): what the
caching allocator held at its peak, which is what decides an OOM. `max_memory_allocated` and,
when NVML is available, the device-level used memory (which includes other processes packed on
the same GPU and the CUDA context) are reported alongside.

On CPU the figure is the peak resident set size of the trial's process (memory_kind "host_rss"),
reset at the start of the trial through /proc/self/clear_refs so that a reused Ray actor does not
carry the previous trial's peak. It includes the Python interpreter and imported libraries; it
is host RAM, never to be read as VRAM. Beside it a CPU trial reports its tensor peak
(`TensorPeakProbe`, kind "cpu_tensor_peak"): the most bytes of tensor storage alive at once during
its first optimizer steps and its first evaluation, counted from the allocator's own events by
torch.profiler. That figure moves with r, target modules and batch size, and is what the
estimator's allocated bytes predict for the same device and dtypes.
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
        # The peak before the latest `section`, which reset the counters to measure itself.
        self._floor: MemoryReading | None = None

    def reset(self) -> None:
        """Start measuring from now."""
        self._floor = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        gc.collect()
        if self.is_cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._nvml_handle = _nvml_handle(self.device)
        elif not _reset_vm_hwm():
            self._sampler = _RssSampler()

    def read(self) -> MemoryReading:
        """The peak since `reset`, in MiB (a `section` in between does not lower it)."""
        current = self._read()
        floor = self._floor
        if floor is None:
            return current
        allocated = [x for x in (floor.cuda_allocated_mib, current.cuda_allocated_mib) if x is not None]
        return MemoryReading(
            peak_memory_mib=max(floor.peak_memory_mib, current.peak_memory_mib),
            memory_kind=current.memory_kind,
            cuda_allocated_mib=max(allocated) if allocated else None,
            nvml_used_mib=current.nvml_used_mib,
        )

    def section(self, fn: Any) -> MemoryReading:
        """Run `fn()` and return the peak memory while it ran (same kind as `read`), keeping the
        peak since `reset` for later reads: the counters are reset for the section, and what they
        held before becomes a floor."""
        self._floor = self.read()
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        self._reset_counters()
        fn()
        return self._read()

    def _read(self) -> MemoryReading:
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


# --- the CPU tensor peak ----------------------------------------------------------------------------
#
# Host RSS drowns a small model in Python and its libraries (every smoke-sweep trial reads 620-680
# MiB). The tensor peak is what moves with the configuration: the most bytes of tensor storage alive
# at once (parameters, gradients, optimizer states, activations, temporaries) during the first
# optimizer steps and around the first evaluation. torch.profiler(profile_memory=True) reports every
# allocation and free of PyTorch's CPU allocator ("[memory]" events, + and - bytes); their running
# sum in time order, plus the storages the trial already held when the window opened, is the number
# of live tensor bytes at every moment of the window, and its maximum is the peak.
#
# What the allocator reports, and what follows from it (torch 2.13, c10 ProfiledCPUMemoryReporter):
# * A free is reported only for a block allocated while a profiler ran in this process (the
#   allocator keeps their sizes; "Memory block of unknown size..." is logged for the others). So the
#   frees of tensors that were alive before the window do not show: if the window freed one, the
#   figure would be high by its size. The windows open where nothing the trial held is freed: at the
#   start of training (model and optimizer only) and after an optimizer step has zeroed the
#   gradients (model and optimizer states only). The allocator keeps the sizes of a window's blocks
#   after it closes, so a later window does see the free of a block from an earlier one (and counts
#   it right: such a block is in that window's starting total if it is still alive).
# * Only allocations through PyTorch's allocator are seen: oneDNN's or OpenMP's own scratch memory
#   and Python objects are not (the GPU estimator does not count them either).
# * Recording every op costs time: only TENSOR_PEAK_STEPS optimizer steps and the first
#   TENSOR_PEAK_EVAL_BATCHES batches of the first evaluation are profiled, and `overhead_s` (the
#   profiler's start, stop and this module's bookkeeping) is reported with the figure: about 0.3 s a
#   trial on the builtin tiny model, plus about a second for the profiler's first start in a
#   process (docs/memory.md).

TENSOR_PEAK_KIND = "cpu_tensor_peak"
TENSOR_PEAK_STEPS = 3  # optimizer steps profiled from the start of training: the states exist from step 1
TENSOR_PEAK_EVAL_BATCHES = 4  # batches of the first evaluation profiled (the eval set can be large)
_MEMORY_EVENT = "[memory]"


def running_peak(deltas: Any) -> tuple[int, int]:
    """(highest running sum, final sum) of allocations (+bytes) and frees (-bytes) in time order.

    The highest is at least 0 (the start of the window counts).
    """
    running = peak = 0
    for delta in deltas:
        running += int(delta)
        if running > peak:
            peak = running
    return peak, running


def storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct CPU storages behind `tensors` (views and tied weights counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        try:
            if tensor.device.type != "cpu" or tensor.is_sparse:
                continue
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (meta, some subclasses)
            continue
        seen.setdefault(storage.data_ptr(), storage.nbytes())
    return sum(seen.values())


def _quant_state_tensors(state: Any, depth: int = 0) -> Any:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset) and of its nested state2."""
    import torch

    if depth > 2:
        return
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif value is not None and hasattr(value, "absmax"):
            yield from _quant_state_tensors(value, depth + 1)


def trial_tensors(model: Any, optimizer: Any = None) -> Any:
    """What a trial holds between steps: parameters, gradients, buffers, 4-bit quantization states, optimizer states."""
    import torch

    for param in model.parameters():
        yield param
        if param.grad is not None:
            yield param.grad
        state = getattr(param, "quant_state", None)
        if state is not None:
            yield from _quant_state_tensors(state)
    yield from model.buffers()
    for state in (getattr(optimizer, "state", None) or {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


@dataclass
class TensorWindow:
    """One profiled stretch of a trial: what was live at its start, and its highest live total."""

    phase: str  # "train" (the first optimizer steps) or "eval" (the first evaluation)
    baseline_bytes: int
    peak_bytes: int  # baseline + the highest running sum of the window's allocator events
    events: int
    steps: int  # optimizer steps inside the window


@dataclass
class TensorPeakReading:
    """The CPU tensor peak of a trial: the highest of its profiled windows (memory kind cpu_tensor_peak)."""

    windows: list[TensorWindow]
    batch_size: int | None  # the largest training micro-batch the windows saw (rows)
    seq_len: int | None  # the longest padded sequence length among those batches
    overhead_s: float

    @property
    def peak_bytes(self) -> int:
        return max(w.peak_bytes for w in self.windows)

    @property
    def phase(self) -> str:
        return max(self.windows, key=lambda w: w.peak_bytes).phase

    def as_metrics(self) -> dict[str, Any]:
        def peak_of(phase: str) -> float | None:
            peaks = [w.peak_bytes for w in self.windows if w.phase == phase]
            return round(max(peaks) / MIB, 4) if peaks else None

        return {
            "tensor_peak_mib": round(self.peak_bytes / MIB, 4),
            "tensor_peak_kind": TENSOR_PEAK_KIND,
            "tensor_peak_phase": self.phase,
            "tensor_peak_train_mib": peak_of("train"),
            "tensor_peak_eval_mib": peak_of("eval"),
            "tensor_baseline_mib": round(min(w.baseline_bytes for w in self.windows) / MIB, 4),
            "tensor_peak_steps": sum(w.steps for w in self.windows if w.phase == "train"),
            "tensor_peak_batch_size": self.batch_size,
            "tensor_peak_seq_len": self.seq_len,
            "tensor_peak_overhead_s": round(self.overhead_s, 3),
        }


class TensorPeakProbe:
    """Measures the CPU tensor peak of a trial over a few profiled windows (see the section comment).

    The trainable's reporter opens the train window at the start of training, closes it after
    `steps` optimizer steps, opens the eval window after the step that triggers the first evaluation
    and closes it when that evaluation ends. `reading()` is the result so far; None before a window
    has closed, or when the profiler could not be started (e.g. another profiler runs in this process:
    `unavailable` says why).

    Args:
        steps: Optimizer steps the train window covers.
    """

    def __init__(self, steps: int = TENSOR_PEAK_STEPS) -> None:
        self.steps = steps
        self.windows: list[TensorWindow] = []
        self.unavailable: str | None = None
        self.eval_done = False
        self.train_done = False
        self._profiler: Any = None
        self._phase = ""
        self._baseline = 0
        self._steps_in_window = 0
        self._hook: Any = None
        self._shapes: list[tuple[int, int]] = []
        self._overhead = 0.0

    @property
    def active(self) -> bool:
        return self._profiler is not None

    @property
    def phase(self) -> str:
        return self._phase if self.active else ""

    @property
    def steps_in_window(self) -> int:
        return self._steps_in_window if self.active else 0

    def start(self, phase: str, model: Any, optimizer: Any = None) -> None:
        """Open a window: count what the trial holds now, start the profiler and watch the batch shapes."""
        if self.active or self.unavailable:
            return
        import time as _time

        began = _time.perf_counter()
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto prints a line per start and stop otherwise
        import torch
        from torch.profiler import ProfilerActivity, profile

        if torch.autograd.profiler._is_profiler_enabled or torch._C._autograd._profiler_enabled():
            # A second profiler would take over the first one's session and end it: leave the user's alone.
            self.unavailable = "another torch.profiler is running in this process"
            return
        self._baseline = storage_bytes(trial_tensors(model, optimizer))
        profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        try:
            profiler.__enter__()
        except RuntimeError as exc:  # "profiler already enabled" (a user's own profiler) and the like
            self.unavailable = f"torch.profiler could not start: {str(exc).splitlines()[0] if str(exc) else exc}"
            return
        self._profiler, self._phase, self._steps_in_window = profiler, phase, 0
        if phase == "train":
            self._hook = model.register_forward_pre_hook(self._record_shape, with_kwargs=True)
        self._overhead += _time.perf_counter() - began

    def step_done(self) -> None:
        if self.active:
            self._steps_in_window += 1

    def stop(self) -> None:
        """Close the open window and record its peak."""
        if not self.active:
            return
        import time as _time

        began = _time.perf_counter()
        profiler, self._profiler = self._profiler, None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        profiler.__exit__(None, None, None)
        deltas = [
            (event.start_ns(), i, event.nbytes())
            for i, event in enumerate(profiler.profiler.kineto_results.events())
            if event.name() == _MEMORY_EVENT and _is_host(event.device_type())
        ]
        deltas.sort()
        peak, _ = running_peak(d for _, _, d in deltas)
        self.windows.append(
            TensorWindow(self._phase, self._baseline, self._baseline + peak, len(deltas), self._steps_in_window)
        )
        if self._phase == "train":
            self.train_done = True
        else:
            self.eval_done = True
        self._overhead += _time.perf_counter() - began

    def close(self) -> None:
        """Stop a window left open (the trial ended or failed inside it) without recording it."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            try:
                profiler.__exit__(None, None, None)
            except Exception:  # already torn down with the failing trial; nothing to record
                pass

    def reading(self) -> TensorPeakReading | None:
        if not self.windows:
            return None
        return TensorPeakReading(
            windows=list(self.windows),
            batch_size=max((b for b, _ in self._shapes), default=None),
            seq_len=max((s for _, s in self._shapes), default=None),
            overhead_s=self._overhead,
        )

    def _record_shape(self, module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids") if kwargs else None
        if ids is None and args:
            ids = args[0]
        shape = getattr(ids, "shape", None)
        if module.training and shape is not None and len(shape) == 2:
            self._shapes.append((int(shape[0]), int(shape[1])))


def _is_host(device_type: Any) -> bool:
    """CPU, MKLDNN and IDEEP allocations count as host tensor memory (as torch.profiler's own tables count them)."""
    return str(device_type).rsplit(".", 1)[-1] in ("CPU", "MKLDNN", "IDEEP")
